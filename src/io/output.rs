//! Output files that appear only when complete.
//!
//! Every file a writer creates is first written under a temporary name in the target's
//! folder and renamed into place by [`OutputSet::commit`]. Dropping an uncommitted set
//! removes the temporary files, and the names are also kept in a process-wide registry so
//! that a signal handler can remove them on Ctrl-C ([`remove_pending_files`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn register(path: &Path) {
    if let Ok(mut p) = PENDING.lock() {
        p.push(path.to_path_buf());
    }
}

fn unregister(path: &Path) {
    if let Ok(mut p) = PENDING.lock() {
        p.retain(|q| q != path);
    }
}

/// Registers a temporary file (e.g. a spooled input) for removal on interruption.
pub fn register_temporary(path: &Path) {
    register(path)
}

/// Forgets a temporary file registered with [`register_temporary`].
pub fn unregister_temporary(path: &Path) {
    unregister(path)
}

/// Removes every temporary file not yet committed. Called from the CLI's signal
/// handler; uses `try_lock` so that it never blocks.
pub fn remove_pending_files() {
    if let Ok(p) = PENDING.try_lock() {
        for path in p.iter() {
            let _ = std::fs::remove_file(path);
        }
    }
}

struct Pending {
    temp: PathBuf,
    target: PathBuf,
}

/// Where a writer puts its bytes: files created atomically, or one stream (stdout).
#[derive(Default)]
pub struct OutputSet {
    files: Vec<Pending>,
    stream: Option<Box<dyn Write + Send>>,
    in_place: bool,
}

impl OutputSet {
    /// A set that creates files under temporary names.
    pub fn new() -> Self {
        OutputSet::default()
    }

    /// A set whose single output is `stream` (e.g. stdout); formats that need to seek
    /// refuse it.
    pub fn to_stream(stream: Box<dyn Write + Send>) -> Self {
        OutputSet {
            files: Vec::new(),
            stream: Some(stream),
            in_place: false,
        }
    }

    /// A set that opens existing targets for writing in place, without truncating them
    /// (`convert -n`).
    pub fn in_place() -> Self {
        OutputSet {
            files: Vec::new(),
            stream: None,
            in_place: true,
        }
    }

    /// True when writing into existing files (`-n`).
    pub fn is_in_place(&self) -> bool {
        self.in_place
    }

    /// Takes the output stream, if this set writes to one.
    pub fn take_stream(&mut self) -> Option<Box<dyn Write + Send>> {
        self.stream.take()
    }

    /// True when this set writes to a stream rather than to files.
    pub fn is_stream(&self) -> bool {
        self.stream.is_some()
    }

    /// Creates the file that will become `target`, empty, opened read-write.
    pub fn create(&mut self, target: &Path) -> Result<File> {
        if self.in_place {
            // Writing into an existing image: QEMU's writer locks, as `convert -n` takes.
            return super::lock::open_write(target);
        }
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{}: not a file name", target.display())))?;
        for attempt in 0..100u32 {
            let temp = dir.join(format!(
                ".{}.imgconv-{}-{}.tmp",
                name.to_string_lossy(),
                std::process::id(),
                attempt + (crate::random::u32() & 0xffff)
            ));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&temp)
            {
                Ok(f) => {
                    register(&temp);
                    self.files.push(Pending {
                        temp,
                        target: target.to_path_buf(),
                    });
                    return Ok(f);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(target, e)),
            }
        }
        Err(Error::invalid(format!(
            "{}: could not create a temporary file",
            target.display()
        )))
    }

    /// Renames every temporary file into place.
    pub fn commit(mut self) -> Result<()> {
        if let Some(mut s) = self.stream.take() {
            s.flush()?;
        }
        for p in std::mem::take(&mut self.files) {
            std::fs::rename(&p.temp, &p.target).map_err(|e| Error::io(&p.target, e))?;
            unregister(&p.temp);
        }
        Ok(())
    }
}

impl Drop for OutputSet {
    fn drop(&mut self) {
        for p in &self.files {
            let _ = std::fs::remove_file(&p.temp);
            unregister(&p.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_renames_and_drop_removes() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("out.img");
        {
            let mut o = OutputSet::new();
            let mut f = o.create(&t).unwrap();
            f.write_all(b"x").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut o = OutputSet::new();
        let mut f = o.create(&t).unwrap();
        f.write_all(b"y").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(&t).unwrap(), b"y");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

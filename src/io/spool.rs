//! Spooling a stream to a sparse temporary file, for formats that need random access
//! (qcow2, VDI, sparse VMDK inside a compressed file or a pipe).
//!
//! The file is created in `OpenOptions::tmpdir` (else `$TMPDIR`, else `/tmp`) and
//! unlinked right after it is opened: it disappears when the image is closed, and also
//! when the process dies (error, Ctrl-C, kill). Between creation and unlinking it is
//! registered with [`crate::io::output::register_temporary`] so that the CLI's signal
//! handler removes it. Runs of zeros are not written: they stay holes.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::compressed::from_io;
use crate::io::output::{register_temporary, unregister_temporary};
use crate::io::FileStorage;

const BUF: usize = 1 << 20;
const BLOCK: usize = 4096;

/// The folder spooled files go to: `tmpdir`, else `$TMPDIR`, else `/tmp`.
pub fn spool_dir(tmpdir: Option<&Path>) -> PathBuf {
    tmpdir
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
}

/// Creates an anonymous (already unlinked) read-write file in `dir`.
pub fn anonymous_file(dir: &Path) -> Result<File> {
    for _ in 0..100 {
        let path = dir.join(format!(
            ".imgconv-spool-{}-{:08x}.tmp",
            std::process::id(),
            rand::random::<u32>()
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => {
                register_temporary(&path);
                let removed = std::fs::remove_file(&path);
                unregister_temporary(&path);
                removed.map_err(|e| Error::io(&path, e))?;
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(dir, e)),
        }
    }
    Err(Error::invalid(format!(
        "{}: could not create a temporary file",
        dir.display()
    )))
}

/// Copies `reader` to its end into a sparse anonymous file in `dir` and returns it as
/// storage named `name` (for messages).
pub fn spool(reader: &mut dyn Read, dir: &Path, name: &Path) -> Result<FileStorage> {
    let file = anonymous_file(dir)?;
    let mut buf = vec![0u8; BUF];
    let mut pos = 0u64;
    loop {
        let mut got = 0;
        while got < BUF {
            match reader.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(from_io(e)),
            }
        }
        let mut off = 0;
        while off < got {
            // Write each run of non-zero blocks at once; zero blocks stay holes.
            let mut end = off;
            while end < got && !crate::convert::is_zero(&buf[end..(end + BLOCK).min(got)]) {
                end = (end + BLOCK).min(got);
            }
            if end > off {
                file.write_all_at(&buf[off..end], pos + off as u64)
                    .map_err(|e| Error::io(dir, e))?;
                off = end;
            } else {
                off = (off + BLOCK).min(got);
            }
        }
        pos += got as u64;
        if got < BUF {
            break;
        }
    }
    file.set_len(pos).map_err(|e| Error::io(dir, e))?;
    FileStorage::from_file(file, name.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Storage;

    #[test]
    fn spools_sparse_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; (3 << 20) + 123];
        data[10] = 1;
        data[(2 << 20) + 5000] = 2;
        let s = spool(
            &mut std::io::Cursor::new(data.clone()),
            dir.path(),
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(s.len(), data.len() as u64);
        let mut back = vec![0u8; data.len()];
        s.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        assert!(s.allocated_bytes() < 1 << 20);
    }
}

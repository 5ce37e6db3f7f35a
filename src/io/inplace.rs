//! An existing image file changed in place: opened read-write once, locked as a writer
//! (see [`super::lock`]), and every change to it made through here.
//!
//! Two environment variables exist for the crash tests (they change nothing when unset):
//! `IMGCONV_TEST_CRASH_AFTER_WRITES=N` kills the process with SIGKILL right before the
//! change (write, truncate or flush) that follows the first N, so that a test can stop
//! an operation at every point and look at what is left; `IMGCONV_TEST_PAUSE_AFTER_LOCK_MS=MS`
//! sleeps that long once the writer's lock is held, so that a test can watch another
//! process being refused meanwhile.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::lock;
use super::FileStorage;
use crate::error::{Error, Result};

/// Changes made so far by this process (for the crash test hook).
static CHANGES: AtomicU64 = AtomicU64::new(0);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// Called before every change: the crash test hook.
fn before_change() {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    if let Some(limit) = *LIMIT.get_or_init(|| env_u64("IMGCONV_TEST_CRASH_AFTER_WRITES")) {
        if CHANGES.fetch_add(1, Ordering::SeqCst) >= limit {
            // SAFETY: kill(2) on our own process; SIGKILL cannot be caught, as a crash.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}

/// An image file opened for writing in place and locked as a writer.
#[derive(Debug)]
pub struct InPlaceFile {
    file: File,
    path: PathBuf,
}

impl InPlaceFile {
    /// Opens `path` read-write and takes the writer's locks; fails with
    /// [`Error::Locked`] when another process uses the image.
    pub fn open(path: &Path) -> Result<Self> {
        let file = lock::open_write(path)?;
        if let Some(ms) = env_u64("IMGCONV_TEST_PAUSE_AFTER_LOCK_MS") {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        Ok(InPlaceFile {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (reads only: changes go through this type).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file's current length.
    pub fn file_len(&self) -> Result<u64> {
        Ok(self.file.metadata().map_err(|e| self.err(e))?.len())
    }

    /// A positional reader over the same open file description (so it shares the
    /// locks rather than conflicting with them), with the file's current length.
    pub fn storage(&self) -> Result<FileStorage> {
        let f = self.file.try_clone().map_err(|e| self.err(e))?;
        FileStorage::from_file(f, self.path.clone())
    }

    fn err(&self, e: std::io::Error) -> Error {
        Error::io(&self.path, e)
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as
    /// zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        before_change();
        self.file.write_all_at(buf, offset).map_err(|e| self.err(e))
    }

    /// Makes `[offset, offset + len)` read as zeros: a hole where the file system can
    /// punch one, written zeros otherwise.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        before_change();
        const MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if super::fallocate(&self.file, MODE, offset, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], pos)
                .map_err(|e| self.err(e))?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Sets the file's length.
    pub fn set_len(&self, len: u64) -> Result<()> {
        before_change();
        self.file.set_len(len).map_err(|e| self.err(e))
    }

    /// Flushes written data to the disk: everything written before is durable before
    /// anything written after (the order crash safety rests on).
    pub fn sync(&self) -> Result<()> {
        before_change();
        self.file.sync_data().map_err(|e| self.err(e))
    }
}

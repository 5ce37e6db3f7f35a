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
/// Buffers in flight between the reader thread and the writer.
const BUFFERS: usize = 3;

/// The most bytes a spooled copy may hold, and what set that cap (named in the error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolCap {
    /// Decoded bytes allowed.
    pub bytes: u64,
    /// Where the cap came from, as the error names it.
    pub set_by: &'static str,
}

impl SpoolCap {
    /// The error for a stream that goes on past the cap.
    pub fn exceeded(&self, size: u64) -> Error {
        Error::TooLarge {
            format: "input",
            structure: self.set_by,
            size,
            limit: self.bytes,
        }
    }
}

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
            crate::random::u32()
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
/// storage named `name` (for messages). A stream longer than `cap` is an error as soon
/// as it passes it (the file, already unlinked, goes with the error).
///
/// The reader (typically a decompressor) runs on a thread of its own while this thread
/// finds the zero blocks and writes the rest, so spooling costs little more wall time
/// than decoding. Buffers go back and forth between the two: at most `BUFFERS` MiB.
pub fn spool(
    reader: &mut (dyn Read + Send),
    dir: &Path,
    name: &Path,
    cap: Option<SpoolCap>,
) -> Result<FileStorage> {
    use std::sync::mpsc::sync_channel;
    let file = anonymous_file(dir)?;
    // Filled buffers (with their length, or the read error) one way, empty ones back.
    let (full_tx, full_rx) = sync_channel::<Result<(Vec<u8>, usize)>>(BUFFERS);
    let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        let _ = empty_tx.send(vec![0u8; BUF]);
    }
    let pos = std::thread::scope(|scope| -> Result<u64> {
        // Owned here, so that returning (also on an error) closes both channels and
        // stops the reader thread before the scope waits for it.
        let (full_rx, empty_tx) = (full_rx, empty_tx);
        let decoding = scope.spawn(move || {
            while let Ok(mut buf) = empty_rx.recv() {
                let r = fill(reader, &mut buf);
                let last = !matches!(r, Ok(n) if n == BUF);
                if full_tx.send(r.map(|n| (buf, n))).is_err() || last {
                    return;
                }
            }
        });
        let copied = (|| -> Result<u64> {
            let mut pos = 0u64;
            loop {
                // The reader thread always sends before it stops: a closed channel means
                // it is gone without a word (a panic), which is an error too.
                let (buf, got) = full_rx.recv().map_err(|_| {
                    Error::Format(format!("{}: the decoding thread failed", name.display()))
                })??;
                if let Some(cap) = cap {
                    if pos + got as u64 > cap.bytes {
                        return Err(cap.exceeded(pos + got as u64));
                    }
                }
                write_sparse(&file, &buf[..got], pos, dir)?;
                pos += got as u64;
                if got < BUF {
                    return Ok(pos);
                }
                let _ = empty_tx.send(buf);
            }
        })();
        drop((full_rx, empty_tx));
        // Joined explicitly: the scope alone does not wait for thread-local destructors.
        let _ = decoding.join();
        copied
    })?;
    file.set_len(pos).map_err(|e| Error::io(dir, e))?;
    FileStorage::from_file(file, name.to_path_buf())
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn fill(reader: &mut (dyn Read + Send), buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(from_io(e)),
        }
    }
    Ok(got)
}

/// Writes the runs of non-zero blocks of `buf` at `pos`; zero blocks stay holes.
fn write_sparse(file: &File, buf: &[u8], pos: u64, dir: &Path) -> Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let mut end = off;
        while end < buf.len() && !crate::zero::is_zero(&buf[end..(end + BLOCK).min(buf.len())]) {
            end = (end + BLOCK).min(buf.len());
        }
        if end > off {
            file.write_all_at(&buf[off..end], pos + off as u64)
                .map_err(|e| Error::io(dir, e))?;
            off = end;
        } else {
            off = (off + BLOCK).min(buf.len());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Storage;

    #[test]
    fn a_stream_past_the_cap_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cap = SpoolCap {
            bytes: 3 << 20,
            set_by: "temporary copy (--max-spool)",
        };
        for (len, ok) in [(3 << 20, true), ((3 << 20) + 1, false), (50 << 20, false)] {
            let r = spool(
                &mut std::io::Cursor::new(vec![1u8; len]),
                dir.path(),
                Path::new("x"),
                Some(cap),
            );
            assert_eq!(r.is_ok(), ok, "{len}");
            if let Err(e) = r {
                assert!(e.to_string().contains("--max-spool"), "{e}");
            }
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

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
            None,
        )
        .unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(s.len(), data.len() as u64);
        let mut back = vec![0u8; data.len()];
        s.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        assert!(s.allocated_bytes() < 1 << 20);
    }

    /// A reader that fails after a few MiB: the error comes back, nothing is left.
    #[test]
    fn reader_errors_are_returned_and_leave_nothing() {
        use crate::io::testing::FailingAfter;
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 10, 5 << 20] {
            let mut failing = FailingAfter {
                left: len,
                piece: 100_000,
            };
            let r = spool(&mut failing, dir.path(), Path::new("x"), None);
            assert!(r.is_err(), "{len}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
        // Exactly a multiple of the buffer size, and empty.
        for len in [0usize, 2 * BUF] {
            let s = spool(
                &mut std::io::Cursor::new(vec![1u8; len]),
                dir.path(),
                Path::new("x"),
                None,
            )
            .unwrap();
            assert_eq!(s.len(), len as u64);
        }
    }
}

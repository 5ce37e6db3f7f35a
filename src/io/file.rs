//! Random-access byte sources under the format readers: files and memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Bytes a format reader parses: a file, a spooled temporary file, or memory.
///
/// Reads take `&self` (positional I/O), so one source serves several threads.
pub trait Storage: Send + Sync {
    /// Length in bytes.
    fn len(&self) -> u64;

    /// True when the source holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` from `offset`; a read that runs past the end fails with
    /// [`io::ErrorKind::UnexpectedEof`].
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Where the data and holes are: at `offset`, returns `(is_data, end)` for the run
    /// that starts there. `None` means the source cannot tell (treat it all as data).
    fn segment(&self, _offset: u64) -> Option<(bool, u64)> {
        None
    }

    /// The file's path, for messages and for resolving relative references.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// Bytes the source occupies on disk (`actual-size` in `info`).
    fn allocated_bytes(&self) -> u64 {
        self.len()
    }

    /// The file whose bytes this storage reads, at the same offsets, when it is one
    /// (for copy offloading: `convert -C`).
    fn plain_file(&self) -> Option<&File> {
        None
    }
}

/// A regular file (or block device) read with `pread`, aware of its holes.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    len: u64,
    holes_supported: bool,
}

impl FileStorage {
    /// Opens `path` read-only: a regular file or a block device, nothing else.
    ///
    /// FIFOs, sockets, character devices and directories are refused with
    /// [`crate::Error::NotAFile`], checked before opening (no device is opened by
    /// accident) and again on the open file (the name may have been swapped meanwhile),
    /// which is opened with `O_NONBLOCK` so that even a FIFO cannot block the open.
    pub fn open(path: &Path) -> crate::Result<Self> {
        let file = open_regular(path)?;
        Self::from_file(file, path.to_path_buf())
    }

    /// Opens the image file `path` read-only as [`FileStorage::open`] does (regular files
    /// and block devices only), holding QEMU's read locks on it unless `force_share`
    /// (`-U`): fails with [`crate::Error::Locked`] while another process writes the image
    /// (see [`super::lock`]).
    pub fn open_image(path: &Path, force_share: bool) -> crate::Result<Self> {
        let access = if force_share {
            super::lock::Access::SharedRead
        } else {
            super::lock::Access::Read
        };
        let file = open_regular(path)?;
        if file.metadata().map(|m| m.is_file()).unwrap_or(false) {
            super::lock::lock(&file, path, access)?;
        }
        Self::from_file(file, path.to_path_buf())
    }

    /// Wraps an already open file.
    pub fn from_file(file: File, path: PathBuf) -> crate::error::Result<Self> {
        let meta = file
            .metadata()
            .map_err(|e| crate::error::Error::io(&path, e))?;
        let is_file = meta.file_type().is_file();
        let len = if is_file {
            meta.len()
        } else {
            // Block devices report 0 in metadata; seeking to the end gives the size.
            let off = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if off < 0 {
                return Err(crate::error::Error::io(&path, io::Error::last_os_error()));
            }
            off as u64
        };
        if is_file {
            // Conversions read mostly in ascending order: ask for a larger readahead.
            // SAFETY: advice on a descriptor we own; the result is only a hint.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        }
        Ok(FileStorage {
            file,
            path,
            len,
            holes_supported: is_file,
        })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// [`crate::Error::NotAFile`] unless `meta` is a regular file or a block device.
/// Opens `path` read-only if it is a regular file or a block device (see
/// [`FileStorage::open`]), back in blocking mode.
fn open_regular(path: &Path) -> crate::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let meta = std::fs::metadata(path).map_err(|e| crate::Error::io(path, e))?;
    refuse_special(path, &meta)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| crate::Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| crate::Error::io(path, e))?;
    refuse_special(path, &meta)?;
    // Regular files and block devices: back to ordinary blocking reads.
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    unsafe {
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

fn refuse_special(path: &Path, meta: &std::fs::Metadata) -> crate::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    let kind = if ft.is_file() || ft.is_block_device() {
        return Ok(());
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_dir() {
        "directory"
    } else {
        "special file"
    };
    Err(crate::Error::NotAFile {
        path: path.to_path_buf(),
        kind,
    })
}

impl Storage for FileStorage {
    fn len(&self) -> u64 {
        self.len
    }

    fn plain_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset:#x} runs past the end of the {}-byte file",
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.file.read_exact_at(buf, offset)
    }

    fn segment(&self, offset: u64) -> Option<(bool, u64)> {
        if !self.holes_supported || offset >= self.len {
            return None;
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on a file descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::ENXIO) {
                Some((false, self.len)) // trailing hole
            } else {
                None
            };
        }
        let data = data as u64;
        if data > offset {
            return Some((false, data.min(self.len)));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        Some((true, (hole as u64).clamp(offset + 1, self.len)))
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn allocated_bytes(&self) -> u64 {
        self.file
            .metadata()
            .map(|m| m.blocks() * 512)
            .unwrap_or(self.len)
    }
}

/// Bytes in memory (fuzzing, tests, small embedded structures).
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    data: Vec<u8>,
}

impl MemStorage {
    /// Storage holding `data`.
    pub fn new(data: Vec<u8>) -> Self {
        MemStorage { data }
    }
}

impl Storage for MemStorage {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).ok();
        match start.and_then(|s| Some(s..s.checked_add(buf.len())?)) {
            Some(r) if r.end <= self.data.len() => {
                buf.copy_from_slice(&self.data[r]);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the in-memory image",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn finds_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        f.flush().unwrap();
        drop(f);
        let s = FileStorage::open(&p).unwrap();
        let (d, end) = s.segment(0).unwrap();
        // Some filesystems report everything as data; both answers are correct.
        if !d {
            assert_eq!(end, 1 << 20);
            let (d, end) = s.segment(1 << 20).unwrap();
            assert!(d);
            assert!(end > 1 << 20 && end <= 4 << 20);
        }
        let mut b = [0u8; 2];
        assert!(s.read_exact_at(&mut b, (4 << 20) - 1).is_err());
    }

    #[test]
    fn mem_storage_bounds() {
        let m = MemStorage::new(vec![1, 2, 3]);
        let mut b = [0u8; 2];
        m.read_exact_at(&mut b, 1).unwrap();
        assert_eq!(b, [2, 3]);
        assert!(m.read_exact_at(&mut b, 2).is_err());
        assert!(m.read_exact_at(&mut b, u64::MAX).is_err());
    }
}

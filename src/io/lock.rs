//! Image locking as QEMU does it: open-file-description (OFD) byte-range locks on the
//! image file, so that qemu and imgconv each refuse an image the other is writing.
//!
//! QEMU (`block/file-posix.c`) takes shared (read) locks on single bytes of every image
//! file it opens: byte `100 + i` says "I hold permission i", byte `200 + i` says "I do
//! not let others take permission i". The permissions are consistent read (0), write
//! (1), write unchanged (2) and resize (3). A reader holds consistent read and refuses
//! to share write and resize (bytes 100, 201, 203); a writer also holds write and resize
//! (bytes 100, 101, 103, 201, 203). Before going ahead, an opener asks whether anyone
//! else holds the byte `200 + i` of each permission it wants, and the byte `100 + i` of
//! each permission it refuses to share; if so, it drops its locks and fails with QEMU's
//! message (`Failed to get shared "write" lock` …).
//!
//! The locks belong to the open file description: they last while the [`File`] (or a
//! clone made with `try_clone`) stays open, and two descriptions of one file conflict
//! even within one process. Open an image once and lock that.
//!
//! Where the file system has no OFD locks (some network file systems), nothing is
//! locked, as QEMU does; the path is recorded for the caller to warn about
//! ([`take_unlocked_files`]).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// What an open of an image file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading, sharing nothing with writers (qemu-img's read-only opens).
    Read,
    /// Reading with `-U` / `--force-share`: no locks taken, none tested.
    SharedRead,
    /// Writing in place (`resize`, `commit`, `rebase`, `amend`, `snapshot`, `bitmap`,
    /// `check -r`, the target of `convert -n`).
    Write,
}

/// QEMU's permission bits, by bit number.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const RESIZE: u32 = 1 << 3;
/// Every permission QEMU knows.
const ALL_PERMS: u32 = 0b1111;

/// Byte `PERM_BASE + i`: the holder has permission i.
const PERM_BASE: i64 = 100;
/// Byte `SHARED_BASE + i`: the holder does not share permission i.
const SHARED_BASE: i64 = 200;

static UNLOCKED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The files left unlocked since the last call because their file system has no OFD
/// locks (the CLI warns about them, as QEMU does).
pub fn take_unlocked_files() -> Vec<PathBuf> {
    UNLOCKED
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default()
}

/// `(permissions held, permissions not shared)` for an access.
fn permissions(access: Access) -> Option<(u32, u32)> {
    match access {
        Access::SharedRead => None,
        Access::Read => Some((CONSISTENT_READ, WRITE | RESIZE)),
        Access::Write => Some((CONSISTENT_READ | WRITE | RESIZE, WRITE | RESIZE)),
    }
}

fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Takes (`F_RDLCK`) or drops (`F_UNLCK`) the lock on one byte.
fn set(file: &File, kind: libc::c_short, byte: i64) -> std::io::Result<()> {
    let mut fl = flock(kind, byte);
    // SAFETY: fcntl on a descriptor we own with a valid flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// True when another open file description holds a lock on `byte`.
fn held_by_other(file: &File, byte: i64) -> std::io::Result<bool> {
    // A write-lock probe conflicts with any lock another description holds.
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: as above; F_OFD_GETLK fills `fl`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// True for the errors of a file system (or kernel) without OFD locks.
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP)
    ) || e.raw_os_error() == Some(libc::ENOTSUP)
}

/// Every byte this access locks.
fn bytes(held: u32, unshared: u32) -> Vec<i64> {
    let mut v = Vec::new();
    for i in 0..PERM_NAMES.len() as u32 {
        if held & (1 << i) != 0 {
            v.push(PERM_BASE + i as i64);
        }
    }
    for i in 0..PERM_NAMES.len() as u32 {
        if unshared & (1 << i) != 0 {
            v.push(SHARED_BASE + i as i64);
        }
    }
    v
}

/// Locks the image file `file` (opened from `path`) for `access`, as QEMU would.
///
/// Fails with [`Error::Locked`] when another process (qemu, or another imgconv) holds
/// the image in a conflicting way; then no lock is left behind.
pub fn lock(file: &File, path: &Path, access: Access) -> Result<()> {
    let Some((held, unshared)) = permissions(access) else {
        return Ok(());
    };
    let io_err = |e: std::io::Error| Error::io(path, e);
    let wanted = bytes(held, unshared);
    // As QEMU: take the locks first, then look for conflicts.
    for (n, &b) in wanted.iter().enumerate() {
        if let Err(e) = set(file, libc::F_RDLCK as libc::c_short, b) {
            for &taken in &wanted[..n] {
                let _ = set(file, libc::F_UNLCK as libc::c_short, taken);
            }
            if unsupported(&e) {
                if let Ok(mut v) = UNLOCKED.lock() {
                    v.push(path.to_path_buf());
                }
                return Ok(());
            }
            return Err(io_err(e));
        }
    }
    let conflict = find_conflict(file, held, unshared).map_err(io_err)?;
    if let Some(what) = conflict {
        unlock(file);
        return Err(Error::Locked {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(())
}

/// The first conflict, in QEMU's order and words: a permission this opener wants that
/// someone refuses to share, then a permission this opener refuses to share that
/// someone holds.
fn find_conflict(file: &File, held: u32, unshared: u32) -> std::io::Result<Option<String>> {
    for (i, name) in PERM_NAMES.iter().enumerate() {
        if held & (1 << i) != 0 && held_by_other(file, SHARED_BASE + i as i64)? {
            return Ok(Some(format!("\"{name}\"")));
        }
    }
    for (i, name) in PERM_NAMES.iter().enumerate() {
        if unshared & (1 << i) != 0 && held_by_other(file, PERM_BASE + i as i64)? {
            return Ok(Some(format!("shared \"{name}\"")));
        }
    }
    Ok(None)
}

/// Drops every lock this description holds on the permission bytes.
pub fn unlock(file: &File) {
    for b in bytes(ALL_PERMS, ALL_PERMS) {
        let _ = set(file, libc::F_UNLCK as libc::c_short, b);
    }
}

/// Opens `path` read-only and locks it for `access` (`Read` or `SharedRead`).
pub fn open_read(path: &Path, access: Access) -> Result<File> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    if f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        lock(&f, path, access)?;
    }
    Ok(f)
}

/// Opens `path` for reading and writing and takes the writer's locks.
pub fn open_write(path: &Path) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    if f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        lock(&f, path, Access::Write)?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_share_and_writers_exclude() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let r1 = open_read(&p, Access::Read).unwrap();
        let _r2 = open_read(&p, Access::Read).unwrap();
        let e = open_write(&p).unwrap_err();
        assert_eq!(
            e.to_string().lines().next().unwrap(),
            "Failed to get \"write\" lock"
        );
        drop(r1);
        drop(_r2);
        let w = open_write(&p).unwrap();
        let e = open_read(&p, Access::Read).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("Failed to get shared \"write\" lock"));
        assert!(e.to_string().contains("Is another process using the image"));
        // -U reads go ahead.
        open_read(&p, Access::SharedRead).unwrap();
        drop(w);
        open_read(&p, Access::Read).unwrap();
    }
}

//! Output files that appear only when complete, all together.
//!
//! Every file a writer creates is first written under a temporary name in the target's
//! folder. [`OutputSet::commit`] puts them all in place as one transaction: each target
//! is checked first (an existing directory, device or pipe there fails the commit before
//! any file moves); then each temporary file is swapped with its existing target
//! (`renameat2(RENAME_EXCHANGE)`, so that the old file ends up under the temporary name)
//! or renamed to a fresh target; if any step fails, the steps already done are undone
//! (swapped back), so that every target holds what it held before, and every temporary
//! file is removed. Only when all are in place are the old files unlinked; a caller that
//! does not want to wait while their blocks are freed takes them still open
//! ([`OutputSet::release_replaced_with`]).
//!
//! Swapping instead of renaming over an existing file also avoids ext4's
//! replace-via-rename heuristic, which starts writeback of the whole new file inside
//! `rename()` (measured with 800 MiB files on ext4: `rename` over an existing file
//! 0.77–0.86 s, exchange then unlink 0.25–0.36 s). Where the file system cannot swap,
//! the old file is kept under a hard link until the commit is complete, then renamed
//! over as before.
//!
//! The page cache of an old file about to be replaced is dropped when its replacement is
//! created (`forget_cached_pages`): the new file's pages then reuse memory instead of
//! pushing other pages out, as they do after QEMU's truncation of its target.
//!
//! Dropping an uncommitted set removes its temporary files, and their names are also
//! kept in a process-wide registry so that a signal handler can remove them
//! ([`remove_pending_files`]).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Temporary files to remove on a signal, as C strings so that the handler only calls
/// `unlink` (async-signal-safe) on them.
static PENDING: Mutex<Vec<(PathBuf, CString)>> = Mutex::new(Vec::new());

fn register(path: &Path) {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    if let Ok(mut p) = PENDING.lock() {
        p.push((path.to_path_buf(), c));
    }
}

fn unregister(path: &Path) {
    if let Ok(mut p) = PENDING.lock() {
        p.retain(|q| q.0 != path);
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
/// handler: it only takes the lock with `try_lock` (never blocks) and calls `unlink`.
pub fn remove_pending_files() {
    if let Ok(p) = PENDING.try_lock() {
        for (_, c) in p.iter() {
            // SAFETY: unlink of a NUL-terminated path we own; async-signal-safe.
            unsafe { libc::unlink(c.as_ptr()) };
        }
    }
}

fn c_path(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// `renameat2(from, to, flags)`, through the system call (older C libraries lack it).
fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    let (f, t) = (c_path(from)?, c_path(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call; no memory is written.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
thread_local! {
    /// Tests of the fallback: act as a file system that cannot swap names.
    static NO_EXCHANGE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Swaps two existing names atomically.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    #[cfg(test)]
    if NO_EXCHANGE.with(|n| n.get()) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    rename2(a, b, libc::RENAME_EXCHANGE)
}

/// How one file was put in place, so that it can be undone.
enum Placed {
    /// Swapped with the old target, which now sits under the temporary name.
    Exchanged,
    /// Renamed to a target that did not exist.
    Fresh,
    /// Renamed over the old target (the file system cannot swap); the old file kept
    /// under `backup` when a hard link could be made.
    Replaced { backup: Option<PathBuf> },
}

/// A name beside `target` for a temporary file: `.NAME.imgconv-PID-N.SUFFIX`.
fn temp_name(target: &Path, attempt: u32, suffix: &str) -> Result<PathBuf> {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file name", target.display())))?;
    Ok(dir.join(format!(
        ".{}.imgconv-{}-{}.{suffix}",
        name.to_string_lossy(),
        std::process::id(),
        attempt + (crate::random::u32() & 0xffff)
    )))
}

/// Refuses a target where a file cannot be put: a directory, a device, a pipe, a socket.
/// A missing target, a regular file or a symbolic link (replaced, not followed) is fine.
fn check_target(target: &Path) -> Result<()> {
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.file_type().is_file() || m.file_type().is_symlink() => Ok(()),
        Ok(m) => {
            let what = if m.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            Err(Error::io(
                target,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("the output's name is taken by {what}; nothing was written"),
                ),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(target, e)),
    }
}

struct Pending {
    temp: PathBuf,
    target: PathBuf,
    /// Dropping the old target's cached pages, in the background.
    forgetting: Option<std::thread::JoinHandle<()>>,
}

impl Pending {
    fn wait_forgetting(&mut self) {
        if let Some(h) = self.forgetting.take() {
            let _ = h.join();
        }
    }
}

/// Starts dropping the clean cached pages of the regular file at `target` (not followed
/// if a link): it will be replaced, so its pages only crowd out the new file's. Measured
/// with a 4 GiB target cached on ext4 in a VM, writing its replacement took 13.5 s with the
/// old pages cached and 5 s without (the new pages had to come from memory that had been
/// given back to the host). Dirty pages stay: dropping them would first write back data
/// that is about to be deleted (which made re-runs with 400 MiB outputs 2× slower). The
/// file's data is not touched: if the conversion fails, the old file is intact, only no
/// longer cached. Best effort; errors are ignored.
fn forget_cached_pages(target: &Path) -> Option<std::thread::JoinHandle<()>> {
    let file = open_regular(target)?;
    let len = file.metadata().ok()?.len();
    std::thread::Builder::new()
        .name("imgconv-uncache".into())
        .spawn(move || drop_clean_pages(&file, len))
        .ok()
}

/// Opens `path` for reading if it is a regular file, not following a link; `None`
/// otherwise (opening a device or a pipe can have effects or block, so nothing else is
/// opened at all).
fn open_regular(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if !std::fs::symlink_metadata(path).ok()?.is_file() {
        return None;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    file.metadata().ok().filter(|m| m.is_file())?;
    Some(file)
}

/// Drops the cached pages of `file`, skipping every 64 MiB piece that holds a dirty page
/// (`POSIX_FADV_DONTNEED` would write those back first). Runs of clean pieces are dropped
/// in one call (each call drains every CPU's page lists). Without `cachestat(2)` (Linux
/// before 6.5), nothing is dropped.
fn drop_clean_pages(file: &File, len: u64) {
    use std::os::fd::AsRawFd;
    const PIECE: u64 = 64 << 20;
    let fd = file.as_raw_fd();
    let drop_range = |from: u64, to: u64| {
        if to > from {
            // SAFETY: an advisory call on a descriptor the caller owns.
            unsafe {
                libc::posix_fadvise(
                    fd,
                    from as i64,
                    (to - from) as i64,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
        }
    };
    let mut clean_from = 0;
    let mut offset = 0;
    while offset < len {
        let n = PIECE.min(len - offset);
        match page_cache_state(fd, offset, n) {
            Some(s) if s.nr_dirty == 0 => {}
            Some(_) => {
                drop_range(clean_from, offset);
                clean_from = offset + n;
            }
            None => return,
        }
        offset += n;
    }
    drop_range(clean_from, len);
}

/// `struct cachestat` of `<linux/mman.h>`. Only `nr_dirty` is read; the other fields
/// are there because the kernel writes the whole struct.
#[repr(C)]
#[derive(Default)]
struct CacheStat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// The page-cache state of `len` bytes at `offset` of `fd` (`cachestat(2)`; its number
/// is 451 on every architecture, as for all system calls added since Linux 5.1).
fn page_cache_state(fd: i32, offset: u64, len: u64) -> Option<CacheStat> {
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = [offset, len];
    let mut state = CacheStat::default();
    // SAFETY: the kernel reads the two-u64 range and writes one `struct cachestat`,
    // both alive for the call.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd,
            range.as_ptr(),
            &mut state as *mut CacheStat,
            0,
        )
    };
    (r == 0).then_some(state)
}

/// What receives the old files a commit replaced (see
/// [`OutputSet::release_replaced_with`]).
type ReleaseReplaced = Box<dyn FnOnce(Vec<File>) + Send>;

/// Where a writer puts its bytes: files created atomically, or one stream (stdout).
#[derive(Default)]
pub struct OutputSet {
    files: Vec<Pending>,
    stream: Option<Box<dyn Write + Send>>,
    in_place: bool,
    release_replaced: Option<ReleaseReplaced>,
}

impl OutputSet {
    /// A set that creates files under temporary names.
    pub fn new() -> Self {
        OutputSet::default()
    }

    /// A set whose single output is `stream` (e.g. stdout); formats that need to seek
    /// refuse it.
    pub fn to_stream(stream: Box<dyn Write + Send>) -> Self {
        let mut set = OutputSet::default();
        set.stream = Some(stream);
        set
    }

    /// A set that opens existing targets for writing in place, without truncating them
    /// (`convert -n`).
    pub fn in_place() -> Self {
        let mut set = OutputSet::default();
        set.in_place = true;
        set
    }

    /// Hands the old files that [`commit`](Self::commit) replaces to `release`, already
    /// unlinked but still open, instead of closing them inside the commit. Their blocks
    /// are freed when the last descriptor closes, and that can take seconds: ext4 mounted
    /// with `discard` discards them synchronously (3–5 s for a 4 GiB file, measured). The
    /// CLI closes them in a background process, so that a command returns once its new
    /// output is in place. `release` is called once, only when the commit succeeded and
    /// replaced at least one regular file.
    pub fn release_replaced_with(
        mut self,
        release: impl FnOnce(Vec<File>) + Send + 'static,
    ) -> Self {
        self.release_replaced = Some(Box::new(release));
        self
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

    /// For writers of `format` that only create new files: refuses a stream and `-n`
    /// with a typed [`Error::Unsupported`] naming which.
    pub fn require_new_files(&self, format: &'static str) -> Result<()> {
        if self.is_stream() {
            return Err(Error::unsupported(format, "writing to a stream"));
        }
        if self.in_place {
            return Err(Error::unsupported(
                format,
                "writing into an existing image (-n)",
            ));
        }
        Ok(())
    }

    /// Creates the file that will become `target`, empty, opened read-write.
    pub fn create(&mut self, target: &Path) -> Result<File> {
        if self.in_place {
            // Writing into an existing image: QEMU's writer locks, as `convert -n` takes.
            return super::lock::open_write(target);
        }
        for attempt in 0..100u32 {
            let temp = temp_name(target, attempt, "tmp")?;
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
                        forgetting: forget_cached_pages(target),
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

    /// Puts every temporary file in place, all or none (see the module doc): on an error
    /// every target is left as it was and every temporary file is removed.
    pub fn commit(mut self) -> Result<()> {
        if let Some(mut s) = self.stream.take() {
            s.flush()?;
        }
        for p in &mut self.files {
            p.wait_forgetting();
            check_target(&p.target)?;
        }
        let mut placed: Vec<Placed> = Vec::with_capacity(self.files.len());
        for p in &self.files {
            match place(p) {
                Ok(how) => placed.push(how),
                Err(e) => {
                    // Undo in reverse order; Drop then removes every temporary file,
                    // except one that still holds an old file (it could not be swapped
                    // back: keep the data rather than the promise).
                    let mut keep = Vec::new();
                    for (i, (p, how)) in self.files.iter().zip(placed.iter()).enumerate().rev() {
                        if !undo(p, how) {
                            keep.push(i);
                        }
                    }
                    for i in keep {
                        let p = self.files.remove(i);
                        unregister(&p.temp);
                    }
                    return Err(e);
                }
            }
        }
        // All in place: the old files (under the temporary names) and backups go, kept
        // open for the release callback if there is one.
        let mut replaced = Vec::new();
        for (p, how) in self.files.iter().zip(placed.iter()) {
            let old = match how {
                Placed::Exchanged => Some(&p.temp),
                Placed::Replaced {
                    backup: Some(backup),
                } => Some(backup),
                _ => None,
            };
            if let Some(old) = old {
                if self.release_replaced.is_some() {
                    replaced.extend(open_regular(old));
                }
                let _ = std::fs::remove_file(old);
                unregister(old);
            }
            unregister(&p.temp);
        }
        self.files.clear();
        if let Some(release) = self.release_replaced.take() {
            if !replaced.is_empty() {
                release(replaced);
            }
        }
        Ok(())
    }
}

/// Puts one temporary file at its target.
fn place(p: &Pending) -> Result<Placed> {
    let err = |e| Error::io(&p.target, e);
    match exchange(&p.temp, &p.target) {
        Ok(()) => return Ok(Placed::Exchanged),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            // No old file (or the temporary file vanished, which the rename reports).
            std::fs::rename(&p.temp, &p.target).map_err(err)?;
            return Ok(Placed::Fresh);
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
            ) => {}
        Err(e) => return Err(err(e)),
    }
    // No swapping here: keep the old file under a hard link, then rename over it.
    let mut backup = None;
    for attempt in 0..10 {
        let name = temp_name(&p.target, attempt, "old")?;
        register(&name);
        match std::fs::hard_link(&p.target, &name) {
            Ok(()) => {
                backup = Some(name);
                break;
            }
            Err(e) => {
                unregister(&name);
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    break;
                }
            }
        }
    }
    if let Err(e) = std::fs::rename(&p.temp, &p.target) {
        if let Some(b) = &backup {
            let _ = std::fs::remove_file(b);
            unregister(b);
        }
        return Err(err(e));
    }
    Ok(Placed::Replaced { backup })
}

/// Undoes [`place`] as far as possible: the old file back at the target, the new one
/// back under its temporary name (removed by the caller). False when an old file could
/// not be swapped back and still sits under the temporary name.
fn undo(p: &Pending, how: &Placed) -> bool {
    match how {
        Placed::Exchanged => exchange(&p.temp, &p.target).is_ok(),
        Placed::Fresh => {
            let _ = std::fs::rename(&p.target, &p.temp);
            true
        }
        Placed::Replaced { backup } => {
            if let Some(b) = backup {
                if std::fs::rename(b, &p.target).is_ok() {
                    unregister(b);
                }
            }
            true
        }
    }
}

impl Drop for OutputSet {
    fn drop(&mut self) {
        for p in &mut self.files {
            p.wait_forgetting();
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

    #[test]
    fn only_a_regular_old_file_has_its_cache_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("old.img");
        std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
        let h = forget_cached_pages(&file).expect("a regular file is uncached");
        h.join().unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), vec![7u8; 1 << 20]);
        // A pipe (opening it would block), a directory, a link and nothing: left alone.
        let fifo = dir.path().join("fifo");
        let c = c_path(&fifo).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for p in [
            &fifo,
            &dir.path().to_path_buf(),
            &link,
            &dir.path().join("none"),
        ] {
            assert!(forget_cached_pages(p).is_none(), "{}", p.display());
        }
        // Replacing the old file (a fresh set drops its cache first) keeps the promise.
        let mut o = OutputSet::new();
        let mut f = o.create(&file).unwrap();
        f.write_all(b"new").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A set of three files, `a`, `b`, `c`, holding `tag`.
    fn three(dir: &Path, tag: &[u8]) -> OutputSet {
        three_in(OutputSet::new(), dir, tag)
    }

    /// `a`, `b`, `c` holding `tag`, created in `o`.
    fn three_in(mut o: OutputSet, dir: &Path, tag: &[u8]) -> OutputSet {
        for n in ["a", "b", "c"] {
            o.create(&dir.join(n)).unwrap().write_all(tag).unwrap();
        }
        o
    }

    #[test]
    fn commit_replaces_existing_files_and_leaves_only_them() {
        for swap in [true, false] {
            NO_EXCHANGE.with(|n| n.set(!swap));
            replaces_existing_files();
        }
    }

    fn replaces_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        three(dir.path(), b"old").commit().unwrap();
        three(dir.path(), b"new").commit().unwrap();
        assert_eq!(names(dir.path()), ["a", "b", "c"]);
        for n in ["a", "b", "c"] {
            assert_eq!(std::fs::read(dir.path().join(n)).unwrap(), b"new");
        }
    }

    /// A set of `a`, `b`, `c` holding `tag` that records what its commit releases.
    fn three_releasing(
        dir: &Path,
        tag: &[u8],
    ) -> (OutputSet, std::sync::mpsc::Receiver<Vec<File>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let o = OutputSet::new().release_replaced_with(move |files| tx.send(files).unwrap());
        (three_in(o, dir, tag), rx)
    }

    /// The release callback gets the replaced files, unlinked and still readable; with
    /// nothing replaced, or a failed commit, it is not called.
    #[test]
    fn replaced_files_are_handed_over_open() {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        for swap in [true, false] {
            NO_EXCHANGE.with(|n| n.set(!swap));
            let dir = tempfile::tempdir().unwrap();
            // Fresh targets: nothing to release.
            let (o, rx) = three_releasing(dir.path(), b"old");
            o.commit().unwrap();
            assert!(rx.try_recv().is_err());
            // Two replaced, one symbolic link (replaced, never opened).
            std::fs::remove_file(dir.path().join("c")).unwrap();
            std::os::unix::fs::symlink("a", dir.path().join("c")).unwrap();
            let (o, rx) = three_releasing(dir.path(), b"new");
            o.commit().unwrap();
            let old = rx.try_recv().expect("released");
            assert_eq!(old.len(), 2);
            for mut f in old {
                assert_eq!(f.metadata().unwrap().nlink(), 0);
                let mut data = Vec::new();
                f.read_to_end(&mut data).unwrap();
                assert_eq!(data, b"old");
            }
            assert_eq!(names(dir.path()), ["a", "b", "c"]);
            // A failed commit releases nothing.
            let (o, rx) = three_releasing(dir.path(), b"newer");
            std::fs::remove_file(dir.path().join("b")).unwrap();
            std::fs::create_dir(dir.path().join("b")).unwrap();
            assert!(o.commit().is_err());
            assert!(rx.try_recv().is_err());
        }
    }

    /// A target taken by a directory fails the commit before anything moves.
    #[test]
    fn a_blocked_target_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        assert!(three(dir.path(), b"new").commit().is_err());
        assert_eq!(names(dir.path()), ["b"]);
        std::fs::remove_dir(dir.path().join("b")).unwrap();
        three(dir.path(), b"old").commit().unwrap();
        std::fs::remove_file(dir.path().join("b")).unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        assert!(three(dir.path(), b"new").commit().is_err());
        assert_eq!(names(dir.path()), ["a", "b", "c"]);
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"old");
    }

    /// A placement that fails half-way (here: the third temporary file vanished) undoes
    /// the ones done: old files back, new ones gone, no temporary file left.
    #[test]
    fn a_failure_half_way_undoes_the_files_placed() {
        for (existing, swap) in [(false, true), (true, true), (true, false)] {
            NO_EXCHANGE.with(|n| n.set(!swap));
            let dir = tempfile::tempdir().unwrap();
            if existing {
                three(dir.path(), b"old").commit().unwrap();
            }
            let o = three(dir.path(), b"new");
            let c_temp = names(dir.path())
                .into_iter()
                .find(|n| n.starts_with(".c.imgconv-"))
                .unwrap();
            std::fs::remove_file(dir.path().join(c_temp)).unwrap();
            assert!(o.commit().is_err());
            if existing {
                assert_eq!(names(dir.path()), ["a", "b", "c"]);
                for n in ["a", "b", "c"] {
                    assert_eq!(std::fs::read(dir.path().join(n)).unwrap(), b"old");
                }
            } else {
                assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
            }
        }
    }
}

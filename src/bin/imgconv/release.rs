//! Freeing a replaced output's blocks after the command has returned.
//!
//! When `convert`, `dd` or `create` replaces an existing file, the old file is unlinked
//! once the new one is in place. Its blocks are freed when its last descriptor closes,
//! and that can take as long as writing the new file: ext4 mounted with `discard`
//! discards them synchronously (3–5 s for a 4 GiB file on the development VM; QEMU pays
//! the same in its `ftruncate` of the old file before it writes). So the commit hands
//! the old files over still open ([`OutputSet::release_replaced_with`]), and a small
//! child process named `imgconv-release`, detached from the terminal's signals, holds
//! the last descriptors and closes them when it exits, just after this process lets go.
//!
//! Nothing can be left behind: the old names are gone before the command returns, and
//! the kernel frees an unlinked file whatever way the child ends (after a crash, ext4
//! frees it at the next mount). A set under 64 MiB, or a failed `fork`, is closed here.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use imgconv::io::OutputSet;

/// Allocated bytes below which the old files are closed in this process (freeing them
/// is quick).
const BACKGROUND_FROM: u64 = 64 << 20;

/// The child's name, as `ps` and `pgrep -x` show it (at most 15 bytes and a NUL).
const CHILD_NAME: &[u8; 16] = b"imgconv-release\0";

/// A set of new output files whose commit frees the replaced files in the background.
pub fn output_set() -> OutputSet {
    OutputSet::new().release_replaced_with(release_in_background)
}

fn release_in_background(files: Vec<File>) {
    if worth_a_child(&files) {
        if let Some(holder) = Holder::start(&files) {
            drop(files);
            holder.let_go();
        }
    }
}

/// True when the files hold at least [`BACKGROUND_FROM`] bytes of blocks.
fn worth_a_child(files: &[File]) -> bool {
    let allocated: u64 = files
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum();
    allocated >= BACKGROUND_FROM
}

/// A child process holding copies of some descriptors until [`Holder::let_go`].
struct Holder {
    pid: libc::pid_t,
    /// The parent's end of the pipe the child waits on.
    write_end: libc::c_int,
}

impl Holder {
    /// Forks a child that keeps `files` (and nothing else) open; `None` if the pipe or
    /// the fork fails.
    fn start(files: &[File]) -> Option<Holder> {
        let mut pipe = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return None;
        }
        let [read_end, write_end] = pipe;
        let mut keep: Vec<libc::c_int> = files.iter().map(|f| f.as_raw_fd()).collect();
        keep.push(read_end);
        keep.sort_unstable();
        // SAFETY: the child only makes async-signal-safe system calls (`child`), as a
        // child of a multithreaded process must, and never returns.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            child(&keep, read_end);
        }
        // SAFETY: closing descriptors this function opened.
        unsafe { libc::close(read_end) };
        if pid < 0 {
            // SAFETY: as above.
            unsafe { libc::close(write_end) };
            return None;
        }
        Some(Holder { pid, write_end })
    }

    /// Tells the child to exit (once the caller has closed its own copies, the child's
    /// exit closes the last ones). Returns the child's pid; it is not waited for.
    fn let_go(self) -> libc::pid_t {
        // SAFETY: closing the descriptor `start` opened.
        unsafe { libc::close(self.write_end) };
        self.pid
    }
}

/// The child: keeps only `keep` open, waits until the parent closes its end of the pipe,
/// then exits, which closes the last descriptors of the old files.
fn child(keep: &[libc::c_int], read_end: libc::c_int) -> ! {
    // SAFETY: system calls only, on memory allocated before the fork.
    unsafe {
        // Out of the terminal's process group (Ctrl-C is the parent's), default
        // dispositions (the parent's handlers remove its temporary files), its own name.
        libc::setsid();
        for sig in crate::common::CLEANUP_SIGNALS {
            libc::signal(sig, libc::SIG_DFL);
        }
        libc::prctl(libc::PR_SET_NAME, CHILD_NAME.as_ptr());
        // Every other descriptor closed, stdout and stderr first of all: a caller
        // reading the command's output must not wait for this process.
        let mut from: libc::c_uint = 0;
        for &fd in keep {
            let fd = fd as libc::c_uint;
            if fd > from {
                close_range(from, fd - 1);
            }
            from = fd + 1;
        }
        close_range(from, libc::c_uint::MAX);
        let mut byte = 0u8;
        while libc::read(read_end, (&mut byte as *mut u8).cast(), 1) < 0
            && *libc::__errno_location() == libc::EINTR
        {}
        libc::_exit(0)
    }
}

/// Closes descriptors `first..=last` (`close_range(2)`; Linux 5.9). On older kernels,
/// closes them one by one up to 65535.
///
/// # Safety
/// Only for the child: it closes descriptors that other code may own.
unsafe fn close_range(first: libc::c_uint, last: libc::c_uint) {
    // SAFETY: a system call without pointers.
    if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) } == 0 {
        return;
    }
    for fd in first..=last.min(65535) {
        // SAFETY: as above.
        unsafe { libc::close(fd as libc::c_int) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Polls `ready` for up to 10 s.
    fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
        let t = Instant::now();
        while !ready() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "waited 10 s for {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_child_holds_only_the_old_file_in_its_own_session_then_exits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.img");
        std::fs::write(&path, b"old data").unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let holder = Holder::start(std::slice::from_ref(&file)).expect("a child");
        let pid = holder.pid;
        let proc_dir = format!("/proc/{pid}");
        let fds = || -> Vec<String> {
            std::fs::read_dir(format!("{proc_dir}/fd"))
                .map(|d| {
                    d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                        .map(|l| l.to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        wait_until("the child's name and descriptors", || {
            std::fs::read_to_string(format!("{proc_dir}/comm"))
                .is_ok_and(|c| c.trim_end() == "imgconv-release")
                && fds().len() == 2
        });
        // The unlinked old file and its end of the pipe; no stdout or stderr.
        let mut held = fds();
        held.sort();
        assert!(held[0].ends_with("old.img (deleted)"), "{held:?}");
        assert!(held[1].starts_with("pipe:"), "{held:?}");
        // Its own session (the terminal's Ctrl-C is for the command): stat's 6th field.
        let stat = std::fs::read_to_string(format!("{proc_dir}/stat")).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let session: libc::pid_t = after_name.split(' ').nth(3).unwrap().parse().unwrap();
        assert_eq!(session, pid);
        // Still waiting; let go, and it exits cleanly.
        drop(file);
        assert_eq!(holder.let_go(), pid);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn only_files_with_64_mib_of_blocks_are_worth_a_child() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, written: usize, size: u64| {
            let f = File::create_new(dir.path().join(name)).unwrap();
            f.set_len(size).unwrap();
            std::io::Write::write_all(&mut &f, &vec![1u8; written]).unwrap();
            f
        };
        // Sizes do not count, blocks do: a sparse 1 GiB file is freed at once.
        let sparse = file("sparse", 1 << 20, 1 << 30);
        let small = file("small", 16 << 20, 16 << 20);
        let big = file("big", 64 << 20, 64 << 20);
        assert!(!worth_a_child(std::slice::from_ref(&sparse)));
        assert!(!worth_a_child(&[sparse, small]));
        assert!(worth_a_child(&[big]));
    }
}

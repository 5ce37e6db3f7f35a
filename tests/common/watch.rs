//! Running imgconv under watch: wall time, peak memory (`wait4`'s rusage), an optional
//! address-space limit (as `prlimit --as`), a file-size limit, a timeout and stdin.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Result of one imgconv run under watch.
#[derive(Debug)]
pub struct Watched {
    /// Exit code, `None` when killed by a signal.
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
    /// Peak resident memory.
    pub max_rss_kib: i64,
    /// CPU time (user and system): unlike wall time, not stretched by a busy disk.
    pub cpu: Duration,
    /// It was killed for running past the timeout.
    pub timed_out: bool,
}

impl Watched {
    /// Asserts the run did not panic; `what` names it in the message.
    pub fn assert_no_panic(&self, what: impl std::fmt::Debug) {
        assert!(
            !self.stderr.contains("panicked"),
            "{what:?} panicked: {}",
            self.stderr
        );
    }

    /// Asserts the run took less than `limit`.
    pub fn assert_faster_than(&self, what: impl std::fmt::Debug, limit: Duration) {
        assert!(
            self.elapsed < limit && !self.timed_out,
            "{what:?} took {:?}",
            self.elapsed
        );
    }

    /// Asserts the run's peak memory stayed under 256 MiB.
    pub fn assert_small(&self, what: impl std::fmt::Debug) {
        self.assert_rss_below(what, 256 << 10);
    }

    /// Asserts the run's peak memory stayed under `kib` KiB.
    pub fn assert_rss_below(&self, what: impl std::fmt::Debug, kib: i64) {
        assert!(
            self.max_rss_kib < kib,
            "{what:?} used {} KiB (limit {kib} KiB); stderr: {}",
            self.max_rss_kib,
            self.stderr
        );
    }

    /// Asserts an exit with `code` (not a signal).
    pub fn assert_code(&self, what: impl std::fmt::Debug, code: i32) {
        assert_eq!(
            self.code,
            Some(code),
            "{what:?}: signal {:?}, stderr: {}",
            self.signal,
            self.stderr
        );
    }
}

/// How to run imgconv under watch.
#[derive(Default, Clone)]
pub struct Watch<'a> {
    /// Address-space limit in bytes (`prlimit --as`).
    pub address_space: Option<u64>,
    /// File-size limit in bytes (`prlimit --fsize`: SIGXFSZ past it).
    pub file_size: Option<u64>,
    /// Killed (SIGKILL) after this long.
    pub timeout: Option<Duration>,
    /// Bytes fed on stdin (stdin is /dev/null otherwise).
    pub stdin: Option<&'a [u8]>,
    /// Environment variables set.
    pub env: Vec<(&'a str, &'a Path)>,
    /// Working folder.
    pub cwd: Option<&'a Path>,
}

impl Watch<'_> {
    /// Runs imgconv with `args`.
    ///
    /// imgconv is started by GNU time (which reports its exit status and peak memory,
    /// `wait4`'s rusage, to a file), itself under prlimit(1) when limits are asked for:
    /// started straight from the test process, the child's maxrss would include the
    /// test process's own peak (exec folds the old address space's into it).
    pub fn run(&self, args: &[&str]) -> Watched {
        use std::io::{Read, Write};
        use std::os::unix::process::CommandExt;
        let t = Instant::now();
        let report = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new("prlimit");
        if let Some(v) = self.address_space {
            cmd.arg(format!("--as={v}"));
        }
        if let Some(v) = self.file_size {
            cmd.arg(format!("--fsize={v}"));
        }
        cmd.arg("/usr/bin/time")
            .arg("-o")
            .arg(report.path())
            .args(["-f", "%x %M %U %S"])
            .arg(super::imgconv_bin())
            .args(args)
            .envs(self.env.iter().copied())
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout kills imgconv too.
            .process_group(0);
        if let Some(d) = self.cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        let feeder = self.stdin.map(|data| {
            let data = data.to_vec();
            let mut stdin = child.stdin.take().unwrap();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            })
        });
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let out_reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = out.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let killer = self.timeout.map(|limit| {
            let (timed_out, done) = (timed_out.clone(), done.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                while start.elapsed() < limit {
                    if done.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if !done.load(std::sync::atomic::Ordering::SeqCst) {
                    timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                    // SAFETY: signalling our own child's process group.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
            })
        });
        let status = child.wait().unwrap();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(k) = killer {
            let _ = k.join();
        }
        if let Some(f) = feeder {
            let _ = f.join();
        }
        // "Command terminated by signal N" (or "… exited with non-zero status N"),
        // then "STATUS MAXRSS USER SYSTEM".
        let reported = std::fs::read_to_string(report.path()).unwrap_or_default();
        let signal = reported
            .lines()
            .find_map(|l| l.strip_prefix("Command terminated by signal "))
            .and_then(|n| n.trim().parse::<i32>().ok());
        let last: Vec<&str> = reported
            .lines()
            .last()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let int = |i: usize| last.get(i).and_then(|x| x.parse::<i64>().ok());
        let secs = |i: usize| {
            last.get(i)
                .and_then(|x| x.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let cpu = Duration::from_secs_f64(secs(2) + secs(3));
        let (code, signal, max_rss_kib) = match (int(0), int(1), signal) {
            (Some(_), Some(rss), Some(sig)) => (None, Some(sig), rss),
            (Some(c), Some(rss), None) => (Some(c as i32), None, rss),
            // GNU time itself was killed (timeout).
            _ => (None, Some(libc::SIGKILL), 0),
        };
        let _ = status;
        // IMGCONV_TEST_RSS_LOG=FILE: one line per run (command, peak KiB), for the
        // README's memory table.
        if let Some(log) = std::env::var_os("IMGCONV_TEST_RSS_LOG") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                let line = format!("{} {max_rss_kib}\n", args.first().copied().unwrap_or(""));
                let _ = f.write_all(line.as_bytes()); // one write: appends do not interleave
            }
        }
        Watched {
            code,
            signal,
            stdout: out_reader.join().unwrap(),
            stderr: err_reader.join().unwrap(),
            elapsed: t.elapsed(),
            max_rss_kib,
            cpu,
            timed_out: timed_out.load(std::sync::atomic::Ordering::SeqCst),
        }
    }
}

/// Runs imgconv with `args`, measuring wall time and peak memory.
pub fn watched(args: &[&str]) -> Watched {
    Watch::default().run(args)
}

/// Notices every `open` of some files (inotify `IN_OPEN`), by any process: the test's
/// way of asserting that imgconv never opened a file, as strace would show.
pub struct OpenWatch {
    fd: libc::c_int,
    watches: Vec<(libc::c_int, std::path::PathBuf)>,
}

impl OpenWatch {
    /// Starts watching `paths` (which must exist).
    pub fn new(paths: &[&Path]) -> Self {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain system calls; the path buffers outlive them.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let mut watches = Vec::new();
        for p in paths {
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
            let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN) };
            assert!(
                wd >= 0,
                "inotify_add_watch {}: {}",
                p.display(),
                std::io::Error::last_os_error()
            );
            watches.push((wd, p.to_path_buf()));
        }
        OpenWatch { fd, watches }
    }

    /// The watched files opened since the last call (each once).
    pub fn opened(&self) -> Vec<std::path::PathBuf> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut at = 0usize;
            while at + 16 <= n as usize {
                let wd = i32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
                if let Some((_, p)) = self.watches.iter().find(|w| w.0 == wd) {
                    if !seen.contains(p) {
                        seen.push(p.clone());
                    }
                }
                at += 16 + len;
            }
        }
        seen
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(self.fd) };
    }
}

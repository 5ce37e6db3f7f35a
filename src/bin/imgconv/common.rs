//! Pieces shared by the subcommands: opening, errors, progress bars, signals.

use std::io::IsTerminal;
use std::path::Path;

use imgconv::{Format, Image, OpenOptions};

/// A command's failure: the exit code and the error to print.
pub type CmdError = (u8, imgconv::Error);

/// A command's outcome.
pub type CmdResult = Result<std::process::ExitCode, CmdError>;

/// Maps a library error to exit code `code`.
pub fn fail(code: u8) -> impl Fn(imgconv::Error) -> CmdError {
    move |e| (code, e)
}

/// Parses a `-f`/`-O` format name.
pub fn parse_format(s: &str) -> Result<Format, String> {
    s.parse::<Format>().map_err(|e| e.to_string())
}

/// Options for reading a source image: spooling folder and tar member.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct InputArgs {
    /// Folder for the temporary copy of a compressed or piped input that needs random
    /// access (qcow2, VDI, sparse VMDK; raw of unrecorded length, except when `convert`
    /// writes raw or qcow2); default $TMPDIR.
    #[arg(long = "tmpdir", value_name = "DIR")]
    pub tmpdir: Option<std::path::PathBuf>,
    /// The member to open when the input is a tar archive holding several images.
    #[arg(long = "member", value_name = "NAME")]
    pub member: Option<String>,
    /// Largest temporary copy of a compressed or piped input (with --untrusted, default
    /// twice the virtual size the image declares plus 64 MiB).
    #[arg(long = "max-spool", value_name = "SIZE", value_parser = parse_size_arg)]
    pub max_spool: Option<u64>,
    /// Largest raw disk read from a stream that records its length nowhere (gzip,
    /// bzip2, zstd without content size, a pipe).
    #[arg(long = "max-size", value_name = "SIZE", value_parser = parse_size_arg)]
    pub max_size: Option<u64>,
}

impl InputArgs {
    /// Puts these options into `o`.
    pub fn apply(&self, o: &mut OpenOptions) {
        o.tmpdir = self.tmpdir.clone();
        o.member = self.member.clone();
        o.max_spool = self.max_spool;
        o.max_size = self.max_size;
    }
}

/// Parses a size argument (`512M`, `2G`, bytes).
pub fn parse_size_arg(s: &str) -> Result<u64, String> {
    imgconv::writer::parse_size(s).map_err(|e| e.to_string())
}

/// Opens a source image (`-` = standard input) with an optional format, trust mode,
/// spooling folder and tar member, for a command that walks it once in order (`map`,
/// `compare`): a raw disk on a stream of unrecorded length is read in that one pass,
/// not copied to a temporary file first.
pub fn open_input(
    path: &str,
    format: Option<Format>,
    untrusted: bool,
    input: &InputArgs,
) -> imgconv::Result<Image> {
    let mut o = if untrusted {
        OpenOptions::untrusted()
    } else {
        OpenOptions::trusted()
    };
    o.format = format;
    o.stream_unknown_length = true;
    input.apply(&mut o);
    imgconv::open(Path::new(path), &o)
}

/// Opens `path` with an optional format and trust mode.
pub fn open_image(path: &str, format: Option<Format>, untrusted: bool) -> imgconv::Result<Image> {
    let mut o = if untrusted {
        OpenOptions::untrusted()
    } else {
        OpenOptions::trusted()
    };
    o.format = format;
    imgconv::open(Path::new(path), &o)
}

/// A progress bar on stderr when `-p` was given and stderr is a terminal.
pub fn progress_bar(enabled: bool) -> Option<indicatif::ProgressBar> {
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(100);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "    ({percent:>3}.00/100%) [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    Some(pb)
}

/// The progress bar's look when the total is not known yet (a stream of unrecorded
/// length): bytes done and speed.
pub fn progress_style_unknown_total() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(
        "    {spinner} {bytes} {bytes_per_sec} (size known at the end)",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner())
}

/// Formats a byte count as qemu-img does ("1 GiB", "196 KiB", "1.5 MiB").
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    // qemu prints three significant digits without trailing zeros ("%0.3g").
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s} {}", UNITS[u])
}

/// Signals that end imgconv after removing its temporary files: interruption and
/// termination, the CPU-time limit (`prlimit --cpu`), alarms, user signals, and a
/// closed output pipe (`imgconv info … | head -1`).
const CLEANUP_SIGNALS: [libc::c_int; 8] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGXCPU,
    libc::SIGALRM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGPIPE,
];

/// Removes temporary outputs and exits on every signal of [`CLEANUP_SIGNALS`]; ignores
/// SIGXFSZ, so that a write past the file-size limit (`prlimit --fsize`, `ulimit -f`)
/// fails with EFBIG and the conversion cleans up like on any other write error.
pub fn install_signal_handlers() {
    extern "C" fn on_signal(sig: libc::c_int) {
        imgconv::io::output::remove_pending_files();
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    for sig in CLEANUP_SIGNALS {
        // SAFETY: installing a handler that only calls async-signal-safe functions
        // (unlink, _exit).
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    // SAFETY: ignoring a signal.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}

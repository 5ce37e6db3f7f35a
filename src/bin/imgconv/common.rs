//! Pieces shared by the subcommands: opening, errors, progress bars, signals.

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
    #[command(flatten)]
    pub remote: RemoteArgs,
}

impl InputArgs {
    /// Puts these options into `o`.
    pub fn apply(&self, o: &mut OpenOptions) {
        o.tmpdir = self.tmpdir.clone();
        o.member = self.member.clone();
        o.max_spool = self.max_spool;
        o.max_size = self.max_size;
        o.remote = self.remote.options();
    }
}

/// Options for images at a URL (`http(s)://`, `docker://`, `oci:`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RemoteArgs {
    /// An HTTP header sent with every request, 'Name: value' (repeatable), e.g.
    /// 'X-Auth-Token: …' for a Glance image export. Never printed.
    #[arg(long = "header", value_name = "'NAME: VALUE'", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// PEM file of CA certificates to trust besides the system's.
    #[arg(long = "ca-cert", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Registry credentials USER:PASSWORD (else the docker config.json, else anonymous).
    #[arg(long = "creds", value_name = "USER:PASSWORD")]
    pub creds: Option<String>,
    /// Platform to pick from a registry image index, OS/ARCH[/VARIANT] (default linux/amd64).
    #[arg(long = "platform", value_name = "OS/ARCH")]
    pub platform: Option<String>,
    /// Seconds to wait for a connection and for each read from a server (default 30).
    #[arg(long = "timeout", value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

impl RemoteArgs {
    /// The library's options for these arguments.
    pub fn options(&self) -> imgconv::io::remote::RemoteOptions {
        let mut r = imgconv::io::remote::RemoteOptions {
            headers: self.headers.clone(),
            ca_cert: self.ca_cert.clone(),
            creds: self.creds.clone(),
            platform: self.platform.clone(),
            ..Default::default()
        };
        if let Some(t) = self.timeout {
            r.timeout = std::time::Duration::from_secs(t.max(1));
        }
        r
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let mut r = imgconv::io::remote::RemoteOptions::default();
    r.header(s).map_err(|e| e.to_string())?;
    Ok(r.headers.remove(0))
}

/// Parses a size argument (`512M`, `2G`, bytes).
pub fn parse_size_arg(s: &str) -> Result<u64, String> {
    imgconv::writer::parse_size(s).map_err(|e| e.to_string())
}

/// Opens a source image (`-` = standard input) with an optional format, trust mode,
/// spooling folder and tar member; without QEMU's read locks when `force_share` (`-U`).
/// With `one_pass`, for a command that walks the image once in order (`map`,
/// `compare`): a raw disk on a stream of unrecorded length is read in that one pass, not
/// copied to a temporary file first.
pub fn open_input(
    path: &str,
    format: Option<Format>,
    untrusted: bool,
    input: &InputArgs,
    force_share: bool,
    one_pass: bool,
) -> imgconv::Result<Image> {
    let mut o = if untrusted {
        OpenOptions::untrusted()
    } else {
        OpenOptions::trusted()
    };
    o.format = format;
    o.force_share = force_share;
    o.stream_unknown_length = one_pass;
    input.apply(&mut o);
    imgconv::open(Path::new(path), &o)
}

/// True when `name` is a URL, a registry image or an OCI layout rather than a file.
pub fn is_remote(name: &str) -> bool {
    imgconv::io::remote::classify(name).is_some()
}

/// Opens `path` with an optional format and trust mode; without QEMU's read locks when
/// `force_share` (`-U`).
pub fn open_image(
    path: &str,
    format: Option<Format>,
    untrusted: bool,
    force_share: bool,
) -> imgconv::Result<Image> {
    let mut o = if untrusted {
        OpenOptions::untrusted()
    } else {
        OpenOptions::trusted()
    };
    o.format = format;
    o.force_share = force_share;
    imgconv::open(Path::new(path), &o)
}

/// Opens the image an argument names (a file name, `json:{...}`, or with `image_opts`
/// an option string); errors read as qemu-img's: `Could not open 'ARG': why`. See
/// [`open_input`] for `one_pass`.
pub fn open_spec(
    arg: &str,
    format: Option<Format>,
    image_opts: bool,
    untrusted: bool,
    input: &InputArgs,
    force_share: bool,
    one_pass: bool,
) -> Result<Image, CmdError> {
    let spec = crate::spec::parse(arg, format, image_opts).map_err(fail(1))?;
    open_input(
        &spec.filename,
        spec.format,
        untrusted,
        input,
        force_share,
        one_pass,
    )
    .map_err(|e| could_not_open(arg, e))
}

/// `Could not open 'ARG': why`, qemu-img's wording for a failed open.
/// A URL is shown without its user, password and query (they may hold secrets).
pub fn could_not_open(arg: &str, e: imgconv::Error) -> CmdError {
    let shown = if is_remote(arg) {
        imgconv::io::remote::redact(arg)
    } else {
        arg.to_string()
    };
    (
        1,
        imgconv::Error::Format(format!("Could not open '{shown}': {}", describe(&e))),
    )
}

/// An error as qemu words it where the two overlap: a missing or unreadable file is
/// `Could not open 'PATH': No such file or directory` (no Rust error codes).
pub fn describe(e: &imgconv::Error) -> String {
    match e {
        imgconv::Error::Io { path, source } => {
            let why = strerror(source);
            match source.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    format!("Could not open '{}': {why}", path.display())
                }
                _ => format!("{}: {why}", path.display()),
            }
        }
        // `-f qcow2` on something else: qemu's words.
        imgconv::Error::Corrupt {
            format: "qcow2",
            structure: "header",
            offset: 0,
            reason,
        } if reason.starts_with("bad magic") => "Image is not in qcow2 format".into(),
        other => other.to_string(),
    }
}

/// The C library's text for an OS error, without Rust's ` (os error N)`.
pub fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Checks a `-t` (target) or `-T` (source) cache mode as qemu-img does; imgconv then
/// ignores it (see the README: cache modes change how qemu does I/O, not the result).
pub fn check_cache_mode(mode: Option<&str>, source: bool) -> Result<(), CmdError> {
    match mode {
        None | Some("none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe") => {
            Ok(())
        }
        Some(m) => Err((
            1,
            imgconv::Error::invalid(if source {
                format!("Invalid source cache option: {m}")
            } else {
                format!("Invalid cache option: {m}")
            }),
        )),
    }
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
pub const CLEANUP_SIGNALS: [libc::c_int; 8] = [
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

/// An error message as printed: control characters escaped ([`esc`]), except the line
/// break of QEMU's two-line lock message (`Failed to get "write" lock` /
/// `Is another process using the image [x]?`), which scripts match as qemu prints it.
pub fn error_text(msg: &str) -> String {
    const LOCK_BREAK: &str = " lock\nIs another process using the image [";
    match msg.split_once(LOCK_BREAK) {
        Some((before, after)) => format!("{}{LOCK_BREAK}{}", esc(before), esc(after)),
        None => esc(msg).into_owned(),
    }
}

/// A string from an image's metadata (a file name, a VMDK createType, a VDI comment…)
/// made safe for a terminal, as git quotes odd file names: unchanged when it holds no
/// control character; otherwise in double quotes with `"`, `\` and every control
/// character escaped (`"\033]0;x\a"`), so that no byte of it can move the cursor,
/// retitle the window or fake a line.
pub fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{b}' => out.push_str("\\v"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let mut b = [0u8; 4];
                for byte in c.encode_utf8(&mut b).bytes() {
                    out.push_str(&format!("\\{byte:03o}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_quoted() {
        assert_eq!(esc("base.qcow2"), "base.qcow2");
        assert_eq!(esc("dir with \\ and é"), "dir with \\ and é");
        assert_eq!(esc("a\u{1b}]0;pwned\u{7}b"), "\"a\\033]0;pwned\\ab\"");
        assert_eq!(esc("x\"\\\n"), "\"x\\\"\\\\\\n\"");
        assert_eq!(esc("\u{9b}2J"), "\"\\302\\2332J\"");
    }

    #[test]
    fn errors_read_as_qemus() {
        let e = imgconv::Error::io("nonexist", std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            describe(&e),
            "Could not open 'nonexist': No such file or directory"
        );
        assert!(check_cache_mode(Some("none"), false).is_ok());
        let (code, e) = check_cache_mode(Some("bogus"), true).unwrap_err();
        assert_eq!(
            (code, e.to_string()),
            (1, "Invalid source cache option: bogus".into())
        );
    }

    #[test]
    fn lock_messages_keep_their_two_lines() {
        let e = imgconv::Error::Locked {
            path: "x\u{1b}.qcow2".into(),
            what: "shared \"write\"".into(),
        };
        assert_eq!(
            error_text(&format!("Could not open 'x': {e}")),
            "Could not open 'x': Failed to get shared \"write\" lock\nIs another process using the image [\"x\\033.qcow2]?\""
        );
        assert_eq!(error_text("a\nb"), "\"a\\nb\"");
    }
}

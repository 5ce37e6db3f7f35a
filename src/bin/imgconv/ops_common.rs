//! Pieces shared by the image-changing subcommands (`rebase`, `commit`, `amend`,
//! `snapshot`, `bitmap`): cache-mode and flag checks, qemu-img's progress lines.

use std::io::Write;
use std::sync::{Arc, Mutex};

use imgconv::convert::ProgressFn;

/// Checks a `-t`/`-T` cache mode as qemu-img does (the mode itself changes nothing
/// here: writes are flushed in the order crash safety needs whatever the mode).
pub fn parse_cache(s: &str) -> Result<String, String> {
    match s {
        "none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe" => {
            Ok(s.to_string())
        }
        _ => Err(format!("Invalid cache option: {s}")),
    }
}

/// `--image-opts` and `--object`, which the image-changing subcommands parse as qemu-img
/// does and then refuse with a reason ([`Unsupported::refuse`]) rather than ignore.
#[derive(clap::Args)]
pub struct Unsupported {
    /// Not supported (image specifications instead of file names).
    #[arg(long = "image-opts", hide = true)]
    image_opts: bool,
    /// Not supported (secrets for encrypted images).
    #[arg(long = "object", hide = true)]
    object: Vec<String>,
}

impl Unsupported {
    /// Fails (exit code 1) when either option was given.
    pub fn refuse(&self) -> Result<(), crate::common::CmdError> {
        refuse_unsupported(self.image_opts, &self.object).map_err(|e| (1, e))
    }
}

/// Options imgconv does not have, refused with a reason rather than ignored.
fn refuse_unsupported(image_opts: bool, objects: &[String]) -> Result<(), imgconv::Error> {
    if image_opts {
        return Err(imgconv::Error::invalid(
            "--image-opts is not supported: give the image as a file name",
        ));
    }
    if !objects.is_empty() {
        return Err(imgconv::Error::invalid(
            "--object is not supported (it defines secrets for encrypted images, which imgconv does not open)",
        ));
    }
    Ok(())
}

/// qemu-img's `-p` output: `    (12.34/100%)\r` on standard output whenever the
/// progress moved by at least one percent, and a newline at the end.
pub struct Progress {
    last: Mutex<Option<f64>>,
}

impl Progress {
    /// A progress printer, when `-p` was given.
    pub fn new(enabled: bool) -> Option<Arc<Progress>> {
        enabled.then(|| {
            Arc::new(Progress {
                last: Mutex::new(None),
            })
        })
    }

    /// Prints the progress `done / total` if it moved enough.
    pub fn update(&self, done: u64, total: u64) {
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*last, Some(l) if pct - l < 1.0 && pct < 100.0) {
            return;
        }
        *last = Some(pct);
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "    ({pct:.2}/100%)\r");
        let _ = out.flush();
    }

    /// The callback the library calls.
    pub fn callback(self: &Arc<Self>) -> Arc<ProgressFn> {
        let me = self.clone();
        Arc::new(move |d, t| me.update(d, t))
    }

    /// Ends the progress line.
    pub fn finish(&self) {
        self.update(1, 1);
        println!();
    }
}

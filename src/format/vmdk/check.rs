//! `check` for VMDK, as `qemu-img check` does it: every grain of the disk is looked up
//! in its extent's grain directory and tables, and a grain stored past the end of its
//! extent file is reported. Like QEMU, the check stops at the first bad grain (the
//! image then fails the check with exit code 1).

use crate::driver::{CheckReport, CheckRequest};
use crate::error::{Error, Result};
use crate::image::Image;

/// Sector size of the messages.
const SECTOR: u64 = 512;

/// Checks the VMDK image in `req.storage`: its extents are opened as the context allows,
/// the parent of a delta disk is not (as qemu-img, the check covers this image only).
pub fn check_storage(req: &CheckRequest<'_>) -> Result<CheckReport> {
    let mut ctx = req.ctx.clone();
    // The parent of a delta disk is not opened, as in qemu-img's check; untrusted, every
    // other file named (extents, the parent) is refused rather than recorded.
    ctx.options.metadata_only = !ctx.options.untrusted;
    let opened = super::open(req.storage.clone(), &ctx)?;
    Ok(check(&Image::from_opened(opened)))
}

/// Checks the opened VMDK `image` by walking its whole map (runs of grains at a time,
/// then grain by grain around a failure to name the first bad grain's sector).
pub fn check(image: &Image) -> CheckReport {
    let dev = image.device();
    let size = dev.size();
    let grain = image
        .info()
        .cluster_size
        .filter(|&g| g >= SECTOR)
        .unwrap_or(64 * 1024);
    let mut r = CheckReport::default();
    let mut pos = 0u64;
    while pos < size {
        match dev.map(pos, size - pos) {
            Ok(e) => pos += e.len.max(1),
            Err(_) => {
                // The run failed somewhere: find the first grain that fails.
                let mut g = pos / grain * grain;
                loop {
                    let len = grain.min(size - g);
                    match dev.map(g, len) {
                        Ok(_) => g += len,
                        Err(e) => {
                            report(&mut r, g / SECTOR, &e);
                            return r;
                        }
                    }
                    if g >= size {
                        // The whole run maps grain by grain (a transient failure).
                        pos = g;
                        break;
                    }
                }
            }
        }
    }
    r
}

/// Records QEMU's message for the grain at `sector` that failed with `e`.
fn report(r: &mut CheckReport, sector: u64, e: &Error) {
    match e {
        Error::Corrupt { reason, .. } if reason.contains("past the end") => {
            r.message(format!(
                "ERROR: cluster offset for sector {sector} points after EOF"
            ));
            r.failed = Some("Invalid argument".into());
        }
        other => {
            r.message(format!(
                "ERROR: could not get cluster_offset for sector {sector}"
            ));
            r.failed = Some(format!("Operation not permitted ({other})"));
        }
    }
}

//! `imgconv check`: verifies an image's metadata (qcow2, VMDK, VDI), as `qemu-img check`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args as ClapArgs;
use imgconv::driver::{CheckReport, CheckRequest};
use imgconv::io::inplace::InPlaceFile;
use imgconv::io::FileStorage;
use imgconv::{Format, OpenOptions};

use crate::common::{fail, parse_format, CmdResult};

/// Arguments of `imgconv check`.
#[derive(ClapArgs)]
pub struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// Repair: `leaks` lowers the refcounts of leaked clusters (`all` is refused).
    #[arg(short = 'r')]
    repair: Option<String>,
    /// Accepted for qemu-img compatibility and ignored.
    #[arg(short = 'q', hide = true)]
    quiet: bool,
    /// Read without QEMU's image locks (for an image another process is writing).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: String,
}

/// Runs `imgconv check`.
pub fn run(a: Args) -> CmdResult {
    let path = Path::new(&a.file);
    // With -r the image is opened once, for writing (QEMU's writer locks): a second,
    // read-only description would hold read locks that conflict with them.
    let writer = match a.repair {
        Some(_) => Some(InPlaceFile::open(path).map_err(|e| {
            (
                1,
                imgconv::Error::Format(format!("Could not open '{}': {e}", a.file)),
            )
        })?),
        None => None,
    };
    let storage = match &writer {
        Some(w) => w.storage().map_err(fail(1))?,
        None => FileStorage::open_image(path, a.force_share).map_err(fail(1))?,
    };
    let format = match a.format {
        Some(f) => f,
        None => imgconv::format::probe_storage(&storage).map_err(fail(1))?,
    };
    let driver = imgconv::format::driver(format);
    let no_checks = || {
        // qemu-img's wording and exit code for formats without a check (or without
        // repairs, when -r was given).
        eprintln!("imgconv: This image format does not support checks");
        Ok(ExitCode::from(63))
    };
    let Some(check) = driver.check else {
        return no_checks();
    };
    let mut options = OpenOptions::trusted().format(format);
    options.force_share = a.force_share;
    let ctx = imgconv::open::context_for_path(path, &options);
    let req = CheckRequest {
        storage: Arc::new(storage),
        ctx: &ctx,
    };
    let could_not = |e| {
        (
            1,
            imgconv::Error::Format(format!("Could not check '{}': {e}", a.file)),
        )
    };
    if a.repair.is_some() && driver.repair.is_none() {
        return no_checks();
    }
    let r = match (a.repair.as_deref(), driver.repair) {
        (None, _) | (_, None) => check(&req).map_err(could_not)?,
        (Some("leaks"), Some(repair)) => {
            let file = writer.as_ref().expect("opened for writing with -r");
            let r = repair(&req, file).map_err(could_not)?;
            print_messages(&r);
            if r.repair_failed {
                return Err((
                    1,
                    imgconv::Error::Format("Check failed: Input/output error".into()),
                ));
            }
            if r.leaks_fixed == 0 {
                return finish(&r, &a, format);
            }
            if a.output == "human" && !a.quiet {
                print!(
                    "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\n",
                    r.leaks_fixed
                );
            }
            let mut again = check(&req).map_err(could_not)?;
            again.leaks_fixed = r.leaks_fixed;
            again
        }
        (Some(other), Some(_)) => {
            return Err((
                1,
                imgconv::Error::unsupported(
                    format.name(),
                    format!("repairing images with -r {other} (only -r leaks); use imgconv convert to write a clean copy"),
                ),
            ))
        }
    };
    print_messages(&r);
    finish(&r, &a, format)
}

/// Prints each problem on stderr, as qemu-img does.
fn print_messages(r: &CheckReport) {
    for m in &r.messages {
        eprintln!("{m}");
    }
}

/// Prints the summary of a finished check (its messages already on stderr) and gives its
/// exit code.
fn finish(r: &CheckReport, a: &Args, format: Format) -> CmdResult {
    if let Some(why) = &r.failed {
        return Err((1, imgconv::Error::Format(format!("Check failed: {why}"))));
    }
    if a.output == "json" {
        println!("{}", json(r, &a.file, format));
    } else if !a.quiet {
        print!("{}", human(r));
    }
    Ok(ExitCode::from(r.exit_code()))
}

/// qemu-img's human summary.
fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let a = r.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// qemu-img's JSON, with its key order; zero optional counters are left out as qemu does.
fn json(r: &CheckReport, filename: &str, format: Format) -> String {
    let mut f: Vec<(&str, serde_json::Value)> = Vec::new();
    if r.image_end_offset != 0 {
        f.push(("image-end-offset", r.image_end_offset.into()));
    }
    if r.compressed_clusters != 0 {
        f.push(("compressed-clusters", r.compressed_clusters.into()));
    }
    if r.total_clusters != 0 {
        f.push(("total-clusters", r.total_clusters.into()));
    }
    if r.corruptions != 0 {
        f.push(("corruptions", r.corruptions.into()));
    }
    f.push(("check-errors", r.check_errors.into()));
    if r.leaks != 0 {
        f.push(("leaks", r.leaks.into()));
    }
    if r.leaks_fixed != 0 {
        f.push(("leaks-fixed", r.leaks_fixed.into()));
    }
    if r.allocated_clusters != 0 {
        f.push(("allocated-clusters", r.allocated_clusters.into()));
    }
    f.push(("filename", filename.into()));
    f.push(("format", format.name().into()));
    if r.fragmented_clusters != 0 {
        f.push(("fragmented-clusters", r.fragmented_clusters.into()));
    }
    let body: Vec<String> = f.iter().map(|(k, v)| format!("    \"{k}\": {v}")).collect();
    format!("{{\n{}\n}}", body.join(",\n"))
}

//! `imgconv check`: verifies an image's metadata (qcow2, VMDK, VDI), as `qemu-img check`.

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::format::qcow2::check::{check, check_and_repair, CheckReport};
use imgconv::io::FileStorage;
use imgconv::Format;

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
    /// Refuse references to other files (VMDK extent files other than the image).
    #[arg(long)]
    untrusted: bool,
    /// Accepted for qemu-img compatibility and ignored.
    #[arg(short = 'q', hide = true)]
    quiet: bool,
    #[arg(short = 'U', long = "force-share", hide = true)]
    force_share: bool,
    /// The image.
    file: String,
}

/// Runs `imgconv check`.
pub fn run(a: Args) -> CmdResult {
    let _ = a.force_share;
    let storage = FileStorage::open(Path::new(&a.file)).map_err(fail(1))?;
    let format = match a.format {
        Some(f) => f,
        None => imgconv::detect::probe(&storage).map_err(fail(1))?,
    };
    if format == Format::Raw {
        // qemu-img's wording and exit code for formats without a check.
        eprintln!("imgconv: This image format does not support checks");
        return Ok(ExitCode::from(63));
    }
    let could_not = |e| {
        (
            1,
            imgconv::Error::Format(format!("Could not check '{}': {e}", a.file)),
        )
    };
    if format != Format::Qcow2 {
        if a.repair.is_some() {
            // As qemu-img: VMDK and VDI checks do not repair, which it words so.
            eprintln!("imgconv: This image format does not support checks");
            return Ok(ExitCode::from(63));
        }
        let r = match format {
            Format::Vdi => imgconv::format::vdi::check::check(&storage).map_err(could_not)?,
            _ => {
                // Extents are opened, the parent of a delta disk is not: as qemu-img,
                // the check covers this image only. Untrusted, any other file named
                // is refused (the parent too, as everywhere).
                let o = if a.untrusted {
                    imgconv::OpenOptions::untrusted().format(format)
                } else {
                    imgconv::OpenOptions::trusted()
                        .format(format)
                        .metadata_only()
                };
                let img = imgconv::open(Path::new(&a.file), &o).map_err(|e| {
                    (
                        1,
                        imgconv::Error::Format(format!("Could not open '{}': {e}", a.file)),
                    )
                })?;
                imgconv::format::vmdk::check::check(&img)
            }
        };
        return finish(&r, &a, format);
    }
    let fix = match a.repair.as_deref() {
        None => false,
        Some("leaks") => true,
        Some(r) => {
            return Err((
                1,
                imgconv::Error::unsupported(
                    "qcow2",
                    format!("repairing images with -r {r} (only -r leaks); use imgconv convert to write a clean copy"),
                ),
            ))
        }
    };
    let mut r = if fix {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&a.file)
            .map_err(|e| (1, imgconv::Error::io(&a.file, e)))?;
        check_and_repair(&storage, Some(&file)).map_err(could_not)?
    } else {
        check(&storage).map_err(could_not)?
    };
    for m in &r.messages {
        eprintln!("{m}");
    }
    if r.repair_failed {
        return Err((
            1,
            imgconv::Error::Format("Check failed: Input/output error".into()),
        ));
    }
    if r.leaks_fixed > 0 {
        if a.output == "human" && !a.quiet {
            print!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\n",
                r.leaks_fixed
            );
        }
        let fixed = r.leaks_fixed;
        r = check(&storage).map_err(could_not)?;
        r.leaks_fixed = fixed;
        for m in &r.messages {
            eprintln!("{m}");
        }
    }
    finish(&r, &a, format)
}

/// Prints the summary of a finished check (messages already on stderr for qcow2) and
/// gives its exit code.
fn finish(r: &CheckReport, a: &Args, format: Format) -> CmdResult {
    if format != Format::Qcow2 {
        for m in &r.messages {
            eprintln!("{m}");
        }
    }
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

//! `imgconv info`: what an image is.

use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::{Format, ImageInfo};

use crate::common::{fail, human_size, parse_format, CmdResult, InputArgs};

/// Arguments of `imgconv info`.
#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Image format (probed from magic bytes when omitted).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// Show every image of the backing chain (opens the backing files; without it, as
    /// qemu-img, no backing or data file is opened).
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Refuse references to other files; report them without opening them.
    #[arg(long)]
    untrusted: bool,
    /// Accepted for qemu-img compatibility (images are always opened read-only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: String,
}

/// Runs `imgconv info`.
pub fn run(a: Args) -> CmdResult {
    let _ = a.force_share;
    // As qemu-img's info: backing and data files are named, not opened, unless the
    // chain is asked for (VMDK extents, part of the image itself, are opened).
    let mut o = if a.untrusted {
        imgconv::OpenOptions::untrusted().metadata_only()
    } else if a.backing_chain {
        imgconv::OpenOptions::trusted()
    } else {
        imgconv::OpenOptions::trusted().metadata_only()
    };
    o.format = a.format;
    a.input.apply(&mut o);
    let img = imgconv::open(&a.file, &o).map_err(fail(1))?;
    let mut chain: Vec<&ImageInfo> = vec![img.info()];
    if a.backing_chain {
        while let Some(b) = chain.last().and_then(|i| i.backing.as_deref()) {
            chain.push(b);
        }
    }
    if a.output == "json" {
        let text = if a.backing_chain {
            serde_json::to_string_pretty(&chain)
        } else {
            serde_json::to_string_pretty(img.info())
        }
        .map_err(|e| (1, imgconv::Error::Format(e.to_string())))?;
        println!("{text}");
    } else {
        let mut first = true;
        for i in chain {
            if !first {
                println!();
            }
            first = false;
            print!("{}", human(i));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The human-readable form, laid out as qemu-img prints it.
pub fn human(i: &ImageInfo) -> String {
    let mut s = String::new();
    s += &format!("image: {}\n", i.filename);
    s += &format!("file format: {}\n", i.format);
    if let Some(c) = &i.compression {
        s += &format!("compression: {c}\n");
    }
    if let Some(m) = &i.archive_member {
        s += &format!("archive member: {m} (tar)\n");
    }
    s += &format!(
        "virtual size: {} ({} bytes)\n",
        human_size(i.virtual_size),
        i.virtual_size
    );
    if let Some(a) = i.actual_size {
        s += &format!("disk size: {}\n", human_size(a));
    }
    if let Some(c) = i.cluster_size {
        s += &format!("cluster_size: {c}\n");
    }
    if let Some(b) = &i.backing_filename {
        s += &format!("backing file: {b}");
        if let Some(f) = &i.full_backing_filename {
            if f != b {
                s += &format!(" (actual path: {f})");
            }
        }
        s += "\n";
    }
    if let Some(f) = &i.backing_filename_format {
        s += &format!("backing file format: {f}\n");
    }
    if !i.snapshots.is_empty() {
        s += "Snapshot list:\n";
        s += &format!(
            "{:<10}{:<17}{:>7}{:>20}{:>16}{:>11}\n",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
        for sn in &i.snapshots {
            let clock = sn.vm_clock_sec;
            s += &format!(
                "{:<10}{:<17}{:>7}{:>20}{:>16}{:>11}\n",
                sn.id,
                sn.name,
                human_size(sn.vm_state_size),
                format_date(sn.date_sec),
                format!(
                    "{:04}:{:02}:{:02}.{:03}",
                    clock / 3600,
                    (clock / 60) % 60,
                    clock % 60,
                    sn.vm_clock_nsec / 1_000_000
                ),
                sn.icount
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "--".into())
            );
        }
    }
    if let Some(d) = i.dirty_flag {
        if d {
            s += "dirty flag: true\n";
        }
    }
    if !i.references.is_empty() {
        s += "References to other files:\n";
        for r in &i.references {
            s += &format!("    {}: {}\n", r.field, r.name);
        }
    }
    if let Some(fs) = &i.format_specific {
        s += "Format specific information:\n";
        if let Some(data) = fs.get("data") {
            human_value(&mut s, data, 1);
        }
    }
    s
}

fn human_value(s: &mut String, v: &serde_json::Value, indent: usize) {
    let pad = "    ".repeat(indent);
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = k.replace('-', " ");
                match v {
                    serde_json::Value::Object(_) => {
                        *s += &format!("{pad}{key}:\n");
                        human_value(s, v, indent + 1);
                    }
                    serde_json::Value::Array(items) => {
                        *s += &format!("{pad}{key}:\n");
                        for (n, it) in items.iter().enumerate() {
                            *s += &format!("{pad}    [{n}]:\n");
                            human_value(s, it, indent + 2);
                        }
                    }
                    _ => *s += &format!("{pad}{key}: {}\n", scalar(v)),
                }
            }
        }
        other => *s += &format!("{pad}{}\n", scalar(other)),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

fn format_date(secs: u64) -> String {
    // Civil date from days since the epoch (UTC), without a date library.
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

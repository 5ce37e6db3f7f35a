//! `imgconv info`: what an image is, in qemu-img's human and JSON shapes.

use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::{Format, ImageInfo};
use serde_json::{json, Map, Value};

use crate::common::{esc, human_size, parse_format, CmdResult, InputArgs};

/// Arguments of `imgconv info`.
#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Image format (probed from magic bytes when omitted).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// The image is an option string (`driver=qcow2,file.filename=x`), not a file name.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// Show every image of the backing chain (opens the backing files; without it, as
    /// qemu-img, no backing or data file is opened).
    #[arg(short = 'b', long = "backing-chain")]
    backing_chain: bool,
    /// Human output: also show what qemu-img does not — every file the image refers
    /// to, VDI header fields. (JSON always has them, as `references` and
    /// `format-details`, keys qemu's parsers do not read.)
    #[arg(long = "details")]
    details: bool,
    /// Refuse references to other files; report them without opening them.
    #[arg(long)]
    untrusted: bool,
    /// QEMU objects (refused: see `convert --object`).
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Read without QEMU's image locks (for an image another process is writing).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: String,
}

/// Runs `imgconv info`.
pub fn run(a: Args) -> CmdResult {
    crate::spec::check_objects(&a.objects).map_err(|e| (1, e))?;
    let spec = crate::spec::parse(&a.file, a.format, a.image_opts).map_err(|e| (1, e))?;
    // As qemu-img's info: backing and data files (and a VDI's parent) are named, not
    // opened, unless the chain is asked for (VMDK extents, part of the image itself,
    // are opened unless untrusted).
    let mut o = if a.untrusted {
        imgconv::OpenOptions::untrusted().metadata_only()
    } else if a.backing_chain {
        imgconv::OpenOptions::trusted()
    } else {
        imgconv::OpenOptions::trusted().metadata_only()
    };
    o.format = spec.format;
    o.force_share = a.force_share;
    a.input.apply(&mut o);
    let img =
        imgconv::open(&spec.filename, &o).map_err(|e| crate::common::could_not_open(&a.file, e))?;
    let mut chain: Vec<&ImageInfo> = vec![img.info()];
    if a.backing_chain {
        while let Some(b) = chain.last().and_then(|i| i.backing.as_deref()) {
            chain.push(b);
        }
    }
    let follow = !a.untrusted;
    if a.output == "json" {
        // Snapshots (up to 65535 of them) are written one by one, never held as a
        // whole tree of JSON values.
        let tree = if a.backing_chain {
            Value::Array(chain.iter().map(|i| json_info(i, follow)).collect())
        } else {
            json_info(img.info(), follow)
        };
        let objects: Vec<&Value> = match &tree {
            Value::Array(list) => list.iter().collect(),
            one => vec![one],
        };
        let lists: Vec<(&Value, &[imgconv::image::SnapshotInfo])> = objects
            .iter()
            .zip(&chain)
            .filter_map(|(o, i)| Some((o.get("snapshots")?, i.snapshots.as_slice())))
            .collect();
        let mut deferred = |v: &Value, s: &mut String, level: usize, sink: crate::qjson::Sink| {
            let Some((_, list)) = lists.iter().find(|(p, _)| std::ptr::eq(*p, v)) else {
                return false;
            };
            crate::qjson::write_list(s, list.iter().map(|x| json!(x)), level, sink);
            true
        };
        let mut out = std::io::stdout().lock();
        crate::qjson::write_to(&mut out, &tree, &mut deferred)
            .map_err(|e| (1, imgconv::Error::io("standard output", e)))?;
    } else {
        let mut first = true;
        for i in chain {
            if !first {
                println!();
            }
            first = false;
            print!("{}", human(i, a.details, follow));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The file nodes qemu lists under an image (`Child node '/file':` and, for VMDK
/// extents in files of their own, `'/extents.N'`): name, path, length, allocated bytes.
fn children(i: &ImageInfo, follow: bool) -> Vec<(String, String, u64, u64)> {
    let stat = |p: &str| -> Option<(u64, u64)> {
        let m = std::fs::metadata(p).ok()?;
        if !m.is_file() {
            return None;
        }
        use std::os::unix::fs::MetadataExt;
        // qemu's file driver reports whole sectors.
        Some((m.len().next_multiple_of(512), m.blocks() * 512))
    };
    let mut out = Vec::new();
    if follow && i.format == Format::Vmdk {
        let extents = match &i.format_specific {
            Some(imgconv::details::FormatDetails::Vmdk(v)) => v.extents.as_slice(),
            _ => &[],
        };
        for (n, e) in extents.iter().enumerate() {
            let name = e.filename.as_str();
            if name == i.filename {
                continue;
            }
            if let Some((len, alloc)) = stat(name) {
                out.push((format!("extents.{n}"), name.to_string(), len, alloc));
            }
        }
    }
    if i.filename != "-" {
        if let Some((len, alloc)) = stat(&i.filename) {
            out.push(("file".to_string(), i.filename.clone(), len, alloc));
        }
    }
    out
}

/// The JSON object qemu-img prints (QAPI `ImageInfo`), plus imgconv's `compression`,
/// `archive-member` and `references`, which qemu's parsers ignore.
/// The snapshot list is a placeholder (`null`) for the caller to write item by item.
pub fn json_info(i: &ImageInfo, follow: bool) -> Value {
    let mut m = Map::new();
    // Insertion order is QAPI's: qemu's key order depends on it within a bucket.
    m.insert("filename".into(), json!(i.filename));
    m.insert("format".into(), json!(i.format.name()));
    m.insert("dirty-flag".into(), json!(i.dirty_flag.unwrap_or(false)));
    if let Some(a) = i.actual_size {
        m.insert("actual-size".into(), json!(a));
    }
    m.insert("virtual-size".into(), json!(i.virtual_size));
    if let Some(c) = i.cluster_size {
        m.insert("cluster-size".into(), json!(c));
    }
    if let Some(b) = &i.backing_filename {
        m.insert("backing-filename".into(), json!(b));
    }
    if let Some(b) = &i.full_backing_filename {
        m.insert("full-backing-filename".into(), json!(b));
    }
    if let Some(b) = &i.backing_filename_format {
        m.insert("backing-filename-format".into(), json!(b));
    }
    if !i.snapshots.is_empty() {
        m.insert("snapshots".into(), Value::Null);
    }
    if let Some(fs) = &i.format_specific {
        m.insert(format_specific_key(i.format).into(), json!(fs));
    }
    if let Some(c) = &i.wrapper {
        m.insert("compression".into(), json!(c));
    }
    if let Some(a) = &i.archive_member {
        m.insert("archive-member".into(), json!(a));
    }
    if !i.references.is_empty() {
        m.insert("references".into(), json!(i.references));
    }
    let kids: Vec<Value> = children(i, follow)
        .into_iter()
        .map(|(name, path, len, alloc)| {
            json!({
                "name": name,
                "info": {
                    "children": [],
                    "virtual-size": len,
                    "filename": path,
                    "format": "file",
                    "actual-size": alloc,
                    "format-specific": {"type": "file", "data": {}},
                    "dirty-flag": false,
                }
            })
        })
        .collect();
    m.insert("children".into(), Value::Array(kids));
    Value::Object(m)
}

/// Where an image's format-specific fields go: `format-specific` for the formats qemu
/// reports them for, `format-details` for the others (VDI), so that what qemu's
/// parsers read stays what qemu-img prints.
fn format_specific_key(format: Format) -> &'static str {
    match format {
        Format::Qcow2 | Format::Vmdk => "format-specific",
        _ => "format-details",
    }
}

/// The human-readable form, laid out as qemu-img prints it; strings from the image
/// are escaped (see [`esc`]). `details` adds what qemu-img does not print.
pub fn human(i: &ImageInfo, details: bool, follow: bool) -> String {
    let mut s = String::new();
    s += &format!("image: {}\n", esc(&i.filename));
    s += &format!("file format: {}\n", i.format);
    if let Some(c) = &i.wrapper {
        s += &format!("compression: {c}\n");
    }
    if let Some(m) = &i.archive_member {
        s += &format!("archive member: {} (tar)\n", esc(m));
    }
    s += &format!(
        "virtual size: {} ({} bytes)\n",
        human_size(i.virtual_size),
        i.virtual_size
    );
    match i.actual_size {
        Some(a) => s += &format!("disk size: {}\n", human_size(a)),
        None => s += "disk size: unavailable\n",
    }
    if let Some(c) = i.cluster_size {
        s += &format!("cluster_size: {c}\n");
    }
    if i.dirty_flag == Some(true) {
        s += "cleanly shut down: no\n";
    }
    if let Some(b) = &i.backing_filename {
        s += &format!("backing file: {}", esc(b));
        if let Some(f) = &i.full_backing_filename {
            if f != b {
                s += &format!(" (actual path: {})", esc(f));
            }
        }
        s += "\n";
    }
    if let Some(f) = &i.backing_filename_format {
        s += &format!("backing file format: {}\n", esc(f));
    }
    if !i.snapshots.is_empty() {
        s += "Snapshot list:\n";
        // qemu's columns: "%-7s %-16s %8s %19s %15s %10s".
        s += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
        for sn in &i.snapshots {
            let clock = sn.vm_clock_sec;
            s += &format!(
                "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
                esc(&sn.id),
                esc(&sn.name),
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
    let qemu_has = format_specific_key(i.format) == "format-specific";
    if let Some(fs) = i.format_specific.as_ref().filter(|_| qemu_has || details) {
        s += "Format specific information:\n";
        let fs = serde_json::to_value(fs).unwrap_or_default();
        if let Some(data) = fs.get("data") {
            human_value(&mut s, data, 1);
        }
    }
    if details && !i.references.is_empty() {
        s += "References to other files:\n";
        for r in &i.references {
            s += &format!("    {}: {}\n", r.field, esc(&r.name));
        }
    }
    for (name, path, len, alloc) in children(i, follow) {
        s += &format!("Child node '/{name}':\n");
        s += &format!("    filename: {}\n", esc(&path));
        s += "    protocol type: file\n";
        s += &format!("    file length: {} ({len} bytes)\n", human_size(len));
        s += &format!("    disk size: {}\n", human_size(alloc));
    }
    s
}

fn human_value(s: &mut String, v: &Value, indent: usize) {
    let pad = "    ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, v) in crate::qjson::ordered(m) {
                let key = k.replace('-', " ");
                match v {
                    Value::Object(_) => {
                        *s += &format!("{pad}{key}:\n");
                        human_value(s, v, indent + 1);
                    }
                    Value::Array(items) => {
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

fn scalar(v: &Value) -> String {
    match v {
        Value::String(x) => esc(x).into_owned(),
        other => other.to_string(),
    }
}

/// A snapshot's date as qemu prints it: local time, `YYYY-MM-DD HH:MM:SS`.
fn format_date(secs: u64) -> String {
    let t = secs.min(i64::MAX as u64) as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which lives on this stack frame.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

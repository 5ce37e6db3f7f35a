//! `imgconv map`: where an image's data lies.

use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::{Extent, ExtentKind, Format};
use serde::Serialize;

use crate::common::{fail, open_input, parse_format, CmdResult, InputArgs};

/// Arguments of `imgconv map`.
#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// Refuse references to other files (images from strangers).
    #[arg(long)]
    untrusted: bool,
    /// Accepted for qemu-img compatibility and ignored.
    #[arg(short = 'U', long = "force-share", hide = true)]
    force_share: bool,
    /// The image.
    file: String,
}

/// One line of `map --output=json`, with qemu-img's field names.
#[derive(Serialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

fn mergeable(prev: &Extent, e: &Extent) -> bool {
    prev.end() == e.offset
        && prev.kind == e.kind
        && prev.depth == e.depth
        && prev.compressed == e.compressed
        && match (prev.host_offset, e.host_offset) {
            (Some(a), Some(b)) => a + prev.len == b,
            (None, None) => true,
            _ => false,
        }
}

/// Runs `imgconv map`.
pub fn run(a: Args) -> CmdResult {
    let _ = a.force_share;
    let img = open_input(&a.file, a.format, a.untrusted, &a.input).map_err(fail(1))?;
    let dev = img.device();
    let mut extents: Vec<Extent> = Vec::new();
    let mut pos = 0;
    // The size is re-read: a raw stream of unrecorded length learns it at its end.
    while pos < dev.size() {
        let e = dev.map(pos, dev.size() - pos).map_err(fail(1))?;
        pos = e.end();
        match extents.last_mut() {
            Some(p) if mergeable(p, &e) => p.len += e.len,
            _ => extents.push(e),
        }
    }
    if a.output == "json" {
        let entries: Vec<MapEntry> = extents
            .iter()
            .map(|e| MapEntry {
                start: e.offset,
                length: e.len,
                depth: e.depth,
                present: e.kind != ExtentKind::Unallocated,
                zero: e.kind.reads_as_zero(),
                data: e.kind == ExtentKind::Data,
                compressed: e.compressed,
                offset: e.host_offset,
            })
            .collect();
        let text = serde_json::to_string_pretty(&entries)
            .map_err(|e| (1, imgconv::Error::Format(e.to_string())))?;
        println!("{text}");
    } else {
        println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        for e in extents.iter().filter(|e| e.kind == ExtentKind::Data) {
            let mapped = e
                .host_offset
                .map(|o| format!("{o:#x}"))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<#16x}{:<#16x}{:<16}{}",
                e.offset,
                e.len,
                mapped,
                img.info().filename
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! `imgconv map`: where an image's data lies, in qemu-img's two shapes.
//!
//! The map is printed as it is walked: one entry is held at a time (merged with the
//! next while they continue each other), so memory stays the same whatever the number
//! of extents — a hostile image can make millions.

use std::io::Write;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::writer::parse_size;
use imgconv::Format;

use crate::common::{esc, fail, open_spec, parse_format, CmdResult, InputArgs};
use crate::status::{StatusReader, ALLOCATED, DATA, OFFSET_VALID, ZERO};

/// Arguments of `imgconv map`.
#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// The image is an option string (`driver=qcow2,file.filename=x`), not a file name.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// Map from this offset on (k, M, G… suffixes).
    #[arg(long = "start-offset", value_name = "OFFSET")]
    start_offset: Option<String>,
    /// Map at most this many bytes.
    #[arg(long = "max-length", value_name = "LENGTH")]
    max_length: Option<String>,
    /// Refuse references to other files (images from strangers).
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

/// One map entry, as qemu-img's `MapEntry`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
    /// The file holding the data (entries with an offset only).
    file: Option<String>,
}

impl Entry {
    /// True when `next` continues `self` (qemu's `entry_mergeable`).
    fn continued_by(&self, next: &Entry) -> bool {
        self.length > 0
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.file == next.file
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// Runs `imgconv map`.
pub fn run(a: Args) -> CmdResult {
    crate::spec::check_objects(&a.objects).map_err(fail(1))?;
    let start = match &a.start_offset {
        Some(s) => parse_size(s).map_err(|_| {
            (
                1,
                imgconv::Error::invalid(format!("Invalid start offset specified: '{s}'")),
            )
        })?,
        None => 0,
    };
    let max_length = match &a.max_length {
        Some(s) => parse_size(s).map_err(|_| {
            (
                1,
                imgconv::Error::invalid(format!("Invalid max length specified: '{s}'")),
            )
        })?,
        None => u64::MAX,
    };
    let img = open_spec(
        &a.file,
        a.format,
        a.image_opts,
        a.untrusted,
        &a.input,
        a.force_share,
        true,
    )?;
    let status = StatusReader::new(&img).coarse();
    let end = status.size().min(start.saturating_add(max_length));
    let json = a.output == "json";
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 << 10, stdout.lock());
    let r = walk(&status, start, end, json, &mut out)
        .and_then(|()| out.flush().map_err(|e| (1, imgconv::Error::Stream(e))));
    match r {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // The reader stopped reading (`| head`): end quietly, as qemu-img (which the
        // signal ends) does, with the shell's code for it.
        Err((_, imgconv::Error::Stream(e))) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(ExitCode::from(141))
        }
        Err(e) => Err(e),
    }
}

/// Walks `[start, end)` and prints each entry as soon as the next one does not
/// continue it.
fn walk(
    status: &StatusReader,
    start: u64,
    end: u64,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), crate::common::CmdError> {
    let io = |e: std::io::Error| (1, imgconv::Error::Stream(e));
    if json {
        out.write_all(b"[").map_err(io)?;
    } else {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )
        .map_err(io)?;
    }
    let mut curr = Entry {
        start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
        file: None,
    };
    // The end is re-read: a raw stream of unrecorded length learns its size at its end.
    while curr.start + curr.length < end.min(status.size()) {
        let end = end.min(status.size());
        let offset = curr.start + curr.length;
        // qemu probes at most 1 GiB at a time.
        let s = status
            .status(offset, (end - offset).min(1 << 30))
            .map_err(|e| {
                (
                    1,
                    imgconv::Error::Format(format!(
                        "Could not read file metadata: {}",
                        crate::common::describe(&e)
                    )),
                )
            })?;
        let has_offset = s.flags & OFFSET_VALID != 0;
        let mut next = Entry {
            start: offset,
            length: s.len.min(end - offset),
            depth: s.depth,
            present: s.flags & ALLOCATED != 0,
            zero: s.flags & ZERO != 0,
            data: s.flags & DATA != 0,
            compressed: s.compressed,
            offset: s.host_offset.filter(|_| has_offset),
            file: has_offset.then(|| status.file_at(s.depth, offset).to_string()),
        };
        if curr.continued_by(&next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            dump(&curr, json, true, out)?;
            if !json && (!next.data || next.zero) {
                // The human form does not tell zero kinds apart: merge them more.
                next.data = false;
                next.zero = true;
            }
        }
        curr = next;
    }
    if curr.length > 0 || json {
        dump(&curr, json, false, out)?;
    }
    if json {
        out.write_all(b"]\n").map_err(io)?;
    }
    Ok(())
}

/// Prints one entry as qemu-img does (`more`: another entry follows).
fn dump(
    e: &Entry,
    json: bool,
    more: bool,
    out: &mut dyn Write,
) -> Result<(), crate::common::CmdError> {
    let io = |e: std::io::Error| (1, imgconv::Error::Stream(e));
    if json {
        write!(
            out,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        )
        .map_err(io)?;
        if let Some(o) = e.offset {
            write!(out, ", \"offset\": {o}").map_err(io)?;
        }
        out.write_all(b"}").map_err(io)?;
        if more {
            out.write_all(b",\n").map_err(io)?;
        }
        return Ok(());
    }
    if e.data && e.offset.is_none() {
        return Err((
            1,
            imgconv::Error::Format(
                "File contains external, encrypted or compressed clusters.".into(),
            ),
        ));
    }
    if e.data && !e.zero {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}{}",
            hex(e.start),
            hex(e.length),
            hex(e.offset.unwrap_or(0)),
            esc(e.file.as_deref().unwrap_or(""))
        )
        .map_err(io)?;
    }
    Ok(())
}

/// `%#x`: 0 without a prefix, as printf prints it.
fn hex(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}

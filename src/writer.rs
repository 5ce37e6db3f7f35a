//! The interface every format writer implements, driven by the conversion engine.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::detect::Format;
use crate::error::{Error, Result};

/// Compresses (or otherwise encodes) one grain on the engine's worker threads.
pub trait GrainEncoder: Send + Sync {
    /// Encodes the grain at guest `offset`. `Ok(None)` means "store it as it is" (the
    /// encoded form would not be smaller).
    fn encode(&self, offset: u64, grain: &[u8]) -> Result<Option<Vec<u8>>>;
}

/// A run of guest data handed to a writer, in ascending order.
#[derive(Debug)]
pub struct DataRun<'a> {
    /// Guest offset, a multiple of the writer's grain size.
    pub offset: u64,
    /// The bytes; a multiple of the grain size long except at the end of the disk.
    pub data: &'a [u8],
    /// With an encoder: one entry per grain of `data` (`None` = store that grain plain).
    pub encoded: Option<&'a [Option<Vec<u8>>]>,
}

/// A format writer. The engine calls `write_data` and `write_zeros` with ascending,
/// non-overlapping, grain-aligned ranges that together cover the disk, then `finish`.
pub trait ImageWriter: Send {
    /// Granularity of the format (cluster, grain, block). Runs are aligned to it.
    fn grain_size(&self) -> u64;

    /// The encoder the engine's workers run on each grain, if the writer compresses.
    fn encoder(&self) -> Option<Arc<dyn GrainEncoder>> {
        None
    }

    /// Stores guest data.
    fn write_data(&mut self, run: DataRun<'_>) -> Result<()>;

    /// True when [`copy_range`](Self::copy_range) works: copy offloading (`convert -C`).
    fn copy_range_supported(&self) -> bool {
        false
    }

    /// Stores `len` bytes of `src` from `src_offset` at guest `offset`, letting the
    /// kernel copy them (`copy_file_range`) instead of passing them through memory.
    /// Called instead of `write_data`, with the same ordering rules, when
    /// [`copy_range_supported`](Self::copy_range_supported).
    fn copy_range(
        &mut self,
        _src: &std::fs::File,
        _src_offset: u64,
        offset: u64,
        _len: u64,
    ) -> Result<()> {
        Err(Error::Format(format!(
            "internal error: copy offloading at {offset:#x} into a writer without it"
        )))
    }

    /// Records that `[offset, offset + len)` must read as zeros. On a fresh target with no
    /// backing file this usually costs nothing.
    fn write_zeros(&mut self, offset: u64, len: u64) -> Result<()>;

    /// Sets the virtual size of an image made by [`crate::format::create_writer_unsized`]
    /// (its source's length was unknown until the end); called once, after the last run
    /// and before `finish`. Writers that need the size up front refuse to be made so.
    fn set_size(&mut self, size: u64) -> Result<()> {
        Err(Error::Format(format!(
            "internal error: this writer was given its size ({size}) at creation"
        )))
    }

    /// Writes the remaining metadata and flushes. The engine then commits the output.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Writes into an existing image in place (the base image of `commit`), at any
/// offset, in one transaction that [`finish`](InPlaceWriter::finish) makes durable.
pub trait InPlaceWriter {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Granularity of the format's allocation: writes and zeroed ranges are aligned to
    /// it (or end at the end of the disk).
    fn grain_size(&self) -> u64;

    /// Grows the virtual disk to `size` bytes; the new space reads as zeros.
    fn grow(&mut self, size: u64) -> Result<()>;

    /// Writes `data` at guest `offset`.
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()>;

    /// Makes `[offset, offset + len)` read as zeros.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()>;

    /// Makes the writes durable (and, for formats with metadata, visible).
    fn finish(self: Box<Self>) -> Result<()>;
}

/// What a writer is asked to make: qemu-img's `-o` options, `-c`, and a backing file.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// `-o key=value` pairs, in order. Each writer takes the keys it knows and refuses
    /// the rest.
    pub options: BTreeMap<String, String>,
    /// `-c`: compress the data (formats that can).
    pub compressed: bool,
    /// `-B` / `-o backing_file`: the backing file name to record.
    pub backing_file: Option<String>,
    /// `-F` / `-o backing_fmt`: its format.
    pub backing_format: Option<Format>,
}

/// Splits a qemu option string at its commas (`a=b,c=d`; `,,` stands for a comma in a
/// value), as `-o` and `--image-opts` take them. Empty items are kept.
pub fn split_options(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
}

impl WriteOptions {
    /// Parses a qemu-img `-o` string (`a=b,c=d`; `,,` escapes a comma) into `options`,
    /// moving `backing_file` and `backing_fmt` to their fields.
    pub fn parse_o(&mut self, s: &str) -> Result<()> {
        for item in split_options(s).into_iter().filter(|i| !i.is_empty()) {
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), v.to_string()),
                None => (item.trim().to_string(), "on".to_string()),
            };
            match k.as_str() {
                "backing_file" => self.backing_file = Some(v),
                "backing_fmt" => self.backing_format = Some(v.parse()?),
                _ => {
                    self.options.insert(k, v);
                }
            }
        }
        Ok(())
    }

    /// Takes option `key` out of the map (so that leftovers can be reported).
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.options.remove(key)
    }

    /// Fails naming every option still in the map: the writer did not know them.
    pub fn reject_unknown(&self, format: Format) -> Result<()> {
        if self.options.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = self.options.keys().map(String::as_str).collect();
        Err(Error::invalid(format!(
            "invalid option(s) for format '{format}': {}",
            keys.join(", ")
        )))
    }
}

/// Parses an on/off option value as qemu-img does.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(Error::invalid(format!("option {key}: '{v}' is not on/off"))),
    }
}

/// Parses a size as qemu-img does: a number with an optional suffix k, M, G, T, P, E
/// (powers of 1024; `b` or none = bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let bad = || Error::invalid(format!("invalid size '{s}'"));
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: u64 = match suffix.trim() {
        "" | "b" | "B" => 1,
        "k" | "K" | "KiB" => 1 << 10,
        "M" | "m" | "MiB" => 1 << 20,
        "G" | "g" | "GiB" => 1 << 30,
        "T" | "t" | "TiB" => 1 << 40,
        "P" | "p" | "PiB" => 1 << 50,
        "E" | "e" | "EiB" => 1 << 60,
        _ => return Err(bad()),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let v = f * mult as f64;
    if !(0.0..1.8e19).contains(&v) {
        return Err(bad());
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_o_strings() {
        let mut w = WriteOptions::default();
        w.parse_o("cluster_size=65536,backing_file=a,,b.qcow2,backing_fmt=qcow2,lazy_refcounts")
            .unwrap();
        assert_eq!(w.backing_file.as_deref(), Some("a,b.qcow2"));
        assert_eq!(w.backing_format, Some(Format::Qcow2));
        assert_eq!(w.take("cluster_size").as_deref(), Some("65536"));
        assert_eq!(w.take("lazy_refcounts").as_deref(), Some("on"));
        w.reject_unknown(Format::Qcow2).unwrap();
        w.options.insert("bogus".into(), "1".into());
        assert!(w.reject_unknown(Format::Qcow2).is_err());
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 1572864);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999E").is_err());
    }
}

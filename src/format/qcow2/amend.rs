//! `amend` for qcow2: the options QEMU lets an existing image change — `compat`
//! (0.10 ↔ 1.1), `lazy_refcounts`, `refcount_bits`, `size`, `data_file_raw` (off only)
//! and `data_file` (renaming an external data file) — applied in QEMU's order
//! (upgrade, refcount width, data file, backing check, lazy refcounts, size, downgrade)
//! with QEMU's checks and messages, all in one [`Qcow2Edit`] transaction: an option
//! that is refused leaves the image untouched.

use super::edit::{Allocation, Qcow2Edit};
use super::header::{
    parse_u64_table, serialize_u64_table, AutoclearFeatures, CompatibleFeatures,
    IncompatibleFeatures, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO,
};
use super::FMT;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::limits::MAX_QCOW2_L1_BYTES;
use crate::writer::{parse_bool, parse_size, WriteOptions};

/// The options `qemu-img amend -o help` lists for qcow2, in its words.
pub const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// Options of `qemu-img create` that `amend` cannot change.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "encryption",
    "encrypt.format",
    "nocow",
    "extent_size_hint",
];

/// What an `amend -o …` asks for; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendRequest {
    /// `compat`: 2 (`0.10`, `v2`) or 3 (`1.1`, `v3`).
    pub version: Option<u32>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits`.
    pub refcount_bits: Option<u32>,
    /// `size`.
    pub size: Option<u64>,
    /// `backing_file`: must be the current one (QEMU changes it only by `rebase`).
    pub backing_file: Option<String>,
    /// `backing_fmt`: must be the current one.
    pub backing_format: Option<String>,
    /// Whether `backing_file` / `backing_fmt` were given at all.
    pub backing_given: bool,
    /// `data_file`: the external data file's new name.
    pub data_file: Option<String>,
    /// `data_file_raw`.
    pub data_file_raw: Option<bool>,
}

impl AmendRequest {
    /// Parses the `-o` string of `qemu-img amend` for qcow2, with qemu-img's errors.
    pub fn parse(s: &str) -> Result<Self> {
        let mut o = WriteOptions::default();
        o.parse_o(s).map_err(|_| {
            // backing_fmt is parsed as a format name there; any string is fine here.
            Error::invalid(format!("Invalid options: {s}"))
        })?;
        let mut r = AmendRequest {
            backing_given: o.backing_file.is_some() || o.backing_format.is_some(),
            backing_file: o.backing_file.take(),
            backing_format: o.backing_format.take().map(|f| f.name().to_string()),
            ..AmendRequest::default()
        };
        for (k, v) in std::mem::take(&mut o.options) {
            match k.as_str() {
                "compat" => {
                    r.version = Some(match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => {
                            return Err(Error::invalid(format!("Unknown compatibility level {v}")))
                        }
                    })
                }
                "lazy_refcounts" => r.lazy_refcounts = Some(parse_bool(&k, &v)?),
                "refcount_bits" => {
                    let bits: u32 = v.parse().unwrap_or(0);
                    if bits == 0 || bits > 64 || !bits.is_power_of_two() {
                        return Err(Error::invalid(
                            "Refcount width must be a power of two and may not exceed 64 bits",
                        ));
                    }
                    r.refcount_bits = Some(bits);
                }
                "size" => r.size = Some(parse_size(&v)?),
                "data_file" => r.data_file = Some(v),
                "data_file_raw" => r.data_file_raw = Some(parse_bool(&k, &v)?),
                k if k.starts_with("encrypt.") => {
                    return Err(Error::invalid(
                        "Can't amend encryption options - encryption not present",
                    ))
                }
                k if CREATE_ONLY.contains(&k) => {
                    return Err(Error::invalid(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    )))
                }
                k => return Err(Error::invalid(format!("Invalid parameter '{k}'"))),
            }
        }
        Ok(r)
    }
}

/// Applies `r` to the image being edited. `view` is the image as it reads now (with
/// its backing chain) and `backing_size` its backing file's size: growing the disk
/// needs them to keep the new space reading as zeros.
pub fn amend(
    edit: &mut Qcow2Edit,
    r: &AmendRequest,
    view: Option<&dyn BlockDevice>,
    backing_size: Option<u64>,
) -> Result<()> {
    let old_version = edit.header.version;
    let new_version = r.version.unwrap_or(old_version);
    if r.data_file.is_some() && !edit.has_data_file() {
        return Err(Error::invalid(
            "data-file can only be set for images that use an external data file",
        ));
    }
    let raw_now = edit
        .header
        .autoclear_features
        .contains(AutoclearFeatures::DATA_FILE_RAW);
    if r.data_file_raw == Some(true) && !raw_now {
        return Err(Error::invalid(
            "data-file-raw cannot be set on existing images",
        ));
    }
    // Upgrade first: some features need version 3.
    if new_version > old_version {
        edit.header.version = 3;
        if edit.snapshots.iter().any(|s| s.extra.len() < 16) {
            edit.snapshots_changed();
        }
    }
    if let Some(bits) = r.refcount_bits {
        if bits != edit.header.refcount_bits() {
            if new_version < 3 && bits != 16 {
                return Err(Error::invalid(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
                ));
            }
            edit.header.refcount_order = bits.trailing_zeros();
        }
    }
    if r.data_file_raw == Some(false) {
        edit.header
            .autoclear_features
            .remove(AutoclearFeatures::DATA_FILE_RAW);
    }
    if let Some(d) = &r.data_file {
        edit.set_data_file(d.clone());
    }
    if r.backing_given
        && (r.backing_file != edit.backing_file || r.backing_format != edit.backing_format)
    {
        return Err(Error::invalid(
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
        ));
    }
    match r.lazy_refcounts {
        Some(true) => {
            if new_version < 3 {
                return Err(Error::invalid(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            edit.header.compatible_features |= CompatibleFeatures::LAZY_REFCOUNTS;
        }
        Some(false) => {
            // The refcounts this transaction writes are exact: the image is clean.
            edit.header
                .compatible_features
                .remove(CompatibleFeatures::LAZY_REFCOUNTS);
        }
        None => {}
    }
    if let Some(size) = r.size {
        resize(edit, size, view, backing_size)?;
    }
    if new_version < old_version {
        downgrade(edit)?;
    }
    Ok(())
}

/// Changes the virtual size, as QEMU's qcow2 truncate does: shrinking drops every
/// cluster past the new end; growing keeps the new space reading as zeros, with zero
/// clusters where the backing file reaches into it and the old last cluster's tail
/// zeroed. Persistent bitmaps follow the new size.
pub fn resize(
    edit: &mut Qcow2Edit,
    new_size: u64,
    view: Option<&dyn BlockDevice>,
    backing_size: Option<u64>,
) -> Result<()> {
    if new_size % 512 != 0 {
        return Err(Error::invalid("The new size must be a multiple of 512"));
    }
    let old = edit.size();
    let cs = edit.cluster_size();
    if new_size > old {
        if old % cs != 0 {
            // The tail of the old last cluster becomes guest-visible: make it zeros.
            let gc = old / cs;
            let shows = edit.allocation(gc)? != Allocation::Unallocated
                || backing_size.is_some_and(|b| b > old);
            if shows {
                let view = view.ok_or_else(|| {
                    Error::invalid("qcow2: growing needs the image's current contents")
                })?;
                let mut data = vec![0u8; cs as usize];
                let n = (old - gc * cs) as usize;
                view.read_at(&mut data[..n], gc * cs)?;
                super::rebase::write_cluster(edit, gc, &data, None)?;
            }
        }
        if let Some(b) = backing_size.filter(|&b| b > old) {
            let first = old.div_ceil(cs);
            let end = b.min(new_size).div_ceil(cs);
            for gc in first..end {
                edit.write_zero_cluster(gc)?;
            }
        }
    }
    edit.set_size(new_size)?;
    super::bitmap::resize_all(edit, old, new_size)
}

/// Turns the image into version 2 (compat=0.10) with QEMU's checks, after the other
/// options: refcounts of 16 bits, no external data file, snapshots that v2 programs
/// read right, no incompatible features but a zstd type without compressed clusters;
/// zero clusters become unallocated (no backing file) or clusters of zeros. Persistent
/// bitmaps, which v2 cannot hold, are refused too (QEMU drops them and leaks their
/// clusters).
fn downgrade(edit: &mut Qcow2Edit) -> Result<()> {
    if edit.header.refcount_order != 4 {
        return Err(Error::invalid("compat=0.10 requires refcount_bits=16"));
    }
    if edit.has_data_file() {
        return Err(Error::invalid("Cannot downgrade an image with a data file"));
    }
    let size = edit.size();
    if edit
        .snapshots
        .iter()
        .any(|s| s.vm_state_size() > u32::MAX as u64 || s.disk_size().unwrap_or(size) != size)
    {
        return Err(Error::invalid(
            "Internal snapshots prevent downgrade of image",
        ));
    }
    let incompatible = edit.header.incompatible_features
        & !(IncompatibleFeatures::DIRTY | IncompatibleFeatures::COMPRESSION_TYPE);
    if !incompatible.is_empty() {
        return Err(Error::invalid(format!(
            "Cannot downgrade an image with incompatible features {:#x} set",
            incompatible.bits()
        )));
    }
    if !edit.bitmaps.is_empty() {
        return Err(Error::unsupported(
            FMT,
            "downgrading an image with persistent bitmaps to compat=0.10 (version 2 cannot hold them; remove them first)",
        ));
    }
    expand_zero_clusters(edit)?;
    if edit
        .header
        .incompatible_features
        .contains(IncompatibleFeatures::COMPRESSION_TYPE)
    {
        if has_compressed_clusters(edit)? {
            return Err(Error::invalid(
                "Cannot downgrade an image with zstd compression type and existing compressed clusters",
            ));
        }
        edit.header.compression_type = 0;
    }
    edit.header.version = 2;
    Ok(())
}

fn has_compressed_clusters(edit: &Qcow2Edit) -> Result<bool> {
    let w = (edit.header.l2_entry_size() / 8) as usize;
    for &e in edit.l1() {
        let t = e & OFFSET_MASK;
        if t == 0 {
            continue;
        }
        let table = edit.read_l2(t)?;
        if table.iter().step_by(w).any(|&e| e & OFLAG_COMPRESSED != 0) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn is_zero_entry(e: u64) -> bool {
    e & OFLAG_COMPRESSED == 0 && e & OFLAG_ZERO != 0
}

/// Version 2 has no zero clusters: each becomes unallocated when there is no backing
/// file to show through, a cluster of zeros otherwise — in the active tables and in
/// every snapshot's (L2 tables shared between snapshots stay shared).
fn expand_zero_clusters(edit: &mut Qcow2Edit) -> Result<()> {
    let has_backing = edit.backing_file.is_some();
    let cs = edit.cluster_size();
    let per = edit.l2_entries();
    let zeros = vec![0u8; cs as usize];
    // The active layer, through the ordinary write path.
    for i in 0..edit.l1().len() as u64 {
        let t = edit.l1()[i as usize] & OFFSET_MASK;
        if t == 0 {
            continue;
        }
        let table = edit.read_l2(t)?;
        for (j, &e) in table.iter().enumerate() {
            if !is_zero_entry(e) {
                continue;
            }
            let gc = i * per + j as u64;
            if has_backing {
                edit.write_cluster(gc, &zeros)?;
            } else {
                edit.discard_cluster(gc)?;
            }
        }
    }
    // Snapshots: each changed L2 table is copied once; every L1 table that used it
    // moves to the copy.
    let mut copies: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    for s in 0..edit.snapshots.len() {
        let sn = edit.snapshots[s].clone();
        let bytes = sn.l1_size as u64 * 8;
        if bytes > MAX_QCOW2_L1_BYTES {
            return Err(Error::TooLarge {
                format: FMT,
                structure: "snapshot L1 table",
                size: bytes,
                limit: MAX_QCOW2_L1_BYTES,
            });
        }
        let mut b = vec![0u8; bytes as usize];
        edit.file().read_at(&mut b, sn.l1_table_offset)?;
        let mut l1 = parse_u64_table(&b);
        let mut changed = false;
        for entry in l1.iter_mut() {
            let t = *entry & OFFSET_MASK;
            if t == 0 {
                continue;
            }
            let copy = match copies.get(&t) {
                Some(&c) => {
                    // Another path to the copy: it and all it references count one more.
                    edit.incref(c);
                    for &e in edit.read_l2(c)?.iter() {
                        edit.retain_entry(e);
                    }
                    c
                }
                None => {
                    let mut table = edit.read_l2(t)?;
                    if !table.iter().any(|&e| is_zero_entry(e)) {
                        continue;
                    }
                    for e in table.iter_mut() {
                        if is_zero_entry(*e) {
                            *e = if has_backing {
                                // A new cluster, counted once (for this path).
                                edit.write_new(&zeros)?
                            } else {
                                0
                            };
                        } else {
                            edit.retain_entry(*e);
                        }
                    }
                    let c = edit.write_new(&serialize_u64_table(&table))?;
                    copies.insert(t, c);
                    c
                }
            };
            // This path no longer leads to the old table.
            for &e in edit.read_l2(t)?.iter() {
                edit.release_entry(e)?;
            }
            edit.decref(t)?;
            *entry = copy;
            changed = true;
        }
        if changed {
            let mut bytes = serialize_u64_table(&l1);
            bytes.resize(bytes.len().next_multiple_of(cs as usize), 0);
            let o = edit.write_new(&bytes)?;
            edit.decref_range(sn.l1_table_offset, sn.l1_size as u64 * 8)?;
            edit.snapshots[s].l1_table_offset = o;
            edit.snapshots_changed();
        }
    }
    Ok(())
}

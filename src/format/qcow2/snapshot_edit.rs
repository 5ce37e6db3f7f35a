//! Internal snapshots written, applied and deleted (`qemu-img snapshot -c/-a/-d`), as
//! QEMU does it: a snapshot is a copy of the active L1 table; every L2 table and data
//! cluster it reaches counts one reference more, and the active tables stop claiming
//! sole ownership (their COPIED flags are recomputed when the transaction commits, the
//! active L2 tables copied where they must change).
//!
//! The table entries themselves are in `snapshot.rs`.

use super::edit::Qcow2Edit;
use super::header::{parse_u64_table, serialize_u64_table, OFFSET_MASK};
use super::snapshot::SnapshotEntry;
use super::FMT;
use crate::error::{Error, Result};
use crate::limits::{MAX_QCOW2_L1_BYTES, MAX_QCOW2_SNAPSHOTS};

/// Longest snapshot name QEMU keeps (`QEMUSnapshotInfo.name` holds 256 bytes with
/// the NUL; longer names are cut).
pub const MAX_SNAPSHOT_NAME: usize = 255;

/// Why a snapshot operation could not be done, in the words qemu-img uses after
/// "Could not … snapshot 'NAME': ".
fn not_supported(what: &str) -> Error {
    Error::unsupported(FMT, what.to_string())
}

/// The ID QEMU gives a new snapshot: one more than the largest numeric ID.
fn next_id(snapshots: &[SnapshotEntry]) -> String {
    let max = snapshots
        .iter()
        .map(|s| s.id.parse::<u64>().unwrap_or(0))
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

/// Cuts `name` to QEMU's length limit at a character boundary.
fn clip_name(name: &str) -> String {
    let mut end = name.len().min(MAX_SNAPSHOT_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

/// One more (or one less) path to every L2 table `l1` references and to everything
/// those tables reference.
fn count_paths(edit: &mut Qcow2Edit, l1: &[u64], add: bool) -> Result<()> {
    let w = (edit.header.l2_entry_size() / 8) as usize;
    for &e in l1 {
        let t = e & OFFSET_MASK;
        if t == 0 {
            continue;
        }
        let table = edit.read_l2(t)?;
        for j in (0..table.len()).step_by(w) {
            if add {
                edit.retain_entry(table[j]);
            } else {
                edit.release_entry(table[j])?;
            }
        }
        if add {
            edit.incref(t);
        } else {
            edit.decref(t)?;
        }
    }
    Ok(())
}

/// Reads the L1 table of snapshot `sn`.
fn read_l1(edit: &Qcow2Edit, sn: &SnapshotEntry) -> Result<Vec<u64>> {
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
    Ok(parse_u64_table(&b))
}

/// Creates the internal snapshot `name` of the image's current state, stamped with
/// `date` (seconds and nanoseconds since the epoch), as `qemu-img snapshot -c` does:
/// ID one past the largest, no VM state, VM clock 0, instruction count 0.
pub fn create(edit: &mut Qcow2Edit, name: &str, date: (u32, u32)) -> Result<()> {
    if edit.has_data_file() {
        return Err(not_supported(
            "internal snapshots of an image with an external data file",
        ));
    }
    if edit.snapshots.len() >= MAX_QCOW2_SNAPSHOTS as usize {
        return Err(Error::invalid(format!(
            "qcow2: the image already has {MAX_QCOW2_SNAPSHOTS} snapshots"
        )));
    }
    let l1 = edit.l1().to_vec();
    let l1_table_offset = if l1.is_empty() {
        0
    } else {
        let mut bytes = serialize_u64_table(&l1);
        bytes.resize(
            bytes.len().next_multiple_of(edit.cluster_size() as usize),
            0,
        );
        edit.write_new(&bytes)?
    };
    count_paths(edit, &l1, true)?;
    let mut extra = Vec::with_capacity(24);
    extra.extend_from_slice(&0u64.to_be_bytes());
    extra.extend_from_slice(&edit.size().to_be_bytes());
    extra.extend_from_slice(&0u64.to_be_bytes());
    let sn = SnapshotEntry {
        l1_table_offset,
        l1_size: l1.len() as u32,
        date_sec: date.0,
        date_nsec: date.1,
        vm_clock_nsec: 0,
        vm_state_size32: 0,
        extra,
        id: next_id(&edit.snapshots),
        name: clip_name(name),
    };
    edit.snapshots.push(sn);
    edit.snapshots_changed();
    Ok(())
}

/// The index of the snapshot `which` names, matched as `qemu-img snapshot -a` matches:
/// by ID first, then by name.
pub fn find_by_id_or_name(snapshots: &[SnapshotEntry], which: &str) -> Option<usize> {
    snapshots
        .iter()
        .position(|s| s.id == which)
        .or_else(|| snapshots.iter().position(|s| s.name == which))
}

/// Reverts the active state to snapshot `which` (ID or name), as `snapshot -a`: the
/// active L1 table becomes a copy of the snapshot's, the disk takes the snapshot's
/// size, and what only the old active state used is freed. The snapshot stays.
pub fn apply(edit: &mut Qcow2Edit, which: &str) -> Result<()> {
    // QEMU's words: the bin puts "Could not apply snapshot 'NAME': " before them.
    let i = find_by_id_or_name(&edit.snapshots, which).ok_or_else(|| {
        Error::Format("Failed to load snapshot: No such file or directory".into())
    })?;
    let sn = edit.snapshots[i].clone();
    let sn_l1 = read_l1(edit, &sn)?;
    let old_l1 = edit.l1().to_vec();
    count_paths(edit, &sn_l1, true)?;
    count_paths(edit, &old_l1, false)?;
    let mut new_l1 = sn_l1;
    if new_l1.len() < old_l1.len() {
        new_l1.resize(old_l1.len(), 0);
    }
    edit.set_l1(new_l1);
    let old_size = edit.size();
    if let Some(size) = sn.disk_size() {
        edit.header.size = size;
        // Persistent bitmaps follow the disk's size.
        super::bitmap::resize_all(edit, old_size, size)?;
    }
    let need = edit.header.min_l1_size();
    if (edit.l1().len() as u64) < need {
        return Err(Error::corrupt(
            FMT,
            "snapshot table entry",
            edit.header.snapshots_offset,
            format!("snapshot {which:?} has an L1 table too small for its disk size"),
        ));
    }
    Ok(())
}

/// Deletes the snapshot named `name` (the first with that name, as `snapshot -d`
/// matches it) and frees what only it used.
pub fn delete(edit: &mut Qcow2Edit, name: &str) -> Result<()> {
    let i = edit
        .snapshots
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| Error::Format("snapshot not found".into()))?;
    let sn = edit.snapshots.remove(i);
    let l1 = read_l1(edit, &sn)?;
    count_paths(edit, &l1, false)?;
    edit.decref_range(sn.l1_table_offset, sn.l1_size as u64 * 8)?;
    edit.snapshots_changed();
    Ok(())
}

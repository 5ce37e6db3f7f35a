//! `rebase` for qcow2: puts an overlay onto another backing image (or none).
//!
//! Safe mode keeps what the overlay shows: every guest cluster the overlay does not
//! hold itself, and whose contents differ between the old backing chain and the new
//! one, is copied into the overlay (compressed with `-c`) from the old chain — the
//! whole cluster, as QEMU writes it since 8.2 — before the header names the new
//! backing file. Unsafe mode (`-u`) only rewrites the header. Both run in one
//! [`Qcow2Edit`] transaction: an interruption leaves the overlay on its old backing.

use super::edit::{Allocation, Qcow2Edit};
use super::writer::ClusterEncoder;
use crate::device::BlockDevice;
use crate::error::Result;

/// Progress callback: `(bytes done, bytes total)`.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// How many bytes from `offset` (at most `len`) read as zeros in `dev` as its map says
/// (past the end of `dev` everything does).
fn zero_run(dev: Option<&dyn BlockDevice>, offset: u64, len: u64) -> Result<u64> {
    let Some(dev) = dev else {
        return Ok(len);
    };
    if offset >= dev.size() {
        return Ok(len);
    }
    let e = dev.map(offset, len.min(dev.size() - offset))?;
    Ok(if e.kind.reads_as_zero() {
        if e.end() >= dev.size() {
            len
        } else {
            e.len
        }
    } else {
        0
    })
}

/// Reads `buf.len()` bytes at `offset` of `dev`; past its end (or without a device)
/// the bytes are zeros.
fn read_padded(dev: Option<&dyn BlockDevice>, buf: &mut [u8], offset: u64) -> Result<()> {
    let n = match dev {
        Some(d) if offset < d.size() => (d.size() - offset).min(buf.len() as u64) as usize,
        _ => 0,
    };
    if n > 0 {
        dev.expect("n > 0 needs a device")
            .read_at(&mut buf[..n], offset)?;
    }
    buf[n..].fill(0);
    Ok(())
}

/// Safe-mode rebase of the overlay being edited: `old` is the overlay as it reads now
/// (with its old backing chain), `new_backing` the image it will sit on (`None` for no
/// backing file). Copies into the overlay what must be kept; the caller then sets the
/// new backing name and commits.
pub fn copy_differences(
    edit: &mut Qcow2Edit,
    old: &dyn BlockDevice,
    new_backing: Option<&dyn BlockDevice>,
    compress: bool,
    progress: Option<Progress<'_>>,
) -> Result<()> {
    let cs = edit.cluster_size();
    let size = edit.size();
    let clusters = size.div_ceil(cs);
    let encoder = compress
        .then(|| ClusterEncoder::new(cs as usize, edit.header.compression().unwrap_or_default()));
    let mut old_buf = vec![0u8; cs as usize];
    let mut new_buf = vec![0u8; cs as usize];
    let mut gc = 0;
    while gc < clusters {
        let offset = gc * cs;
        if let Some(p) = progress {
            p(offset, size);
        }
        let len = (size - offset).min(cs);
        if edit.allocation(gc)? == Allocation::Allocated {
            gc += 1;
            continue;
        }
        // Where both sides read as zeros for whole clusters, nothing can differ.
        let rest = size - offset;
        let z = zero_run(Some(old), offset, rest)?.min(zero_run(new_backing, offset, rest)?);
        if z >= len {
            let skip = (z / cs).max(1);
            // Clusters the overlay holds itself are skipped above anyway.
            gc += skip;
            continue;
        }
        old.read_at(&mut old_buf[..len as usize], offset)?;
        old_buf[len as usize..].fill(0);
        read_padded(new_backing, &mut new_buf[..len as usize], offset)?;
        if old_buf[..len as usize] != new_buf[..len as usize] {
            write_cluster(edit, gc, &old_buf, encoder.as_ref())?;
        }
        gc += 1;
    }
    if let Some(p) = progress {
        p(size, size);
    }
    Ok(())
}

/// Stores one cluster of the overlay: zeros as a zero cluster where the version allows,
/// compressed when asked and it shrinks, plainly otherwise.
pub(crate) fn write_cluster(
    edit: &mut Qcow2Edit,
    gc: u64,
    data: &[u8],
    encoder: Option<&ClusterEncoder>,
) -> Result<()> {
    if crate::zero::is_zero(data) && (edit.header.version >= 3 || edit.backing_file.is_none()) {
        return edit.write_zero_cluster(gc);
    }
    if let Some(enc) = encoder {
        if let Some(z) = enc.compress(data)? {
            return edit.write_compressed_cluster(gc, &z);
        }
    }
    edit.write_cluster(gc, data)
}

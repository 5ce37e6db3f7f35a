//! The qcow2 parts of `commit`: writing into a qcow2 base image in place
//! ([`Qcow2InPlace`]) and emptying the overlay afterwards ([`make_empty`]).

use std::path::Path;

use super::edit::Qcow2Edit;
use crate::error::{Error, Result};
use crate::writer::InPlaceWriter;

/// A qcow2 image written in place through one [`Qcow2Edit`] transaction: the writes
/// become visible all at once when [`InPlaceWriter::finish`] commits it.
pub struct Qcow2InPlace {
    edit: Qcow2Edit,
}

impl Qcow2InPlace {
    /// Opens the qcow2 image at `path` for writing in place.
    pub fn open(path: &Path) -> Result<Self> {
        let edit = Qcow2Edit::open(path)?;
        if edit.has_data_file() {
            return Err(Error::unsupported(
                "qcow2",
                "writing into an image with an external data file",
            ));
        }
        Ok(Qcow2InPlace { edit })
    }

    /// Makes whole clusters `[first, first + n)` read as zeros.
    fn zero_clusters(&mut self, first: u64, n: u64) -> Result<()> {
        for gc in first..first + n {
            self.edit.write_zero_cluster(gc)?;
        }
        Ok(())
    }
}

impl InPlaceWriter for Qcow2InPlace {
    fn size(&self) -> u64 {
        self.edit.size()
    }

    fn grain_size(&self) -> u64 {
        self.edit.cluster_size()
    }

    fn grow(&mut self, size: u64) -> Result<()> {
        if size > self.edit.size() {
            self.edit.set_size(size)?;
        }
        Ok(())
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        let cs = self.edit.cluster_size();
        if offset % cs != 0 {
            return Err(Error::invalid(format!(
                "qcow2: in-place write at {offset:#x} is not cluster aligned"
            )));
        }
        let mut buf = vec![0u8; cs as usize];
        for (i, chunk) in data.chunks(cs as usize).enumerate() {
            let gc = offset / cs + i as u64;
            if crate::zero::is_zero(chunk) {
                self.zero_clusters(gc, 1)?;
                continue;
            }
            let cluster: &[u8] = if chunk.len() == cs as usize {
                chunk
            } else {
                buf[..chunk.len()].copy_from_slice(chunk);
                buf[chunk.len()..].fill(0);
                &buf
            };
            self.edit.write_cluster(gc, cluster)?;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        let cs = self.edit.cluster_size();
        if offset % cs != 0 {
            return Err(Error::invalid(format!(
                "qcow2: in-place zeroing at {offset:#x} is not cluster aligned"
            )));
        }
        self.zero_clusters(offset / cs, len.div_ceil(cs))
    }

    fn finish(self: Box<Self>) -> Result<()> {
        super::bitmap::commit(self.edit)
    }
}

/// Empties the qcow2 overlay at `path` after a commit, as QEMU's `bdrv_make_empty`:
/// every cluster of the active layer is dropped, so that the overlay reads its backing
/// file again. An image without snapshots or bitmaps is then rebuilt as small as a
/// new one (header, refcount table and block, L1 table), in a second transaction; with
/// them, the L2 tables stay and only their entries go.
pub fn make_empty(path: &Path) -> Result<()> {
    let mut edit = Qcow2Edit::open(path)?;
    let simple = edit.snapshots.is_empty() && edit.bitmaps.is_empty() && !edit.has_data_file();
    if simple {
        edit.drop_active_tables()?;
    } else {
        let clusters = edit.size().div_ceil(edit.cluster_size());
        for gc in 0..clusters {
            edit.discard_cluster(gc)?;
        }
    }
    super::bitmap::commit(edit)?;
    if simple {
        // Everything but the header is free now: move the remaining tables to the
        // front and cut the file after them.
        let mut edit = Qcow2Edit::open(path)?;
        edit.relocate_metadata();
        super::bitmap::commit(edit)?;
    }
    Ok(())
}

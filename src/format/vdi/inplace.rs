//! A VDI image written in place (the base image of `commit`), as QEMU's VDI driver
//! writes one: data of an allocated block is overwritten where it lies; a block written
//! for the first time is appended after the last one, whole (zeros around the data),
//! and mapped. New blocks' data is flushed before the block map entries and the header's
//! allocated-block count that make them part of the image are written, and those are
//! flushed in turn; an interruption before that leaves blocks past the last one that
//! nothing maps.
//!
//! Dynamic and fixed images only: a differencing image's unallocated blocks show its
//! parent, which a block written for the first time would have to copy in (refused with
//! a typed error). The virtual size cannot change (QEMU's VDI driver cannot resize
//! either).

use std::path::Path;

use super::header::{Header, ImageType, BLOCK_ZERO, FORMAT, MAX_HEADER_BYTES};
use super::reader::{read_block_map, read_header};
use crate::error::{Error, Result};
use crate::io::inplace::InPlaceFile;
use crate::writer::InPlaceWriter;

/// A VDI image opened for writing in place.
pub struct VdiInPlace {
    file: InPlaceFile,
    header: Header,
    map: Vec<u32>,
    /// Block map entries changed (blocks mapped for the first time), not yet written.
    mapped: Vec<u32>,
}

impl VdiInPlace {
    /// Opens the VDI image at `path` for writing in place, with QEMU's writer locks.
    pub fn open(path: &Path) -> Result<Self> {
        let file = InPlaceFile::open(path)?;
        let storage = file.storage()?;
        let (_, header) = read_header(&storage)?;
        if header.kind().is_some_and(ImageType::has_parent) {
            return Err(Error::unsupported(
                FORMAT,
                "writing into a differencing image in place (as the base of a commit)",
            ));
        }
        let storage: std::sync::Arc<dyn crate::io::Storage> = std::sync::Arc::new(storage);
        let map = read_block_map(&storage, &header)?;
        Ok(VdiInPlace {
            file,
            header,
            map,
            mapped: Vec::new(),
        })
    }

    fn block_size(&self) -> u64 {
        self.header.block_size as u64
    }

    /// File offset of the data of physical block `physical`.
    fn data_at(&self, physical: u32) -> u64 {
        self.header.data_offset as u64
            + physical as u64 * self.header.block_stride()
            + self.header.block_extra as u64
    }

    /// Writes `data` (or zeros, when `None`) at `within` of guest block `block`.
    fn write_block(
        &mut self,
        block: u64,
        within: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<()> {
        let e = self.map[block as usize];
        if e < BLOCK_ZERO {
            let at = self.data_at(e) + within;
            return match data {
                Some(d) => self.file.write_at(d, at),
                None => self.file.write_at(&vec![0u8; len as usize], at),
            };
        }
        let Some(d) = data else {
            // Unallocated and zero blocks read as zeros already.
            return Ok(());
        };
        if crate::zero::is_zero(d) {
            return Ok(());
        }
        // The first write to this block: a whole new block after the last one.
        let physical = self.header.blocks_allocated;
        if physical >= self.header.blocks {
            return Err(Error::corrupt(
                FORMAT,
                "header",
                0x184,
                "every physical block is in use already",
            ));
        }
        let mut whole = vec![0u8; self.header.block_stride() as usize];
        let start = (self.header.block_extra as u64 + within) as usize;
        whole[start..start + d.len()].copy_from_slice(d);
        let at = self.header.data_offset as u64 + physical as u64 * self.header.block_stride();
        self.file.write_at(&whole, at)?;
        self.header.blocks_allocated += 1;
        self.map[block as usize] = physical;
        self.mapped.push(block as u32);
        Ok(())
    }

    /// Splits `[offset, offset + len)` by block and calls `f(block, within, from, n)`.
    fn per_block(
        &mut self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut Self, u64, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        crate::device::check_bounds(offset, len, self.header.disk_size)?;
        let bs = self.block_size();
        let mut pos = offset;
        while pos < offset + len {
            let block = pos / bs;
            let within = pos % bs;
            let n = (bs - within).min(offset + len - pos);
            f(self, block, within, pos - offset, n)?;
            pos += n;
        }
        Ok(())
    }
}

impl InPlaceWriter for VdiInPlace {
    fn size(&self) -> u64 {
        self.header.disk_size
    }

    fn grain_size(&self) -> u64 {
        self.block_size()
    }

    fn grow(&mut self, size: u64) -> Result<()> {
        if size > self.header.disk_size {
            return Err(Error::unsupported(
                FORMAT,
                format!(
                    "growing the image in place (from {} to {size} bytes)",
                    self.header.disk_size
                ),
            ));
        }
        Ok(())
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.per_block(offset, data.len() as u64, |me, block, within, from, n| {
            let d = &data[from as usize..(from + n) as usize];
            me.write_block(block, within, Some(d), n)
        })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.per_block(offset, len, |me, block, within, _, n| {
            me.write_block(block, within, None, n)
        })
    }

    fn finish(self: Box<Self>) -> Result<()> {
        // New blocks' data first, then what maps them.
        self.file.sync()?;
        if self.mapped.is_empty() {
            return Ok(());
        }
        for &b in &self.mapped {
            let at = self.header.blocks_offset as u64 + b as u64 * 4;
            self.file
                .write_at(&self.map[b as usize].to_le_bytes(), at)?;
        }
        self.file.sync()?;
        let mut h = vec![0u8; MAX_HEADER_BYTES];
        self.file.read_at(&mut h, 0)?;
        self.header.serialize(&mut h);
        self.file.write_at(&h[..self.header.end()], 0)?;
        self.file.sync()
    }
}

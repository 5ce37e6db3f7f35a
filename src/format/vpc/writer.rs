//! Writing VHD images laid out as `qemu-img convert -O vpc` lays them out.
//!
//! Dynamic: footer copy at 0, dynamic header at 512, BAT at 1536, then 2 MiB blocks
//! (each a 512-byte bitmap with every bit set, then the data) appended in the order the
//! data arrives, and the footer after the last block. Only blocks with data are
//! allocated, and inside a block only the data is written: zero stretches stay holes of
//! the file. Fixed: the disk's bytes (zero stretches left as holes), then the footer.
//! Headers, BAT and footers are written by `finish`.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::header::{
    bitmap_size, new_size, serialize_bat, DiskType, DynamicHeader, Footer, Geometry, ParentLocator,
    Uuid, BAT_UNUSED, DYNAMIC_COOKIE, DYNAMIC_HEADER_SIZE, FEATURES_RESERVED, FOOTER_COOKIE,
    FOOTER_SIZE, FORMAT, NO_NEXT, SECTOR, VERSION_1_0, VHD_EPOCH,
};
use crate::detect::Format;
use crate::error::{Error, Result};
use crate::io::{write_all_at, AllocateAhead, OutputSet};
use crate::writer::{parse_bool, DataRun, ImageWriter, WriteOptions};

/// Block size of new dynamic images (qemu's, and the specification's default).
pub const BLOCK_SIZE: u64 = 2 << 20;
/// Offset of the dynamic header in new images.
pub const HEADER_OFFSET: u64 = FOOTER_SIZE as u64;
/// Offset of the BAT in new images.
pub const BAT_OFFSET: u64 = HEADER_OFFSET + DYNAMIC_HEADER_SIZE as u64;
/// Creator version qemu writes (Virtual PC 2007's, 5.3).
pub const CREATOR_VERSION: u32 = 0x0005_0003;
/// Azure's unit of virtual size.
pub const AZURE_ALIGN: u64 = 1 << 20;

/// What `-o azure=` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Azure {
    /// No Azure rule (default).
    Off,
    /// `on`: a fixed image of the exact size, refused unless the size is a whole MiB.
    Strict,
    /// `round`: a fixed image of the exact size, rounded up to the next whole MiB.
    Round,
}

/// What to write, decided from the `-o` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcOptions {
    /// `subformat=fixed` (else dynamic).
    pub fixed: bool,
    /// `force_size=on`: the exact size, geometry 65535 × 16 × 255, creator `qem2`.
    pub force_size: bool,
    /// `azure=on|round`.
    pub azure: Azure,
}

impl VpcOptions {
    /// Takes the options a VHD writer knows out of `opts` and refuses the rest.
    pub fn from_write_options(opts: &WriteOptions) -> Result<VpcOptions> {
        let mut opts = opts.clone();
        let subformat = opts.take("subformat");
        let fixed = match subformat.as_deref() {
            None | Some("dynamic") => false,
            Some("fixed") => true,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "vpc: subformat '{v}' is not one of dynamic, fixed"
                )))
            }
        };
        let force = match opts.take("force_size") {
            Some(v) => Some(parse_bool("force_size", &v)?),
            None => None,
        };
        let azure = match opts.take("azure").as_deref() {
            None | Some("off") => Azure::Off,
            Some("on") => Azure::Strict,
            Some("round") => Azure::Round,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "vpc: azure '{v}' is not one of off, on (refuse sizes that are not a whole MiB), round (round them up)"
                )))
            }
        };
        opts.reject_unknown(Format::Vpc)?;
        if opts.compressed {
            return Err(Error::unsupported(FORMAT, "compression (-c)"));
        }
        if opts.backing_file.is_some() {
            return Err(Error::unsupported(
                FORMAT,
                "writing differencing images (backing file)",
            ));
        }
        if azure != Azure::Off {
            // Azure takes fixed VHDs of the exact size only: that is what the option makes.
            if subformat.as_deref() == Some("dynamic") {
                return Err(Error::invalid(
                    "vpc: azure=on|round makes a fixed image; Azure refuses dynamic VHDs (drop subformat=dynamic)",
                ));
            }
            if force == Some(false) {
                return Err(Error::invalid(
                    "vpc: azure=on|round needs the exact size (force_size=on); Azure refuses a size rounded to a CHS geometry",
                ));
            }
            return Ok(VpcOptions {
                fixed: true,
                force_size: true,
                azure,
            });
        }
        Ok(VpcOptions {
            fixed,
            force_size: force.unwrap_or(false),
            azure,
        })
    }

    /// The virtual size to request for a source of `size` bytes under the Azure rule.
    pub fn azure_size(&self, size: u64) -> Result<u64> {
        match self.azure {
            Azure::Off => Ok(size),
            Azure::Strict if size % AZURE_ALIGN == 0 => Ok(size),
            Azure::Strict => Err(Error::invalid(format!(
                "vpc: Azure accepts only virtual sizes that are a whole number of MiB; {size} bytes is not \
                 (-o azure=round rounds it up to {} bytes; or resize the source first)",
                size.next_multiple_of(AZURE_ALIGN)
            ))),
            Azure::Round => size
                .checked_next_multiple_of(AZURE_ALIGN)
                .ok_or_else(|| Error::invalid(format!("vpc: disk size {size} is too large"))),
        }
    }
}

/// The footer qemu writes for a new image: creator `qemu` (`qem2` with `force_size`,
/// which tells readers to take the exact current size), Virtual PC 2007's version,
/// `Wi2k`, a fresh UUID.
pub fn new_footer(kind: DiskType, size: u64, geometry: Geometry, force_size: bool) -> Footer {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    Footer {
        cookie: *FOOTER_COOKIE,
        features: FEATURES_RESERVED,
        version: VERSION_1_0,
        data_offset: if kind == DiskType::Fixed {
            NO_NEXT
        } else {
            HEADER_OFFSET
        },
        timestamp: now.saturating_sub(VHD_EPOCH) as u32,
        creator_app: if force_size { *b"qem2" } else { *b"qemu" },
        creator_version: CREATOR_VERSION,
        creator_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        geometry,
        disk_type: kind.to_u32(),
        checksum: 0,
        uuid: Uuid::random(),
        saved_state: 0,
    }
}

/// The dynamic header of a new image with `entries` BAT entries.
pub fn new_dynamic_header(entries: u32) -> DynamicHeader {
    DynamicHeader {
        cookie: *DYNAMIC_COOKIE,
        data_offset: NO_NEXT,
        table_offset: BAT_OFFSET,
        version: VERSION_1_0,
        max_table_entries: entries,
        block_size: BLOCK_SIZE as u32,
        checksum: 0,
        parent_uuid: Uuid::default(),
        parent_timestamp: 0,
        reserved: 0,
        parent_name: [0; 512],
        locators: [ParentLocator::default(); 8],
    }
}

/// Where the first block of a new dynamic image goes: after the BAT, sector-aligned.
pub fn first_block_offset(entries: u64) -> u64 {
    (BAT_OFFSET + entries * 4).next_multiple_of(SECTOR)
}

/// Writes one VHD file.
pub struct VpcWriter {
    file: File,
    path: PathBuf,
    footer: Footer,
    /// Guest bytes the engine may send (the source's size; the image may be larger).
    size: u64,
    /// Dynamic images: the BAT and the end of the last block.
    dynamic: Option<DynamicState>,
    allocate_ahead: AllocateAhead,
}

struct DynamicState {
    bat: Vec<u32>,
    next_free: u64,
}

/// Creates a VHD writer for `target` (`-o subformat=`, `force_size=`, `azure=`).
pub fn create_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    let o = VpcOptions::from_write_options(opts)?;
    out.require_new_files(FORMAT)?;
    let wanted = o.azure_size(size)?;
    let ns = new_size(wanted, o.force_size)?;
    let kind = if o.fixed {
        DiskType::Fixed
    } else {
        DiskType::Dynamic
    };
    let footer = new_footer(kind, ns.size, ns.geometry, o.force_size);
    let file = out.create(target)?;
    let path = target.to_path_buf();
    let dynamic = if o.fixed {
        file.set_len(ns.size + FOOTER_SIZE as u64)
            .map_err(|e| Error::io(&path, e))?;
        None
    } else {
        let entries = ns.size.div_ceil(BLOCK_SIZE);
        Some(DynamicState {
            bat: vec![BAT_UNUSED; entries as usize],
            next_free: first_block_offset(entries),
        })
    };
    Ok(Box::new(VpcWriter {
        file,
        path,
        footer,
        size,
        dynamic,
        allocate_ahead: AllocateAhead::new(true),
    }))
}

impl VpcWriter {
    fn put(&mut self, data: &[u8], at: u64) -> Result<()> {
        self.allocate_ahead
            .before_write(&self.file, at, data.len() as u64);
        write_all_at(&self.file, data, at, &self.path)
    }

    /// The file offset of guest `offset`'s block data, allocating the block (bitmap with
    /// every sector present) when it has none yet.
    fn block_data(&mut self, offset: u64) -> Result<u64> {
        let bm = bitmap_size(BLOCK_SIZE);
        let st = self.dynamic.as_mut().expect("dynamic image");
        let idx = (offset / BLOCK_SIZE) as usize;
        if st.bat[idx] == BAT_UNUSED {
            let at = st.next_free;
            let entry = u32::try_from(at / SECTOR).map_err(|_| {
                Error::invalid(format!(
                    "vpc: the image grows past the BAT's reach (block at {at:#x})"
                ))
            })?;
            st.bat[idx] = entry;
            st.next_free += bm + BLOCK_SIZE;
            write_all_at(&self.file, &vec![0xFF; bm as usize], at, &self.path)?;
        }
        Ok(st.bat[idx] as u64 * SECTOR + bm)
    }
}

impl ImageWriter for VpcWriter {
    fn grain_size(&self) -> u64 {
        SECTOR
    }

    fn write_data(&mut self, run: DataRun<'_>) -> Result<()> {
        let end = run.offset.checked_add(run.data.len() as u64);
        if run.offset % SECTOR != 0 || end.is_none_or(|e| e > self.size) {
            return Err(Error::invalid(format!(
                "vpc: internal error: data run at {:#x}+{} is not sector-aligned inside the disk",
                run.offset,
                run.data.len()
            )));
        }
        if self.dynamic.is_none() {
            return self.put(run.data, run.offset);
        }
        let mut done = 0usize;
        while done < run.data.len() {
            let pos = run.offset + done as u64;
            let n = ((BLOCK_SIZE - pos % BLOCK_SIZE) as usize).min(run.data.len() - done);
            let at = self.block_data(pos)? + pos % BLOCK_SIZE;
            let piece = &run.data[done..done + n];
            self.allocate_ahead
                .before_write(&self.file, at, piece.len() as u64);
            write_all_at(&self.file, piece, at, &self.path)?;
            done += n;
        }
        Ok(())
    }

    fn write_zeros(&mut self, _offset: u64, _len: u64) -> Result<()> {
        // A fresh image reads as zeros already: unallocated blocks, or holes.
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let footer = self.footer.seal();
        match self.dynamic.take() {
            None => write_all_at(&self.file, &footer, self.footer.current_size, &self.path),
            Some(st) => {
                let mut header = new_dynamic_header(st.bat.len() as u32);
                let mut head = Vec::with_capacity(BAT_OFFSET as usize);
                head.extend_from_slice(&footer);
                head.extend_from_slice(&header.seal());
                head.extend_from_slice(&serialize_bat(&st.bat));
                write_all_at(&self.file, &head, 0, &self.path)?;
                write_all_at(&self.file, &footer, st.next_free, &self.path)
            }
        }
        // No fdatasync, like `qemu-img convert`: the rename on commit guards against
        // interruption.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Result<VpcOptions> {
        let mut w = WriteOptions::default();
        w.parse_o(s)?;
        VpcOptions::from_write_options(&w)
    }

    #[test]
    fn options() {
        assert_eq!(
            opts("").unwrap(),
            VpcOptions {
                fixed: false,
                force_size: false,
                azure: Azure::Off
            }
        );
        let a = opts("azure=on").unwrap();
        assert!(a.fixed && a.force_size);
        assert!(a.azure_size(1 << 30).is_ok());
        assert!(a.azure_size((1 << 30) + 512).is_err());
        assert_eq!(opts("azure=round").unwrap().azure_size(1).unwrap(), 1 << 20);
        assert!(opts("azure=on,subformat=dynamic").is_err());
        assert!(opts("azure=round,force_size=off").is_err());
        assert!(opts("azure=on,subformat=fixed,force_size=on").is_ok());
        assert!(opts("subformat=bogus").is_err());
        assert!(opts("cluster_size=4096").is_err());
        assert!(opts("azure=maybe").is_err());
    }

    #[test]
    fn header_layout_is_qemus() {
        assert_eq!(BAT_OFFSET, 1536);
        assert_eq!(first_block_offset(1), 2048);
        assert_eq!(first_block_offset(128), 2048);
        assert_eq!(first_block_offset(129), 2560);
    }
}

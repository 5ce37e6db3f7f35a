//! Builds VHD files by hand for the tests (differencing images, odd block sizes, broken
//! metadata), from the library's on-disk structs.
#![allow(dead_code)]

use std::path::Path;

use imgconv::format::vpc::header::{
    bitmap_size, serialize_bat, DiskType, DynamicHeader, Footer, Geometry, ParentLocator, Uuid,
    BAT_UNUSED, DYNAMIC_COOKIE, FOOTER_COOKIE, VERSION_1_0,
};

/// One allocated block: its index, sector bitmap (one bit per sector, MSB first) and data.
pub struct Block {
    pub index: usize,
    pub bitmap: Vec<u8>,
    pub data: Vec<u8>,
}

/// A dynamic or differencing VHD to write.
pub struct Vhd {
    pub kind: DiskType,
    pub uuid: Uuid,
    pub parent_uuid: Uuid,
    pub size: u64,
    pub block_size: u32,
    /// `(platform code, data)` in header order.
    pub locators: Vec<([u8; 4], Vec<u8>)>,
    pub parent_name: String,
    pub blocks: Vec<Block>,
    pub creator: [u8; 4],
}

impl Vhd {
    /// A dynamic image of `size` bytes with `block_size`-byte blocks and no data.
    pub fn dynamic(size: u64, block_size: u32) -> Vhd {
        Vhd {
            kind: DiskType::Dynamic,
            uuid: Uuid::random(),
            parent_uuid: Uuid::default(),
            size,
            block_size,
            locators: Vec::new(),
            parent_name: String::new(),
            blocks: Vec::new(),
            creator: *b"win ",
        }
    }

    /// A differencing image over the parent whose footer UUID is `parent`.
    pub fn differencing(size: u64, block_size: u32, parent: Uuid) -> Vhd {
        Vhd {
            kind: DiskType::Differencing,
            parent_uuid: parent,
            ..Vhd::dynamic(size, block_size)
        }
    }

    /// Adds a `W2ru`/`W2ku` locator holding `path` in UTF-16LE.
    pub fn windows_locator(mut self, code: &[u8; 4], path: &str) -> Vhd {
        self.locators.push((*code, utf16le(path)));
        self
    }

    /// Adds a block whose sectors `present` (indices) hold `byte`, bits set for them.
    pub fn block(mut self, index: usize, present: impl IntoIterator<Item = u64>, byte: u8) -> Vhd {
        let sectors = self.block_size as u64 / 512;
        let mut bitmap = vec![0u8; bitmap_size(self.block_size as u64) as usize];
        let mut data = vec![0u8; self.block_size as usize];
        for s in present {
            assert!(s < sectors);
            bitmap[(s / 8) as usize] |= 0x80 >> (s % 8);
            data[(s * 512) as usize..((s + 1) * 512) as usize].fill(byte);
        }
        self.blocks.push(Block {
            index,
            bitmap,
            data,
        });
        self
    }

    /// The footer of this image.
    pub fn footer(&self) -> Footer {
        let mut f = Footer {
            cookie: *FOOTER_COOKIE,
            features: 2,
            version: VERSION_1_0,
            data_offset: 512,
            timestamp: 0,
            creator_app: self.creator,
            creator_version: 0x000a_0000,
            creator_os: *b"Wi2k",
            original_size: self.size,
            current_size: self.size,
            geometry: Geometry::for_sectors(self.size / 512),
            disk_type: self.kind.to_u32(),
            checksum: 0,
            uuid: self.uuid,
            saved_state: 0,
        };
        f.seal();
        f
    }

    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let entries = self.size.div_ceil(self.block_size as u64) as usize;
        let mut out = vec![0u8; 1536];
        let mut locs = [ParentLocator::default(); 8];
        for (i, (code, data)) in self.locators.iter().enumerate() {
            let at = out.len() as u64;
            let space = (data.len() as u64).next_multiple_of(512).max(512);
            out.extend_from_slice(data);
            out.resize((at + space) as usize, 0);
            locs[i] = ParentLocator {
                platform: *code,
                data_space: space as u32,
                data_length: data.len() as u32,
                reserved: 0,
                data_offset: at,
            };
        }
        let bat_at = out.len() as u64;
        let mut bat = vec![BAT_UNUSED; entries];
        out.resize(out.len() + (entries * 4).next_multiple_of(512), 0xFF);
        for b in &self.blocks {
            bat[b.index] = (out.len() / 512) as u32;
            out.extend_from_slice(&b.bitmap);
            out.extend_from_slice(&b.data);
        }
        let bat_bytes = serialize_bat(&bat);
        out[bat_at as usize..bat_at as usize + bat_bytes.len()].copy_from_slice(&bat_bytes);
        let mut name = [0u8; 512];
        for (i, u) in self.parent_name.encode_utf16().take(256).enumerate() {
            name[2 * i..2 * i + 2].copy_from_slice(&u.to_be_bytes());
        }
        let mut h = DynamicHeader {
            cookie: *DYNAMIC_COOKIE,
            data_offset: u64::MAX,
            table_offset: bat_at,
            version: VERSION_1_0,
            max_table_entries: entries as u32,
            block_size: self.block_size,
            checksum: 0,
            parent_uuid: self.parent_uuid,
            parent_timestamp: 0,
            reserved: 0,
            parent_name: name,
            locators: locs,
        };
        out[512..1536].copy_from_slice(&h.seal());
        let footer = self.footer().serialize();
        out[..512].copy_from_slice(&footer);
        out.extend_from_slice(&footer);
        out
    }

    /// Writes the file.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.bytes()).unwrap();
    }

    /// What the guest reads where this image holds sectors, else `base` (the parent's
    /// bytes, or zeros for a dynamic image).
    pub fn overlay(&self, base: &[u8]) -> Vec<u8> {
        let mut out = base.to_vec();
        out.resize(self.size as usize, 0);
        let bs = self.block_size as u64;
        for b in &self.blocks {
            for s in 0..bs / 512 {
                let at = b.index as u64 * bs + s * 512;
                if at >= self.size || b.bitmap[(s / 8) as usize] & (0x80 >> (s % 8)) == 0 {
                    continue;
                }
                let n = 512.min(self.size - at) as usize;
                out[at as usize..at as usize + n]
                    .copy_from_slice(&b.data[(s * 512) as usize..(s * 512) as usize + n]);
            }
        }
        out
    }
}

/// `s` in UTF-16LE.
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Rewrites the footer of the VHD at `path` (both copies of a dynamic image) with `f`
/// applied, checksum recomputed.
pub fn patch_footer(path: &Path, f: impl Fn(&mut Footer)) {
    let mut data = std::fs::read(path).unwrap();
    let n = data.len();
    let mut at = vec![n - 512];
    if data.starts_with(FOOTER_COOKIE) {
        at.push(0);
    }
    for a in at {
        let mut footer = Footer::parse(&data[a..a + 512]);
        f(&mut footer);
        data[a..a + 512].copy_from_slice(&footer.seal());
    }
    std::fs::write(path, data).unwrap();
}

/// Rewrites the dynamic header of the VHD at `path` with `f` applied; the checksum is
/// recomputed when `seal`.
pub fn patch_header(path: &Path, seal: bool, f: impl Fn(&mut DynamicHeader)) {
    let mut data = std::fs::read(path).unwrap();
    let at = Footer::parse(&data[..512]).data_offset as usize;
    let mut h = DynamicHeader::parse(data[at..at + 1024].try_into().unwrap());
    f(&mut h);
    let bytes = if seal { h.seal() } else { h.serialize() };
    data[at..at + 1024].copy_from_slice(&bytes);
    std::fs::write(path, data).unwrap();
}

/// Sets BAT entry `i` of the VHD at `path` to `value`.
pub fn patch_bat(path: &Path, i: usize, value: u32) {
    let mut data = std::fs::read(path).unwrap();
    let at = Footer::parse(&data[..512]).data_offset as usize;
    let h = DynamicHeader::parse(data[at..at + 1024].try_into().unwrap());
    let e = h.table_offset as usize + 4 * i;
    data[e..e + 4].copy_from_slice(&value.to_be_bytes());
    std::fs::write(path, data).unwrap();
}

/// The BAT entries of the VHD at `path`.
pub fn read_bat(path: &Path) -> Vec<u32> {
    let data = std::fs::read(path).unwrap();
    let at = Footer::parse(&data[..512]).data_offset as usize;
    let h = DynamicHeader::parse(data[at..at + 1024].try_into().unwrap());
    let t = h.table_offset as usize;
    imgconv::format::vpc::header::parse_bat(&data[t..t + 4 * h.max_table_entries as usize])
}

//! qemu's view of an image's allocation (`bdrv_block_status_above`), rebuilt from the
//! library's extents, so that the commands whose output depends on it — `-p` update
//! points, `compare -s` — behave as qemu-img's do.
//!
//! qemu asks each format driver for the status of a stretch and gets flags back; how far
//! one answer reaches depends on the driver: a raw file answers per data/hole run, qcow2
//! per run of contiguous clusters within one L2 table (one cluster at a time when
//! compressed), sparse VMDK per grain, VDI per block. The flags differ per format too:
//! an unallocated VDI block is "zero, allocated", an unallocated qcow2 cluster "zero",
//! a raw hole "zero, allocated, at an offset".

use std::sync::Arc;

use imgconv::{BlockDevice, ExtentKind, Format, Image, ImageInfo};

/// The stretch holds data.
pub const DATA: u32 = 0x01;
/// The stretch reads as zeros.
pub const ZERO: u32 = 0x02;
/// The stretch lies at a known offset in a file.
pub const OFFSET_VALID: u32 = 0x04;
/// The stretch is allocated in some layer of the chain.
pub const ALLOCATED: u32 = 0x10;
/// The stretch reaches the end of the image.
pub const EOF: u32 = 0x20;

/// qemu's largest request: `INT_MAX` bytes, rounded down to whole sectors.
pub const MAX_REQUEST: u64 = (i32::MAX as u64) & !511;

/// One image of a backing chain, as far as status answers go.
#[derive(Debug, Clone)]
struct Layer {
    format: Format,
    cluster_size: Option<u64>,
    /// The image's name, as qemu names the file its data lies in.
    name: String,
    /// VMDK extents in files of their own: guest range and file name.
    extents: Vec<(u64, u64, String)>,
}

/// One status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Where it starts.
    pub offset: u64,
    /// How far it reaches (> 0).
    pub len: u64,
    /// `DATA`, `ZERO`, `OFFSET_VALID`, `ALLOCATED`, `EOF`.
    pub flags: u32,
    /// The layer of the chain that answered (0 = the image itself).
    pub depth: u32,
    /// Where the stretch lies in its file, when `OFFSET_VALID`.
    pub host_offset: Option<u64>,
    /// Stored compressed.
    pub compressed: bool,
}

/// One source image: where it starts in the (concatenated) disk, and its chain.
#[derive(Clone)]
struct Part {
    start: u64,
    dev: Arc<dyn BlockDevice>,
    layers: Vec<Layer>,
}

static NO_LAYER: Layer = Layer {
    format: Format::Raw,
    cluster_size: None,
    name: String::new(),
    extents: Vec::new(),
};

impl Part {
    fn layer(&self, depth: u32) -> &Layer {
        let i = (depth as usize).min(self.layers.len().saturating_sub(1));
        self.layers.get(i).unwrap_or(&NO_LAYER)
    }
}

/// Answers status questions about one image (with its backing chain), or about several
/// images one after the other (`convert A B C out`).
#[derive(Clone)]
pub struct StatusReader {
    parts: Vec<Part>,
    size: u64,
    /// Answers reach as far as the library's extents do, not cut where qemu's drivers
    /// stop theirs (see [`StatusReader::coarse`]).
    coarse: bool,
}

fn layers_of(info: &ImageInfo) -> Vec<Layer> {
    let mut layers = Vec::new();
    let mut i = Some(info);
    while let Some(x) = i {
        let mut extents = Vec::new();
        if x.format == Format::Vmdk {
            let list = match &x.format_specific {
                Some(imgconv::details::FormatDetails::Vmdk(v)) => v.extents.as_slice(),
                _ => &[],
            };
            let mut start = 0u64;
            for e in list {
                let len = e.virtual_size;
                extents.push((start, start + len, e.filename.clone()));
                start += len;
            }
        }
        layers.push(Layer {
            format: x.format,
            cluster_size: x.cluster_size.filter(|&c| c > 0),
            name: x.filename.clone(),
            extents,
        });
        i = x.backing.as_deref();
    }
    layers
}

impl StatusReader {
    /// Status of `img`, whose info tells the formats of its chain.
    pub fn new(img: &Image) -> Self {
        Self::concat(std::slice::from_ref(img))
    }

    /// Status of `imgs` one after the other.
    pub fn concat(imgs: &[Image]) -> Self {
        let mut parts = Vec::new();
        let mut start = 0;
        for img in imgs {
            parts.push(Part {
                start,
                dev: img.device().clone(),
                layers: layers_of(img.info()),
            });
            start += img.size();
        }
        StatusReader {
            parts,
            size: start,
            coarse: false,
        }
    }

    /// This reader with answers as long as the library's extents: for `map`, whose
    /// entries merge neighbours of the same status and contiguous offsets anyway, so its
    /// output is the same — but a 2^25-block VDI is walked in a few steps, not one per
    /// block.
    pub fn coarse(mut self) -> Self {
        self.coarse = true;
        self
    }

    /// The disk's size. A raw disk on a stream of unrecorded length (the last source)
    /// gives an upper bound until its end has been read, then its exact size.
    pub fn size(&self) -> u64 {
        match self.parts.last() {
            Some(p) => p.start + p.dev.size(),
            None => self.size,
        }
    }

    /// True when [`StatusReader::size`] is exact (no stream of unrecorded length is
    /// still being read).
    pub fn length_known(&self) -> bool {
        self.parts.iter().all(|p| p.dev.length_known())
    }

    fn part_at(&self, offset: u64) -> &Part {
        let i = self.parts.partition_point(|p| p.start <= offset);
        &self.parts[i.saturating_sub(1)]
    }

    /// The file that holds the data at `offset` of layer `depth` (qemu's map `File`):
    /// the image itself, or the VMDK extent file covering it.
    pub fn file_at(&self, depth: u32, offset: u64) -> &str {
        let p = self.part_at(offset);
        let l = p.layer(depth);
        let local = offset - p.start;
        l.extents
            .iter()
            .find(|(s, e, _)| (*s..*e).contains(&local))
            .map_or(l.name.as_str(), |(_, _, n)| n.as_str())
    }

    /// Where the source holding `offset` starts, and its alignment (its cluster size,
    /// or 512 for raw) to which qemu rounds status runs.
    fn source_at(&self, offset: u64) -> (u64, u64) {
        let p = self.part_at(offset);
        let top = p.layer(0);
        let align = match top.format {
            Format::Raw => 512,
            _ => top.cluster_size.unwrap_or(512).max(512),
        };
        (p.start, align)
    }

    /// The status at `offset`, reaching at most `bytes` (qemu's
    /// `bdrv_block_status_above(bs, NULL, offset, bytes)`) and never past the end of
    /// the source image holding `offset`.
    pub fn status(&self, offset: u64, bytes: u64) -> imgconv::Result<Status> {
        let p = self.part_at(offset);
        let local = offset - p.start;
        let psize = p.dev.size();
        if local >= psize {
            return Err(imgconv::Error::invalid(format!(
                "status asked at offset {offset}, past the end of the disk ({psize} bytes)"
            )));
        }
        let mut bytes = bytes.min(psize - local);
        if let Layer {
            format: Format::Qcow2,
            cluster_size: Some(c),
            ..
        } = *p.layer(0)
        {
            // qcow2 answers for at most INT_MAX bytes (whole clusters) at once.
            bytes = bytes.min((i32::MAX as u64 / c * c).max(c));
        }
        let e = p.dev.map(local, bytes)?;
        let mut end = e.end().min(local + bytes);
        // Where each layer down to the answering one stops its answer.
        for d in (0..=e.depth).filter(|_| !self.coarse) {
            let l = p.layer(d);
            let span = match (l.format, l.cluster_size) {
                (Format::Qcow2, Some(c)) if d == e.depth && e.compressed => Some(c),
                // One L2 table: cluster_size / 8 entries of cluster_size bytes.
                (Format::Qcow2, Some(c)) => c.checked_mul(c / 8),
                (Format::Vmdk | Format::Vdi | Format::Vpc, Some(c)) => Some(c),
                _ => None,
            };
            if let Some(span) = span.filter(|&s| s > 0) {
                end = end.min((local / span + 1).saturating_mul(span));
            }
        }
        let layer = p.layer(e.depth);
        let fmt = layer.format;
        // A raw file maps every byte, holes included, to the same offset.
        let host_offset = match fmt {
            Format::Raw => Some(e.host_offset.unwrap_or(local)),
            // A hole in a flat extent lies where the data would.
            Format::Vmdk if layer.cluster_size.is_none() && e.host_offset.is_none() => layer
                .extents
                .iter()
                .find(|(s, t, _)| (*s..*t).contains(&local))
                .map(|(s, _, _)| local - s),
            _ if e.compressed => None,
            _ => e.host_offset,
        };
        let mut flags = match e.kind {
            ExtentKind::Data => {
                let at_offset = !e.compressed && (e.host_offset.is_some() || fmt == Format::Raw);
                DATA | ALLOCATED | if at_offset { OFFSET_VALID } else { 0 }
            }
            ExtentKind::Zero => match fmt {
                Format::Raw => ZERO | OFFSET_VALID | ALLOCATED,
                // A hole in a flat extent: data of the format, zeros of the file.
                Format::Vmdk if layer.cluster_size.is_none() => {
                    DATA | ZERO | OFFSET_VALID | ALLOCATED
                }
                _ => {
                    ZERO | ALLOCATED
                        | if e.host_offset.is_some() {
                            OFFSET_VALID
                        } else {
                            0
                        }
                }
            },
            ExtentKind::Unallocated => match fmt {
                Format::Raw => ZERO | OFFSET_VALID | ALLOCATED,
                // No backing file in qemu's view (a VHD's parent is not read by it).
                Format::Vdi | Format::Vpc => ZERO | ALLOCATED,
                // Formats with backing files: zeros, allocated nowhere.
                _ => ZERO,
            },
        };
        // Re-read: a stream of unrecorded length knows its size once its end is read.
        if end == p.dev.size() {
            flags |= EOF;
        }
        let host_offset = host_offset.filter(|_| flags & OFFSET_VALID != 0);
        Ok(Status {
            offset,
            len: end - local,
            flags,
            depth: e.depth,
            host_offset,
            compressed: e.compressed,
        })
    }
}

/// How qemu-img convert classes a stretch of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Data,
    Zero,
    Backing,
}

/// The units in which qemu-img convert copies (its `convert_iteration_sectors`): runs of
/// one status, data cut to 2 MiB, whole clusters when compressing. Its progress counts
/// the sectors of data units and advances as each unit is done.
pub struct CopySteps {
    status: StatusReader,
    total_sectors: u64,
    sector: u64,
    next_status: u64,
    class: Class,
    /// Sectors of data per unit (2 MiB).
    buf_sectors: u64,
    /// `-S 0`: zero stretches are written too, and count.
    write_zeros: bool,
    /// The target has a backing file: stretches the source's backing holds are skipped.
    target_has_backing: bool,
    /// Cluster of a compressed target, in sectors (0 = not compressed).
    cluster_sectors: u64,
}

/// One copy unit: `sectors` long, counted in the progress when `counts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub sectors: u64,
    pub counts: bool,
}

impl CopySteps {
    /// The units qemu-img would copy `status`'s disk in.
    pub fn new(
        status: StatusReader,
        write_zeros: bool,
        target_has_backing: bool,
        compressed_cluster: Option<u64>,
    ) -> Self {
        let total_sectors = status.size().div_ceil(512);
        let cluster_sectors = compressed_cluster.map_or(0, |c| (c / 512).max(1));
        CopySteps {
            status,
            total_sectors,
            sector: 0,
            next_status: 0,
            class: Class::Data,
            // A compressing target is written a cluster at a time.
            buf_sectors: if cluster_sectors > 0 {
                cluster_sectors
            } else {
                (2 << 20) / 512
            },
            write_zeros,
            target_has_backing,
            cluster_sectors,
        }
    }

    /// Where the next unit starts, in bytes.
    pub fn position(&self) -> u64 {
        (self.sector * 512).min(self.status.size())
    }

    /// The next unit, or `None` at the end of the disk.
    pub fn next_step(&mut self) -> imgconv::Result<Option<Step>> {
        if self.sector >= self.total_sectors {
            return Ok(None);
        }
        let sector = self.sector;
        let mut n = (self.total_sectors - sector).min(MAX_REQUEST / 512);
        if self.next_status <= sector {
            let s = self.status.status(sector * 512, n * 512)?;
            n = s.len.div_ceil(512);
            let (start, align) = self.status.source_at(sector * 512);
            let tail = (sector - start / 512 + n) % (align / 512);
            if n > tail {
                n -= tail;
            }
            self.class = if self.target_has_backing && s.depth > 0 {
                // qemu reads the source only down to its backing file, which the
                // target's backing file stands for.
                Class::Backing
            } else if s.flags & ZERO != 0 {
                Class::Zero
            } else if s.flags & DATA != 0 || !self.target_has_backing {
                Class::Data
            } else {
                Class::Backing
            };
            self.next_status = sector + n;
        }
        n = n.min(self.next_status - sector);
        if self.class == Class::Data || (self.write_zeros && self.class == Class::Zero) {
            n = n.min(self.buf_sectors);
        }
        if self.cluster_sectors > 0 {
            // Compressed clusters are written whole.
            if n < self.cluster_sectors {
                n = self.cluster_sectors.min(self.total_sectors - sector);
                self.class = Class::Data;
            } else {
                n -= n % self.cluster_sectors;
            }
        }
        let counts = match self.class {
            Class::Data => true,
            Class::Zero => self.write_zeros,
            Class::Backing => false,
        };
        self.sector += n;
        Ok(Some(Step { sectors: n, counts }))
    }
}

//! The qcow2 virtual disk: address translation through L1/L2 tables, with a bounded L2
//! cache, decompression on the calling thread, subclusters, an external data file and
//! a backing device underneath.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use flate2::{Decompress, FlushDecompress};
#[cfg(feature = "zstd")]
use zstd::stream::raw::{Decoder as ZstdDecoder, InBuffer, Operation, OutBuffer};

use super::header::{
    parse_u64_table, ClusterKind, CompressedDescriptor, CompressionType, Header, L1Entry, L2Entry,
    SubclusterBitmap, SubclusterState, SUBCLUSTERS,
};
use crate::device::{check_bounds, clamp_map_request, BlockDevice, Extent, ExtentKind};
use crate::error::{Error, Result};
use crate::io::table::PagedTable;
use crate::io::{read_struct, Storage};

const FMT: &str = "qcow2";

/// Bytes of L2 tables the cache of the top image may hold (at least two tables are
/// always allowed); each image of its backing chain gets an eighth. The engine reads in
/// ascending order, so a small cache suffices; with 64 KiB clusters this covers 64 GiB
/// of guest space.
pub const L2_CACHE_BYTES: u64 = 8 << 20;

/// Decompressors kept for reuse (each holds a window or a zstd context).
const DECODER_POOL: usize = 16;

/// Where guest data lives, for a stretch of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Not allocated in this layer.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Stored plainly at this host offset (of the data storage) for the stretch's start.
    Plain(u64),
    /// Stored compressed; the guest cluster starts at `cluster_start`.
    Compressed {
        desc: CompressedDescriptor,
        cluster_start: u64,
    },
}

/// A stretch of uniform [`Piece`] starting at the requested offset.
#[derive(Debug, Clone, Copy)]
struct Run {
    len: u64,
    piece: Piece,
}

struct L2Cache {
    tables: HashMap<u64, (Arc<[u64]>, u64)>,
    tick: u64,
    capacity: usize,
}

/// Everything the device needs besides the header, gathered by `open`.
pub(crate) struct Qcow2Parts {
    /// The qcow2 file (metadata and compressed clusters).
    pub(crate) file: Arc<dyn Storage>,
    /// Where plain clusters live: the external data file, or `file`. `None` when an
    /// external data file was not opened (metadata-only).
    pub(crate) data: Option<Arc<dyn Storage>>,
    /// The parsed header.
    pub(crate) header: Header,
    /// The active L1 table, read a page at a time.
    pub(crate) l1: PagedTable,
    /// The backing device, when opened.
    pub(crate) backing: Option<Arc<dyn BlockDevice>>,
    /// The backing file's name, when the image has one (for errors when it was not
    /// opened).
    pub(crate) backing_name: Option<String>,
    /// Memory for the L2 cache.
    pub(crate) cache_bytes: u64,
}

/// A qcow2 image as a [`BlockDevice`].
pub struct Qcow2Device {
    file: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    external: bool,
    cluster_bits: u32,
    l2_bits: u32,
    extended: bool,
    size: u64,
    compression: CompressionType,
    l1: PagedTable,
    backing: Option<Arc<dyn BlockDevice>>,
    backing_name: Option<String>,
    cache: Mutex<L2Cache>,
    inflaters: Mutex<Vec<Decompress>>,
    #[cfg(feature = "zstd")]
    zstd: Mutex<Vec<ZstdDecoder<'static>>>,
}

impl Qcow2Device {
    /// Builds the device; `parts.header` must have been validated by `open`.
    pub(crate) fn new(parts: Qcow2Parts) -> Self {
        let h = &parts.header;
        let cluster_bits = h.cluster_bits;
        let l2_bits = h.l2_entries().trailing_zeros();
        let capacity = (parts.cache_bytes >> cluster_bits).max(2) as usize;
        Qcow2Device {
            external: h.has_external_data_file(),
            extended: h.extended_l2(),
            size: h.size,
            compression: h.compression().unwrap_or_default(),
            cluster_bits,
            l2_bits,
            file: parts.file,
            data: parts.data,
            l1: parts.l1,
            backing: parts.backing,
            backing_name: parts.backing_name,
            cache: Mutex::new(L2Cache {
                tables: HashMap::new(),
                tick: 0,
                capacity,
            }),
            inflaters: Mutex::new(Vec::new()),
            #[cfg(feature = "zstd")]
            zstd: Mutex::new(Vec::new()),
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The L2 table at `offset`, from the cache or the file.
    fn l2_table(&self, offset: u64, l1_entry_offset: u64) -> Result<Arc<[u64]>> {
        {
            let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            c.tick += 1;
            let tick = c.tick;
            if let Some((t, used)) = c.tables.get_mut(&offset) {
                *used = tick;
                return Ok(t.clone());
            }
        }
        let cs = self.cluster_size();
        if offset & (cs - 1) != 0 {
            return Err(Error::corrupt(
                FMT,
                "L1 entry",
                l1_entry_offset,
                format!("L2 table offset {offset:#x} is not cluster aligned"),
            ));
        }
        if !matches!(offset.checked_add(cs), Some(e) if e <= self.file.len()) {
            return Err(Error::corrupt(
                FMT,
                "L2 table",
                offset,
                format!(
                    "table lies past the end of the file ({:#x})",
                    self.file.len()
                ),
            ));
        }
        let mut buf = vec![0u8; cs as usize];
        read_struct(self.file.as_ref(), &mut buf, offset, FMT, "L2 table")?;
        let table: Arc<[u64]> = parse_u64_table(&buf).into();
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.tables.len() >= c.capacity {
            if let Some(oldest) = c.tables.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k) {
                c.tables.remove(&oldest);
            }
        }
        let tick = c.tick;
        c.tables.insert(offset, (table.clone(), tick));
        Ok(table)
    }

    /// What the guest cluster holding `pos` is, as `(piece at pos, end of that piece)`.
    fn piece_in_table(
        &self,
        table: &[u64],
        l2_offset: u64,
        index: u64,
        pos: u64,
    ) -> Result<(Piece, u64)> {
        let cs = self.cluster_size();
        let cluster_start = pos & !(cs - 1);
        let cluster_end = cluster_start + cs;
        let within = pos - cluster_start;
        let words = if self.extended { 2 } else { 1 };
        let entry_off = l2_offset + index * 8 * words;
        let word = L2Entry(table[(index * words) as usize]);
        let bad = |why: String| Error::corrupt(FMT, "L2 entry", entry_off, why);
        let kind = word.decode(self.cluster_bits, self.extended, self.external);
        let host = match kind {
            ClusterKind::Compressed(desc) => {
                if self.external {
                    return Err(bad(
                        "compressed cluster in an image with an external data file".into(),
                    ));
                }
                if self.extended && table[(index * 2 + 1) as usize] != 0 {
                    return Err(bad(
                        "compressed cluster with a non-zero subcluster bitmap".into()
                    ));
                }
                return Ok((
                    Piece::Compressed {
                        desc,
                        cluster_start,
                    },
                    cluster_end,
                ));
            }
            ClusterKind::Zero { .. } => return Ok((Piece::Zero, cluster_end)),
            ClusterKind::Unallocated => None,
            ClusterKind::Normal { host_offset } => {
                if host_offset & (cs - 1) != 0 {
                    return Err(bad(format!(
                        "cluster offset {host_offset:#x} is not cluster aligned"
                    )));
                }
                Some(host_offset)
            }
        };
        if !self.extended {
            return Ok(match host {
                Some(h) => (Piece::Plain(h + within), cluster_end),
                None => (Piece::Unallocated, cluster_end),
            });
        }
        let bitmap = SubclusterBitmap(table[(index * 2 + 1) as usize]);
        if bitmap.conflicts() != 0 {
            return Err(bad(format!(
                "subclusters {:#x} are marked both allocated and zero",
                bitmap.conflicts()
            )));
        }
        if host.is_none() && bitmap.allocated() != 0 {
            return Err(bad(
                "unallocated cluster with allocated subclusters".to_string()
            ));
        }
        let sc = cs / SUBCLUSTERS as u64;
        let i = (within / sc) as u32;
        let end = cluster_start + (i + bitmap.run_len(i)) as u64 * sc;
        let piece = match bitmap.state(i) {
            SubclusterState::Allocated => Piece::Plain(host.unwrap_or(0) + within),
            SubclusterState::Zero => Piece::Zero,
            SubclusterState::Unallocated => Piece::Unallocated,
        };
        Ok((piece, end))
    }

    /// The longest uniform stretch of this layer from `offset`, at most `len` bytes.
    ///
    /// Plain stretches are merged while their host offsets are contiguous; compressed
    /// clusters are merged only when `merge_compressed` (for `map`).
    fn top_run(&self, offset: u64, len: u64, merge_compressed: bool) -> Result<Run> {
        let end = offset + len;
        let span_bits = self.cluster_bits + self.l2_bits;
        let mut pos = offset;
        let mut first: Option<Piece> = None;
        // True when `p` at `pos` continues the run that started with `first` at `offset`.
        let continues = |first: &Piece, p: &Piece, pos: u64| match (first, p) {
            (Piece::Unallocated, Piece::Unallocated) | (Piece::Zero, Piece::Zero) => true,
            (Piece::Plain(a), Piece::Plain(b)) => *b == a + (pos - offset),
            (Piece::Compressed { .. }, Piece::Compressed { .. }) => merge_compressed,
            _ => false,
        };
        'outer: while pos < end {
            let l1_index = pos >> span_bits;
            let span_end = ((l1_index + 1) << span_bits).min(end);
            let l1e = L1Entry(self.l1.get(l1_index)?);
            let Some(l2_offset) = l1e.l2_offset() else {
                match &first {
                    None => first = Some(Piece::Unallocated),
                    Some(f) if continues(f, &Piece::Unallocated, pos) => {}
                    Some(_) => break,
                }
                // Every following unallocated L1 entry at once (a huge sparse table).
                let spans_left = ((end - 1) >> span_bits) - l1_index + 1;
                let free = self
                    .l1
                    .run_while(l1_index, spans_left, |e| L1Entry(e).l2_offset().is_none())?
                    .max(1);
                pos = span_end.max(((l1_index + free) << span_bits).min(end));
                continue;
            };
            let table = self.l2_table(l2_offset, self.l1_entry_offset(l1_index))?;
            while pos < span_end {
                let index = (pos >> self.cluster_bits) & ((1 << self.l2_bits) - 1);
                let (piece, piece_end) = self.piece_in_table(&table, l2_offset, index, pos)?;
                match &first {
                    None => first = Some(piece),
                    Some(f) if continues(f, &piece, pos) => {}
                    Some(_) => break 'outer,
                }
                pos = piece_end.min(end);
                if matches!(piece, Piece::Compressed { .. }) && !merge_compressed {
                    break 'outer;
                }
            }
        }
        Ok(Run {
            len: pos - offset,
            piece: first.unwrap_or(Piece::Unallocated),
        })
    }

    fn l1_entry_offset(&self, l1_index: u64) -> u64 {
        self.l1.entry_offset(l1_index)
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(b) => {
                let bsize = b.size();
                let n = if offset >= bsize {
                    0
                } else {
                    (bsize - offset).min(buf.len() as u64) as usize
                };
                if n > 0 {
                    b.read_at(&mut buf[..n], offset)?;
                }
                buf[n..].fill(0);
                Ok(())
            }
            None => match &self.backing_name {
                Some(name) => Err(Error::NotOpened {
                    format: FMT,
                    reference: format!("backing file {name:?}"),
                }),
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
        }
    }

    fn read_plain(&self, buf: &mut [u8], host: u64) -> Result<()> {
        let data = self.data.as_ref().ok_or_else(|| Error::NotOpened {
            format: FMT,
            reference: "the external data file".into(),
        })?;
        read_struct(data.as_ref(), buf, host, FMT, "data cluster")
    }

    fn read_compressed(
        &self,
        buf: &mut [u8],
        pos: u64,
        desc: CompressedDescriptor,
        cluster_start: u64,
    ) -> Result<()> {
        let file_len = self.file.len();
        let off = desc.host_offset;
        if off >= file_len {
            return Err(Error::corrupt(
                FMT,
                "compressed cluster",
                off,
                format!("data starts past the end of the file ({file_len:#x})"),
            ));
        }
        // The last sector may be cut short where the file ends.
        let n = desc.max_len().min(file_len - off);
        let mut input = vec![0u8; n as usize];
        read_struct(
            self.file.as_ref(),
            &mut input,
            off,
            FMT,
            "compressed cluster",
        )?;
        let mut cluster = vec![0u8; self.cluster_size() as usize];
        // A short last cluster of the disk needs only its guest part.
        let need = (self.size - cluster_start).min(self.cluster_size()) as usize;
        self.decompress(&input, &mut cluster, need, off)?;
        let from = (pos - cluster_start) as usize;
        buf.copy_from_slice(&cluster[from..from + buf.len()]);
        Ok(())
    }

    /// Decompresses `input` into `out`, which must receive at least `need` bytes;
    /// anything after a full `out` is ignored.
    fn decompress(&self, input: &[u8], out: &mut [u8], need: usize, host: u64) -> Result<()> {
        let bad = |why: String| Error::corrupt(FMT, "compressed cluster", host, why);
        match self.compression {
            CompressionType::Zlib => {
                let popped = self
                    .inflaters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop();
                let mut d = match popped {
                    Some(mut d) => {
                        d.reset(false);
                        d
                    }
                    None => Decompress::new(false),
                };
                let r = d.decompress(input, out, FlushDecompress::Finish);
                let produced = d.total_out();
                let mut pool = self.inflaters.lock().unwrap_or_else(|e| e.into_inner());
                if pool.len() < DECODER_POOL {
                    pool.push(d);
                }
                if produced >= need as u64 {
                    return Ok(());
                }
                Err(bad(match r {
                    Err(e) => format!("deflate error: {e}"),
                    Ok(_) => format!(
                        "deflate stream ends after {produced} of {} bytes",
                        out.len()
                    ),
                }))
            }
            #[cfg(not(feature = "zstd"))]
            CompressionType::Zstd => Err(bad("zstd: built without the `zstd` feature".into())),
            #[cfg(feature = "zstd")]
            CompressionType::Zstd => {
                let popped = self.zstd.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let mut d = match popped {
                    Some(mut d) => {
                        d.reinit().map_err(|e| bad(format!("zstd: {e}")))?;
                        d
                    }
                    None => ZstdDecoder::new().map_err(|e| bad(format!("zstd: {e}")))?,
                };
                let want = out.len();
                let mut inb = InBuffer::around(input);
                let mut outb = OutBuffer::around(out);
                let mut result = Ok(());
                // Frames follow one another; stop as soon as the cluster is full, so
                // trailing sector padding is never parsed.
                while outb.pos() < want {
                    let before = (inb.pos, outb.pos());
                    if let Err(e) = d.run(&mut inb, &mut outb) {
                        result = Err(bad(format!("zstd: {e}")));
                        break;
                    }
                    if outb.pos() < want && (inb.pos, outb.pos()) == before {
                        result = Err(bad(format!(
                            "zstd data ends after {} of {want} bytes",
                            outb.pos()
                        )));
                        break;
                    }
                }
                let full = outb.pos() >= need;
                let mut pool = self.zstd.lock().unwrap_or_else(|e| e.into_inner());
                if pool.len() < DECODER_POOL && result.is_ok() {
                    pool.push(d);
                }
                if full {
                    Ok(())
                } else {
                    result
                }
            }
        }
    }
}

impl BlockDevice for Qcow2Device {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let run = self.top_run(pos, (buf.len() - done) as u64, false)?;
            let n = run.len as usize;
            let out = &mut buf[done..done + n];
            match run.piece {
                Piece::Unallocated => self.read_backing(out, pos)?,
                Piece::Zero => out.fill(0),
                Piece::Plain(host) => self.read_plain(out, host)?,
                Piece::Compressed {
                    desc,
                    cluster_start,
                } => self.read_compressed(out, pos, desc, cluster_start)?,
            }
            done += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = clamp_map_request(offset, len, self.size)?;
        let run = self.top_run(offset, len, true)?;
        Ok(match run.piece {
            Piece::Unallocated => match &self.backing {
                Some(b) if offset < b.size() => {
                    let mut e = b.map(offset, run.len.min(b.size() - offset))?;
                    e.depth += 1;
                    e
                }
                // Past the backing file's end the overlay reads zeros of its own.
                _ => Extent::new(offset, run.len, ExtentKind::Unallocated),
            },
            Piece::Zero => Extent::new(offset, run.len, ExtentKind::Zero),
            Piece::Plain(host) => {
                let mut e = Extent::new(offset, run.len, ExtentKind::Data);
                e.host_offset = Some(host);
                e
            }
            Piece::Compressed { .. } => {
                let mut e = Extent::new(offset, run.len, ExtentKind::Data);
                e.compressed = true;
                e
            }
        })
    }
}

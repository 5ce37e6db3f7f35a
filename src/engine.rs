//! The conversion engine: one pipeline for every pair of formats. It knows formats only
//! through the two traits: it reads a [`BlockDevice`] and feeds an [`ImageWriter`] that the
//! caller made ([`crate::convert`](mod@crate::convert) picks it from the format table).
//!
//! A dispatcher thread walks the source's [`BlockDevice::map`] and cuts the disk into
//! grain-aligned units: stretches that read as zeros become zero runs without being read;
//! data stretches become jobs of at most `chunk_size` bytes. Worker threads read each job,
//! find all-zero grains, compare with the target's backing image when there is one, and
//! run the writer's encoder (compression). The calling thread receives the results,
//! puts them back in order and hands them to the [`ImageWriter`]. A fixed number of
//! tokens bounds the jobs in flight, so memory stays bounded whatever the image size.
//!
//! Performance notes (measured with `benches/compare-qemu-img.sh`): read buffers are
//! recycled through a small pool and data runs are handed to the writer as slices of
//! them, so the data is copied once on the way in (the read) and once on the way out
//! (the write), like `cp`; adjacent data extents are read with one `read_at`; units are
//! 1 MiB, which keeps a unit in the CPU cache from its read to its write.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use crate::device::{BlockDevice, Extent};
use crate::error::{Error, Result};
use crate::io::aligned::AlignedBuf;
use crate::writer::{DataRun, GrainEncoder, ImageWriter};
use crate::zero::is_zero;

/// Progress callback: `(bytes done, bytes total)`.
pub type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

/// Stops a running conversion from another thread: give a clone to the conversion
/// ([`EngineOptions::cancel`]), call [`cancel`](CancelToken::cancel) on any clone, and the
/// conversion ends with [`Error::Interrupted`] (its outputs removed). A token belongs to
/// the conversions it was given to; there is no process-wide state.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not cancelled yet.
    pub fn new() -> Self {
        CancelToken::default()
    }

    /// Asks every conversion holding this token to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// True once [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Default size of one unit of work. 1 MiB measured slightly faster than 2 and much
/// faster than 8 (a unit stays in the CPU cache between its read, its zero scan and its
/// write), and few enough units are in flight to keep memory low.
pub const DEFAULT_CHUNK: u64 = 1 << 20;

/// Most worker threads started when [`EngineOptions::threads`] is 0 (the cores).
pub const DEFAULT_MAX_THREADS: usize = 16;

/// How the engine runs: threads, sparseness, progress, backing image of the target.
#[derive(Clone)]
pub struct EngineOptions {
    /// Worker threads (`-m`); 0 = the number of cores, at most [`DEFAULT_MAX_THREADS`].
    pub threads: usize,
    /// Smallest run of zeros to leave unwritten (`-S`); 0 writes every byte, zero
    /// stretches of the source included (a fully allocated output, as qemu-img's `-S 0`).
    pub min_sparse: u64,
    /// Bytes per unit of work (rounded to the writer's grain size).
    pub chunk_size: u64,
    /// Called after each unit is written.
    pub progress: Option<Arc<ProgressFn>>,
    /// The target's backing image: grains that read the same there are not written.
    pub target_backing: Option<Arc<dyn BlockDevice>>,
    /// The target is known to read as zeros already (`--target-is-zero`).
    pub target_is_zero: bool,
    /// Stops the conversion when cancelled.
    pub cancel: CancelToken,
    /// Copy offloading (`-C`): where the source keeps its data plainly in a file (raw)
    /// and the writer can take it so, data stretches are copied by the kernel
    /// (`copy_file_range`), unread and unscanned for zeros; otherwise ignored.
    pub copy_offload: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: 0,
            min_sparse: 4096,
            chunk_size: DEFAULT_CHUNK,
            progress: None,
            target_backing: None,
            target_is_zero: false,
            cancel: CancelToken::new(),
            copy_offload: false,
        }
    }
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("threads", &self.threads)
            .field("min_sparse", &self.min_sparse)
            .field("chunk_size", &self.chunk_size)
            .field("target_backing", &self.target_backing.is_some())
            .finish()
    }
}

/// What one unit of work becomes.
enum Piece {
    /// Guest data at `offset`: bytes `start..end` of the unit's buffer.
    Data {
        offset: u64,
        start: usize,
        end: usize,
        encoded: Option<Vec<Option<Vec<u8>>>>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    /// Data left in the source's file at `host`, for the writer to copy (`-C`).
    Copy {
        offset: u64,
        host: u64,
        len: u64,
    },
}

/// A unit of work, cut by the dispatcher.
enum Job {
    /// Reads as zeros in the source.
    Zero { seq: u64, offset: u64, len: u64 },
    /// Has data; `parts` are the source's extents inside it.
    Data {
        seq: u64,
        offset: u64,
        len: u64,
        parts: Vec<Extent>,
        /// Already read (sequential-only sources are read by the dispatcher).
        buf: Option<AlignedBuf>,
    },
}

struct Done {
    seq: u64,
    pieces: Vec<Piece>,
    bytes: u64,
    /// The unit's bytes, which the data pieces point into; back to the pool once written.
    buf: AlignedBuf,
}

/// Read buffers recycled between the workers and the collector: in steady state a
/// conversion allocates nothing per unit and never zero-fills memory that a read is
/// about to overwrite.
struct BufPool {
    free: Mutex<Vec<AlignedBuf>>,
    keep: usize,
}

impl BufPool {
    fn new(keep: usize) -> Self {
        BufPool {
            free: Mutex::new(Vec::with_capacity(keep)),
            keep,
        }
    }

    /// A buffer of `len` bytes with unspecified contents.
    fn get(&self, len: usize) -> AlignedBuf {
        let mut b = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_default();
        b.resize(len);
        b
    }

    fn put(&self, b: AlignedBuf) {
        if b.capacity() == 0 {
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            if f.len() < self.keep {
                f.push(b);
            }
        }
    }
}

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Runs the pipeline: `src` → workers → `writer`, then `writer.finish()`.
pub fn run(
    src: &dyn BlockDevice,
    mut writer: Box<dyn ImageWriter>,
    opts: &EngineOptions,
) -> Result<()> {
    let grain = writer.grain_size().max(1);
    let zero_gran = if opts.min_sparse == 0 {
        0
    } else {
        align_up(opts.min_sparse.max(grain), grain)
    };
    let chunk = align_up(opts.chunk_size.max(grain), zero_gran.max(grain));
    let threads = if opts.threads == 0 {
        // At most 16 by default: memory grows with the workers (up to ~9 MiB each for
        // streamOptimized output), and the README's budget holds for the default.
        std::thread::available_parallelism().map_or(2, |n| n.get().min(DEFAULT_MAX_THREADS))
    } else {
        opts.threads
    }
    .clamp(1, 64);
    let length_known = src.length_known();
    let encoder = writer.encoder();
    // Units in flight (read, being encoded, or waiting for their turn): enough to keep
    // every worker busy while the writer catches up, few enough to bound memory.
    // A sequential source is read by the dispatcher alone: without an encoder to keep
    // busy, a few units ahead of the writer are enough (a decompressing reader is
    // usually what limits, and keeps memory of its own).
    let max_in_flight = if src.sequential_only() && encoder.is_none() {
        threads + 2
    } else {
        (threads * 4).min((threads + 2).max(16))
    };
    let pool = BufPool::new(max_in_flight + 1);
    let cancel = AtomicBool::new(false);

    let (job_tx, job_rx) = sync_channel::<Job>(threads * 2);
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = sync_channel::<Result<Done>>(max_in_flight);
    let (token_tx, token_rx) = sync_channel::<()>(max_in_flight);
    for _ in 0..max_in_flight {
        token_tx.send(()).expect("token channel has room");
    }

    let offload = opts.copy_offload
        && writer.copy_range_supported()
        && src.plain_file().is_some()
        && opts.target_backing.is_none()
        && encoder.is_none()
        && !src.sequential_only();
    let ctx = WorkerCtx {
        src,
        grain,
        zero_gran,
        encoder: encoder.as_deref(),
        backing: opts.target_backing.as_deref(),
        offload,
        cancel: &cancel,
        cancelled: &opts.cancel,
        pool: &pool,
    };

    let result = std::thread::scope(|s| -> Result<()> {
        let mut threads_running = Vec::with_capacity(threads + 1);
        // Threads that cannot be started (a process or address-space limit) are not a
        // panic: the conversion goes on with the workers it has, or fails if none.
        let spawn_error =
            |e: std::io::Error| Error::Format(format!("cannot start a conversion thread: {e}"));
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let ctx = &ctx;
            match std::thread::Builder::new()
                .spawn_scoped(s, move || worker(ctx, &job_rx, &done_tx))
            {
                Ok(t) => threads_running.push(t),
                Err(_) if !threads_running.is_empty() => break,
                Err(e) => return Err(spawn_error(e)),
            }
        }
        {
            let done_tx = done_tx.clone();
            let ctx = &ctx;
            let dispatcher = std::thread::Builder::new().spawn_scoped(s, move || {
                let r = dispatch(ctx, chunk, &job_tx, &token_rx);
                if let Err(e) = r {
                    let _ = done_tx.send(Err(e));
                }
            });
            match dispatcher {
                Ok(t) => threads_running.push(t),
                Err(e) => {
                    // The job queue's sender went with the closure: the workers end.
                    cancel.store(true, Ordering::SeqCst);
                    return Err(spawn_error(e));
                }
            }
        }
        // Only the workers hold the job queue: when the last one has left (after an
        // error), a dispatcher blocked on a full queue is woken with an error instead
        // of waiting forever.
        drop(job_rx);
        drop(done_tx);
        let r = collect(&mut *writer, src, &done_rx, &token_tx, opts, &pool);
        if r.is_err() {
            cancel.store(true, Ordering::SeqCst);
        }
        drop(done_rx);
        drop(token_tx);
        // Joined one by one (the scope alone does not wait for their thread-local
        // destructors), and a panic becomes an error rather than a panic of the caller.
        let mut panicked = false;
        for t in threads_running {
            panicked |= t.join().is_err();
        }
        if panicked && r.is_ok() {
            return Err(Error::Format(
                "internal error: a conversion thread panicked".into(),
            ));
        }
        r
    });
    result?;
    // A cancel that came after the last piece was copied still wins: the caller asked
    // for no image, and none is committed.
    if opts.cancel.is_cancelled() {
        return Err(Error::Interrupted);
    }
    if !length_known {
        // The source has ended (the collector saw all of it): its size is final now.
        if !src.length_known() {
            return Err(Error::Format(
                "internal error: the source's length is still unknown at its end".into(),
            ));
        }
        writer.set_size(src.size())?;
    }
    writer.finish()
}

/// Walks the map and sends jobs in ascending order.
///
/// The disk's size is read again after every `map`: a source of unknown length (see
/// [`BlockDevice::length_known`]) learns where it ends while it is mapped.
fn dispatch(
    ctx: &WorkerCtx<'_>,
    chunk: u64,
    jobs: &SyncSender<Job>,
    tokens: &Receiver<()>,
) -> Result<()> {
    let (src, grain, cancel) = (ctx.src, ctx.grain, ctx.cancel);
    let sequential = src.sequential_only();
    let mut size = src.size();
    let mut mapper = Mapper::new(src);
    let mut pos = 0u64;
    let mut seq = 0u64;
    while pos < size {
        if cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        if ctx.cancelled.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let ext = mapper.upto(pos, u64::MAX, &mut size)?;
        // `-S 0` (no zero granularity): zero stretches are written as data too, so
        // that the output is fully allocated, as qemu-img makes it.
        let job = if ext.kind.reads_as_zero() && ctx.zero_gran != 0 {
            // Coalesce following zero extents, then keep whole grains only.
            let mut zend = ext.end();
            while zend < size {
                // A long run of small zero extents: still answer a stop at once.
                if cancel.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if ctx.cancelled.is_cancelled() {
                    return Err(Error::Interrupted);
                }
                let e = mapper.upto(zend, u64::MAX, &mut size)?;
                if !e.kind.reads_as_zero() {
                    break;
                }
                zend = e.end();
            }
            let end = if zend == size {
                size
            } else {
                align_down(zend, grain)
            };
            if end > pos {
                let j = Job::Zero {
                    seq,
                    offset: pos,
                    len: end - pos,
                };
                pos = end;
                Some(j)
            } else {
                None
            }
        } else {
            None
        };
        let job = match job {
            Some(j) => j,
            None => {
                let (end, parts) = data_unit(
                    &mut mapper,
                    pos,
                    &mut size,
                    grain,
                    chunk,
                    ctx.zero_gran != 0,
                )?;
                let buf = if sequential {
                    Some(read_parts(src, ctx.pool, pos, end - pos, &parts)?)
                } else {
                    None
                };
                let j = Job::Data {
                    seq,
                    offset: pos,
                    len: end - pos,
                    parts,
                    buf,
                };
                pos = end;
                j
            }
        };
        if tokens.recv().is_err() || jobs.send(job).is_err() {
            return Ok(()); // the collector has stopped
        }
        seq += 1;
    }
    Ok(())
}

/// The dispatcher's view of the source's map: the last extent the source returned is
/// kept, and questions inside it are answered from it. A unit is cut from several
/// questions, and each costs the source real work (a raw file answers with
/// `SEEK_DATA`/`SEEK_HOLE`, which walk the page cache from the offset asked to the next
/// change: asked at every unit of a long extent, that walk grows with the extent).
struct Mapper<'a> {
    src: &'a dyn BlockDevice,
    last: Option<Extent>,
}

impl<'a> Mapper<'a> {
    fn new(src: &'a dyn BlockDevice) -> Self {
        Mapper { src, last: None }
    }

    /// Maps the source at `pos` up to `stop` (or its end), then refreshes `*size` and
    /// checks the extent against both. `pos` must be below both.
    fn upto(&mut self, pos: u64, stop: u64, size: &mut u64) -> Result<Extent> {
        let cached = self
            .last
            .as_ref()
            .filter(|l| l.offset <= pos && pos < l.end() && l.end() <= *size);
        let e = match cached {
            Some(l) => *l,
            None => {
                let e = self.src.map(pos, *size - pos)?;
                *size = self.src.size();
                if e.offset != pos || e.len == 0 || e.end() > *size {
                    return Err(Error::Format(format!(
                        "internal error: map({pos:#x}) returned {}+{} beyond {:#x}",
                        e.offset, e.len, *size
                    )));
                }
                self.last = Some(e);
                e
            }
        };
        // The part of `e` from `pos` to `stop`.
        let end = e.end().min(stop.min(*size));
        let skip = pos - e.offset;
        Ok(Extent {
            offset: pos,
            len: end - pos,
            // A compressed extent's host offset names the whole compressed piece.
            host_offset: if e.compressed {
                e.host_offset.filter(|_| skip == 0)
            } else {
                e.host_offset.map(|h| h + skip)
            },
            ..e
        })
    }
}

/// Cuts a data unit starting at `pos` (grain-aligned): up to `chunk` bytes, ending early
/// (when `cut_at_zeros`) where a zero stretch covers at least one whole grain.
fn data_unit(
    mapper: &mut Mapper<'_>,
    pos: u64,
    size: &mut u64,
    grain: u64,
    chunk: u64,
    cut_at_zeros: bool,
) -> Result<(u64, Vec<Extent>)> {
    let mut parts = Vec::new();
    let mut cur = pos;
    while cur < (pos + chunk).min(*size) {
        let mut e = mapper.upto(cur, pos + chunk, size)?;
        if e.kind.reads_as_zero() && cur > pos && cut_at_zeros {
            let cut = align_up(cur, grain);
            if cut + grain <= e.end() || (e.end() == *size && cut < *size) {
                if cut > cur {
                    e.len = cut - cur;
                    parts.push(e);
                }
                return Ok((cut.min(*size), parts));
            }
        }
        cur = e.end();
        parts.push(e);
    }
    // A data extent ending mid-grain: extend the unit to the grain's end.
    let end = align_up(cur, grain).min(*size);
    while cur < end.min(*size) {
        let e = mapper.upto(cur, end, size)?;
        cur = e.end();
        parts.push(e);
    }
    let end = end.min(*size);
    Ok((end, parts))
}

/// Reads a unit into a pooled buffer: data parts from the source, everything else
/// (zero parts, and any gap between parts) as zeros.
fn read_parts(
    src: &dyn BlockDevice,
    pool: &BufPool,
    offset: u64,
    len: u64,
    parts: &[Extent],
) -> Result<AlignedBuf> {
    let mut buf = pool.get(len as usize);
    let mut cur = 0usize;
    let mut i = 0;
    while i < parts.len() {
        let p = &parts[i];
        let s = (p.offset - offset) as usize;
        let mut e = s + p.len as usize;
        buf[cur..s].fill(0);
        i += 1;
        if p.kind.reads_as_zero() {
            buf[s..e].fill(0);
        } else {
            // One read for adjacent data parts (e.g. consecutive clusters), so that the
            // reader can merge them into one large read of its file.
            while let Some(q) = parts.get(i) {
                if q.kind.reads_as_zero() || q.offset - offset != e as u64 {
                    break;
                }
                e += q.len as usize;
                i += 1;
            }
            src.read_at(&mut buf[s..e], p.offset)?;
        }
        cur = e;
    }
    buf[cur..].fill(0);
    Ok(buf)
}

struct WorkerCtx<'a> {
    src: &'a dyn BlockDevice,
    grain: u64,
    zero_gran: u64,
    encoder: Option<&'a dyn GrainEncoder>,
    backing: Option<&'a dyn BlockDevice>,
    /// Data parts stored plainly in the source's file become `Piece::Copy`.
    offload: bool,
    /// The pipeline is shutting down (an error, or the end).
    cancel: &'a AtomicBool,
    /// The caller's token.
    cancelled: &'a CancelToken,
    pool: &'a BufPool,
}

fn worker(ctx: &WorkerCtx<'_>, jobs: &Mutex<Receiver<Job>>, done: &SyncSender<Result<Done>>) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        if ctx.cancel.load(Ordering::Relaxed) {
            return;
        }
        let r = process(ctx, job);
        let failed = r.is_err();
        if done.send(r).is_err() || failed {
            return;
        }
    }
}

fn process(ctx: &WorkerCtx<'_>, job: Job) -> Result<Done> {
    match job {
        Job::Zero { seq, offset, len } => Ok(Done {
            seq,
            pieces: zero_pieces(ctx, offset, len)?,
            bytes: len,
            buf: AlignedBuf::new(),
        }),
        Job::Data {
            seq,
            offset,
            len,
            parts,
            buf,
        } => {
            if ctx.offload && buf.is_none() {
                if let Some(pieces) = copy_pieces(&parts) {
                    return Ok(Done {
                        seq,
                        pieces,
                        bytes: len,
                        buf: AlignedBuf::new(),
                    });
                }
            }
            let buf = match buf {
                Some(b) => b,
                None => read_parts(ctx.src, ctx.pool, offset, len, &parts)?,
            };
            Ok(Done {
                seq,
                pieces: data_pieces(ctx, offset, &buf)?,
                bytes: len,
                buf,
            })
        }
    }
}

/// A unit for copy offloading: its data parts as copies from the source's file (where
/// each lies at its own offset), its zero parts as zeros; `None` when a data part is
/// stored otherwise, or the parts leave a gap.
fn copy_pieces(parts: &[Extent]) -> Option<Vec<Piece>> {
    let mut pieces = Vec::with_capacity(parts.len());
    let mut end = parts.first()?.offset;
    for p in parts {
        if p.offset != end {
            return None;
        }
        end = p.end();
        if p.kind.reads_as_zero() {
            pieces.push(Piece::Zero {
                offset: p.offset,
                len: p.len,
            });
        } else {
            pieces.push(Piece::Copy {
                offset: p.offset,
                host: p.host_offset.filter(|_| !p.compressed)?,
                len: p.len,
            });
        }
    }
    Some(pieces)
}

/// A zero stretch of the source: nothing to store, unless the target's backing image
/// has data there that must be hidden.
fn zero_pieces(ctx: &WorkerCtx<'_>, offset: u64, len: u64) -> Result<Vec<Piece>> {
    let Some(backing) = ctx.backing else {
        return Ok(vec![Piece::Zero { offset, len }]);
    };
    let mut pieces = Vec::new();
    let end = offset + len;
    let bsize = backing.size();
    let mut cur = offset;
    while cur < end.min(bsize) {
        let e = backing.map(cur, end.min(bsize) - cur)?;
        if !e.kind.reads_as_zero() {
            let s = align_down(e.offset, ctx.grain).max(offset);
            let t = align_up(e.end(), ctx.grain).min(end);
            push_zero(&mut pieces, s, t - s);
        }
        cur = e.end();
    }
    Ok(pieces)
}

fn push_zero(pieces: &mut Vec<Piece>, offset: u64, len: u64) {
    if let Some(Piece::Zero { offset: o, len: l }) = pieces.last_mut() {
        if *o + *l >= offset {
            *l = (offset + len).max(*o + *l) - *o;
            return;
        }
    }
    pieces.push(Piece::Zero { offset, len });
}

/// Splits a read unit into data and zero pieces, and encodes the data grains.
fn data_pieces(ctx: &WorkerCtx<'_>, offset: u64, buf: &[u8]) -> Result<Vec<Piece>> {
    #[derive(PartialEq, Clone, Copy)]
    enum K {
        Data,
        Zero,
        Skip,
    }
    let len = buf.len() as u64;
    let gran = if ctx.zero_gran == 0 {
        len.max(1)
    } else {
        ctx.zero_gran
    };
    let mut runs: Vec<(K, u64, u64)> = Vec::new(); // (kind, start, end) relative to offset
    let mut backing_buf = Vec::new();
    let mut s = 0u64;
    while s < len {
        let e = (s + gran).min(len);
        let block = &buf[s as usize..e as usize];
        let zero = ctx.zero_gran != 0 && is_zero(block);
        let k = match ctx.backing {
            None => {
                if zero {
                    K::Zero
                } else {
                    K::Data
                }
            }
            Some(b) => {
                // Compare with what the target's backing image shows here.
                let bsize = b.size();
                let (gs, ge) = (offset + s, offset + e);
                backing_buf.clear();
                backing_buf.resize((e - s) as usize, 0);
                if gs < bsize {
                    let n = (ge.min(bsize) - gs) as usize;
                    b.read_at(&mut backing_buf[..n], gs)?;
                }
                if backing_buf.as_slice() == block {
                    K::Skip
                } else if zero {
                    K::Zero
                } else {
                    K::Data
                }
            }
        };
        match runs.last_mut() {
            Some((lk, _, le)) if *lk == k => *le = e,
            _ => runs.push((k, s, e)),
        }
        s = e;
    }
    let mut pieces = Vec::with_capacity(runs.len());
    for (k, s, e) in runs {
        match k {
            K::Skip => {}
            K::Zero => pieces.push(Piece::Zero {
                offset: offset + s,
                len: e - s,
            }),
            K::Data => {
                let (start, end) = (s as usize, e as usize);
                let encoded = match ctx.encoder {
                    Some(enc) => Some(
                        buf[start..end]
                            .chunks(ctx.grain as usize)
                            .enumerate()
                            .map(|(i, g)| enc.encode(offset + s + i as u64 * ctx.grain, g))
                            .collect::<Result<Vec<_>>>()?,
                    ),
                    None => None,
                };
                pieces.push(Piece::Data {
                    offset: offset + s,
                    start,
                    end,
                    encoded,
                });
            }
        }
    }
    Ok(pieces)
}

/// Receives results, restores their order and feeds the writer, until the dispatcher
/// and the workers are done; then checks that the whole disk was written.
fn collect(
    writer: &mut dyn ImageWriter,
    src: &dyn BlockDevice,
    done: &Receiver<Result<Done>>,
    tokens: &SyncSender<()>,
    opts: &EngineOptions,
    pool: &BufPool,
) -> Result<()> {
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    let mut written = 0u64;
    let mut zero_to_write = opts.target_backing.is_some() || !opts.target_is_zero;
    if opts.target_is_zero {
        zero_to_write = opts.target_backing.is_some();
    }
    // Progress totals are 0 while the source's length is unknown.
    let total = || if src.length_known() { src.size() } else { 0 };
    if let Some(p) = &opts.progress {
        p(0, total());
    }
    // Until every sender is gone: the dispatcher and the workers have finished.
    while let Ok(d) = done.recv() {
        let d = d?;
        pending.insert(d.seq, d);
        while let Some(d) = pending.remove(&next) {
            for p in d.pieces {
                match p {
                    Piece::Data {
                        offset,
                        start,
                        end,
                        encoded,
                    } => writer.write_data(DataRun {
                        offset,
                        data: &d.buf[start..end],
                        encoded: encoded.as_deref(),
                    })?,
                    Piece::Zero { offset, len } => {
                        if zero_to_write {
                            writer.write_zeros(offset, len)?
                        }
                    }
                    Piece::Copy { offset, host, len } => {
                        let file = src.plain_file().ok_or_else(|| {
                            Error::Format("internal error: copy offloading without a file".into())
                        })?;
                        writer.copy_range(file, host, offset, len)?
                    }
                }
            }
            written += d.bytes;
            next += 1;
            pool.put(d.buf);
            let _ = tokens.send(());
            if let Some(p) = &opts.progress {
                p(written, total());
            }
        }
    }
    if !pending.is_empty() || written != src.size() {
        return Err(Error::Format(format!(
            "internal error: conversion stopped at byte {written} of {}",
            src.size()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{ExtentKind, MemDevice};

    /// A device with a fixed extent layout, for testing the dispatcher.
    struct Patchy {
        data: Vec<u8>,
        zero_from: u64,
        zero_to: u64,
    }

    impl BlockDevice for Patchy {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn map(&self, offset: u64, len: u64) -> Result<Extent> {
            let end = offset + len;
            let (kind, e) = if offset < self.zero_from {
                (ExtentKind::Data, self.zero_from)
            } else if offset < self.zero_to {
                (ExtentKind::Unallocated, self.zero_to)
            } else {
                (ExtentKind::Data, self.size())
            };
            Ok(Extent::new(offset, e.min(end) - offset, kind))
        }
    }

    #[derive(Default)]
    struct Recorder {
        grain: u64,
        log: Arc<Mutex<Vec<(bool, u64, u64)>>>,
        image: Arc<Mutex<Vec<u8>>>,
    }

    impl ImageWriter for Recorder {
        fn grain_size(&self) -> u64 {
            self.grain
        }
        fn write_data(&mut self, run: DataRun<'_>) -> Result<()> {
            assert_eq!(run.offset % self.grain, 0);
            self.log
                .lock()
                .unwrap()
                .push((true, run.offset, run.data.len() as u64));
            let mut img = self.image.lock().unwrap();
            let o = run.offset as usize;
            img[o..o + run.data.len()].copy_from_slice(run.data);
            Ok(())
        }
        fn write_zeros(&mut self, offset: u64, len: u64) -> Result<()> {
            self.log.lock().unwrap().push((false, offset, len));
            Ok(())
        }
        fn finish(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 | 1).collect()
    }

    #[test]
    fn covers_the_disk_in_order() {
        for threads in [1, 3] {
            let mut data = pattern(10 * 65536 + 1000);
            data[3 * 65536 + 100..6 * 65536 + 17].fill(0);
            let dev = Patchy {
                data: data.clone(),
                zero_from: 3 * 65536 + 100,
                zero_to: 6 * 65536 + 17,
            };
            let rec = Recorder {
                grain: 65536,
                image: Arc::new(Mutex::new(vec![0; data.len()])),
                ..Default::default()
            };
            let (log, image) = (rec.log.clone(), rec.image.clone());
            let opts = EngineOptions {
                threads,
                chunk_size: 3 * 65536,
                ..Default::default()
            };
            run(&dev, Box::new(rec), &opts).unwrap();
            assert_eq!(*image.lock().unwrap(), data);
            let log = log.lock().unwrap();
            let mut pos = 0;
            for &(_, o, l) in log.iter() {
                assert_eq!(o, pos, "runs are contiguous and ascending");
                pos += l;
            }
            assert_eq!(pos, data.len() as u64);
            // Grains 4 and 5 are entirely zero and never written as data.
            assert!(log
                .iter()
                .filter(|r| r.0)
                .all(|&(_, o, l)| o + l <= 4 * 65536 || o >= 6 * 65536));
        }
    }

    /// A long data extent is asked about once, not once per unit (a raw file answers
    /// each question with a page-cache walk to the next hole).
    #[test]
    fn long_extents_are_mapped_once() {
        struct Counted {
            inner: Patchy,
            maps: std::sync::atomic::AtomicUsize,
        }
        impl BlockDevice for Counted {
            fn size(&self) -> u64 {
                self.inner.size()
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
                self.inner.read_at(buf, offset)
            }
            fn map(&self, offset: u64, len: u64) -> Result<Extent> {
                self.maps.fetch_add(1, Ordering::Relaxed);
                self.inner.map(offset, len)
            }
        }
        let mut data = pattern(64 * 65536);
        data[40 * 65536..50 * 65536].fill(0);
        let dev = Counted {
            inner: Patchy {
                data: data.clone(),
                zero_from: 40 * 65536,
                zero_to: 50 * 65536,
            },
            maps: Default::default(),
        };
        let rec = Recorder {
            grain: 65536,
            image: Arc::new(Mutex::new(vec![0; data.len()])),
            ..Default::default()
        };
        let image = rec.image.clone();
        let opts = EngineOptions {
            chunk_size: 65536,
            ..Default::default()
        };
        run(&dev, Box::new(rec), &opts).unwrap();
        assert_eq!(*image.lock().unwrap(), data);
        // Three extents, 54 units of data.
        let maps = dev.maps.load(Ordering::Relaxed);
        assert!(maps <= 4, "{maps} map calls");
    }

    #[test]
    fn zero_detection_and_min_sparse_zero() {
        let mut data = pattern(1 << 20);
        data[4096..8192].fill(0);
        let dev = MemDevice::new(data.clone());
        for (min_sparse, expect_zero) in [(4096u64, true), (0, false)] {
            let rec = Recorder {
                grain: 512,
                image: Arc::new(Mutex::new(vec![0; data.len()])),
                ..Default::default()
            };
            let (log, image) = (rec.log.clone(), rec.image.clone());
            let opts = EngineOptions {
                min_sparse,
                ..Default::default()
            };
            run(&dev, Box::new(rec), &opts).unwrap();
            assert_eq!(*image.lock().unwrap(), data);
            let has_zero = log.lock().unwrap().iter().any(|r| !r.0);
            assert_eq!(has_zero, expect_zero);
        }
    }

    /// Data and holes alternating every `period` bytes, mapped in extents of at most
    /// `piece` bytes; counts the reads.
    struct Striped {
        data: Vec<u8>,
        period: u64,
        piece: u64,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl BlockDevice for Striped {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn map(&self, offset: u64, len: u64) -> Result<Extent> {
            let hole = (offset / self.period) % 2 == 1;
            let end = ((offset / self.period + 1) * self.period)
                .min(offset + self.piece)
                .min(offset + len)
                .min(self.size());
            let kind = if hole {
                ExtentKind::Unallocated
            } else {
                ExtentKind::Data
            };
            Ok(Extent::new(offset, end - offset, kind))
        }
    }

    fn striped(len: usize, period: u64, piece: u64) -> Striped {
        let mut data = pattern(len);
        for (i, b) in data.iter_mut().enumerate() {
            if (i as u64 / period) % 2 == 1 {
                *b = 0;
            }
        }
        Striped {
            data,
            period,
            piece,
            reads: Default::default(),
        }
    }

    #[test]
    fn recycled_buffers_never_leak_stale_bytes() {
        // Holes that do not cover whole grains end up inside data units, where the
        // (recycled, dirty) buffer must be zeroed.
        for threads in [1, 2] {
            let dev = striped(300_000, 1000, 1000);
            let rec = Recorder {
                grain: 512,
                image: Arc::new(Mutex::new(vec![0; dev.data.len()])),
                ..Default::default()
            };
            let image = rec.image.clone();
            let opts = EngineOptions {
                threads,
                min_sparse: 0,
                chunk_size: 4096,
                ..Default::default()
            };
            run(&dev, Box::new(rec), &opts).unwrap();
            assert!(*image.lock().unwrap() == dev.data, "threads {threads}");
        }
    }

    #[test]
    fn adjacent_data_extents_are_read_at_once() {
        // 64 KiB of data in 512-byte extents, then a 64 KiB hole, repeated.
        let dev = striped(8 << 16, 1 << 16, 512);
        let rec = Recorder {
            grain: 512,
            image: Arc::new(Mutex::new(vec![0; dev.data.len()])),
            ..Default::default()
        };
        let image = rec.image.clone();
        let opts = EngineOptions {
            threads: 2,
            chunk_size: 1 << 20,
            ..Default::default()
        };
        run(&dev, Box::new(rec), &opts).unwrap();
        assert!(*image.lock().unwrap() == dev.data);
        assert_eq!(dev.reads.load(Ordering::Relaxed), 4);
    }

    /// A writer error while workers are still reading must stop the whole pipeline: the
    /// dispatcher may be blocked on a full job queue when the last worker leaves.
    #[test]
    fn a_failing_writer_never_leaves_the_pipeline_hanging() {
        struct Slow;
        impl BlockDevice for Slow {
            fn size(&self) -> u64 {
                64 << 20
            }
            fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
                std::thread::sleep(std::time::Duration::from_millis(30));
                buf.fill(1);
                Ok(())
            }
            fn map(&self, offset: u64, len: u64) -> Result<Extent> {
                Ok(Extent::new(offset, len, ExtentKind::Data))
            }
        }
        struct Failing;
        impl ImageWriter for Failing {
            fn grain_size(&self) -> u64 {
                512
            }
            fn write_data(&mut self, _run: DataRun<'_>) -> Result<()> {
                Err(Error::invalid("disk full"))
            }
            fn write_zeros(&mut self, _offset: u64, _len: u64) -> Result<()> {
                Ok(())
            }
            fn finish(self: Box<Self>) -> Result<()> {
                Ok(())
            }
        }
        for _ in 0..5 {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let opts = EngineOptions {
                    threads: 2,
                    ..EngineOptions::default()
                };
                let _ = tx.send(run(&Slow, Box::new(Failing), &opts));
            });
            let r = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .expect("the conversion hangs after a writer error");
            assert!(r.unwrap_err().to_string().contains("disk full"));
        }
    }
}

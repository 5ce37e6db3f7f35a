//! A raw disk read straight from a stream (a decompressor, a pipe, a tar member), in
//! one pass and without a temporary file.
//!
//! [`StreamDevice`] is sequential-only: the conversion engine reads it on one thread at
//! ascending offsets. A thread of its own runs the (decompressing) reader a few MiB
//! ahead. The device sorts what arrives into zero and data stretches of 4 KiB (so that
//! `map` reports zero runs and the engine skips them without copying), keeps the decoded
//! buffers that hold data — at most [`STREAM_RETAIN_BYTES`] behind the latest position
//! asked for — and hands those it no longer needs back to the decoding thread. Each
//! data byte is copied once, into the reader's buffer. When the last byte of the disk
//! has been decoded it checks that the stream ends there (which also makes the decoders
//! verify their final checksums): a stream longer or shorter than its declared size is
//! an error.
//!
//! A stream whose length is recorded nowhere (gzip, bzip2, a zstd frame without content
//! size, a pipe) can be read the same way by the conversion engine alone
//! ([`StreamDevice::unknown_length`]): the disk ends where the stream ends. Until then
//! `size()` is an upper bound ([`MAX_VIRTUAL_SIZE`]) and [`BlockDevice::length_known`] is
//! false. The device always decodes past every extent it reports, so the end of the
//! stream is found — and `size()` becomes exact — before the engine could ask about an
//! offset beyond it.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Mutex;

use crate::device::{check_bounds, clamp_map_request, BlockDevice, Extent, ExtentKind};
use crate::error::{Error, Result};
use crate::io::compressed::from_io;
use crate::limits::{MAX_VIRTUAL_SIZE, STREAM_RETAIN_BYTES};

/// Zero detection granularity.
const BLOCK: usize = 4096;
/// How far `map` decodes ahead to find the end of the stretch it reports.
const LOOKAHEAD: u64 = 1 << 20;
/// Bytes of one decoded buffer (a multiple of [`BLOCK`]).
const FEED_BUF: usize = 1 << 20;
/// Decoded buffers queued ahead of the device.
const FEED_DEPTH: usize = 2;

/// A stretch of the disk: all zeros, or data held in the decoded buffers.
#[derive(Clone, Copy)]
struct Seg {
    start: u64,
    len: u64,
    zero: bool,
}

impl Seg {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Decoded bytes `[start, start + len)` of the disk.
struct Chunk {
    start: u64,
    len: usize,
    bytes: Vec<u8>,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.start + self.len as u64
    }
}

struct State {
    feed: Feed,
    /// Bytes taken from the feed so far.
    decoded: u64,
    /// Lowest offset still readable.
    base: u64,
    /// Decoded stretches covering `[base, decoded)`.
    segs: VecDeque<Seg>,
    /// The decoded buffers that hold the data stretches, ascending.
    chunks: VecDeque<Chunk>,
    /// A failure is final: later calls repeat its message.
    failed: Option<String>,
    /// The stream has ended.
    ended: bool,
}

impl State {
    fn drop_chunks_below(&mut self, below: u64) {
        while self.chunks.front().is_some_and(|c| c.end() <= below) {
            if let Some(c) = self.chunks.pop_front() {
                self.feed.recycle(c.bytes);
            }
        }
    }
}

/// A raw disk decoded from a stream, read at ascending offsets only.
pub struct StreamDevice {
    /// The disk's size; for an unknown length, [`MAX_VIRTUAL_SIZE`] until the end of the
    /// stream has been decoded.
    size: AtomicU64,
    /// The size was declared by the container (else it is found at the end).
    declared: bool,
    /// `size` is exact: declared, or the stream has ended. Read without the lock, which
    /// the reader holds while it waits for the decoder.
    length_known: AtomicBool,
    /// The upper bound of an unknown length is the caller's `--max-size`.
    limit_set_by_caller: bool,
    name: String,
    state: Mutex<State>,
}

impl StreamDevice {
    /// A device of `size` bytes read from `reader`, which must end exactly there.
    /// `name` is used in errors.
    pub fn new(reader: Box<dyn Read + Send>, size: u64, name: impl Into<String>) -> Self {
        Self::with_size(reader, Some(size), name.into())
    }

    /// A device as long as `reader` turns out to be (at most [`MAX_VIRTUAL_SIZE`]), for
    /// the conversion engine. Decodes the first bytes at once, so that an empty stream
    /// is known to be empty before anyone asks.
    pub fn unknown_length(reader: Box<dyn Read + Send>, name: impl Into<String>) -> Result<Self> {
        Self::unknown_length_at_most(reader, name, None)
    }

    /// [`StreamDevice::unknown_length`], an error past `max_size` bytes (`--max-size`)
    /// rather than [`MAX_VIRTUAL_SIZE`].
    pub fn unknown_length_at_most(
        reader: Box<dyn Read + Send>,
        name: impl Into<String>,
        max_size: Option<u64>,
    ) -> Result<Self> {
        let mut dev = Self::with_size(reader, None, name.into());
        if let Some(m) = max_size {
            dev.size = AtomicU64::new(m.min(MAX_VIRTUAL_SIZE));
            dev.limit_set_by_caller = true;
        }
        {
            let mut st = dev.lock()?;
            dev.ensure(&mut st, 0, 0)?;
        }
        Ok(dev)
    }

    fn with_size(reader: Box<dyn Read + Send>, size: Option<u64>, name: String) -> Self {
        StreamDevice {
            size: AtomicU64::new(size.unwrap_or(MAX_VIRTUAL_SIZE)),
            declared: size.is_some(),
            length_known: AtomicBool::new(size.is_some()),
            limit_set_by_caller: false,
            name,
            state: Mutex::new(State {
                feed: Feed::start(reader),
                decoded: 0,
                base: 0,
                segs: VecDeque::new(),
                chunks: VecDeque::new(),
                failed: None,
                ended: false,
            }),
        }
    }

    fn current_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        let st = self
            .state
            .lock()
            .map_err(|_| Error::Format(format!("{}: stream reader poisoned", self.name)))?;
        if let Some(msg) = &st.failed {
            return Err(Error::Format(msg.clone()));
        }
        Ok(st)
    }

    /// Decodes until `upto` is covered; bytes below `keep_from` that were not decoded
    /// before are dropped at once (nobody asked for them).
    fn ensure(&self, st: &mut State, upto: u64, keep_from: u64) -> Result<()> {
        let r = self.ensure_inner(st, upto, keep_from);
        if let Err(e) = &r {
            st.failed = Some(e.to_string());
            st.segs.clear();
            st.chunks.clear();
        }
        r
    }

    /// With an unknown length, decodes until the stream ends or lies strictly beyond
    /// `upto`: every extent reported stays below what was decoded, so that the end of
    /// the stream is found before the engine gets there.
    fn ensure_inner(&self, st: &mut State, upto: u64, keep_from: u64) -> Result<()> {
        let more = |st: &State| {
            if self.declared {
                st.decoded < upto
            } else {
                !st.ended && st.decoded <= upto
            }
        };
        while more(st) {
            if keep_from > st.decoded {
                // The caller went past everything decoded so far: none of it is needed.
                st.segs.clear();
                st.drop_chunks_below(u64::MAX);
            }
            let Some((buf, got)) = st.feed.next().map_err(from_io)? else {
                if self.declared {
                    return Err(Error::Format(format!(
                        "{}: the data ends at byte {} but the image should hold {} bytes",
                        self.name,
                        st.decoded,
                        self.current_size()
                    )));
                }
                // The disk ends with the stream.
                st.ended = true;
                self.size.store(st.decoded, Ordering::Release);
                self.length_known.store(true, Ordering::Release);
                break;
            };
            let start = st.decoded;
            let limit = self.current_size();
            if got as u64 > limit - start {
                return Err(self.too_long(limit));
            }
            st.decoded += got as u64;
            let mut holds_data = false;
            if st.decoded > keep_from {
                let mut off = keep_from.saturating_sub(start) as usize;
                while off < got {
                    // Blocks are aligned to absolute offsets: buffers start at multiples.
                    let e = ((off / BLOCK + 1) * BLOCK).min(got);
                    let zero = crate::zero::is_zero(&buf[off..e]);
                    push(&mut st.segs, start + off as u64, (e - off) as u64, zero);
                    holds_data |= !zero;
                    off = e;
                }
            }
            if holds_data {
                st.chunks.push_back(Chunk {
                    start,
                    len: got,
                    bytes: buf,
                });
            } else {
                st.feed.recycle(buf);
            }
            if st.segs.is_empty() {
                st.base = st.base.max(keep_from.min(st.decoded));
            }
            if self.declared && st.decoded == limit {
                // The stream must end here: this also lets the decoders check their
                // trailing checksums, and catches data past the declared size.
                if st.feed.next().map_err(from_io)?.is_some() {
                    return Err(self.too_long(limit));
                }
                st.ended = true;
            }
        }
        Ok(())
    }

    fn too_long(&self, limit: u64) -> Error {
        if self.declared {
            Error::Format(format!(
                "{}: the data goes on past the {limit} bytes the image should hold",
                self.name
            ))
        } else {
            Error::TooLarge {
                format: "raw",
                structure: if self.limit_set_by_caller {
                    "raw disk read from a stream of unrecorded length (cap: --max-size)"
                } else {
                    "disk read from a stream"
                },
                size: limit.saturating_add(1),
                limit,
            }
        }
    }

    /// Forgets every stretch that ends at or before `below`; offsets below it are
    /// passed for good.
    fn trim(st: &mut State, below: u64) {
        while st.segs.front().is_some_and(|s| s.end() <= below) {
            st.segs.pop_front();
        }
        st.drop_chunks_below(below);
        st.base = st.base.max(below.min(st.decoded));
    }

    fn passed(&self, offset: u64, base: u64) -> Error {
        Error::unsupported(
            "raw",
            format!(
                "going back to offset {offset:#x} of {}, read from a stream at ascending offsets only (now at {base:#x}); open it with OpenOptions::random_access() to read it in any order",
                self.name
            ),
        )
    }
}

/// Copies the decoded bytes at `from` into `dst`; false when some are not held.
fn copy_out(chunks: &VecDeque<Chunk>, from: u64, dst: &mut [u8]) -> bool {
    let end = from + dst.len() as u64;
    let mut pos = from;
    for c in chunks {
        if c.end() <= pos {
            continue;
        }
        if c.start > pos {
            return false;
        }
        let n = (c.end().min(end) - pos) as usize;
        let at = (pos - c.start) as usize;
        let to = (pos - from) as usize;
        dst[to..to + n].copy_from_slice(&c.bytes[at..at + n]);
        pos += n as u64;
        if pos == end {
            return true;
        }
    }
    pos == end
}

/// One message from the decoding thread: a buffer and its length, the end of the
/// stream (`None`), or the reader's error.
type FeedMsg = std::io::Result<Option<(Vec<u8>, usize)>>;

/// How long dropping a device mid-stream waits for its decoding thread to stop. A
/// thread blocked reading a silent pipe is left behind; it stops at its next read.
const FEED_STOP_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs a (decompressing) reader on a thread of its own, a few buffers ahead, so that
/// decoding overlaps the zero scan, the engine and the writes instead of taking turns
/// with them on the engine's dispatcher thread. Buffers come back for reuse.
struct Feed {
    rx: Receiver<FeedMsg>,
    free: Sender<Vec<u8>>,
    done: bool,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Disconnected when the thread has finished.
    stopped: Receiver<()>,
}

impl Feed {
    fn start(mut inner: Box<dyn Read + Send>) -> Self {
        let (tx, rx) = sync_channel::<FeedMsg>(FEED_DEPTH);
        let (free, free_rx) = channel::<Vec<u8>>();
        let (stop_tx, stopped) = channel::<()>();
        let thread = std::thread::spawn(move || {
            let _stopping = stop_tx; // dropped when the thread returns
            Self::run(inner.as_mut(), &tx, &free_rx)
        });
        Feed {
            rx,
            free,
            done: false,
            thread: Some(thread),
            stopped,
        }
    }

    /// The decoding thread: fills buffers and sends them until the end, an error, or
    /// the device is gone.
    fn run(inner: &mut dyn Read, tx: &SyncSender<FeedMsg>, free_rx: &Receiver<Vec<u8>>) {
        loop {
            let mut buf = free_rx.try_recv().unwrap_or_else(|_| vec![0u8; FEED_BUF]);
            let (mut got, mut end, mut err) = (0, false, None);
            while got < buf.len() {
                match inner.read(&mut buf[got..]) {
                    Ok(0) => {
                        end = true;
                        break;
                    }
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            // A closed channel means the device was dropped: stop decoding. What was
            // read before an error is handed over first.
            if got > 0 && tx.send(Ok(Some((buf, got)))).is_err() {
                return;
            }
            if let Some(e) = err {
                let _ = tx.send(Err(e));
                return;
            }
            if end {
                let _ = tx.send(Ok(None));
                return;
            }
        }
    }

    /// The next decoded buffer (full except at the end), or `None` at the end.
    fn next(&mut self) -> FeedMsg {
        if self.done {
            return Ok(None);
        }
        let msg = self.rx.recv().unwrap_or_else(|_| {
            // Gone without saying how the stream ended (a panic): never a short disk.
            Err(std::io::Error::other("the decoding thread stopped"))
        });
        if !matches!(msg, Ok(Some(_))) {
            self.done = true;
        }
        msg
    }

    fn recycle(&self, buf: Vec<u8>) {
        let _ = self.free.send(buf);
    }
}

impl Drop for Feed {
    /// Stops the decoding thread (closing the queue makes its next send fail) and waits
    /// for it briefly, so that it does not outlive the device.
    fn drop(&mut self) {
        let (_, closed) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, closed));
        let finished = matches!(
            self.stopped.recv_timeout(FEED_STOP_WAIT),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
        if let (true, Some(t)) = (finished, self.thread.take()) {
            let _ = t.join();
        }
    }
}

/// Appends a decoded 4 KiB block (or a part of one) to the stretches.
fn push(segs: &mut VecDeque<Seg>, start: u64, len: u64, zero: bool) {
    if let Some(last) = segs.back_mut() {
        if last.zero == zero && last.end() == start {
            last.len += len;
            return;
        }
    }
    segs.push_back(Seg { start, len, zero });
}

impl BlockDevice for StreamDevice {
    fn size(&self) -> u64 {
        self.current_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.current_size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut st = self.lock()?;
        if offset < st.base {
            return Err(self.passed(offset, st.base));
        }
        Self::trim(&mut st, offset);
        let end = offset + buf.len() as u64;
        self.ensure(&mut st, end, offset)?;
        // With an unknown length the stream may have ended before `end`.
        check_bounds(offset, buf.len() as u64, self.current_size())?;
        let mut covered = offset;
        for seg in st.segs.iter() {
            let (s, e) = (seg.start.max(offset), seg.end().min(end));
            if s >= e {
                if seg.start >= end {
                    break;
                }
                continue;
            }
            if s != covered {
                break;
            }
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            if seg.zero {
                dst.fill(0);
            } else if !copy_out(&st.chunks, s, dst) {
                break;
            }
            covered = e;
        }
        if covered != end {
            return Err(self.passed(covered, st.base));
        }
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = clamp_map_request(offset, len, self.current_size())?;
        let mut st = self.lock()?;
        if offset < st.base {
            return Err(self.passed(offset, st.base));
        }
        Self::trim(&mut st, offset.saturating_sub(STREAM_RETAIN_BYTES));
        let want = offset + len.min(LOOKAHEAD);
        if self.declared {
            self.ensure(&mut st, want.min(self.current_size()), offset)?;
        } else {
            // Decodes past `want` (or to the end), and reports no further than `want`.
            self.ensure(&mut st, want, offset)?;
        }
        let size = self.current_size();
        if offset >= size {
            return Err(Error::invalid(format!(
                "{}: offset {offset:#x} is past the end of the stream ({size} bytes)",
                self.name
            )));
        }
        let seg = st.segs.iter().find(|s| s.end() > offset).ok_or_else(|| {
            Error::Format(format!(
                "{}: internal error: nothing decoded at {offset:#x}",
                self.name
            ))
        })?;
        let mut end = seg.end().min(offset + len);
        if !self.declared {
            end = end.min(want);
        }
        let kind = if seg.zero {
            ExtentKind::Zero
        } else {
            ExtentKind::Data
        };
        Ok(Extent::new(offset, end - offset, kind))
    }

    fn sequential_only(&self) -> bool {
        true
    }

    fn length_known(&self) -> bool {
        self.length_known.load(Ordering::Acquire)
    }
}

/// A raw disk from a stream that was decoded to learn its size (for `info`) and not
/// kept: it has a size, and reading it is an error.
pub struct MeasuredDevice {
    size: u64,
    name: String,
}

impl MeasuredDevice {
    /// The measured disk `name` of `size` bytes.
    pub fn new(size: u64, name: impl Into<String>) -> Self {
        MeasuredDevice {
            size,
            name: name.into(),
        }
    }

    fn gone(&self) -> Error {
        Error::invalid(format!(
            "{}: the stream was read to measure the disk (metadata only); its data was not kept",
            self.name
        ))
    }
}

impl BlockDevice for MeasuredDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(self.gone())
    }

    fn map(&self, _offset: u64, _len: u64) -> Result<Extent> {
        Err(self.gone())
    }

    fn sequential_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn image() -> Vec<u8> {
        let mut d = vec![0u8; 3 << 20];
        for (i, b) in d[5000..70_000].iter_mut().enumerate() {
            *b = (i % 251) as u8 | 1;
        }
        d[(2 << 20) + 17] = 9;
        d.truncate((3 << 20) - 100);
        d
    }

    #[test]
    fn maps_zero_runs_and_reads_in_order() {
        let data = image();
        let dev = StreamDevice::new(Box::new(Cursor::new(data.clone())), data.len() as u64, "t");
        let mut out = vec![0u8; data.len()];
        let mut pos = 0u64;
        let mut zero_seen = 0u64;
        while pos < dev.size() {
            let e = dev.map(pos, dev.size() - pos).unwrap();
            assert_eq!(e.offset, pos);
            if e.kind == ExtentKind::Zero {
                zero_seen += e.len;
            } else {
                let n = e.len.min(100_000) as usize;
                dev.read_at(&mut out[pos as usize..pos as usize + n], pos)
                    .unwrap();
                pos += n as u64;
                continue;
            }
            pos = e.end();
        }
        assert_eq!(out, data);
        assert!(zero_seen > 2 << 20, "{zero_seen}");
        // Going back is refused.
        assert!(dev.read_at(&mut [0u8; 10], 0).is_err());
    }

    #[test]
    fn skipped_bytes_are_dropped_and_size_is_checked() {
        let data = image();
        let dev = StreamDevice::new(Box::new(Cursor::new(data.clone())), data.len() as u64, "t");
        let mut b = [0u8; 20];
        dev.read_at(&mut b, (2 << 20) + 10).unwrap();
        assert_eq!(&b[..], &data[(2 << 20) + 10..(2 << 20) + 30]);
        // Longer than declared.
        let dev = StreamDevice::new(Box::new(Cursor::new(data.clone())), 1 << 20, "t");
        assert!(dev.read_at(&mut b, (1 << 20) - 20).is_err());
        // Shorter than declared; the failure sticks.
        let dev = StreamDevice::new(Box::new(Cursor::new(data.clone())), 4 << 20, "t");
        assert!(dev.read_at(&mut b, (3 << 20) + 5).is_err());
        assert!(dev.map((3 << 20) + 100, 10).is_err());
    }

    /// Walks a device the way the engine does: map, then read each data extent.
    fn walk(dev: &StreamDevice) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < dev.size() {
            let e = dev.map(pos, dev.size() - pos).unwrap();
            assert_eq!(e.offset, pos);
            assert!(e.end() <= dev.size());
            let mut b = vec![0u8; e.len as usize];
            if e.kind == ExtentKind::Data {
                dev.read_at(&mut b, pos).unwrap();
            }
            out.extend_from_slice(&b);
            pos = e.end();
        }
        out
    }

    #[test]
    fn unknown_length_is_found_at_the_end() {
        let mut data = image();
        data.resize(5 << 20, 0);
        data[(4 << 20) + 3] = 1;
        // Ends at a buffer boundary, one byte after it, mid-block, with zeros, at once.
        for len in [
            0,
            1,
            4096,
            FEED_BUF,
            FEED_BUF + 1,
            (3 << 20) - 100,
            4 << 20,
            5 << 20,
        ] {
            let d = data[..len].to_vec();
            let dev = StreamDevice::unknown_length(Box::new(Cursor::new(d.clone())), "t").unwrap();
            assert_eq!(dev.length_known(), len == 0, "{len}");
            assert_eq!(walk(&dev), d, "{len}");
            assert!(dev.length_known());
            assert_eq!(dev.size(), len as u64);
            // Past the end is an error, not zeros.
            assert!(dev.read_at(&mut [0u8; 1], len as u64).is_err());
        }
    }

    #[test]
    fn a_failing_stream_of_unknown_length_is_an_error() {
        use crate::io::testing::FailingAfter;
        let failing = |left| {
            Box::new(FailingAfter {
                left,
                piece: 70_000,
            })
        };
        let dev = StreamDevice::unknown_length(failing(3 << 20), "t").unwrap();
        let mut pos = 0;
        let err = loop {
            match dev.map(pos, dev.size() - pos) {
                Ok(e) => pos = e.end(),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("broken"), "{err}");
        assert!(!dev.length_known());
        // Broken at once.
        assert!(StreamDevice::unknown_length(failing(0), "t").is_err());
    }
}

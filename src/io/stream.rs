//! A raw disk read straight from a stream (a decompressor, a pipe, a tar member), in
//! one pass and without a temporary file.
//!
//! [`StreamDevice`] is sequential-only: the conversion engine reads it on one thread at
//! ascending offsets. It decodes as it is asked, sorts what it decodes into zero and data
//! stretches of 4 KiB (so that `map` reports zero runs and the engine skips them without
//! copying), keeps at most [`STREAM_RETAIN_BYTES`] behind the latest position asked for,
//! and forgets what lies before the latest read. When the last byte of the disk has been
//! decoded it checks that the stream ends there (which also makes the decoders verify
//! their final checksums): a stream longer or shorter than its declared size is an error.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::Mutex;

use crate::device::{check_bounds, clamp_map_request, BlockDevice, Extent, ExtentKind};
use crate::error::{Error, Result};
use crate::io::compressed::from_io;
use crate::limits::STREAM_RETAIN_BYTES;

/// Zero detection granularity.
const BLOCK: u64 = 4096;
/// Bytes decoded per step.
const STEP: u64 = 256 << 10;
/// How far `map` decodes ahead to find the end of the stretch it reports.
const LOOKAHEAD: u64 = 1 << 20;

enum Seg {
    Zero { start: u64, len: u64 },
    Data { start: u64, bytes: Vec<u8> },
}

impl Seg {
    fn start(&self) -> u64 {
        match self {
            Seg::Zero { start, .. } | Seg::Data { start, .. } => *start,
        }
    }
    fn end(&self) -> u64 {
        match self {
            Seg::Zero { start, len } => start + len,
            Seg::Data { start, bytes } => start + bytes.len() as u64,
        }
    }
}

struct State {
    reader: Box<dyn Read + Send>,
    /// Bytes taken from the reader so far.
    decoded: u64,
    /// Lowest offset still readable.
    base: u64,
    /// Decoded stretches covering `[base, decoded)`.
    segs: VecDeque<Seg>,
    /// A failure is final: later calls repeat its message.
    failed: Option<String>,
    buf: Vec<u8>,
}

/// A raw disk of known size decoded from a stream, read at ascending offsets only.
pub struct StreamDevice {
    size: u64,
    name: String,
    state: Mutex<State>,
}

impl StreamDevice {
    /// A device of `size` bytes read from `reader`, which must end exactly there.
    /// `name` is used in errors.
    pub fn new(reader: Box<dyn Read + Send>, size: u64, name: impl Into<String>) -> Self {
        StreamDevice {
            size,
            name: name.into(),
            state: Mutex::new(State {
                reader: Box::new(ReadAhead::start(reader)),
                decoded: 0,
                base: 0,
                segs: VecDeque::new(),
                failed: None,
                buf: Vec::new(),
            }),
        }
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

    /// Decodes until `upto` (≤ size) is covered; bytes below `keep_from` that were not
    /// decoded before are dropped at once (nobody asked for them).
    fn ensure(&self, st: &mut State, upto: u64, keep_from: u64) -> Result<()> {
        let r = self.ensure_inner(st, upto, keep_from);
        if let Err(e) = &r {
            st.failed = Some(e.to_string());
            st.segs.clear();
        }
        r
    }

    fn ensure_inner(&self, st: &mut State, upto: u64, keep_from: u64) -> Result<()> {
        while st.decoded < upto {
            if keep_from > st.decoded {
                // The caller went past everything decoded so far: none of it is needed.
                st.segs.clear();
            }
            let n = STEP.min(self.size - st.decoded) as usize;
            let mut buf = std::mem::take(&mut st.buf);
            buf.resize(n, 0);
            let mut got = 0;
            while got < n {
                match st.reader.read(&mut buf[got..]) {
                    Ok(0) => {
                        return Err(Error::Format(format!(
                            "{}: the data ends at byte {} but the image should hold {} bytes",
                            self.name,
                            st.decoded + got as u64,
                            self.size
                        )))
                    }
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(from_io(e)),
                }
            }
            let start = st.decoded;
            st.decoded += n as u64;
            if st.decoded > keep_from {
                let mut off = keep_from.saturating_sub(start) as usize;
                while off < n {
                    // Blocks are aligned to absolute offsets, as STEP is a multiple.
                    let e = ((off / BLOCK as usize + 1) * BLOCK as usize).min(n);
                    push(&mut st.segs, start + off as u64, &buf[off..e]);
                    off = e;
                }
            }
            if st.segs.is_empty() {
                st.base = st.base.max(keep_from.min(st.decoded));
            }
            st.buf = buf;
            if st.decoded == self.size {
                // The stream must end here: this also lets the decoders check their
                // trailing checksums, and catches data past the declared size.
                let mut one = [0u8; 1];
                loop {
                    match st.reader.read(&mut one) {
                        Ok(0) => break,
                        Ok(_) => {
                            return Err(Error::Format(format!(
                                "{}: the data goes on past the {} bytes the image should hold",
                                self.name, self.size
                            )))
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(from_io(e)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Forgets every stretch that ends at or before `below`; offsets below it are
    /// passed for good.
    fn trim(st: &mut State, below: u64) {
        while st.segs.front().is_some_and(|s| s.end() <= below) {
            st.segs.pop_front();
        }
        st.base = st.base.max(below.min(st.decoded));
    }

    fn passed(&self, offset: u64, base: u64) -> Error {
        Error::invalid(format!(
            "{}: offset {offset:#x} was already passed (stream read at ascending offsets only; now at {base:#x})",
            self.name
        ))
    }
}

/// Bytes of one read-ahead buffer.
const READ_AHEAD_BUF: usize = 1 << 20;
/// Read-ahead buffers in flight (bounds memory to this many MiB).
const READ_AHEAD_DEPTH: usize = 4;

/// Runs a (decompressing) reader on a thread of its own, a few buffers ahead, so that
/// decoding overlaps the zero scan, the engine and the writes instead of taking turns
/// with them on the engine's dispatcher thread.
struct ReadAhead {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ReadAhead {
    fn start(mut inner: Box<dyn Read + Send>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD_DEPTH);
        std::thread::spawn(move || loop {
            let mut buf = vec![0u8; READ_AHEAD_BUF];
            let mut got = 0;
            let r = loop {
                match inner.read(&mut buf[got..]) {
                    Ok(0) => break Ok(()),
                    Ok(k) => {
                        got += k;
                        if got == buf.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            buf.truncate(got);
            let last = got == 0 || r.is_err();
            let msg = match r {
                Ok(()) => Ok(buf),
                Err(e) if got == 0 => Err(e),
                // Hand over what was read; the error comes with the next message.
                Err(e) => {
                    if tx.send(Ok(buf)).is_err() {
                        return;
                    }
                    Err(e)
                }
            };
            // A closed channel means the device was dropped: stop decoding.
            if tx.send(msg).is_err() || last {
                return;
            }
        });
        ReadAhead {
            rx,
            cur: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(b)) if b.is_empty() => self.done = true,
                Ok(Ok(b)) => {
                    self.cur = b;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => self.done = true,
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Appends a decoded 4 KiB block (or a part of one) to the stretches.
fn push(segs: &mut VecDeque<Seg>, start: u64, chunk: &[u8]) {
    let zero = crate::convert::is_zero(chunk);
    match segs.back_mut() {
        Some(Seg::Zero { start: s, len }) if zero && *s + *len == start => {
            *len += chunk.len() as u64;
            return;
        }
        Some(Seg::Data { start: s, bytes })
            if !zero && *s + bytes.len() as u64 == start && bytes.len() < (1 << 20) =>
        {
            bytes.extend_from_slice(chunk);
            return;
        }
        _ => {}
    }
    segs.push_back(if zero {
        Seg::Zero {
            start,
            len: chunk.len() as u64,
        }
    } else {
        Seg::Data {
            start,
            bytes: chunk.to_vec(),
        }
    });
}

impl BlockDevice for StreamDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size)?;
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
        let mut covered = offset;
        for seg in st.segs.iter() {
            let (s, e) = (seg.start().max(offset), seg.end().min(end));
            if s >= e {
                if seg.start() >= end {
                    break;
                }
                continue;
            }
            if s != covered {
                break;
            }
            covered = e;
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match seg {
                Seg::Zero { .. } => dst.fill(0),
                Seg::Data { start, bytes } => {
                    dst.copy_from_slice(&bytes[(s - start) as usize..(e - start) as usize])
                }
            }
        }
        if covered != end {
            return Err(self.passed(covered, st.base));
        }
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = clamp_map_request(offset, len, self.size)?;
        let mut st = self.lock()?;
        if offset < st.base {
            return Err(self.passed(offset, st.base));
        }
        Self::trim(&mut st, offset.saturating_sub(STREAM_RETAIN_BYTES));
        let want = offset + len.min(LOOKAHEAD);
        self.ensure(&mut st, want.min(self.size), offset)?;
        let seg = st.segs.iter().find(|s| s.end() > offset).ok_or_else(|| {
            Error::Format(format!(
                "{}: internal error: nothing decoded at {offset:#x}",
                self.name
            ))
        })?;
        let end = seg.end().min(offset + len);
        let kind = match seg {
            Seg::Zero { .. } => ExtentKind::Zero,
            Seg::Data { .. } => ExtentKind::Data,
        };
        Ok(Extent::new(offset, end - offset, kind))
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
}

//! Decompressing inputs: gzip, bzip2, xz and zstd streams, found by magic bytes.
//!
//! Every decoder reads concatenated members / streams / frames until the end of its
//! input (pigz, pbzip2, `xz -T0`, pzstd output). xz is decoded by liblzma's multithreaded
//! decoder, which decodes the blocks of a multi-block stream (`xz -T0`) in parallel and
//! falls back to one thread for single-block files. A bzip2 file of several streams
//! (pbzip2 output, files joined with `cat`) is cut at its stream boundaries and decoded by
//! several threads ([`bzip2_file_decoder`]); a single-stream file (plain `bzip2`) has only
//! bit-aligned block boundaries and is decoded by one thread. The decoders verify their checksums
//! (gzip CRC32, bzip2 block CRCs, xz CRC32/CRC64/SHA-256, zstd xxhash when present);
//! a damaged or truncated stream becomes [`Error::Corrupt`] naming the compression and
//! the compressed offset where decoding stopped.
//!
//! For files, [`uncompressed_size`] finds the decompressed length without decoding when
//! the container records it (the xz index, zstd frame headers), so that a raw image can
//! be converted in one pass.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::detect::Compression;
use crate::error::{Error, Result};
use crate::limits::MAX_XZ_INDEX_BYTES;
#[cfg(feature = "xz")]
use crate::limits::{MAX_XZ_DECODER_MEMORY, XZ_THREADING_MEMORY};

/// Turns an I/O error from a decoding stack back into the crate's error: errors that
/// carry an [`Error`] (see [`DecodeReader`]) are unwrapped, others become
/// [`Error::Stream`].
pub fn from_io(e: io::Error) -> Error {
    Error::from(e)
}

/// Wraps an [`Error`] into an [`io::Error`] so that it survives `Read` plumbing.
pub fn to_io(e: Error) -> io::Error {
    io::Error::from(e)
}

/// Counts the bytes read through it, so that errors can name a compressed offset.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A decompressing reader whose errors are [`Error::Corrupt`] values (wrapped in
/// `io::Error`, unwrapped by [`from_io`]) naming the compression and the compressed
/// offset reached.
pub struct DecodeReader {
    inner: Box<dyn Read + Send>,
    compression: Compression,
    consumed: Arc<AtomicU64>,
}

impl DecodeReader {
    /// Compressed bytes consumed so far.
    pub fn compressed_offset(&self) -> u64 {
        self.consumed.load(Ordering::Relaxed)
    }
}

impl Read for DecodeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if e.get_ref().is_some_and(|i| i.is::<Error>()) {
                return e; // already typed (e.g. from a nested layer)
            }
            let offset = self.compressed_offset();
            let reason = match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    format!("the compressed data ends early (truncated file?): {e}")
                }
                _ => e.to_string(),
            };
            to_io(Error::corrupt(
                self.compression.name(),
                "compressed stream",
                offset,
                reason,
            ))
        })
    }
}

#[cfg(test)]
thread_local! {
    /// Decoders started on this thread (tests check that an input is decoded once).
    pub(crate) static DECODERS_STARTED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Wraps `input` in the decoder for `compression` (a typed [`Error::Unsupported`] for a
/// codec left out of the build).
#[cfg_attr(
    not(all(feature = "gzip", feature = "bzip2", feature = "xz", feature = "zstd")),
    allow(unreachable_code, unused_variables)
)]
pub fn decoder(compression: Compression, input: Box<dyn Read + Send>) -> Result<DecodeReader> {
    #[cfg(test)]
    DECODERS_STARTED.with(|n| n.set(n.get() + 1));
    let consumed = Arc::new(AtomicU64::new(0));
    let counted = Counting {
        inner: input,
        count: consumed.clone(),
    };
    let inner: Box<dyn Read + Send> = match compression {
        #[cfg(feature = "gzip")]
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            1 << 16,
            counted,
        ))),
        #[cfg(feature = "bzip2")]
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(counted)),
        #[cfg(feature = "xz")]
        Compression::Xz => Box::new(XzMulti {
            // 1 MiB reads: stream padding between and after streams is skipped a
            // buffer at a time.
            dec: Some(xz_stream(BufReader::with_capacity(
                1 << 20,
                Box::new(counted),
            ))?),
        }),
        #[cfg(feature = "zstd")]
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(counted).map_err(|e| {
            Error::corrupt(
                "zstd",
                "compressed stream",
                0,
                format!("cannot start the zstd decoder: {e}"),
            )
        })?),
        #[allow(unreachable_patterns)]
        other => return Err(missing_codec(other)),
    };
    Ok(DecodeReader {
        inner,
        compression,
        consumed,
    })
}

/// The error for a compression whose codec was left out of the build.
#[allow(dead_code)]
fn missing_codec(c: Compression) -> Error {
    Error::unsupported(
        c.name(),
        format!(
            "decoding {c} (imgconv was built without its `{}` feature)",
            c.name()
        ),
    )
}

#[cfg(feature = "xz")]
type XzIn = BufReader<Box<dyn Read + Send>>;

/// A multithreaded decoder for one xz stream.
#[cfg(feature = "xz")]
fn xz_stream(input: XzIn) -> Result<liblzma::bufread::XzDecoder<XzIn>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(threads.clamp(1, 16))
        .memlimit_threading(XZ_THREADING_MEMORY)
        .memlimit_stop(MAX_XZ_DECODER_MEMORY)
        .decoder()
        .map_err(|e| {
            Error::corrupt(
                "xz",
                "compressed stream",
                0,
                format!("cannot start the xz decoder: {e}"),
            )
        })?;
    Ok(liblzma::bufread::XzDecoder::new_stream(input, stream))
}

/// Concatenated xz streams (with stream padding between them), each decoded by the
/// multithreaded decoder (whose builder cannot set `LZMA_CONCATENATED`).
#[cfg(feature = "xz")]
struct XzMulti {
    dec: Option<liblzma::bufread::XzDecoder<XzIn>>,
}

#[cfg(feature = "xz")]
impl Read for XzMulti {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(dec) = self.dec.as_mut() else {
                return Ok(0);
            };
            let n = dec.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // One stream ended: padding (zeros, a multiple of 4), then EOF or another stream.
            let Some(dec) = self.dec.take() else {
                return Ok(0);
            };
            let mut input = dec.into_inner();
            let mut zeros = 0u64;
            loop {
                let b = input.fill_buf()?;
                if b.is_empty() {
                    break;
                }
                let z = if crate::zero::is_zero(b) {
                    b.len()
                } else {
                    b.iter().take_while(|&&x| x == 0).count()
                };
                let all = z == b.len();
                input.consume(z);
                zeros += z as u64;
                if !all {
                    break;
                }
            }
            let b = input.fill_buf()?;
            if b.is_empty() && zeros % 4 == 0 {
                return Ok(0);
            }
            if zeros % 4 != 0 || !b.starts_with(&b"\xfd7zXZ\0"[..b.len().min(6)]) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "data after the end of the xz stream is neither padding nor another stream",
                ));
            }
            self.dec = Some(xz_stream(input).map_err(to_io)?);
        }
    }
}

#[cfg(feature = "bzip2")]
/// Compressed bytes per piece of a multi-stream bzip2 file decoded by one thread.
const BZ_PIECE: u64 = if cfg!(test) { 64 << 10 } else { 4 << 20 };
#[cfg(feature = "bzip2")]
/// Decoded bytes per message from a bzip2 piece worker.
const BZ_CHUNK: usize = 1 << 20;
#[cfg(feature = "bzip2")]
/// Messages a piece worker may have waiting (bounds memory to threads × this × 1 MiB).
const BZ_QUEUE: usize = 4;

#[cfg(feature = "bzip2")]
/// The start of a bzip2 stream: "BZh", a block size digit, then the first block's magic
/// (π) or the end-of-stream magic (√π) of an empty stream.
fn is_bz_stream_start(b: &[u8]) -> bool {
    b.len() >= 10
        && &b[..3] == b"BZh"
        && (b'1'..=b'9').contains(&b[3])
        && (b[4..10] == [0x31, 0x41, 0x59, 0x26, 0x53, 0x59]
            || b[4..10] == [0x17, 0x72, 0x45, 0x38, 0x50, 0x90])
}

#[cfg(feature = "bzip2")]
/// True when the 11 bytes before a candidate stream start end with a bzip2 end-of-stream
/// marker (48-bit magic, 32-bit CRC, zero padding to a byte): the previous stream really
/// ends there. Together with [`is_bz_stream_start`] this makes a false boundary inside
/// compressed data practically impossible; one would still only cause a decoding error.
fn ends_bz_stream(before: &[u8; 11]) -> bool {
    let mut v = 0u128;
    for &b in before {
        v = v << 8 | u128::from(b);
    }
    (0..8).any(|pad| {
        let bits = v >> pad;
        v & ((1u128 << pad) - 1) == 0 && (bits >> 32) & 0xffff_ffff_ffff == 0x1772_4538_5090
    })
}

#[cfg(feature = "bzip2")]
/// Offsets where the streams of a concatenated bzip2 file (pbzip2 output, or files
/// joined with `cat`) start, found by scanning the compressed bytes. Always starts with 0.
fn bz_stream_starts(file: &File, len: u64) -> Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    const WIN: usize = 4 << 20;
    let mut starts = vec![0u64];
    let mut buf = vec![0u8; WIN + 21];
    let mut pos = 0u64;
    while pos < len {
        // Each window also holds the 11 bytes before it and 10 after.
        let from = pos.saturating_sub(11);
        let n = ((len - from) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], from)
            .map_err(Error::Stream)?;
        let lead = (pos - from) as usize;
        let end = n.min(lead + WIN);
        let mut i = lead.max(11);
        while i < end {
            match buf[i..end].iter().position(|&b| b == b'B') {
                None => break,
                Some(k) => i += k,
            }
            let before: &[u8; 11] = buf[i - 11..i].try_into().unwrap_or(&[0; 11]);
            if is_bz_stream_start(&buf[i..n]) && ends_bz_stream(before) {
                starts.push(from + i as u64);
            }
            i += 1;
        }
        pos = from + end as u64;
    }
    Ok(starts)
}

/// A decoder for a bzip2 file: a file of several streams (pbzip2, lbzip2 -n, `cat`) of
/// at least two pieces' worth is decoded by several threads, one piece of whole
/// streams each, delivered in order; anything else by one thread as [`decoder`] does.
pub fn bzip2_file_decoder(file: File, len: u64) -> Result<DecodeReader> {
    #[cfg(not(feature = "bzip2"))]
    {
        let _ = len;
        decoder(Compression::Bzip2, Box::new(file))
    }
    #[cfg(feature = "bzip2")]
    parallel_bzip2_decoder(file, len)
}

#[cfg(feature = "bzip2")]
fn parallel_bzip2_decoder(file: File, len: u64) -> Result<DecodeReader> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 || len < 2 * BZ_PIECE {
        return decoder(Compression::Bzip2, Box::new(file));
    }
    let starts = bz_stream_starts(&file, len)?;
    // Cut into pieces of whole streams, each at least BZ_PIECE long.
    let mut cuts = vec![0u64];
    for &s in &starts[1..] {
        if s - cuts[cuts.len() - 1] >= BZ_PIECE {
            cuts.push(s);
        }
    }
    if cuts.len() < 2 {
        return decoder(Compression::Bzip2, Box::new(file));
    }
    #[cfg(test)]
    DECODERS_STARTED.with(|n| n.set(n.get() + 1));
    cuts.push(len);
    let consumed = Arc::new(AtomicU64::new(0));
    let reader = ParallelBz::start(Arc::new(file), cuts, threads.min(8), consumed.clone());
    Ok(DecodeReader {
        inner: Box::new(reader),
        compression: Compression::Bzip2,
        consumed,
    })
}

#[cfg(feature = "bzip2")]
type BzMsg = std::result::Result<Vec<u8>, Error>;

#[cfg(feature = "bzip2")]
/// Ordered output of pieces decoded by worker threads.
struct ParallelBz {
    pieces: std::vec::IntoIter<(u64, std::sync::mpsc::Receiver<BzMsg>)>,
    current: Option<(u64, std::sync::mpsc::Receiver<BzMsg>)>,
    chunk: Vec<u8>,
    at: usize,
    consumed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

#[cfg(feature = "bzip2")]
impl Drop for ParallelBz {
    /// Closes every queue (the workers stop at their next piece) and waits for them.
    fn drop(&mut self) {
        self.pieces = Vec::new().into_iter();
        self.current = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(feature = "bzip2")]
impl ParallelBz {
    fn start(file: Arc<File>, cuts: Vec<u64>, threads: usize, consumed: Arc<AtomicU64>) -> Self {
        use std::sync::mpsc::sync_channel;
        use std::sync::Mutex;
        let mut receivers = Vec::new();
        let mut jobs = Vec::new();
        for w in cuts.windows(2) {
            let (tx, rx) = sync_channel::<BzMsg>(BZ_QUEUE);
            receivers.push((w[1], rx));
            jobs.push((w[0], w[1], tx));
        }
        // Workers take pieces in order, so the piece being read is always being decoded.
        let jobs = Arc::new(Mutex::new(jobs.into_iter()));
        let mut handles = Vec::new();
        for _ in 0..threads.min(receivers.len()) {
            let (jobs, file) = (jobs.clone(), file.clone());
            handles.push(std::thread::spawn(move || loop {
                let job = match jobs.lock() {
                    Ok(mut j) => j.next(),
                    Err(_) => None,
                };
                let Some((from, to, tx)) = job else { return };
                if !decode_bz_piece(&file, from, to, &tx) {
                    return; // the reader is gone
                }
            }));
        }
        ParallelBz {
            pieces: receivers.into_iter(),
            current: None,
            chunk: Vec::new(),
            at: 0,
            consumed,
            threads: handles,
        }
    }
}

#[cfg(feature = "bzip2")]
/// Decodes the streams in `[from, to)` of `file` into `tx`; false if the receiver left.
fn decode_bz_piece(
    file: &File,
    from: u64,
    to: u64,
    tx: &std::sync::mpsc::SyncSender<BzMsg>,
) -> bool {
    struct At<'a> {
        file: &'a File,
        pos: u64,
        end: u64,
    }
    impl Read for At<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            use std::os::unix::fs::FileExt;
            let n = (buf.len() as u64).min(self.end - self.pos) as usize;
            let got = self.file.read_at(&mut buf[..n], self.pos)?;
            self.pos += got as u64;
            Ok(got)
        }
    }
    let input = BufReader::with_capacity(
        1 << 16,
        At {
            file,
            pos: from,
            end: to,
        },
    );
    let mut dec = bzip2::bufread::MultiBzDecoder::new(input);
    loop {
        let mut out = vec![0u8; BZ_CHUNK];
        let mut got = 0;
        let res = loop {
            if got == out.len() {
                break Ok(());
            }
            match dec.read(&mut out[got..]) {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = res {
            let offset = dec.get_ref().get_ref().pos;
            let reason = match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    format!("the compressed data ends early (truncated file?): {e}")
                }
                _ => e.to_string(),
            };
            let _ = tx.send(Err(Error::corrupt(
                "bzip2",
                "compressed stream",
                offset,
                reason,
            )));
            return false;
        }
        if got == 0 {
            return true;
        }
        out.truncate(got);
        if tx.send(Ok(out)).is_err() {
            return false;
        }
    }
}

#[cfg(feature = "bzip2")]
impl Read for ParallelBz {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.current.is_none() {
                match self.pieces.next() {
                    None => return Ok(0),
                    Some(p) => self.current = Some(p),
                }
            }
            let Some((end, rx)) = &self.current else {
                return Ok(0);
            };
            match rx.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                Ok(Err(e)) => {
                    // Fail for good: later reads see the end of no piece.
                    self.pieces = Vec::new().into_iter();
                    self.current = None;
                    return Err(to_io(e));
                }
                Err(_) => {
                    // The piece's worker finished it.
                    self.consumed.store(*end, Ordering::Relaxed);
                    self.current = None;
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Reads up to `n` bytes from the start of `r` (fewer at end of stream).
pub fn peek(r: &mut dyn Read, n: usize) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(n);
    r.take(n as u64).read_to_end(&mut head)?;
    Ok(head)
}

/// Puts bytes already read back in front of a stream.
pub fn replay(head: Vec<u8>, rest: Box<dyn Read + Send>) -> Box<dyn Read + Send> {
    Box::new(io::Cursor::new(head).chain(rest))
}

/// Counts the decompressed bytes of a whole stream (decoding it, discarding the data).
pub fn count(r: &mut dyn Read) -> Result<u64> {
    io::copy(r, &mut io::sink()).map_err(from_io)
}

/// The decompressed length of the compressed file, when its container records it
/// without decoding: the xz index (every stream of the file), or zstd frame headers
/// (only if every frame declares its content size). `Ok(None)`: not recorded.
pub fn uncompressed_size(compression: Compression, file: &File, len: u64) -> Result<Option<u64>> {
    match compression {
        Compression::Xz => xz_size(file, len).map(Some),
        Compression::Zstd => zstd_size(file, len),
        Compression::Gzip | Compression::Bzip2 => Ok(None),
    }
}

fn read_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    structure: &'static str,
    fmt: &'static str,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::corrupt(fmt, structure, offset, "the file ends inside it")
        } else {
            Error::Stream(e)
        }
    })
}

/// Reads a multibyte integer of the xz format (7 bits per byte, little end first).
fn xz_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..9 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return if i > 0 && b == 0 { None } else { Some(v) };
        }
    }
    None
}

/// Bytes read at a time while walking backwards over xz stream padding.
const PADDING_PIECE: usize = 1 << 20;

/// How many zero bytes come right before `end` in `file`: read backwards in 1 MiB
/// pieces (256 MiB of padding is 256 reads, not 64 million).
fn trailing_zeros(file: &File, end: u64) -> Result<u64> {
    let mut buf = vec![0u8; (end as usize).min(PADDING_PIECE)];
    let mut pos = end;
    while pos > 0 {
        let n = (pos as usize).min(buf.len());
        let piece = &mut buf[..n];
        read_at(file, piece, pos - n as u64, "stream padding", "xz")?;
        if crate::zero::is_zero(piece) {
            pos -= n as u64;
            continue;
        }
        let last = piece.iter().rposition(|&b| b != 0).unwrap_or(0);
        return Ok(end - (pos - n as u64 + last as u64 + 1));
    }
    Ok(end)
}

/// Walks the streams of an xz file backwards through their footers and indexes, and
/// adds up the uncompressed sizes of all blocks.
fn xz_size(file: &File, len: u64) -> Result<u64> {
    const F: &str = "xz";
    let mut pos = len;
    let mut total = 0u64;
    while pos > 0 {
        // Stream padding: zero bytes in multiples of four between and after streams.
        pos -= trailing_zeros(file, pos)? / 4 * 4;
        if pos == 0 {
            break;
        }
        if pos < 24 || pos % 4 != 0 {
            return Err(Error::corrupt(
                F,
                "stream footer",
                pos.saturating_sub(12),
                "no xz stream footer at the end of the data",
            ));
        }
        let foot_at = pos - 12;
        let mut foot = [0u8; 12];
        read_at(file, &mut foot, foot_at, "stream footer", F)?;
        if &foot[10..12] != b"YZ" {
            return Err(Error::corrupt(
                F,
                "stream footer",
                foot_at,
                "no stream footer ('YZ') at the end of the file (truncated?)",
            ));
        }
        let crc = u32::from_le_bytes([foot[0], foot[1], foot[2], foot[3]]);
        if crc32fast::hash(&foot[4..10]) != crc {
            return Err(Error::corrupt(
                F,
                "stream footer",
                foot_at,
                "CRC32 mismatch",
            ));
        }
        let backward =
            (u64::from(u32::from_le_bytes([foot[4], foot[5], foot[6], foot[7]])) + 1) * 4;
        if backward > MAX_XZ_INDEX_BYTES {
            return Err(Error::TooLarge {
                format: F,
                structure: "index",
                size: backward,
                limit: MAX_XZ_INDEX_BYTES,
            });
        }
        if backward + 12 > foot_at {
            return Err(Error::corrupt(
                F,
                "stream footer",
                foot_at,
                format!("backward size {backward} points before the start of the file"),
            ));
        }
        let index_at = foot_at - backward;
        let mut index = vec![0u8; backward as usize];
        read_at(file, &mut index, index_at, "index", F)?;
        let bad_index = |why: &str| Error::corrupt(F, "index", index_at, why.to_string());
        let body = index.len() - 4;
        let crc = u32::from_le_bytes([
            index[body],
            index[body + 1],
            index[body + 2],
            index[body + 3],
        ]);
        if crc32fast::hash(&index[..body]) != crc {
            return Err(bad_index("CRC32 mismatch"));
        }
        if index[0] != 0 {
            return Err(bad_index("index indicator is not 0"));
        }
        let mut p = 1usize;
        let records =
            xz_varint(&index[..body], &mut p).ok_or_else(|| bad_index("bad record count"))?;
        if records > body as u64 {
            return Err(bad_index("more records than the index has bytes"));
        }
        let mut blocks = 0u64;
        for _ in 0..records {
            let unpadded =
                xz_varint(&index[..body], &mut p).ok_or_else(|| bad_index("bad record"))?;
            let size = xz_varint(&index[..body], &mut p).ok_or_else(|| bad_index("bad record"))?;
            blocks = unpadded
                .checked_add(3)
                .map(|u| u & !3)
                .and_then(|u| blocks.checked_add(u))
                .ok_or_else(|| bad_index("block sizes overflow"))?;
            total = total
                .checked_add(size)
                .ok_or_else(|| bad_index("uncompressed sizes overflow"))?;
        }
        let start = index_at
            .checked_sub(blocks)
            .and_then(|s| s.checked_sub(12))
            .ok_or_else(|| bad_index("the blocks it lists do not fit before it"))?;
        let mut head = [0u8; 12];
        read_at(file, &mut head, start, "stream header", F)?;
        if &head[..6] != b"\xfd7zXZ\0" || head[6..8] != foot[8..10] {
            return Err(Error::corrupt(
                F,
                "stream header",
                start,
                "no matching stream header where the index says the stream starts",
            ));
        }
        pos = start;
    }
    Ok(total)
}

/// Walks the frames of a zstd file through their headers and block headers. Returns
/// the sum of the frames' content sizes, or `None` if a frame does not declare one.
fn zstd_size(file: &File, len: u64) -> Result<Option<u64>> {
    const F: &str = "zstd";
    let mut r = BufReader::with_capacity(1 << 16, file);
    r.seek(SeekFrom::Start(0)).map_err(Error::Stream)?;
    let mut pos = 0u64;
    let mut total = 0u64;
    let eof = |at: u64, what: &'static str| Error::corrupt(F, what, at, "the file ends inside it");
    let read = |r: &mut BufReader<&File>, buf: &mut [u8], at: u64, what: &'static str| {
        r.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                eof(at, what)
            } else {
                Error::Stream(e)
            }
        })
    };
    let skip = |r: &mut BufReader<&File>, n: u64| -> Result<()> {
        r.seek_relative(n as i64).map_err(Error::Stream)
    };
    while pos < len {
        if r.fill_buf().map_err(Error::Stream)?.is_empty() {
            break;
        }
        let mut magic = [0u8; 4];
        read(&mut r, &mut magic, pos, "frame header")?;
        let m = u32::from_le_bytes(magic);
        if m & 0xffff_fff0 == 0x184d_2a50 {
            let mut sz = [0u8; 4];
            read(&mut r, &mut sz, pos + 4, "skippable frame")?;
            let n = u64::from(u32::from_le_bytes(sz));
            if pos + 8 + n > len {
                return Err(eof(pos, "skippable frame"));
            }
            skip(&mut r, n)?;
            pos += 8 + n;
            continue;
        }
        if m != 0xfd2f_b528 {
            return Err(Error::corrupt(
                F,
                "frame header",
                pos,
                format!("bad frame magic {m:#010x}"),
            ));
        }
        let mut d = [0u8; 1];
        read(&mut r, &mut d, pos + 4, "frame header")?;
        let d = d[0];
        let fcs_flag = d >> 6;
        let single = d & 0x20 != 0;
        let checksum = d & 0x04 != 0;
        if d & 0x08 != 0 {
            return Err(Error::corrupt(
                F,
                "frame header",
                pos + 4,
                "reserved bit set",
            ));
        }
        let dict_len = [0u64, 1, 2, 4][(d & 3) as usize];
        let fcs_len = match (fcs_flag, single) {
            (0, false) => 0u64,
            (0, true) => 1,
            (1, _) => 2,
            (2, _) => 4,
            _ => 8,
        };
        let mut hdr_pos = pos + 5;
        if !single {
            skip(&mut r, 1)?; // window descriptor
            hdr_pos += 1;
        }
        skip(&mut r, dict_len)?;
        hdr_pos += dict_len;
        let mut fcs = [0u8; 8];
        read(
            &mut r,
            &mut fcs[..fcs_len as usize],
            hdr_pos,
            "frame header",
        )?;
        hdr_pos += fcs_len;
        let content = match fcs_len {
            0 => return Ok(None),
            2 => u64::from(u16::from_le_bytes([fcs[0], fcs[1]])) + 256,
            _ => u64::from_le_bytes(fcs),
        };
        total = total
            .checked_add(content)
            .ok_or_else(|| Error::corrupt(F, "frame header", pos, "content sizes overflow"))?;
        // Blocks: a 3-byte header each, then the block's bytes.
        let mut at = hdr_pos;
        loop {
            let mut bh = [0u8; 3];
            read(&mut r, &mut bh, at, "block header")?;
            let h = u32::from(bh[0]) | u32::from(bh[1]) << 8 | u32::from(bh[2]) << 16;
            let last = h & 1 != 0;
            let size = match (h >> 1) & 3 {
                0 | 2 => u64::from(h >> 3),
                1 => 1,
                _ => return Err(Error::corrupt(F, "block header", at, "reserved block type")),
            };
            at += 3 + size;
            if at > len {
                return Err(eof(at - size - 3, "block"));
            }
            skip(&mut r, size)?;
            if last {
                break;
            }
        }
        if checksum {
            skip(&mut r, 4)?;
            at += 4;
        }
        if at > len {
            return Err(eof(pos, "frame checksum"));
        }
        pos = at;
    }
    Ok(Some(total))
}

/// Without its codec, a compression is recognised and refused with a typed error.
#[cfg(all(test, not(feature = "zstd")))]
mod without_codecs {
    #[test]
    fn a_missing_codec_is_named() {
        let r = super::decoder(super::Compression::Zstd, Box::new(std::io::empty()));
        let e = r.err().expect("no zstd decoder in this build");
        assert!(e.to_string().contains("`zstd` feature"), "{e}");
    }
}

#[cfg(all(
    test,
    feature = "gzip",
    feature = "bzip2",
    feature = "xz",
    feature = "zstd"
))]
mod tests {
    use super::*;
    use std::io::Write;

    fn roundtrip(c: Compression, compressed: Vec<u8>, expect: &[u8]) {
        let mut d = decoder(c, Box::new(io::Cursor::new(compressed))).unwrap();
        let mut out = Vec::new();
        d.read_to_end(&mut out).unwrap();
        assert_eq!(out, expect);
    }

    #[test]
    fn decodes_concatenated_members() {
        let a = b"first part ".repeat(1000);
        let b = b"second part".repeat(700);
        let mut both = a.clone();
        both.extend_from_slice(&b);

        let gz = |d: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(d).unwrap();
            e.finish().unwrap()
        };
        roundtrip(Compression::Gzip, [gz(&a), gz(&b)].concat(), &both);

        let bz = |d: &[u8]| {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(d).unwrap();
            e.finish().unwrap()
        };
        roundtrip(Compression::Bzip2, [bz(&a), bz(&b)].concat(), &both);

        let zs = |d: &[u8]| zstd::encode_all(d, 1).unwrap();
        roundtrip(Compression::Zstd, [zs(&a), zs(&b)].concat(), &both);

        let xz = |d: &[u8]| {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(d).unwrap();
            e.finish().unwrap()
        };
        let mut two = xz(&a);
        two.extend_from_slice(&[0; 8]); // stream padding
        two.extend_from_slice(&xz(&b));
        roundtrip(Compression::Xz, two.clone(), &both);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.xz");
        std::fs::write(&p, &two).unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(
            uncompressed_size(Compression::Xz, &f, two.len() as u64).unwrap(),
            Some(both.len() as u64)
        );
        // Streaming encoders do not record the content size; one-shot ones do.
        let z = [zs(&a), zs(&b)].concat();
        std::fs::write(&p, &z).unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(
            uncompressed_size(Compression::Zstd, &f, z.len() as u64).unwrap(),
            None
        );
        let bulk = |d: &[u8]| zstd::bulk::compress(d, 1).unwrap();
        let z = [
            bulk(&a),
            vec![0x50, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 9, 9],
            bulk(&b),
        ]
        .concat();
        roundtrip(Compression::Zstd, z.clone(), &both);
        std::fs::write(&p, &z).unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(
            uncompressed_size(Compression::Zstd, &f, z.len() as u64).unwrap(),
            Some(both.len() as u64)
        );
    }

    /// Concatenated bzip2 streams: boundaries found, decoded in parallel pieces, in
    /// order; damage in any piece is a typed error.
    #[test]
    fn multi_stream_bzip2_files_decode_in_parallel() {
        let mut data = Vec::new();
        let mut x = 12345u32;
        for i in 0..1_500_000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            data.push(if i % 5000 < 1000 { 0 } else { (x >> 24) as u8 });
        }
        data.extend_from_slice(b"BZh91AY&SY inside the data changes nothing");
        let parts: Vec<Vec<u8>> = data
            .chunks(200_000)
            .map(|c| {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
                e.write_all(c).unwrap();
                e.finish().unwrap()
            })
            .collect();
        let all = parts.concat();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bz2");
        std::fs::write(&p, &all).unwrap();
        let f = File::open(&p).unwrap();
        let mut expect = vec![0u64];
        for part in &parts[..parts.len() - 1] {
            expect.push(expect[expect.len() - 1] + part.len() as u64);
        }
        assert_eq!(bz_stream_starts(&f, all.len() as u64).unwrap(), expect);
        let mut out = Vec::new();
        bzip2_file_decoder(f, all.len() as u64)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == data, "decoded data differs");
        // A start pattern not preceded by an end-of-stream marker is no boundary.
        let mut one = parts[0].clone();
        one[1000..1010].copy_from_slice(b"BZh91AY&SY");
        let q = dir.path().join("one.bz2");
        std::fs::write(&q, &one).unwrap();
        let f = File::open(&q).unwrap();
        assert_eq!(bz_stream_starts(&f, one.len() as u64).unwrap(), vec![0]);
        // Damage in a middle stream, and a cut file.
        let mut bad = all.clone();
        let mid = expect[4] as usize + 300;
        bad[mid] ^= 0x5a;
        for bytes in [bad, all[..all.len() - 5].to_vec()] {
            std::fs::write(&p, &bytes).unwrap();
            let f = File::open(&p).unwrap();
            let mut d = bzip2_file_decoder(f, bytes.len() as u64).unwrap();
            let err = from_io(d.read_to_end(&mut Vec::new()).unwrap_err());
            assert!(
                matches!(
                    err,
                    Error::Corrupt {
                        format: "bzip2",
                        ..
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn corrupt_streams_give_typed_errors() {
        let data = (0..200_000u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>();
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(&data).unwrap();
        let xz = e.finish().unwrap();
        for cut in [xz.len() / 2, xz.len() - 1] {
            let mut d = decoder(
                Compression::Xz,
                Box::new(io::Cursor::new(xz[..cut].to_vec())),
            )
            .unwrap();
            let err = from_io(d.read_to_end(&mut Vec::new()).unwrap_err());
            assert!(matches!(err, Error::Corrupt { format: "xz", .. }), "{err}");
        }
        let mut bad = xz.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        let mut d = decoder(Compression::Xz, Box::new(io::Cursor::new(bad.clone()))).unwrap();
        assert!(d.read_to_end(&mut Vec::new()).is_err());
        // A file that is cut short has no footer: the index walk says so.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.xz");
        std::fs::write(&p, &xz[..xz.len() - 6]).unwrap();
        let f = File::open(&p).unwrap();
        assert!(uncompressed_size(Compression::Xz, &f, (xz.len() - 6) as u64).is_err());
    }
}

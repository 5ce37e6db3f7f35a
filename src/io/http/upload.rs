//! Uploads with `PUT`: a stream written by the conversion engine as it goes (raw,
//! streamOptimized VMDK), or a finished file.
//!
//! A streamed upload hands the engine a [`PipeWriter`]; a thread of its own sends what
//! arrives as the request body (`Content-Length` when the length is known, else chunked).
//! When the conversion fails, the body is cut off before its end, so the server never
//! receives a complete object. The server's status decides success: anything but 2xx is
//! an [`Error::Http`] naming it.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use super::{status_failure, Client, Failure};
use crate::error::{Error, Result};
use crate::io::remote::redact;

/// Bytes per message between the writer and the sending thread.
const PIECE: usize = 1 << 20;
/// Messages queued between them.
const DEPTH: usize = 4;

/// Called with the bytes sent so far.
pub type SentFn = dyn Fn(u64) + Send + Sync;

enum Msg {
    Data(Vec<u8>),
    End,
    Abort,
}

/// The end the engine writes into.
pub struct PipeWriter {
    tx: SyncSender<Msg>,
    buf: Vec<u8>,
}

impl PipeWriter {
    fn push(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE));
        self.tx
            .send(Msg::Data(piece))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for PipeWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(PIECE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PIECE {
            self.push()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push()
    }
}

/// The request body: what the writer sends, until the verdict.
struct PipeReader {
    rx: Receiver<Msg>,
    piece: Vec<u8>,
    at: usize,
    sent: Arc<AtomicU64>,
    progress: Option<Arc<SentFn>>,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.piece.len() {
            match self.rx.recv() {
                Ok(Msg::Data(p)) => {
                    self.piece = p;
                    self.at = 0;
                }
                Ok(Msg::End) => return Ok(0),
                Ok(Msg::Abort) | Err(_) => {
                    return Err(io::Error::other("the conversion failed: upload cut off"))
                }
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        let total = self.sent.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if let Some(p) = &self.progress {
            p(total);
        }
        Ok(n)
    }
}

/// A streamed upload in progress.
pub struct Upload {
    tx: SyncSender<Msg>,
    thread: std::thread::JoinHandle<Result<()>>,
    sent: Arc<AtomicU64>,
}

/// Starts `PUT url` whose body is what is written to the returned [`PipeWriter`]
/// (`len` bytes, or chunked when `None`); finish with [`Upload::finish`].
pub fn put_stream(
    client: Arc<Client>,
    url: &str,
    len: Option<u64>,
    progress: Option<Arc<SentFn>>,
) -> (PipeWriter, Upload) {
    let (tx, rx) = sync_channel(DEPTH);
    let sent = Arc::new(AtomicU64::new(0));
    let mut reader = PipeReader {
        rx,
        piece: Vec::new(),
        at: 0,
        sent: sent.clone(),
        progress,
    };
    let url = url.to_string();
    let thread = std::thread::spawn(move || -> Result<()> {
        let r = client.send_body("PUT", &url, &[], len, &mut reader);
        // Drain, so that a writer blocked on a full queue wakes up.
        drop(reader);
        match r {
            Ok(resp) => status_failure(&url, resp).map(drop).map_err(failure_error),
            Err(f) => Err(failure_error(f)),
        }
    });
    (
        PipeWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(PIECE),
        },
        Upload { tx, thread, sent },
    )
}

fn failure_error(f: Failure) -> Error {
    match f {
        Failure::Transient(e) | Failure::Final(e) => e,
    }
}

impl Upload {
    /// Ends the body (`converted` is the conversion's outcome: on an error the body is
    /// cut off) and waits for the server's answer. The server's error comes first: it
    /// is usually why the conversion failed (a closed pipe).
    pub fn finish(self, converted: Result<()>) -> Result<u64> {
        let verdict = if converted.is_ok() {
            Msg::End
        } else {
            Msg::Abort
        };
        let _ = self.tx.send(verdict);
        drop(self.tx);
        let sent = self.sent.load(Ordering::Relaxed);
        let uploaded = self
            .thread
            .join()
            .map_err(|_| Error::Format("internal error: the upload thread panicked".into()))?;
        match (converted, uploaded) {
            (Ok(()), Ok(())) => Ok(self.sent.load(Ordering::Relaxed).max(sent)),
            (Err(e), Ok(())) => Err(e),
            (Ok(()), Err(u)) => Err(u),
            (Err(c), Err(u)) => {
                // A conversion that failed on its own cut the upload off: say why.
                if matches!(&c, Error::Stream(e) if e.kind() == io::ErrorKind::BrokenPipe) {
                    Err(u)
                } else {
                    Err(c)
                }
            }
        }
    }
}

/// Uploads the file at `path` with `PUT url` and `Content-Length`, tried again on
/// server errors and dropped connections. Returns the bytes sent.
pub fn put_file(
    client: &Client,
    url: &str,
    path: &Path,
    progress: Option<Arc<SentFn>>,
) -> Result<u64> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    client.with_retries(|| {
        let file = std::fs::File::open(path).map_err(|e| Failure::Final(Error::io(path, e)))?;
        let mut reader = FileBody {
            file: io::BufReader::with_capacity(PIECE, file),
            sent: 0,
            progress: progress.clone(),
        };
        let resp = client.send_body("PUT", url, &[], Some(len), &mut reader)?;
        status_failure(url, resp)?;
        if reader.sent != len {
            return Err(Failure::Final(Error::Http {
                url: redact(url),
                status: None,
                reason: format!("sent {} of {len} bytes", reader.sent),
            }));
        }
        Ok(len)
    })
}

struct FileBody {
    file: io::BufReader<std::fs::File>,
    sent: u64,
    progress: Option<Arc<SentFn>>,
}

impl Read for FileBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.sent += n as u64;
        if let Some(p) = &self.progress {
            p(self.sent);
        }
        Ok(n)
    }
}

//! The front door for writing: converts an opened image (or any [`BlockDevice`]) into a
//! new image of any format. The format's driver, found in the table, makes the writer; the
//! engine ([`crate::engine`]) copies the disk into it; the outputs are committed only when
//! complete.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;

use crate::detect::Format;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::io::OutputSet;
use crate::writer::WriteOptions;

pub use crate::engine::{
    run, CancelToken, EngineOptions, ProgressFn, DEFAULT_CHUNK, DEFAULT_MAX_THREADS,
};

/// Everything `convert` needs: the target format, its options, and how to run.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Output format.
    pub format: Format,
    /// Writer options (`-o`, `-c`, backing file).
    pub write: WriteOptions,
    /// Engine options (`-m`, `-S`, progress).
    pub engine: EngineOptions,
    /// Write into an existing target without creating or truncating it (`-n`).
    pub no_create: bool,
}

impl ConvertOptions {
    /// Conversion to `format` with default options.
    pub fn new(format: Format) -> Self {
        ConvertOptions {
            format,
            write: WriteOptions::default(),
            engine: EngineOptions::default(),
            no_create: false,
        }
    }

    /// Sets a writer option (`-o key=value`).
    pub fn option(mut self, key: &str, value: &str) -> Self {
        self.write
            .options
            .insert(key.to_string(), value.to_string());
        self
    }

    /// Sets the VMDK subformat (`-o subformat=…`).
    pub fn subformat(self, subformat: &str) -> Self {
        self.option("subformat", subformat)
    }

    /// Compresses the output (`-c`).
    pub fn compressed(mut self, on: bool) -> Self {
        self.write.compressed = on;
        self
    }

    /// Sets the number of worker threads (`-m`).
    pub fn threads(mut self, n: usize) -> Self {
        self.engine.threads = n;
        self
    }

    /// Stops the conversion when `token` is cancelled (see [`CancelToken`]).
    pub fn cancel_token(mut self, token: &CancelToken) -> Self {
        self.engine.cancel = token.clone();
        self
    }

    /// Reports progress through `f(done, total)`.
    pub fn progress(mut self, f: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        self.engine.progress = Some(Arc::new(f));
        self
    }
}

/// Converts `src` into a new image at `dst`. The file appears only when complete.
pub fn convert(src: &Image, dst: impl AsRef<Path>, opts: &ConvertOptions) -> Result<()> {
    convert_device(src.device().as_ref(), dst, opts)
}

/// Converts any [`BlockDevice`] — an opened image's, or one of your own — into a new
/// image at `dst`. The file appears only when complete.
pub fn convert_device(
    src: &dyn BlockDevice,
    dst: impl AsRef<Path>,
    opts: &ConvertOptions,
) -> Result<()> {
    let out = if opts.no_create {
        OutputSet::in_place()
    } else {
        OutputSet::new()
    };
    convert_to(src, dst.as_ref(), out, opts)
}

/// Converts `src` into any [`Write`] — stdout, a socket, a `Vec<u8>`, an HTTP request
/// body — for formats written in one pass (raw, streamOptimized VMDK; others refuse with
/// [`Error::NeedsSeekableOutput`]), and gives `w` back
/// (to `finish()` an encoder, or read a buffer).
pub fn convert_to_writer<W: Write + Send>(src: &Image, w: W, opts: &ConvertOptions) -> Result<W> {
    convert_device_to_writer(src.device().as_ref(), w, opts)
}

/// [`convert_to_writer`] for any [`BlockDevice`].
pub fn convert_device_to_writer<W: Write + Send>(
    src: &dyn BlockDevice,
    mut w: W,
    opts: &ConvertOptions,
) -> Result<W> {
    // The engine's writers own their output; `w` may borrow from the caller, so the
    // engine runs on a thread of its own and hands its bytes over a bounded channel to
    // this thread, which writes them to `w`.
    let (tx, rx) = sync_channel::<Vec<u8>>(4);
    let pipe = ChannelWriter {
        tx,
        buf: Vec::with_capacity(PIPE_CHUNK),
    };
    std::thread::scope(|scope| {
        let engine = scope.spawn(move || {
            convert_to(
                src,
                Path::new("-"),
                OutputSet::to_stream(Box::new(pipe)),
                opts,
            )
        });
        let mut written = Ok(());
        for piece in rx.iter() {
            if let Err(e) = w.write_all(&piece) {
                // Dropping the receiver makes the engine's next write fail: it stops.
                written = Err(Error::from(e));
                break;
            }
        }
        drop(rx);
        let converted = engine
            .join()
            .unwrap_or_else(|_| Err(Error::Format("the conversion thread panicked".into())));
        written?;
        converted?;
        w.flush()?;
        Ok::<(), Error>(())
    })?;
    Ok(w)
}

/// Bytes handed from the engine's thread to the caller's at a time.
const PIPE_CHUNK: usize = 1 << 20;

/// The engine's end of [`convert_device_to_writer`]'s channel.
struct ChannelWriter {
    tx: SyncSender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIPE_CHUNK));
        self.tx
            .send(piece)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the output stopped"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(PIPE_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PIPE_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        let _ = self.send();
    }
}

/// Converts any device into `dst` through `out` (new files, existing files for `-n`, or
/// a stream), then commits the output.
pub fn convert_to(
    src: &dyn BlockDevice,
    dst: &Path,
    mut out: OutputSet,
    opts: &ConvertOptions,
) -> Result<()> {
    let writer = if src.length_known() {
        crate::format::create_writer(opts.format, dst, src.size(), &opts.write, &mut out)?
    } else {
        crate::format::create_writer_unsized(opts.format, dst, &opts.write, &mut out)?
    };
    run(src, writer, &opts.engine)?;
    out.commit()
}

//! The front door for writing: converts an opened image (or any [`BlockDevice`]) into a
//! new image of any format. The format's driver, found in the table, makes the writer; the
//! engine ([`crate::engine`]) copies the disk into it; the outputs are committed only when
//! complete.

use std::path::Path;
use std::sync::Arc;

use crate::detect::Format;
use crate::device::BlockDevice;
use crate::error::Result;
use crate::image::Image;
use crate::io::OutputSet;
use crate::writer::WriteOptions;

pub use crate::engine::{interrupt, run, EngineOptions, ProgressFn, DEFAULT_CHUNK};

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

    /// Reports progress through `f(done, total)`.
    pub fn progress(mut self, f: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        self.engine.progress = Some(Arc::new(f));
        self
    }
}

/// Converts `src` into a new image at `dst`. The file appears only when complete.
pub fn convert(src: &Image, dst: impl AsRef<Path>, opts: &ConvertOptions) -> Result<()> {
    let out = if opts.no_create {
        OutputSet::in_place()
    } else {
        OutputSet::new()
    };
    convert_to(src.device().as_ref(), dst.as_ref(), out, opts)
}

/// Converts `src` into a stream (e.g. stdout), for formats that can be written in one
/// pass (raw, streamOptimized VMDK).
pub fn convert_to_writer(
    src: &Image,
    w: Box<dyn std::io::Write + Send>,
    opts: &ConvertOptions,
) -> Result<()> {
    convert_to(
        src.device().as_ref(),
        Path::new("-"),
        OutputSet::to_stream(w),
        opts,
    )
}

/// Converts any device into `dst` through `out`, then commits the output.
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

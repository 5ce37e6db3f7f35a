//! qemu-img's image-changing operations: `rebase`, `commit`, `amend`, `snapshot` and
//! `bitmap`.
//!
//! Each opens the image it changes once, for writing in place and with QEMU's writer
//! locks (see [`crate::io::lock`]); the images it only reads (backing chains, a merge
//! source) carry QEMU's read locks meanwhile. Every change to a qcow2 image is one
//! crash-safe transaction ([`crate::format::qcow2::edit`]): killed at any point, the
//! image is left as it was or as it is meant to be. Which formats allow what follows
//! qemu-img: these operations change qcow2 images (`commit` also writes into a raw or
//! VDI base); other formats get a typed error naming the operation.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::convert::ProgressFn;
use crate::detect::Format;
use crate::device::{BlockDevice, ExtentKind};
use crate::error::{Error, Result};
use crate::format::qcow2;
use crate::format::qcow2::edit::Qcow2Edit;
use crate::image::{Image, ImageInfo, OpenOptions};
use crate::io::lock::{self, Access};
use crate::writer::InPlaceWriter;

/// The format of the image at `path`: `given`, or probed (without taking locks: the
/// caller opens the image again for what it does).
pub fn image_format(path: &Path, given: Option<Format>) -> Result<Format> {
    if let Some(f) = given {
        return Ok(f);
    }
    let storage = crate::io::FileStorage::open_image(path, true)?;
    crate::format::probe_storage(&storage)
}

/// Refuses `op` on a format that qemu-img cannot apply it to.
fn only_qcow2(format: Format, op: &str) -> Result<()> {
    if format != Format::Qcow2 {
        return Err(Error::unsupported(format.name(), op.to_string()));
    }
    Ok(())
}

/// Holds QEMU's read locks on every backing file under `info` (not on the image
/// itself) for as long as the returned files stay open.
fn lock_backing_chain(info: &ImageInfo) -> Result<Vec<File>> {
    let mut held = Vec::new();
    let mut next = info.backing.as_deref();
    while let Some(b) = next {
        let p = Path::new(&b.filename);
        if p.is_file() {
            held.push(lock::open_read(p, Access::Read)?);
        }
        next = b.backing.as_deref();
    }
    Ok(held)
}

/// Opens the image at `path` for reading only, without locks (the caller holds the
/// writer's locks on it), with its backing chain.
fn open_unlocked(path: &Path, format: Format) -> Result<Image> {
    crate::open::open(path, &OpenOptions::trusted().format(format).force_share())
}

/// A name the image records for another file, resolved as QEMU resolves it: against
/// the image's folder unless absolute.
fn resolve_against(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(p),
        _ => p.to_path_buf(),
    }
}

// ---------------------------------------------------------------- rebase

/// What `rebase` is to do.
#[derive(Clone, Default)]
pub struct RebaseOptions {
    /// The image's format (`-f`); probed when `None`.
    pub format: Option<Format>,
    /// The new backing file as the image will record it (`-b`); `None` or empty: no
    /// backing file. A relative name is relative to the image's folder.
    pub backing: Option<String>,
    /// The new backing file's format (`-F`): required with a backing file, as QEMU 10
    /// requires it.
    pub backing_format: Option<Format>,
    /// Only rewrite the header (`-u`): the data is not compared or copied.
    pub unsafe_header_only: bool,
    /// Compress the clusters copied into the image (`-c`).
    pub compress: bool,
    /// Called with `(bytes done, bytes total)`.
    pub progress: Option<Arc<ProgressFn>>,
}

/// Changes the backing file of the image at `path` (qemu-img `rebase`).
///
/// Safe mode (the default) keeps what the image shows: what differs between the old
/// backing chain and the new backing image is copied into the image first.
pub fn rebase(path: &Path, o: &RebaseOptions) -> Result<()> {
    let format = image_format(path, o.format)?;
    only_qcow2(format, "changing the backing file (rebase)")?;
    let name = o.backing.clone().filter(|b| !b.is_empty());
    if name.is_some() && o.backing_format.is_none() {
        return Err(Error::invalid("backing format must be specified"));
    }
    if let Some(n) = &name {
        if n.len() > qcow2::header::MAX_BACKING_FILE_NAME as usize {
            return Err(Error::invalid(format!(
                "qcow2: backing file name is longer than {} bytes",
                qcow2::header::MAX_BACKING_FILE_NAME
            )));
        }
    }
    let mut edit = Qcow2Edit::open(path)?;
    let fmt_name = o.backing_format.map(|f| f.name().to_string());
    if o.unsafe_header_only {
        edit.backing_file = name;
        edit.backing_format = fmt_name;
        return crate::format::qcow2::bitmap::commit(edit);
    }
    let old = open_unlocked(path, Format::Qcow2)?;
    let _held = lock_backing_chain(old.info())?;
    let new = match &name {
        Some(n) => {
            let p = resolve_against(path, n);
            let opts = OpenOptions::trusted().format(o.backing_format.expect("checked above"));
            Some(crate::open::open(&p, &opts).map_err(|e| {
                Error::Format(format!("Could not open new backing file '{n}': {e}"))
            })?)
        }
        None => None,
    };
    edit.backing_file = name;
    edit.backing_format = fmt_name;
    let progress = o.progress.clone();
    let cb = move |d: u64, t: u64| {
        if let Some(p) = &progress {
            p(d, t)
        }
    };
    qcow2::rebase::copy_differences(
        &mut edit,
        old.device().as_ref(),
        new.as_ref()
            .map(|i| i.device().as_ref() as &dyn BlockDevice),
        o.compress,
        Some(&cb),
    )?;
    drop(old);
    crate::format::qcow2::bitmap::commit(edit)
}

// ---------------------------------------------------------------- commit

/// What `commit` is to do.
#[derive(Clone, Default)]
pub struct CommitOptions {
    /// The image's format (`-f`); probed when `None`.
    pub format: Option<Format>,
    /// The image of the backing chain to commit into (`-b`); the backing file when
    /// `None`. Naming one implies `drop`.
    pub base: Option<String>,
    /// Leave the image as it is afterwards (`-d`) instead of emptying it.
    pub drop: bool,
    /// Called with `(bytes done, bytes total)`.
    pub progress: Option<Arc<ProgressFn>>,
}

/// Writes what the image at `path` holds above its base image into the base
/// (qemu-img `commit`), then empties the image unless told not to.
///
/// The base may be raw, qcow2 or VDI (VMDK and the rest are refused, as is a base whose
/// format the chain does not record). A qcow2 base changes in one transaction; raw and
/// VDI bases are written in place; the image is emptied only once the base is on disk,
/// so that an interruption never loses what the image shows.
pub fn commit(path: &Path, o: &CommitOptions) -> Result<()> {
    let format = image_format(path, o.format)?;
    only_qcow2(format, "committing an image into its backing file")?;
    // The image is opened for writing for the whole operation, as QEMU does.
    let top_lock = crate::io::inplace::InPlaceFile::open(path)?;
    let top = open_unlocked(path, format)?;
    let mut chain: Vec<&ImageInfo> = vec![top.info()];
    while let Some(b) = chain.last().and_then(|i| i.backing.as_deref()) {
        chain.push(b);
    }
    if chain.len() < 2 {
        return Err(Error::Format("Image does not have a backing file".into()));
    }
    let depth = match &o.base {
        None => 1,
        Some(b) => find_in_chain(path, &chain, b)?,
    };
    let base_info = chain[depth];
    if chain[depth - 1].backing_filename_format.is_none() {
        return Err(Error::unsupported(
            base_info.format.name(),
            format!(
                "committing into {:?}, whose format {} does not record (it would have to be probed); record it with `rebase -u -b NAME -F FMT`",
                base_info.filename,
                chain[depth - 1].filename
            ),
        ));
    }
    let base_path = PathBuf::from(&base_info.filename);
    let mut held = Vec::new();
    for layer in &chain[1..depth] {
        held.push(lock::open_read(Path::new(&layer.filename), Access::Read)?);
    }
    for layer in chain.iter().skip(depth + 1) {
        let p = Path::new(&layer.filename);
        if p.is_file() {
            held.push(lock::open_read(p, Access::Read)?);
        }
    }
    let mut base: Box<dyn InPlaceWriter> = match base_info.format {
        Format::Raw => Box::new(crate::format::raw::RawInPlace::open(&base_path)?),
        Format::Qcow2 => Box::new(qcow2::commit::Qcow2InPlace::open(&base_path)?),
        Format::Vdi => Box::new(crate::format::vdi::inplace::VdiInPlace::open(&base_path)?),
        other => {
            return Err(Error::unsupported(
                other.name(),
                "writing into the image in place (as the base of a commit)",
            ))
        }
    };
    copy_above_base(top.device().as_ref(), depth as u32, base.as_mut(), o)?;
    base.finish()?;
    drop(held);
    drop(top);
    if !o.drop && o.base.is_none() {
        drop(top_lock);
        qcow2::commit::make_empty(path)?;
    }
    Ok(())
}

/// The depth of the image `name` in `chain` (1 = the backing file), matched as QEMU
/// matches it: as given, or relative to the top image's folder.
fn find_in_chain(top: &Path, chain: &[&ImageInfo], name: &str) -> Result<usize> {
    let candidates = [PathBuf::from(name), resolve_against(top, name)];
    let canon: Vec<PathBuf> = candidates
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    for (d, layer) in chain.iter().enumerate().skip(1) {
        let p = Path::new(&layer.filename);
        if let Ok(c) = p.canonicalize() {
            if canon.contains(&c) {
                return Ok(d);
            }
        }
    }
    Err(Error::invalid(format!(
        "Did not find '{name}' in the backing chain of '{}'",
        top.display()
    )))
}

/// Copies into `base` every stretch of `top` that a layer above the base (depth below
/// `base_depth`) defines: data as read through `top`, zeros as zeroed ranges; in whole
/// grains of the base.
fn copy_above_base(
    top: &dyn BlockDevice,
    base_depth: u32,
    base: &mut dyn InPlaceWriter,
    o: &CommitOptions,
) -> Result<()> {
    let size = top.size();
    if base.size() < size {
        base.grow(size)?;
    }
    let g = base.grain_size();
    let chunk = (1u64 << 20).max(g) / g * g;
    let mut buf = vec![0u8; chunk as usize];
    let mut copy = |base: &mut dyn InPlaceWriter, from: u64, to: u64| -> Result<()> {
        let mut p = from;
        while p < to {
            let n = (to - p).min(chunk);
            let b = &mut buf[..n as usize];
            top.read_at(b, p)?;
            base.write_at(b, p)?;
            p += n;
        }
        Ok(())
    };
    let mut pos = 0;
    while pos < size {
        if let Some(p) = &o.progress {
            p(pos, size);
        }
        let e = top.map(pos, size - pos)?;
        let end = e.end();
        if e.depth < base_depth {
            let first = pos / g * g;
            let last = end.div_ceil(g).saturating_mul(g).min(size);
            if e.kind == ExtentKind::Data {
                copy(base, first, last)?;
            } else {
                // Zeros above the base: whole grains are zeroed, partial ones copied.
                let inner_start = pos.div_ceil(g) * g;
                let inner_end = if end == size { size } else { end / g * g };
                if inner_start < inner_end {
                    copy(base, first, inner_start)?;
                    base.write_zeroes(inner_start, inner_end - inner_start)?;
                    copy(base, inner_end, last)?;
                } else {
                    copy(base, first, last)?;
                }
            }
        }
        pos = end;
    }
    if let Some(p) = &o.progress {
        p(size, size);
    }
    Ok(())
}

/// Parses a format name as `-F` gives it.
pub fn parse_format(s: &str) -> Result<Format> {
    Format::from_str(s).map_err(|_| Error::invalid(format!("Unknown file format '{s}'")))
}

// ---------------------------------------------------------------- amend

/// Changes format-specific options of the image at `path` (qemu-img `amend -o`): for
/// qcow2 `compat`, `lazy_refcounts`, `refcount_bits`, `size`, `data_file`,
/// `data_file_raw` (see [`qcow2::amend`]). Other formats cannot be amended, as in
/// qemu-img.
pub fn amend(path: &Path, format: Option<Format>, options: &str) -> Result<()> {
    let format = image_format(path, format)?;
    if format != Format::Qcow2 {
        return Err(Error::Format(format!(
            "Format driver '{}' does not support option amendment",
            format.name()
        )));
    }
    let request = qcow2::amend::AmendRequest::parse(options)?;
    let mut edit = Qcow2Edit::open(path)?;
    let grows = request.size.is_some_and(|s| s > edit.size());
    let view = if grows {
        Some(open_unlocked(path, format)?)
    } else {
        None
    };
    let _held = match &view {
        Some(v) => lock_backing_chain(v.info())?,
        None => Vec::new(),
    };
    let backing_size = view
        .as_ref()
        .and_then(|v| v.info().backing.as_ref().map(|b| b.virtual_size));
    qcow2::amend::amend(
        &mut edit,
        &request,
        view.as_ref()
            .map(|v| v.device().as_ref() as &dyn BlockDevice),
        backing_size,
    )?;
    drop(view);
    crate::format::qcow2::bitmap::commit(edit)
}

// ---------------------------------------------------------------- snapshot

/// What `snapshot` is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotAction {
    /// `-c NAME`: create a snapshot of the current state.
    Create(String),
    /// `-a NAME`: revert the current state to a snapshot (by ID, then by name).
    Apply(String),
    /// `-d NAME`: delete a snapshot (by name).
    Delete(String),
}

/// Creates, applies or deletes an internal snapshot of the qcow2 image at `path`
/// (qemu-img `snapshot -c/-a/-d`).
pub fn snapshot(path: &Path, format: Option<Format>, action: &SnapshotAction) -> Result<()> {
    let format = image_format(path, format)?;
    if format != Format::Qcow2 {
        // qemu-img's words for each (after "Could not … snapshot 'NAME': ").
        return Err(match action {
            SnapshotAction::Create(_) => Error::Format("Operation not supported".into()),
            SnapshotAction::Apply(_) => {
                Error::Format("Block driver does not support snapshots".into())
            }
            SnapshotAction::Delete(_) => Error::Format("snapshot not found".into()),
        });
    }
    let mut edit = Qcow2Edit::open(path)?;
    match action {
        SnapshotAction::Create(name) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            // QEMU takes the time in microseconds.
            let date = (now.as_secs() as u32, now.subsec_micros() * 1000);
            qcow2::snapshot_edit::create(&mut edit, name, date)?;
        }
        SnapshotAction::Apply(which) => qcow2::snapshot_edit::apply(&mut edit, which)?,
        SnapshotAction::Delete(name) => qcow2::snapshot_edit::delete(&mut edit, name)?,
    }
    crate::format::qcow2::bitmap::commit(edit)
}

/// The internal snapshots of the image at `path` (qemu-img `snapshot -l`; empty for
/// formats without them). `force_share` reads without locks (`-U`).
pub fn list_snapshots(
    path: &Path,
    format: Option<Format>,
    force_share: bool,
) -> Result<Vec<crate::image::SnapshotInfo>> {
    let mut o = OpenOptions::trusted().metadata_only();
    o.format = format;
    o.force_share = force_share;
    Ok(crate::open::open(path, &o)?.info().snapshots.clone())
}

// ---------------------------------------------------------------- bitmap

/// One action of `bitmap`, applied in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapAction {
    /// `--add [-g GRANULARITY]`: a new, empty, enabled bitmap.
    Add {
        /// Bytes per bit; QEMU's default (the cluster size within 4–64 KiB) if `None`.
        granularity: Option<u64>,
    },
    /// `--remove`.
    Remove,
    /// `--clear`: every bit cleared.
    Clear,
    /// `--enable`: record writes.
    Enable,
    /// `--disable`: stop recording writes.
    Disable,
    /// `--merge SOURCE [-b FILE [-F FMT]]`: OR bitmap SOURCE (of FILE, else of the image
    /// itself) into the bitmap.
    Merge {
        /// The source bitmap's name.
        source: String,
        /// The qcow2 image holding it, if not the image itself.
        file: Option<PathBuf>,
        /// That image's format (`-F`); probed when `None`.
        format: Option<Format>,
    },
}

impl BitmapAction {
    /// The operation's name as qemu-img prints it in errors.
    pub fn name(&self) -> &'static str {
        match self {
            BitmapAction::Add { .. } => "add",
            BitmapAction::Remove => "remove",
            BitmapAction::Clear => "clear",
            BitmapAction::Enable => "enable",
            BitmapAction::Disable => "disable",
            BitmapAction::Merge { .. } => "merge",
        }
    }
}

/// A failed `bitmap` action: which one, and why.
#[derive(Debug)]
pub struct BitmapError {
    /// The action that failed.
    pub action: &'static str,
    /// Why.
    pub error: Error,
}

/// Applies `actions` to persistent bitmap `name` of the qcow2 image at `path` (qemu-img
/// `bitmap`), all in one transaction: if one fails, none is applied.
pub fn bitmap(
    path: &Path,
    format: Option<Format>,
    name: &str,
    actions: &[BitmapAction],
) -> std::result::Result<(), BitmapError> {
    let first = actions.first().map_or("add", BitmapAction::name);
    let fail = |action: &'static str| move |error: Error| BitmapError { action, error };
    let format = image_format(path, format).map_err(fail(first))?;
    if format != Format::Qcow2 {
        return Err(BitmapError {
            action: first,
            error: Error::unsupported(format.name(), "persistent bitmaps: Operation not supported"),
        });
    }
    let mut edit = Qcow2Edit::open(path).map_err(fail(first))?;
    for a in actions {
        let op = a.name();
        match a {
            BitmapAction::Add { granularity } => qcow2::bitmap::add(&mut edit, name, *granularity),
            BitmapAction::Remove => qcow2::bitmap::remove(&mut edit, name),
            BitmapAction::Clear => qcow2::bitmap::clear(&mut edit, name),
            BitmapAction::Enable => qcow2::bitmap::set_enabled(&mut edit, name, true),
            BitmapAction::Disable => qcow2::bitmap::set_enabled(&mut edit, name, false),
            BitmapAction::Merge {
                source,
                file,
                format,
            } => merge_source(&edit, source, file.as_deref(), *format)
                .and_then(|bits| qcow2::bitmap::merge(&mut edit, name, &bits)),
        }
        .map_err(fail(op))?;
    }
    crate::format::qcow2::bitmap::commit(edit)
        .map_err(fail(actions.last().map_or(first, BitmapAction::name)))
}

/// What [`copy_bitmaps`] did: the bitmaps it copied and those it skipped because they
/// were in use (inconsistent) and `skip_broken` was set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopiedBitmaps {
    /// Names of the bitmaps copied, in the source's order.
    pub copied: Vec<String>,
    /// Names of the inconsistent bitmaps left out.
    pub skipped: Vec<String>,
}

/// The persistent bitmaps of the qcow2 image at `source` (name, granularity, enabled,
/// in use), read with read locks.
fn source_bitmaps(
    source: &Path,
) -> Result<(
    crate::io::FileStorage,
    Vec<qcow2::header::BitmapDirectoryEntry>,
)> {
    let storage = crate::io::FileStorage::open_image(source, false)?;
    let m = qcow2::read_metadata(&storage)?;
    Ok((storage, m.bitmaps))
}

/// Refuses, before anything is written, a `convert --bitmaps` that qemu-img refuses:
/// a source that is not a qcow2 file, or one with an inconsistent (in-use) bitmap
/// unless `skip_broken`.
pub fn check_bitmaps_copyable(source: &Path, format: Format, skip_broken: bool) -> Result<()> {
    if format != Format::Qcow2 {
        return Err(Error::invalid("Source lacks bitmap support"));
    }
    let (_, bitmaps) = source_bitmaps(source)?;
    if !skip_broken {
        if let Some(b) = bitmaps
            .iter()
            .find(|b| b.flags & qcow2::header::BITMAP_FLAG_IN_USE != 0)
        {
            return Err(Error::invalid(format!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                b.name
            )));
        }
    }
    Ok(())
}

/// Copies the persistent bitmaps of the qcow2 image at `source` into the qcow2 image
/// at `target` (`convert --bitmaps`): each with its name, granularity, enabled state
/// and bits, in one transaction on the target. An inconsistent (in-use) bitmap is an
/// error, or left out when `skip_broken`. The two images must have the same size.
pub fn copy_bitmaps(source: &Path, target: &Path, skip_broken: bool) -> Result<CopiedBitmaps> {
    let (storage, bitmaps) = source_bitmaps(source)?;
    let mut done = CopiedBitmaps::default();
    if bitmaps.is_empty() {
        return Ok(done);
    }
    let mut edit = Qcow2Edit::open(target)?;
    for b in &bitmaps {
        if b.flags & qcow2::header::BITMAP_FLAG_IN_USE != 0 {
            if skip_broken {
                done.skipped.push(b.name.clone());
                continue;
            }
            return Err(Error::invalid(format!(
                "Cannot copy inconsistent bitmap '{}'",
                b.name
            )));
        }
        let failed = |what: &str, e: Error| {
            Error::invalid(format!("Failed to {what} bitmap {}: {}", b.name, e))
        };
        let bits = qcow2::bitmap::read_from(&storage, &b.name)?;
        qcow2::bitmap::add(&mut edit, &b.name, Some(1u64 << b.granularity_bits))
            .map_err(|e| failed("create", e))?;
        if b.flags & qcow2::header::BITMAP_FLAG_AUTO == 0 {
            qcow2::bitmap::set_enabled(&mut edit, &b.name, false)
                .map_err(|e| failed("create", e))?;
        }
        qcow2::bitmap::merge(&mut edit, &b.name, &bits).map_err(|e| failed("populate", e))?;
        done.copied.push(b.name.clone());
    }
    qcow2::bitmap::commit(edit)?;
    Ok(done)
}

/// The bits of bitmap `source`: of the image being edited, or of the qcow2 image
/// `file` (read with read locks).
fn merge_source(
    edit: &Qcow2Edit,
    source: &str,
    file: Option<&Path>,
    format: Option<Format>,
) -> Result<qcow2::bitmap::Bits> {
    let Some(file) = file else {
        return qcow2::bitmap::bits_of(edit, source);
    };
    let f = image_format(file, format)?;
    if f != Format::Qcow2 {
        return Err(Error::invalid(format!("Dirty bitmap '{source}' not found")));
    }
    let storage = crate::io::FileStorage::open_image(file, false)?;
    qcow2::bitmap::read_from(&storage, source)
}

//! Hostile input, the property (issue 13): random valid images of every format (raw,
//! qcow2, VMDK, VDI — made by qemu-img or by imgconv, some wrapped in gzip) and random
//! mutations of their headers and metadata. Every command that reads an image (`info`,
//! `map`, `check`, `compare`, `convert`, `measure`, `resize`) ends within 2 s, by success or by a typed error (its exit code,
//! an `imgconv:` message, no panic, no signal), within 64 MiB of peak memory and under a
//! 1 GiB address-space limit (`prlimit --as`); a failed convert leaves nothing behind;
//! valid images are read without error.
//!
//! The cases are random from a seed: a fixed one by default (so CI is reproducible),
//! `IMGCONV_PROP_SEED=random` for a new one, `IMGCONV_PROP_SEED=N` to replay a run (every
//! failure names its seed and case; `IMGCONV_PROP_CASE` runs that one alone), `IMGCONV_PROP_CASES` sets
//! the number of cases per format (default 6, each an image and two mutants, every
//! command on each: well under a minute).

mod common;
use common::watch::{Watch, Watched};
use common::*;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Peak memory allowed for any command on these (≤ 1 MiB of data) inputs.
const RSS_BUDGET_KIB: i64 = 64 << 10;
/// Wall time allowed for any command.
const TIME_LIMIT: Duration = Duration::from_secs(2);

/// Reproducible noise.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        xorshift64(&mut self.0)
    }
    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Raw,
    Qcow2,
    Vmdk,
    Vdi,
}

/// One input: the file handed to imgconv and what is known of it.
struct Sample {
    path: PathBuf,
    /// The format name for `-f` (the container's content for a `.gz`).
    format: &'static str,
    /// How it was made and changed, for failure messages.
    what: String,
    /// It names other files (extents, a backing file).
    references: bool,
    /// Wrapped in gzip.
    gz: bool,
    /// The virtual size of the valid image it comes from.
    size: u64,
}

/// A header field: offset (from the start of the structure), width in bytes, big-endian.
type Field = (u64, usize, bool);

const QCOW2_FIELDS: &[Field] = &[
    (4, 4, true),   // version
    (8, 8, true),   // backing_file_offset
    (16, 4, true),  // backing_file_size
    (20, 4, true),  // cluster_bits
    (24, 8, true),  // size
    (32, 4, true),  // crypt_method
    (36, 4, true),  // l1_size
    (40, 8, true),  // l1_table_offset
    (48, 8, true),  // refcount_table_offset
    (56, 4, true),  // refcount_table_clusters
    (60, 4, true),  // nb_snapshots
    (64, 8, true),  // snapshots_offset
    (72, 8, true),  // incompatible_features
    (80, 8, true),  // compatible_features
    (88, 8, true),  // autoclear_features
    (96, 4, true),  // refcount_order
    (100, 4, true), // header_length
    (104, 1, true), // compression_type
    (112, 4, true), // first header extension: type
    (116, 4, true), // first header extension: length
];

const VDI_FIELDS: &[Field] = &[
    (0x40, 4, false),  // signature
    (0x44, 4, false),  // version
    (0x48, 4, false),  // cbHeader
    (0x4c, 4, false),  // image type
    (0x50, 4, false),  // flags
    (0x154, 4, false), // offBlocks
    (0x158, 4, false), // offData
    (0x168, 4, false), // legacy cbSector
    (0x170, 8, false), // cbDisk
    (0x178, 4, false), // cbBlock
    (0x17c, 4, false), // cbBlockExtra
    (0x180, 4, false), // cBlocks
    (0x184, 4, false), // cBlocksAllocated
    (0x1a8, 8, false), // uuidLinkage (a parent)
    (0x1d4, 4, false), // LCHS cbSector
];

const VMDK_FIELDS: &[Field] = &[
    (4, 4, false),  // version
    (8, 4, false),  // flags
    (12, 8, false), // capacity
    (20, 8, false), // grainSize
    (28, 8, false), // descriptorOffset
    (36, 8, false), // descriptorSize
    (44, 4, false), // numGTEsPerGT
    (48, 8, false), // rgdOffset
    (56, 8, false), // gdOffset
    (64, 8, false), // overHead
    (72, 1, false), // uncleanShutdown
    (73, 4, false), // newline detection bytes
    (77, 2, false), // compressAlgorithm
];

/// Values that tend to find edges, for a field of a file of `len` bytes.
fn interesting(rng: &mut Rng, len: u64) -> u64 {
    let v = [
        0,
        1,
        2,
        7,
        0x7f,
        0x80,
        0xff,
        0x100,
        0x1ff,
        0x200,
        0x1000,
        0xffff,
        0x1_0000,
        len,
        len.saturating_sub(1),
        len + 1,
        len / 2,
        len / 512,
        len / 512 + 1,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        1 << 32,
        1 << 40,
        1 << 56,
        i64::MAX as u64,
        u64::MAX,
        u64::MAX - 511,
    ];
    if rng.chance(1, 8) {
        rng.next()
    } else {
        *rng.pick(&v)
    }
}

fn put(b: &mut [u8], at: u64, width: usize, big: bool, v: u64) -> bool {
    let Some(end) = usize::try_from(at)
        .ok()
        .and_then(|at| at.checked_add(width))
    else {
        return false;
    };
    if end > b.len() {
        return false;
    }
    let at = at as usize;
    let bytes = if big {
        v.to_be_bytes()
    } else {
        v.to_le_bytes()
    };
    if big {
        b[at..at + width].copy_from_slice(&bytes[8 - width..]);
    } else {
        b[at..at + width].copy_from_slice(&bytes[..width]);
    }
    true
}

fn get(b: &[u8], at: u64, width: usize, big: bool) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    let s = b.get(at..at.checked_add(width)?)?;
    let mut v = [0u8; 8];
    if big {
        v[8 - width..].copy_from_slice(s);
        Some(u64::from_be_bytes(v))
    } else {
        v[..width].copy_from_slice(s);
        Some(u64::from_le_bytes(v))
    }
}

/// Offsets of table entries the header points at (the first entries of qcow2's L1 and
/// refcount tables and an L2 table, VDI's block map, VMDK's grain directory and a grain
/// table): `(offset, width, big-endian)`.
fn metadata_entries(kind: Kind, b: &[u8]) -> Vec<Field> {
    let mut out = Vec::new();
    match kind {
        Kind::Qcow2 => {
            let mask = 0x00ff_ffff_ffff_fe00u64;
            for table in [40u64, 48] {
                if let Some(off) = get(b, table, 8, true) {
                    for k in 0..4 {
                        out.push((off.wrapping_add(8 * k), 8, true));
                    }
                    if let Some(e) = get(b, off, 8, true) {
                        let e = e & mask;
                        for k in 0..4 {
                            // An L2 entry, or a refcount block's (2-byte) entries.
                            out.push((e.wrapping_add(8 * k), 8, true));
                            out.push((e.wrapping_add(2 * k), 2, true));
                        }
                    }
                }
            }
            // The backing file name and the extension area.
            if let Some(off) = get(b, 8, 8, true) {
                out.push((off, 8, true));
            }
        }
        Kind::Vdi => {
            if let Some(off) = get(b, 0x154, 4, false) {
                for k in 0..8 {
                    out.push((off.wrapping_add(4 * k), 4, false));
                }
            }
        }
        Kind::Vmdk => {
            // A streamOptimized file's real header is its footer (the last 1024 bytes
            // but the end-of-stream marker: a marker sector, then the header).
            let mut heads = vec![0u64];
            if b.len() >= 1024 && &b[b.len() - 1024 + 512..b.len() - 1024 + 516] == b"KDMV" {
                heads.push(b.len() as u64 - 512);
            }
            for h in heads {
                if let Some(gd) = get(b, h + 56, 8, false) {
                    let gd = gd.wrapping_mul(512);
                    for k in 0..4 {
                        out.push((gd.wrapping_add(4 * k), 4, false));
                    }
                    if let Some(gt) = get(b, gd, 4, false) {
                        for k in 0..4 {
                            out.push((gt.wrapping_mul(512).wrapping_add(4 * k), 4, false));
                        }
                    }
                }
                for &(o, w, big) in VMDK_FIELDS {
                    out.push((h + o, w, big));
                }
            }
        }
        Kind::Raw => {}
    }
    out
}

/// Tokens written over a word of a VMDK descriptor.
const DESCRIPTOR_TOKENS: &[&str] = &[
    "0",
    "-1",
    "1",
    "4294967296",
    "18446744073709551616",
    "99999999999999",
    "\"/dev/zero\"",
    "\"/\"",
    "\"..\"",
    "\"missing.vmdk\"",
    "\"\"",
    "\"",
    "SESPARSE",
    "VMFS",
    "VMFSSPARSE",
    "ZERO",
    "FLAT",
    "SPARSE",
    "RDONLY",
    "NOACCESS",
    "\"vmfsSparse\"",
    "\"custom\"",
    "\"streamOptimized\"",
    "\"monolithicFlat\"",
    "\"twoGbMaxExtentSparse\"",
    "parentFileNameHint=\"missing.vmdk\"",
    "ffffffff",
];

/// Changes one word of the descriptor text found in `b` (a descriptor file or the one
/// embedded in a sparse extent, whose room is kept).
fn mutate_descriptor(rng: &mut Rng, b: &mut Vec<u8>) -> Option<String> {
    let start = b.windows(21).position(|w| w == b"# Disk DescriptorFile")?;
    let end = b[start..]
        .iter()
        .position(|&c| c == 0)
        .map_or(b.len(), |e| start + e);
    let text = String::from_utf8_lossy(&b[start..end]).into_owned();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let li = rng.below(lines.len() as u64) as usize;
    let mut words: Vec<String> = lines[li].split(' ').map(str::to_string).collect();
    let wi = rng.below(words.len() as u64) as usize;
    let token = rng.pick(DESCRIPTOR_TOKENS).to_string();
    let what = format!(
        "descriptor line {li} word {wi} {:?} -> {token:?}",
        words[wi]
    );
    words[wi] = token;
    lines[li] = words.join(" ");
    let mut new = lines.join("\n").into_bytes();
    new.push(b'\n');
    if end == b.len() {
        b.truncate(start);
        b.extend_from_slice(&new);
    } else {
        new.resize(end - start, 0);
        b[start..end].copy_from_slice(&new);
    }
    Some(what)
}

/// Applies one to three random changes to `b`; says what they were.
fn mutate(rng: &mut Rng, kind: Kind, b: &mut Vec<u8>) -> String {
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let len = b.len() as u64;
        let fields: &[Field] = match kind {
            Kind::Qcow2 => QCOW2_FIELDS,
            Kind::Vdi => VDI_FIELDS,
            Kind::Vmdk => VMDK_FIELDS,
            Kind::Raw => &[],
        };
        match rng.below(10) {
            // A header field.
            0..=2 if !fields.is_empty() => {
                let &(o, w, big) = rng.pick(fields);
                let v = interesting(rng, len);
                if put(b, o, w, big, v) {
                    what.push(format!("field@{o:#x}/{w}={v:#x}"));
                }
            }
            // An entry of a table the header points at.
            3..=4 => {
                let entries = metadata_entries(kind, b);
                if !entries.is_empty() {
                    let &(o, w, big) = rng.pick(&entries);
                    let v = interesting(rng, len);
                    if put(b, o, w, big, v) {
                        what.push(format!("entry@{o:#x}/{w}={v:#x}"));
                    }
                }
            }
            // A word of a VMDK descriptor.
            5 if kind == Kind::Vmdk => {
                if let Some(w) = mutate_descriptor(rng, b) {
                    what.push(w);
                }
            }
            // Another format's signature planted in a raw disk.
            5 if kind == Kind::Raw => {
                const SIGNATURES: &[&[u8]] = &[
                    b"QFI\xfb\0\0\0\x03",
                    b"KDMV\x01\0\0\0",
                    b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 1 FLAT \"/dev/zero\" 0\n",
                    b"<<< Oracle VM VirtualBox Disk Image >>>\n\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x7f\x10\xda\xbe",
                    b"COWD\x01\0\0\0",
                    b"\x1f\x8b\x08\0",
                    b"\xfd7zXZ\0",
                ];
                let sig = *rng.pick(SIGNATURES);
                let n = sig.len().min(b.len());
                b[..n].copy_from_slice(&sig[..n]);
                what.push(format!(
                    "signature {:?}",
                    String::from_utf8_lossy(&sig[..4])
                ));
            }
            // Random bytes in the first 4 KiB.
            6..=7 => {
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(len.clamp(1, 4096));
                    if let Some(c) = b.get_mut(at as usize) {
                        *c = rng.next() as u8;
                        what.push(format!("byte@{at:#x}"));
                    }
                }
            }
            // Random bytes anywhere.
            8 => {
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(len.max(1));
                    if let Some(c) = b.get_mut(at as usize) {
                        *c = rng.next() as u8;
                        what.push(format!("byte@{at:#x}"));
                    }
                }
            }
            // Cut short.
            _ => {
                let at = if rng.chance(1, 2) {
                    rng.below(len.clamp(1, 4096))
                } else {
                    rng.below(len.max(1))
                };
                b.truncate(at as usize);
                what.push(format!("truncated@{at:#x}"));
            }
        }
    }
    what.join(", ")
}

/// A sparse raw disk of a random size with a few pieces of data; its path and size.
fn base_raw(rng: &mut Rng, dir: &Path, max_size: u64) -> (PathBuf, u64) {
    let size = match rng.below(4) {
        0 => 512 * (1 + rng.below(64)),
        1 => (1 + rng.below(8)) << 20,
        2 => (1 + rng.below(4 << 20)) * 3, // not a multiple of 512
        _ => 1 + rng.below(max_size),
    }
    .min(max_size);
    let mut pieces = Vec::new();
    for _ in 0..rng.below(5) {
        let len = (512 * (1 + rng.below(128))).min(size) as usize;
        let off = rng.below(size - len as u64 + 1) & !511;
        pieces.push((off, len, rng.next() as u8));
    }
    let path = dir.join("base.raw");
    make_raw(&path, size, &pieces);
    (path, size)
}

/// `TOOL convert -O FMT [-o OPTS] SRC DST` by qemu-img or imgconv (which must succeed).
fn convert_with(rng: &mut Rng, fmt: &str, opts: &str, src: &Path, dst: &Path) -> &'static str {
    if rng.chance(1, 2) {
        qemu_convert(fmt, opts, src, dst);
        "qemu-img"
    } else {
        imgconv_convert(fmt, opts, src, dst);
        "imgconv"
    }
}

/// A random valid image of `kind` in `dir`.
fn valid_image(rng: &mut Rng, kind: Kind, dir: &Path) -> Sample {
    let mut references = false;
    let (path, format, what, size) = match kind {
        Kind::Raw => {
            let (p, size) = base_raw(rng, dir, 64 << 20);
            (p, "raw", format!("raw of {size} bytes"), size)
        }
        Kind::Qcow2 => {
            let cluster = 1u64 << (9 + rng.below(13)); // 512 B .. 2 MiB
            let max = if cluster < 65536 { 1 << 30 } else { 4 << 40 };
            let (raw, size) = base_raw(rng, dir, max);
            let compat = *rng.pick(&["0.10", "1.1"]);
            let p = dir.join("img.qcow2");
            let backing = compat == "1.1" && rng.chance(1, 4);
            let tool = if backing {
                // An overlay of the raw disk with a few clusters of its own.
                let opts = format!("cluster_size={cluster},compat={compat}");
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &opts,
                    "-b",
                    s(&raw),
                    "-F",
                    "raw",
                    s(&p),
                ]);
                let off = rng.below(size.max(512) / 512) * 512;
                let cmd = format!("write -P 0x5a {off} 512");
                qemu_io(&["-f", "qcow2", "-c", &cmd, s(&p)]);
                references = true;
                "qemu-img overlay"
            } else {
                let refcount = if compat == "1.1" {
                    format!(",refcount_bits={}", 1u64 << rng.below(7))
                } else {
                    String::new()
                };
                let opts = format!("cluster_size={cluster},compat={compat}{refcount}");
                if rng.chance(1, 4) {
                    // Compressed clusters.
                    qemu_img(&["convert", "-c", "-O", "qcow2", "-o", &opts, s(&raw), s(&p)]);
                    "qemu-img -c"
                } else if compat == "1.1" {
                    convert_with(rng, "qcow2", &opts, &raw, &p)
                } else {
                    qemu_convert("qcow2", &opts, &raw, &p);
                    "qemu-img"
                }
            };
            if !backing && rng.chance(1, 5) {
                // (qemu-img refuses some: 1-bit refcounts, say; then there is none.)
                let _ = run("qemu-img", &["snapshot", "-c", "snap", s(&p)]);
            }
            (
                p,
                "qcow2",
                format!("qcow2 by {tool}, {size} bytes, clusters {cluster}, compat {compat}"),
                size,
            )
        }
        Kind::Vmdk => {
            let sub = *rng.pick(&[
                "monolithicSparse",
                "streamOptimized",
                "monolithicFlat",
                "twoGbMaxExtentSparse",
            ]);
            let max = match sub {
                // (qemu-img writes every grain table: 1/16384 of the size.)
                "streamOptimized" => 256 << 30,
                "monolithicFlat" => 4 << 20,
                _ => 16 << 30,
            };
            let (raw, size) = base_raw(rng, dir, max);
            let p = dir.join("img.vmdk");
            let tool = convert_with(rng, "vmdk", &format!("subformat={sub}"), &raw, &p);
            references = matches!(sub, "monolithicFlat" | "twoGbMaxExtentSparse");
            (
                p,
                "vmdk",
                format!("vmdk {sub} by {tool}, {size} bytes"),
                size,
            )
        }
        Kind::Vdi => {
            let fixed = rng.chance(1, 4);
            let (raw, size) = base_raw(rng, dir, if fixed { 4 << 20 } else { 64 << 30 });
            let p = dir.join("img.vdi");
            let opts = if fixed { "static=on" } else { "" };
            let tool = convert_with(rng, "vdi", opts, &raw, &p);
            (
                p,
                "vdi",
                format!("vdi {opts} by {tool}, {size} bytes"),
                size,
            )
        }
    };
    Sample {
        path,
        format,
        what,
        references,
        gz: false,
        size,
    }
}

/// A mutant of `valid` (the main file changed) next to it, sometimes wrapped in gzip.
fn mutant(rng: &mut Rng, kind: Kind, valid: &Sample, n: usize) -> Sample {
    let mut b = std::fs::read(&valid.path).unwrap();
    let change = mutate(rng, kind, &mut b);
    let ext = valid.path.extension().unwrap().to_str().unwrap();
    let single = !valid.references;
    let gz = single && rng.chance(1, 6);
    let path = valid
        .path
        .with_file_name(format!("mutant{n}.{ext}{}", if gz { ".gz" } else { "" }));
    if gz {
        gzip_to(&path, &b);
    } else if valid.references && kind == Kind::Vmdk {
        // Descriptors name their extents by the valid image's name: write over it.
        std::fs::write(&valid.path, &b).unwrap();
        return Sample {
            path: valid.path.clone(),
            format: valid.format,
            what: format!("{}; {change}", valid.what),
            references: true,
            gz: false,
            size: valid.size,
        };
    } else {
        std::fs::write(&path, &b).unwrap();
    }
    Sample {
        path,
        format: valid.format,
        what: format!(
            "{}; {change}{}",
            valid.what,
            if gz { "; in gzip" } else { "" }
        ),
        references: valid.references,
        gz,
        size: valid.size,
    }
}

fn gzip_to(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    enc.write_all(data).unwrap();
    enc.finish().unwrap();
}

/// `qemu-img check`'s exit code for a valid image: what imgconv's must be (its own
/// compressed images with narrow refcounts, for one, have leaks).
fn qemu_check_code(path: &Path) -> Option<i32> {
    run("qemu-img", &["check", s(path)]).status.code()
}

/// Exit codes a command may end with on bad input (qemu-img's).
fn allowed_codes(cmd: &str) -> &'static [i32] {
    match cmd {
        // 1: not completed; 2: corruptions; 3: leaks; 63: no checks for the format.
        "check" => &[0, 1, 2, 3, 63],
        // 1: the contents differ; 2: an error opening; 3: an error reading the
        // allocation; 4: an error reading data (qemu-img's codes).
        "compare" => &[0, 1, 2, 3, 4],
        _ => &[0, 1],
    }
}

/// Runs of one command on one kind of input (valid or mutant).
#[derive(Default)]
struct Tally {
    runs: u32,
    ok: u32,
    peak_rss_kib: i64,
    slowest: Duration,
    slowest_run: String,
}

/// Per command and kind of input (valid or not): the tally.
#[derive(Default)]
struct Stats(std::collections::BTreeMap<(String, bool), Tally>);

impl Stats {
    fn add(&mut self, cmd: &str, valid: bool, w: &Watched, what: &str) {
        let t = self.0.entry((cmd.to_string(), valid)).or_default();
        t.runs += 1;
        t.ok += u32::from(w.code == Some(0));
        t.peak_rss_kib = t.peak_rss_kib.max(w.max_rss_kib);
        if w.elapsed > t.slowest {
            t.slowest = w.elapsed;
            t.slowest_run = what.to_string();
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for ((cmd, valid), t) in &self.0 {
            let what = if *valid { "valid" } else { "mutant" };
            writeln!(
                f,
                "{cmd:8} {what:6}: {:4} runs, {:4} exit 0, peak {:6} KiB, slowest {:?} ({})",
                t.runs, t.ok, t.peak_rss_kib, t.slowest, t.slowest_run
            )?;
        }
        Ok(())
    }
}

/// What the runs of one case share.
struct Case<'a> {
    /// The valid image as raw, for `compare`.
    reference: &'a Path,
    /// Where `convert` writes (empty between runs).
    out_dir: &'a Path,
    /// Names the case in failure messages.
    tag: &'a str,
    failures: &'a Mutex<Vec<String>>,
    stats: &'a Mutex<Stats>,
}

/// Runs every command on `sample` (compared with the case's reference, converted into
/// its output folder) and records whatever breaks the property.
fn run_commands(rng: &mut Rng, sample: &Sample, valid: bool, case: &Case<'_>) {
    let Case {
        reference,
        out_dir,
        tag,
        failures,
        stats,
    } = case;
    let watch = Watch {
        address_space: Some(1 << 30),
        timeout: Some(Duration::from_secs(20)),
        ..Watch::default()
    };
    let untrusted = rng.chance(1, 2);
    let name_format = !sample.gz && rng.chance(1, 3);
    let mut out_fmt = *rng.pick(&["raw", "qcow2", "vmdk", "vdi"]);
    if out_fmt == "vmdk" && sample.size > 2 << 40 {
        // A sparse extent holds at most 2 TiB.
        out_fmt = "qcow2";
    }
    let out = out_dir.join(format!("out.{out_fmt}"));
    let img = s(&sample.path);
    let commands: Vec<(&str, Vec<&str>)> = vec![
        ("info", vec!["info", "--output=json"]),
        ("map", vec!["map", "--output=json"]),
        ("check", vec!["check"]),
        ("compare", vec!["compare"]),
        ("convert", vec!["convert", "-O", out_fmt]),
        ("measure", vec!["measure", "-O", "qcow2"]),
        ("resize", vec!["resize", "-q"]),
    ];
    // resize works on a copy.
    let copy = out_dir.join(format!(
        "resized-{}",
        sample.path.file_name().unwrap().to_string_lossy()
    ));
    let grow = *rng.pick(&["+1M", "+1G", "+3"]);
    for (cmd, mut args) in commands {
        if untrusted {
            args.push("--untrusted");
        }
        if name_format && cmd != "compare" {
            args.extend(["-f", sample.format]);
        }
        match cmd {
            "compare" => args.extend([img, s(reference)]),
            "convert" => args.extend([img, s(&out)]),
            "resize" => {
                std::fs::copy(&sample.path, &copy).unwrap();
                args.extend([s(&copy), grow]);
            }
            _ => args.push(img),
        }
        let mut w: Watched = watch.run(&args);
        if w.elapsed >= TIME_LIMIT && !w.timed_out {
            // Once more, in case the machine was busy.
            w = watch.run(&args);
        }
        let what = format!("{}: {}", sample.what, args.join(" "));
        stats.lock().unwrap().add(cmd, valid, &w, &what);
        let mut problems = Vec::new();
        if w.timed_out || w.elapsed >= TIME_LIMIT {
            problems.push(format!("took {:?}", w.elapsed));
        }
        if let Some(sig) = w.signal {
            problems.push(format!("killed by signal {sig}"));
        }
        if w.stderr.contains("panicked") {
            problems.push("panicked".to_string());
        }
        if let Some(code) = w.code {
            if !allowed_codes(cmd).contains(&code) {
                problems.push(format!("exit code {code}"));
            }
            let error = match cmd {
                // (Or a complete report counting internal errors, as qemu-img gives.)
                "check" => code == 1 && !w.stdout.contains("internal errors"),
                "compare" => code >= 2,
                _ => code != 0,
            };
            // (check lists the problems it found before its final message.)
            if error && !w.stderr.lines().any(|l| l.starts_with("imgconv: ")) {
                problems.push("an error without an imgconv: message".to_string());
            }
            // A valid image is read without error (but an untrusted run refuses
            // references, and checks of raw or gzip-wrapped images are not done).
            // resize changes raw and qcow2 images only, and refuses qcow2 images with
            // snapshots or a size in bytes (as qemu-img does, mostly): only raw must work.
            let refused =
                untrusted && sample.references || cmd == "resize" && sample.format != "raw";
            if valid
                && !refused
                && !match cmd {
                    "check" => Some(code) == qemu_check_code(&sample.path),
                    _ => code == 0,
                }
            {
                problems.push(format!("valid image: exit code {code}"));
            }
            // A valid qcow2 resized is still clean for qemu-img.
            if valid && cmd == "resize" && code == 0 && sample.format == "qcow2" {
                let before = qemu_check_code(&sample.path);
                let after = qemu_check_code(&copy);
                if after != before {
                    problems.push(format!(
                        "qemu-img check: {before:?} before, {after:?} after"
                    ));
                }
            }
        }
        if w.max_rss_kib >= RSS_BUDGET_KIB {
            problems.push(format!("peak memory {} KiB", w.max_rss_kib));
        }
        if cmd == "resize" {
            let _ = std::fs::remove_file(&copy);
        }
        if cmd == "convert" {
            let left: Vec<_> = std::fs::read_dir(out_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            if w.code != Some(0) && !left.is_empty() {
                problems.push(format!("failed convert left {left:?}"));
            }
            for f in left {
                let _ = std::fs::remove_file(out_dir.join(f));
            }
        }
        if !problems.is_empty() {
            failures.lock().unwrap().push(format!(
                "{tag}: {} ({}): imgconv {}: {}; stderr: {}",
                if valid { "valid" } else { "mutant" },
                sample.what,
                args.join(" "),
                problems.join(", "),
                w.stderr.chars().take(300).collect::<String>()
            ));
        }
    }
}

/// The seed of a run that names none: CI replays the same cases every time.
const DEFAULT_SEED: u64 = 1_796_064_096_852_932_091;

#[test]
fn random_and_mutated_images_end_fast_in_bounded_memory() {
    let seed = std::env::var("IMGCONV_PROP_SEED")
        .ok()
        .and_then(|s| {
            if s == "random" {
                Some(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_nanos() as u64,
                )
            } else {
                s.parse().ok()
            }
        })
        // A fixed default keeps CI reproducible; `IMGCONV_PROP_SEED=random` explores.
        .unwrap_or(DEFAULT_SEED);
    let per_format: usize = std::env::var("IMGCONV_PROP_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    // One case only (its number from a failure message), to replay it.
    let only: Option<usize> = std::env::var("IMGCONV_PROP_CASE")
        .ok()
        .and_then(|s| s.parse().ok());
    eprintln!("IMGCONV_PROP_SEED={seed} IMGCONV_PROP_CASES={per_format}");
    let kinds = [Kind::Raw, Kind::Qcow2, Kind::Vmdk, Kind::Vdi];
    let cases = per_format * kinds.len();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let stats = Mutex::new(Stats::default());
    let root = scratch();
    let root = if std::env::var_os("IMGCONV_PROP_KEEP").is_some() {
        eprintln!("kept in {}", root.path().display());
        root.keep()
    } else {
        root.path().to_path_buf()
    };
    // Two at a time: the machine is small and shared.
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| loop {
                let case = next.fetch_add(1, Ordering::SeqCst);
                if case >= cases {
                    break;
                }
                if only.is_some_and(|o| o != case) {
                    continue;
                }
                let kind = kinds[case % kinds.len()];
                let mut rng =
                    Rng::new(seed ^ (case as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let dir = root.join(format!("case{case}"));
                let out_dir = dir.join("out");
                std::fs::create_dir_all(&out_dir).unwrap();
                let tag = format!("seed {seed} case {case}");
                let valid = valid_image(&mut rng, kind, &dir);
                // The reference for compare: the valid image as raw.
                let reference = dir.join("reference.raw");
                qemu_convert("raw", "", &valid.path, &reference);
                let shared = Case {
                    reference: &reference,
                    out_dir: &out_dir,
                    tag: &tag,
                    failures: &failures,
                    stats: &stats,
                };
                run_commands(&mut rng, &valid, true, &shared);
                for n in 0..2 {
                    let m = mutant(&mut rng, kind, &valid, n);
                    run_commands(&mut rng, &m, false, &shared);
                }
                if std::env::var_os("IMGCONV_PROP_KEEP").is_none() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            });
        }
    });
    eprint!("{}", stats.into_inner().unwrap());
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures (replay with IMGCONV_PROP_SEED={seed} IMGCONV_PROP_CASES={per_format}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

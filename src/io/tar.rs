//! tar archives holding one disk image (GCP's `disk.raw` in a `.tar.gz`, container
//! layers with `disk/NAME.img`, OVA packages).
//!
//! Only what is needed to find a member's bytes is parsed: 512-byte ustar / GNU headers
//! (octal or base-256 sizes, the ustar name prefix), GNU long names (`L`) and pax
//! extended headers (`x`, for `path` and `size`). A member's data is one contiguous byte
//! range of the (decompressed) archive, so an uncompressed tar file is opened as a
//! window over the file, without copying. GNU sparse members (`S`) are refused.

use std::io::Read;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::compressed::from_io;
use crate::io::Storage;
use crate::limits::{
    MAX_TAR_META_BYTES, MAX_TAR_NAMES_LISTED, MAX_TAR_NAME_SHOWN, MAX_TAR_SPARSE_ENTRIES,
};

const F: &str = "tar";

/// The size of a header and the unit of data padding.
pub const BLOCK: u64 = 512;

/// What a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (`0`, NUL, or contiguous `7`).
    Regular,
    /// A GNU sparse file (`S`): its data is not one byte range.
    Sparse,
    /// Directories, links, devices: not images.
    Other,
}

/// One 512-byte tar header as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `name`, with the ustar `prefix` joined in front when present.
    pub name: String,
    /// The size field (octal, or base-256 for large GNU members).
    pub size: u64,
    /// The type flag byte.
    pub typeflag: u8,
    /// Old GNU sparse headers (`S`): the map entries in the header.
    pub sparse: Vec<(u64, u64)>,
    /// Old GNU sparse headers: the map goes on in extension blocks.
    pub sparse_extended: bool,
    /// Old GNU sparse headers: the unpacked file size.
    pub real_size: u64,
}

/// Parses `count` old-GNU sparse map entries (12-byte offset, 12-byte length) from
/// `area`, stopping at the first empty one.
fn sparse_entries(area: &[u8], count: usize, at: u64) -> Result<Vec<(u64, u64)>> {
    let mut v = Vec::new();
    for i in 0..count {
        let e = &area[i * 24..i * 24 + 24];
        if e[0] == 0 {
            break;
        }
        let bad = || Error::corrupt(F, "sparse map", at + (i * 24) as u64, "not a number");
        let off = parse_number(&e[..12]).ok_or_else(bad)?;
        let len = parse_number(&e[12..]).ok_or_else(bad)?;
        v.push((off, len));
    }
    Ok(v)
}

/// Parses an octal (NUL/space terminated) or GNU base-256 numeric field.
pub fn parse_number(field: &[u8]) -> Option<u64> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            // Base-256: the remaining bits, big-endian; negative values are refused.
            if first & 0x40 != 0 {
                return None;
            }
            let mut v = u64::from(first & 0x3f);
            for &b in &field[1..] {
                v = v.checked_mul(256)?.checked_add(u64::from(b))?;
            }
            return Some(v);
        }
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let mut v = 0u64;
    for b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

impl Header {
    /// Parses the header block at archive offset `offset`. `Ok(None)` for an all-zero
    /// block (end of archive).
    pub fn parse(block: &[u8; 512], offset: u64) -> Result<Option<Header>> {
        if block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let stored = parse_number(&block[148..156]).ok_or_else(|| {
            Error::corrupt(F, "header checksum", offset + 148, "not an octal number")
        })?;
        let sum: u64 = block
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        if sum != stored {
            return Err(Error::corrupt(
                F,
                "header",
                offset,
                format!("checksum {stored} does not match the header's bytes ({sum})"),
            ));
        }
        let size = parse_number(&block[124..136])
            .ok_or_else(|| Error::corrupt(F, "header size field", offset + 124, "not a number"))?;
        let mut name = cstr(&block[0..100]);
        // POSIX ustar ("ustar\0") has a name prefix; GNU ("ustar  ") uses those bytes
        // for other fields.
        if &block[257..263] == b"ustar\0" {
            let prefix = cstr(&block[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let typeflag = block[156];
        let (sparse, sparse_extended, real_size) = if typeflag == b'S' {
            let real = parse_number(&block[483..495])
                .ok_or_else(|| Error::corrupt(F, "sparse header", offset + 483, "bad real size"))?;
            (
                sparse_entries(&block[386..482], 4, offset + 386)?,
                block[482] != 0,
                real,
            )
        } else {
            (Vec::new(), false, size)
        };
        Ok(Some(Header {
            name,
            size,
            typeflag,
            sparse,
            sparse_extended,
            real_size,
        }))
    }
}

/// What imgconv uses from pax extended header records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pax {
    /// `path`.
    pub path: Option<String>,
    /// `size`.
    pub size: Option<u64>,
    /// `GNU.sparse.major` / `GNU.sparse.minor`: the GNU sparse format version.
    pub sparse_version: Option<(u64, u64)>,
    /// `GNU.sparse.name`: the real name of a sparse member.
    pub sparse_name: Option<String>,
    /// `GNU.sparse.realsize` (or `GNU.sparse.size`): the unpacked size.
    pub sparse_realsize: Option<u64>,
}

/// Parses pax extended header records (`LEN key=value\n`).
pub fn parse_pax(data: &[u8], offset: u64) -> Result<Pax> {
    let bad = |why: &str| Error::corrupt(F, "pax header", offset, why.to_string());
    let mut pax = Pax::default();
    let num = |v: &[u8]| -> Result<u64> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::corrupt(F, "pax header", offset, "bad number"))
    };
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("record without length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad record length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("record length does not fit the data"));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("record without '='"))?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        let text = || String::from_utf8_lossy(value).into_owned();
        match key {
            b"path" => pax.path = Some(text()),
            b"size" => pax.size = Some(num(value)?),
            b"GNU.sparse.major" => {
                let minor = pax.sparse_version.map_or(0, |v| v.1);
                pax.sparse_version = Some((num(value)?, minor));
            }
            b"GNU.sparse.minor" => {
                let major = pax.sparse_version.map_or(0, |v| v.0);
                pax.sparse_version = Some((major, num(value)?));
            }
            b"GNU.sparse.name" => pax.sparse_name = Some(text()),
            b"GNU.sparse.realsize" | b"GNU.sparse.size" => pax.sparse_realsize = Some(num(value)?),
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok(pax)
}

/// A member found in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Full name (long names and pax paths applied).
    pub name: String,
    /// Data length.
    pub size: u64,
    /// What it is.
    pub kind: EntryKind,
    /// Offset of its data in the (decompressed) archive.
    pub data_offset: u64,
    /// Size of the file once unpacked (differs from `size` for sparse members).
    pub real_size: u64,
    /// For sparse members: the stored data stretches `(offset in the file, length)`,
    /// ascending; their bytes follow one another in the archive.
    pub sparse: Vec<(u64, u64)>,
}

impl Entry {
    /// True for members that may be the disk image: non-empty regular (or sparse) files,
    /// except OVA descriptors / manifests / certificates and macOS `._` resource files.
    pub fn is_candidate(&self) -> bool {
        if self.kind == EntryKind::Other || self.real_size == 0 {
            return false;
        }
        let lower = self.name.to_ascii_lowercase();
        let base = lower.rsplit('/').next().unwrap_or(&lower);
        !(base.starts_with("._")
            || base.ends_with(".ovf")
            || base.ends_with(".mf")
            || base.ends_with(".cert"))
    }

    /// True when `wanted` (as the user typed it) names this member; a leading `./` or
    /// `/` on either side does not matter.
    pub fn matches(&self, wanted: &str) -> bool {
        fn norm(s: &str) -> &str {
            s.trim_start_matches("./").trim_start_matches('/')
        }
        norm(&self.name) == norm(wanted)
    }
}

/// The archive's bytes, read forwards.
pub trait TarInput {
    /// Reads exactly `buf.len()` bytes; `Ok(false)` at a clean end of input before
    /// the first byte.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<bool>;
    /// Skips `n` bytes.
    fn skip(&mut self, n: u64) -> Result<()>;
    /// Current offset.
    fn pos(&self) -> u64;
}

/// A stream (pipe or decompressor) as tar input.
pub struct StreamInput<'a> {
    /// The stream.
    pub reader: &'a mut dyn Read,
    /// Bytes consumed so far.
    pub pos: u64,
}

impl TarInput for StreamInput<'_> {
    fn read_full(&mut self, buf: &mut [u8]) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.reader.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(from_io(e)),
            }
        }
        self.pos += got as u64;
        if got == 0 {
            return Ok(false);
        }
        if got < buf.len() {
            return Err(Error::corrupt(
                F,
                "archive",
                self.pos,
                "the archive ends inside a header or member",
            ));
        }
        Ok(true)
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        let copied = std::io::copy(&mut (&mut *self.reader).take(n), &mut std::io::sink())
            .map_err(from_io)?;
        self.pos += copied;
        if copied < n {
            return Err(Error::corrupt(
                F,
                "member data",
                self.pos,
                "the archive ends inside a member",
            ));
        }
        Ok(())
    }

    fn pos(&self) -> u64 {
        self.pos
    }
}

/// A random-access storage (an uncompressed tar file) as tar input: skipping is free.
pub struct StorageInput<'a> {
    /// The archive.
    pub storage: &'a dyn Storage,
    /// Current offset.
    pub pos: u64,
}

impl TarInput for StorageInput<'_> {
    fn read_full(&mut self, buf: &mut [u8]) -> Result<bool> {
        if self.pos >= self.storage.len() {
            return Ok(false);
        }
        crate::io::read_struct(self.storage, buf, self.pos, F, "header")?;
        self.pos += buf.len() as u64;
        Ok(true)
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.storage.len());
        match end {
            Some(e) => {
                self.pos = e;
                Ok(())
            }
            None => Err(Error::corrupt(
                F,
                "member data",
                self.pos,
                "the member runs past the end of the file",
            )),
        }
    }

    fn pos(&self) -> u64 {
        self.pos
    }
}

fn padded(n: u64) -> Option<u64> {
    n.checked_add(BLOCK - 1).map(|v| v & !(BLOCK - 1))
}

/// Reads the next member header (applying long-name and pax headers). The input is
/// left at the start of the member's data; `Ok(None)` at the end of the archive.
pub fn next_entry(input: &mut dyn TarInput) -> Result<Option<Entry>> {
    let mut long_name: Option<String> = None;
    let mut pax = Pax::default();
    loop {
        let at = input.pos();
        let mut block = [0u8; 512];
        if !input.read_full(&mut block)? {
            return Ok(None);
        }
        let Some(h) = Header::parse(&block, at)? else {
            return Ok(None);
        };
        let data_len = padded(h.size)
            .ok_or_else(|| Error::corrupt(F, "header size field", at + 124, "size overflows"))?;
        match h.typeflag {
            b'L' | b'x' => {
                if h.size > MAX_TAR_META_BYTES {
                    return Err(Error::TooLarge {
                        format: F,
                        structure: if h.typeflag == b'L' {
                            "GNU long name"
                        } else {
                            "pax header"
                        },
                        size: h.size,
                        limit: MAX_TAR_META_BYTES,
                    });
                }
                let mut data = vec![0u8; data_len as usize];
                if !input.read_full(&mut data)? {
                    return Err(Error::corrupt(
                        F,
                        "archive",
                        input.pos(),
                        "the archive ends after an extended header",
                    ));
                }
                data.truncate(h.size as usize);
                if h.typeflag == b'L' {
                    long_name = Some(cstr(&data));
                } else {
                    pax = parse_pax(&data, at + BLOCK)?;
                }
            }
            b'K' | b'g' => input.skip(data_len)?,
            t => {
                let mut kind = match t {
                    b'0' | 0 | b'7' => EntryKind::Regular,
                    b'S' => EntryKind::Sparse,
                    _ => EntryKind::Other,
                };
                let mut name = pax.path.clone().or(long_name).unwrap_or(h.name.clone());
                // Links carry no data even when a size is written.
                let mut size = if matches!(t, b'1' | b'2') {
                    0
                } else {
                    pax.size.unwrap_or(h.size)
                };
                let mut real_size = size;
                let mut sparse = Vec::new();
                if t == b'S' {
                    sparse = h.sparse.clone();
                    let mut more = h.sparse_extended;
                    while more {
                        let ext_at = input.pos();
                        let mut ext = [0u8; 512];
                        if !input.read_full(&mut ext)? {
                            return Err(Error::corrupt(
                                F,
                                "sparse map",
                                ext_at,
                                "the archive ends inside it",
                            ));
                        }
                        sparse.extend(sparse_entries(&ext[..504], 21, ext_at)?);
                        if sparse.len() > MAX_TAR_SPARSE_ENTRIES {
                            return Err(Error::TooLarge {
                                format: F,
                                structure: "sparse map",
                                size: sparse.len() as u64,
                                limit: MAX_TAR_SPARSE_ENTRIES as u64,
                            });
                        }
                        more = ext[504] != 0;
                    }
                    real_size = h.real_size;
                } else if kind == EntryKind::Regular && pax.sparse_version == Some((1, 0)) {
                    // POSIX sparse 1.0: the map is text at the start of the data.
                    let map_at = input.pos();
                    let (map, used) = read_sparse_map_1_0(input, size, map_at)?;
                    sparse = map;
                    size -= used;
                    kind = EntryKind::Sparse;
                    real_size = pax.sparse_realsize.ok_or_else(|| {
                        Error::corrupt(
                            F,
                            "pax header",
                            at,
                            "sparse member without GNU.sparse.realsize",
                        )
                    })?;
                    if let Some(n) = &pax.sparse_name {
                        name = n.clone();
                    }
                } else if pax.sparse_version.is_some() || pax.sparse_realsize.is_some() {
                    return Err(Error::unsupported(
                        F,
                        format!("GNU sparse format {:?} of member '{name}' (only old GNU and 1.0 are read)", pax.sparse_version),
                    ));
                }
                let e = Entry {
                    name,
                    size,
                    kind,
                    data_offset: input.pos(),
                    real_size,
                    sparse,
                };
                if e.kind == EntryKind::Sparse {
                    check_sparse_map(&e)?;
                }
                return Ok(Some(e));
            }
        }
    }
}

/// Reads the text sparse map of a POSIX 1.0 sparse member (`N\n` then `offset\n
/// length\n` N times, padded to a block). Returns the map and the bytes it took.
fn read_sparse_map_1_0(
    input: &mut dyn TarInput,
    size: u64,
    at: u64,
) -> Result<(Vec<(u64, u64)>, u64)> {
    let bad = |why: &str| Error::corrupt(F, "sparse map", at, why.to_string());
    let mut numbers: Vec<u64> = Vec::new();
    let mut used = 0u64;
    let mut want: Option<usize> = None;
    let mut cur = String::new();
    loop {
        if want.is_some_and(|w| numbers.len() == 1 + 2 * w) {
            break;
        }
        if used + BLOCK > size.max(BLOCK) || used >= MAX_TAR_META_BYTES {
            return Err(bad("the map does not end inside the member"));
        }
        let mut block = [0u8; 512];
        if !input.read_full(&mut block)? {
            return Err(bad("the archive ends inside it"));
        }
        used += BLOCK;
        for &b in block.iter() {
            if want.is_some_and(|w| numbers.len() == 1 + 2 * w) {
                break;
            }
            if b == b'\n' {
                numbers.push(cur.parse().map_err(|_| bad("not a decimal number"))?);
                cur.clear();
                if numbers.len() == 1 {
                    let n = numbers[0];
                    if n > MAX_TAR_SPARSE_ENTRIES as u64 {
                        return Err(bad("too many entries"));
                    }
                    want = Some(n as usize);
                }
            } else if b.is_ascii_digit() && cur.len() < 20 {
                cur.push(b as char);
            } else {
                return Err(bad("unexpected byte"));
            }
        }
    }
    let map = numbers[1..].chunks(2).map(|c| (c[0], c[1])).collect();
    Ok((map, used.min(size)))
}

/// Checks a sparse map: ascending, inside the file, and adding up to the stored data.
fn check_sparse_map(e: &Entry) -> Result<()> {
    let bad = |why: String| {
        Error::corrupt(
            F,
            "sparse map",
            e.data_offset,
            format!("member '{}': {why}", e.name),
        )
    };
    let mut end = 0u64;
    let mut stored = 0u64;
    for &(off, len) in &e.sparse {
        if off < end {
            return Err(bad(format!("stretch at {off} overlaps the previous one")));
        }
        end = off
            .checked_add(len)
            .filter(|&x| x <= e.real_size)
            .ok_or_else(|| {
                bad(format!(
                    "stretch {off}+{len} runs past the file size {}",
                    e.real_size
                ))
            })?;
        stored += len;
    }
    if stored != e.size {
        return Err(bad(format!(
            "the map holds {stored} bytes but the member stores {}",
            e.size
        )));
    }
    Ok(())
}

/// Skips the data (and padding) of `entry`, of which `consumed` bytes were read already.
pub fn skip_data(input: &mut dyn TarInput, entry: &Entry, consumed: u64) -> Result<()> {
    let total = padded(entry.size)
        .ok_or_else(|| Error::corrupt(F, "member", entry.data_offset, "size overflows"))?;
    input.skip(total - consumed.min(total))
}

/// Names of members, for messages: the first [`MAX_TAR_NAMES_LISTED`] (each cut at
/// [`MAX_TAR_NAME_SHOWN`] bytes) and how many there were, so that an archive of a
/// million members with 1 MiB names costs no more memory than one of three.
#[derive(Debug, Clone, Default)]
pub struct NameList {
    names: Vec<String>,
    total: u64,
}

impl NameList {
    /// Notes one more name.
    pub fn push(&mut self, name: &str) {
        self.total += 1;
        if self.names.len() < MAX_TAR_NAMES_LISTED {
            let mut end = name.len().min(MAX_TAR_NAME_SHOWN);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            let mut shown = name[..end].to_string();
            if end < name.len() {
                shown.push('…');
            }
            self.names.push(shown);
        }
    }

    /// How many names were noted.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// True when none was noted.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

impl std::fmt::Display for NameList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.names.join(", "))?;
        let more = self.total - self.names.len() as u64;
        if more > 0 {
            write!(f, " and {more} more")?;
        }
        Ok(())
    }
}

/// The error for an archive with several candidate images and no `--member`.
pub fn ambiguous(names: &NameList) -> Error {
    Error::Format(format!(
        "tar archive holds several disk images: {names}; choose one with --member NAME"
    ))
}

/// Reads members until the one to open — the one named `wanted`, else the first
/// candidate image — and returns it with `input` at the start of its data. Members
/// passed over are skipped as they come; only a bounded list of their names is kept
/// (for the error when nothing is found).
pub fn find_member(input: &mut dyn TarInput, wanted: Option<&str>) -> Result<Entry> {
    let mut seen = NameList::default();
    loop {
        let Some(e) = next_entry(input)? else {
            return Err(match wanted {
                Some(w) => {
                    Error::invalid(format!("tar archive has no member '{w}' (members: {seen})"))
                }
                None => Error::Format(
                    "tar archive holds no disk image (no non-empty regular file)".into(),
                ),
            });
        };
        let hit = match wanted {
            Some(w) => e.matches(w),
            None => e.is_candidate(),
        };
        if hit {
            check_usable(&e)?;
            return Ok(e);
        }
        seen.push(&e.name);
        skip_data(input, &e, 0)?;
    }
}

/// Reads the rest of an archive after the member `chosen` (`input` past its data): every
/// header must be sound, and when no member was named (`named` false) another candidate
/// image is an error naming them (bounded).
pub fn check_rest(input: &mut dyn TarInput, chosen: &Entry, named: bool) -> Result<()> {
    let mut all = NameList::default();
    all.push(&chosen.name);
    while let Some(e) = next_entry(input)? {
        if !named && e.is_candidate() {
            all.push(&e.name);
        }
        skip_data(input, &e, 0)?;
    }
    if all.len() > 1 {
        return Err(ambiguous(&all));
    }
    Ok(())
}

/// Refuses members whose data is not one byte range.
pub fn check_usable(e: &Entry) -> Result<()> {
    match e.kind {
        EntryKind::Regular | EntryKind::Sparse => Ok(()),
        EntryKind::Other => Err(Error::invalid(format!(
            "tar member '{}' is not a regular file",
            e.name
        ))),
    }
}

/// A byte range of another storage: a tar member, read in place.
pub struct Window {
    inner: Arc<dyn Storage>,
    start: u64,
    len: u64,
}

impl Window {
    /// The bytes `[start, start + len)` of `inner` (checked against its length).
    pub fn new(inner: Arc<dyn Storage>, start: u64, len: u64) -> Result<Self> {
        if start.checked_add(len).is_none_or(|e| e > inner.len()) {
            return Err(Error::corrupt(
                F,
                "member",
                start,
                format!("{len} bytes of data run past the end of the file"),
            ));
        }
        Ok(Window { inner, start, len })
    }
}

impl Storage for Window {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the tar member",
            ));
        }
        self.inner.read_exact_at(buf, self.start + offset)
    }

    fn segment(&self, offset: u64) -> Option<(bool, u64)> {
        if offset >= self.len {
            return None;
        }
        let (data, end) = self.inner.segment(self.start + offset)?;
        Some((data, (end - self.start).clamp(offset + 1, self.len)))
    }

    fn path(&self) -> Option<&std::path::Path> {
        self.inner.path()
    }

    fn allocated_bytes(&self) -> u64 {
        self.len.min(self.inner.allocated_bytes())
    }
}

/// A sparse member of an uncompressed tar file, read in place: the stored stretches
/// where the map puts them, holes elsewhere.
pub struct SparseWindow {
    inner: Arc<dyn Storage>,
    /// `(file offset, length, archive offset)`, ascending.
    map: Vec<(u64, u64, u64)>,
    len: u64,
}

impl SparseWindow {
    /// The sparse member `e` of `inner` (its map checked when it was read).
    pub fn new(inner: Arc<dyn Storage>, e: &Entry) -> Result<Self> {
        if e.data_offset
            .checked_add(e.size)
            .is_none_or(|end| end > inner.len())
        {
            return Err(Error::corrupt(
                F,
                "member",
                e.data_offset,
                "the member runs past the end of the file",
            ));
        }
        let mut at = e.data_offset;
        let map = e
            .sparse
            .iter()
            .filter(|s| s.1 > 0)
            .map(|&(off, len)| {
                let m = (off, len, at);
                at += len;
                m
            })
            .collect();
        Ok(SparseWindow {
            inner,
            map,
            len: e.real_size,
        })
    }

    /// Index of the first stretch that ends after `offset`.
    fn first_after(&self, offset: u64) -> usize {
        self.map.partition_point(|&(o, l, _)| o + l <= offset)
    }
}

impl Storage for SparseWindow {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "read past the end of the tar member",
                )
            })?;
        buf.fill(0);
        for &(o, l, at) in &self.map[self.first_after(offset)..] {
            if o >= end {
                break;
            }
            let (s, e) = (o.max(offset), (o + l).min(end));
            self.inner.read_exact_at(
                &mut buf[(s - offset) as usize..(e - offset) as usize],
                at + (s - o),
            )?;
        }
        Ok(())
    }

    fn segment(&self, offset: u64) -> Option<(bool, u64)> {
        if offset >= self.len {
            return None;
        }
        match self.map.get(self.first_after(offset)) {
            Some(&(o, l, _)) if o <= offset => Some((true, o + l)),
            Some(&(o, _, _)) => Some((false, o)),
            None => Some((false, self.len)),
        }
    }

    fn path(&self) -> Option<&std::path::Path> {
        self.inner.path()
    }

    fn allocated_bytes(&self) -> u64 {
        self.map.iter().map(|m| m.1).sum()
    }
}

/// Expands a sparse member's stored bytes (read from `inner`) into the whole file:
/// zeros in the holes. After the last byte it reads `inner` once more, which must be at
/// its end (this lets the tar layer check the rest of the archive).
pub struct SparseExpand<R> {
    inner: R,
    map: Vec<(u64, u64)>,
    idx: usize,
    pos: u64,
    len: u64,
}

impl<R: Read> SparseExpand<R> {
    /// The expansion of sparse member `e`, whose stored data `inner` yields.
    pub fn new(inner: R, e: &Entry) -> Self {
        SparseExpand {
            inner,
            map: e.sparse.iter().copied().filter(|s| s.1 > 0).collect(),
            idx: 0,
            pos: 0,
            len: e.real_size,
        }
    }
}

impl<R: Read> Read for SparseExpand<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.len {
            let mut one = [0u8; 1];
            return match self.inner.read(&mut one)? {
                0 => Ok(0),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "sparse tar member stores more data than its map lists",
                )),
            };
        }
        let (hole_end, data_end) = match self.map.get(self.idx) {
            Some(&(o, l)) if o <= self.pos => (self.pos, o + l),
            Some(&(o, _)) => (o, o),
            None => (self.len, self.len),
        };
        if hole_end > self.pos {
            let n = (hole_end - self.pos).min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            self.pos += n as u64;
            return Ok(n);
        }
        let n = (data_end - self.pos).min(buf.len() as u64) as usize;
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "sparse tar member ends before its map does",
            ));
        }
        self.pos += got as u64;
        if self.pos == data_end {
            self.idx += 1;
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStorage;

    fn header(name: &str, size: u64, typeflag: u8, gnu: bool) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..name.len()].copy_from_slice(name.as_bytes());
        b[100..108].copy_from_slice(b"0000644\0");
        b[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        b[156] = typeflag;
        if gnu {
            b[257..265].copy_from_slice(b"ustar  \0");
        } else {
            b[257..263].copy_from_slice(b"ustar\0");
            b[263..265].copy_from_slice(b"00");
        }
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        b
    }

    /// Every member of an archive, for the tests.
    fn list(input: &mut dyn TarInput) -> Result<Vec<Entry>> {
        let mut all = Vec::new();
        while let Some(e) = next_entry(input)? {
            skip_data(input, &e, 0)?;
            all.push(e);
        }
        Ok(all)
    }

    /// The member an uncompressed archive in memory opens as (`wanted`, else the only
    /// candidate).
    fn choose(s: &MemStorage, wanted: Option<&str>) -> Result<Entry> {
        let mut input = StorageInput { storage: s, pos: 0 };
        let e = find_member(&mut input, wanted)?;
        if wanted.is_none() {
            skip_data(&mut input, &e, 0)?;
            check_rest(&mut input, &e, false)?;
        }
        Ok(e)
    }

    fn member(out: &mut Vec<u8>, name: &str, data: &[u8], typeflag: u8) {
        out.extend_from_slice(&header(name, data.len() as u64, typeflag, true));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"00000001750\0"), Some(1000));
        assert_eq!(parse_number(b"  1750 \0"), Some(1000));
        assert_eq!(
            parse_number(&[0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]),
            Some(1 << 33)
        );
        assert_eq!(parse_number(b"0009"), None);
        assert_eq!(parse_number(&[0xff; 12]), None);
    }

    #[test]
    fn lists_long_names_and_pax() {
        let mut t = Vec::new();
        let long = "d/".repeat(80) + "disk.img";
        member(
            &mut t,
            "././@LongLink",
            format!("{long}\0").as_bytes(),
            b'L',
        );
        member(&mut t, "short", b"abc", b'0');
        let pax = "21 path=disk/pax.img\n";
        let rec = format!("{} size=5\n", "size=5".len() + 4);
        member(
            &mut t,
            "PaxHeaders/x",
            format!("{pax}{rec}").as_bytes(),
            b'x',
        );
        member(&mut t, "ignored", b"hello", b'0');
        member(&mut t, "disk/", b"", b'5');
        member(&mut t, "vm.ovf", b"<xml/>", b'0');
        t.extend_from_slice(&[0u8; 1024]);
        let s = MemStorage::new(t);
        let all = list(&mut StorageInput {
            storage: &s,
            pos: 0,
        })
        .unwrap();
        let names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, [long.as_str(), "disk/pax.img", "disk/", "vm.ovf"]);
        assert_eq!(all[1].size, 5);
        assert_eq!(all[0].data_offset, 3 * 512);
        let err = choose(&s, None).unwrap_err().to_string();
        assert!(
            err.contains("disk/pax.img") && err.contains("--member"),
            "{err}"
        );
        assert_eq!(
            choose(&s, Some("./disk/pax.img")).unwrap().name,
            "disk/pax.img"
        );
        assert!(choose(&s, Some("nope")).is_err());
    }

    /// Thousands of members with long names: the error lists a few, cut short, and
    /// counts the rest.
    #[test]
    fn names_in_messages_are_bounded() {
        let mut t = Vec::new();
        for i in 0..3000 {
            let long = format!("{i:04}-{}", "n".repeat(5000));
            member(
                &mut t,
                "././@LongLink",
                format!("{long}\0").as_bytes(),
                b'L',
            );
            member(&mut t, "x", b"", b'0');
        }
        t.extend_from_slice(&[0u8; 1024]);
        let s = MemStorage::new(t);
        let err = choose(&s, Some("absent")).unwrap_err().to_string();
        assert!(err.len() < 8 * 1024, "{} bytes", err.len());
        assert!(
            err.contains("0000-nnn") && err.contains("and 2984 more"),
            "{err}"
        );
        let mut n = NameList::default();
        n.push("é".repeat(200).as_str());
        assert!(n.to_string().ends_with('…'));
    }

    fn fix_checksum(b: &mut [u8; 512]) {
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    /// An old-GNU sparse member: `map` of (offset, len) in a file of `real` bytes.
    fn sparse_member(out: &mut Vec<u8>, name: &str, map: &[(u64, u64)], real: u64, fill: u8) {
        let stored: u64 = map.iter().map(|m| m.1).sum();
        let mut h = header(name, stored, b'S', true);
        for (i, &(o, l)) in map.iter().enumerate() {
            let at = 386 + i * 24;
            h[at..at + 12].copy_from_slice(format!("{o:011o}\0").as_bytes());
            h[at + 12..at + 24].copy_from_slice(format!("{l:011o}\0").as_bytes());
        }
        h[483..495].copy_from_slice(format!("{real:011o}\0").as_bytes());
        fix_checksum(&mut h);
        out.extend_from_slice(&h);
        out.extend(std::iter::repeat_n(fill, stored as usize));
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    #[test]
    fn reads_sparse_members() {
        let map = [(4096u64, 1000u64), (10_000, 24)];
        let mut t = Vec::new();
        sparse_member(&mut t, "disk.raw", &map, 20_000, 7);
        t.extend_from_slice(&[0u8; 1024]);
        let mut expect = vec![0u8; 20_000];
        expect[4096..5096].fill(7);
        expect[10_000..10_024].fill(7);
        let mem = MemStorage::new(t.clone());
        let e = choose(&mem, None).unwrap();
        let s: Arc<dyn Storage> = Arc::new(mem);
        assert_eq!(
            (e.kind, e.size, e.real_size),
            (EntryKind::Sparse, 1024, 20_000)
        );
        let w = SparseWindow::new(s.clone(), &e).unwrap();
        let mut got = vec![1u8; 20_000];
        w.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, expect);
        assert_eq!(w.segment(0), Some((false, 4096)));
        assert_eq!(w.segment(4100), Some((true, 5096)));
        assert_eq!(w.segment(10_024), Some((false, 20_000)));
        // The same from a stream.
        let mut r = std::io::Cursor::new(t);
        let mut input = StreamInput {
            reader: &mut r,
            pos: 0,
        };
        let e = next_entry(&mut input).unwrap().unwrap();
        let stored = (&mut r).take(e.size);
        let mut out = Vec::new();
        SparseExpand::new(stored, &e).read_to_end(&mut out).unwrap();
        assert_eq!(out, expect);
    }

    #[test]
    fn rejects_bad_checksums_and_sparse_maps() {
        let mut h = header("a", 10, b'0', false);
        h[0] = b'b';
        assert!(Header::parse(&h, 0).is_err());
        for (map, real) in [
            (vec![(100u64, 50u64), (120, 10)], 1000u64), // overlapping
            (vec![(900, 200)], 1000),                    // past the end
        ] {
            let mut t = Vec::new();
            sparse_member(&mut t, "disk.raw", &map, real, 1);
            let s = MemStorage::new(t);
            let r = list(&mut StorageInput {
                storage: &s,
                pos: 0,
            });
            assert!(matches!(r, Err(Error::Corrupt { .. })), "{map:?}");
        }
        // Truncated member data.
        let mut t = Vec::new();
        member(&mut t, "disk.raw", &[1u8; 600], b'0');
        t.truncate(700);
        let s = MemStorage::new(t);
        assert!(list(&mut StorageInput {
            storage: &s,
            pos: 0
        })
        .is_err());
    }
}

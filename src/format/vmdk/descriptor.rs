//! The text descriptor: header keys, extent lines and the disk database, parsed from
//! and rendered to text. No I/O here.

use crate::error::{Error, Result};

use super::header::FMT;

/// Access mode of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-write.
    Rw,
    /// Read-only.
    RdOnly,
    /// Not accessible: the data is not available (reads as zeros here).
    NoAccess,
}

impl Access {
    /// The keyword as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Rw => "RW",
            Access::RdOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }
}

/// Type of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// Raw bytes at an offset of a file.
    Flat,
    /// A hosted sparse extent (`KDMV`).
    Sparse,
    /// Reads as zeros; no file.
    Zero,
    /// ESX flat extent (offset 0).
    Vmfs,
    /// ESX sparse (COWD or KDMV) delta extent.
    VmfsSparse,
    /// ESX raw device mapping.
    VmfsRdm,
    /// ESX raw device.
    VmfsRaw,
    /// ESXi seSparse extent.
    SeSparse,
}

impl ExtentType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "FLAT" => ExtentType::Flat,
            "SPARSE" => ExtentType::Sparse,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRAW" => ExtentType::VmfsRaw,
            "SESPARSE" => ExtentType::SeSparse,
            _ => return None,
        })
    }

    /// The keyword as written.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRaw => "VMFSRAW",
            ExtentType::SeSparse => "SESPARSE",
        }
    }
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// RW / RDONLY / NOACCESS.
    pub access: Access,
    /// Size in sectors.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentType,
    /// File name as written (None for ZERO).
    pub filename: Option<String>,
    /// Offset in sectors into the file (FLAT).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// `version=`.
    pub version: u32,
    /// `CID=` (content ID).
    pub cid: u32,
    /// `parentCID=` (`ffffffff` when none).
    pub parent_cid: u32,
    /// `createType=`.
    pub create_type: String,
    /// `parentFileNameHint=`, for delta disks.
    pub parent_hint: Option<String>,
    /// The extent lines, in order.
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` and other keys, in order (unquoted values).
    pub ddb: Vec<(String, String)>,
}

/// `parentCID` value meaning "no parent".
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(v)
}

/// Decodes descriptor bytes: UTF-8, or Latin-1 when that fails (windows-1252 files);
/// stops at the first NUL (embedded descriptors are NUL-padded).
pub fn decode_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let bytes = &bytes[..end];
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| b as char).collect(),
    }
}

/// True when `text` looks like a descriptor: its first non-blank line is the
/// `# Disk DescriptorFile` comment (either spelling) or a `version=` line.
pub fn looks_like_descriptor(text: &[u8]) -> bool {
    let s = decode_text(&text[..text.len().min(1024)]);
    let first = s.lines().map(str::trim).find(|l| !l.is_empty());
    match first {
        Some(l) => {
            let l = l.to_ascii_lowercase().replace(' ', "");
            l.starts_with("#diskdescriptorfile") || l.starts_with("version=")
        }
        None => false,
    }
}

impl Descriptor {
    /// Parses descriptor text. `offset` locates it in its file (for errors).
    pub fn parse(text: &str, offset: u64) -> Result<Self> {
        let mut d = Descriptor {
            version: 1,
            parent_cid: NO_PARENT_CID,
            ..Default::default()
        };
        let mut seen_cid = false;
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| {
                Error::corrupt(
                    FMT,
                    "descriptor",
                    offset,
                    format!("line {}: {reason}", n + 1),
                )
            };
            let first = line.split_whitespace().next().unwrap_or("");
            let access = match first.to_ascii_uppercase().as_str() {
                "RW" => Some(Access::Rw),
                "RDONLY" => Some(Access::RdOnly),
                "NOACCESS" => Some(Access::NoAccess),
                _ => None,
            };
            if let (Some(access), false) = (access, line.contains('=')) {
                if d.extents.len() >= crate::limits::MAX_VMDK_EXTENTS {
                    return Err(Error::TooLarge {
                        format: FMT,
                        structure: "extent list",
                        size: d.extents.len() as u64 + 1,
                        limit: crate::limits::MAX_VMDK_EXTENTS as u64,
                    });
                }
                d.extents
                    .push(parse_extent_line(access, line).map_err(bad)?);
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                // Other tools' lines this reader has no use for are skipped, as VMware
                // and QEMU do; extent lines were handled above and fail loudly.
                continue;
            };
            let (k, v) = (k.trim(), unquote(v));
            match k.to_ascii_lowercase().as_str() {
                "version" => {
                    d.version = v.parse().map_err(|_| bad(format!("bad version {v:?}")))?
                }
                "cid" => {
                    d.cid =
                        u32::from_str_radix(v, 16).map_err(|_| bad(format!("bad CID {v:?}")))?;
                    seen_cid = true;
                }
                "parentcid" => {
                    d.parent_cid = u32::from_str_radix(v, 16)
                        .map_err(|_| bad(format!("bad parentCID {v:?}")))?
                }
                "createtype" => d.create_type = v.to_string(),
                "parentfilenamehint" => d.parent_hint = Some(v.to_string()),
                _ => d.ddb.push((k.to_string(), v.to_string())),
            }
        }
        if !seen_cid && d.extents.is_empty() && d.create_type.is_empty() {
            return Err(Error::corrupt(
                FMT,
                "descriptor",
                offset,
                "no CID, createType or extent lines",
            ));
        }
        Ok(d)
    }

    /// The value of a `ddb.*` (or other) key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Total size of the extents, in sectors.
    pub fn total_sectors(&self) -> Option<u64> {
        self.extents
            .iter()
            .try_fold(0u64, |a, e| a.checked_add(e.sectors))
    }

    /// Renders the descriptor in the layout VMware and QEMU write.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s += "# Disk DescriptorFile\n";
        s += &format!("version={}\n", self.version);
        s += &format!("CID={:08x}\n", self.cid);
        s += &format!("parentCID={:08x}\n", self.parent_cid);
        s += &format!("createType=\"{}\"\n", self.create_type);
        if let Some(p) = &self.parent_hint {
            s += &format!("parentFileNameHint=\"{p}\"\n");
        }
        s += "\n# Extent description\n";
        for e in &self.extents {
            s += &format!("{} {} {}", e.access.as_str(), e.sectors, e.kind.as_str());
            if let Some(f) = &e.filename {
                s += &format!(" \"{f}\"");
                if matches!(e.kind, ExtentType::Flat) {
                    s += &format!(" {}", e.offset);
                }
            }
            s += "\n";
        }
        s += "\n# The Disk Data Base\n#DDB\n\n";
        for (k, v) in &self.ddb {
            s += &format!("{k} = \"{v}\"\n");
        }
        s
    }
}

fn parse_extent_line(access: Access, line: &str) -> std::result::Result<ExtentLine, String> {
    let rest = line
        .split_once(char::is_whitespace)
        .map_or("", |x| x.1)
        .trim_start();
    let (size, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let sectors: u64 = size
        .parse()
        .map_err(|_| format!("bad extent size {size:?}"))?;
    let rest = rest.trim_start();
    let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let kind = ExtentType::parse(kind).ok_or_else(|| format!("unknown extent type {kind:?}"))?;
    let rest = rest.trim();
    let (filename, rest) = if let Some(q) = rest.strip_prefix('"') {
        let end = q.find('"').ok_or("unterminated file name")?;
        (Some(q[..end].to_string()), q[end + 1..].trim())
    } else if rest.is_empty() {
        (None, "")
    } else {
        let (f, r) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        // A quote inside an unquoted name cannot be written back (nor read by QEMU).
        if f.contains('"') {
            return Err(format!("stray quote in extent file name {f:?}"));
        }
        (Some(f.to_string()), r.trim())
    };
    let offset = match rest.split_whitespace().next() {
        Some(o) => o.parse().map_err(|_| format!("bad extent offset {o:?}"))?,
        None => 0,
    };
    if filename.is_none() && kind != ExtentType::Zero {
        return Err(format!("{} extent without a file name", kind.as_str()));
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        filename,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_and_vbox_descriptors() {
        let t = "# Disk DescriptorFile\nversion=1\nCID=879f8e20\nparentCID=ffffffff\n\
                 createType=\"twoGbMaxExtentFlat\"\nparentFileNameHint=\"base file.vmdk\"\n\
                 # Extent description\nRW 4194304 FLAT \"a b-f001.vmdk\" 0\n\
                 RDONLY 100 SPARSE \"x.vmdk\"\nNOACCESS 8 ZERO\n\
                 # The disk Data Base \n#DDB\nddb.adapterType=\"ide\"\n\
                 ddb.geometry.heads = \"16\"\n";
        let d = Descriptor::parse(t, 0).unwrap();
        assert_eq!(d.cid, 0x879f8e20);
        assert_eq!(d.parent_cid, NO_PARENT_CID);
        assert_eq!(d.create_type, "twoGbMaxExtentFlat");
        assert_eq!(d.parent_hint.as_deref(), Some("base file.vmdk"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].filename.as_deref(), Some("a b-f001.vmdk"));
        assert_eq!(d.extents[1].access, Access::RdOnly);
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
        assert_eq!(d.get("ddb.adapterType"), Some("ide"));
        assert_eq!(d.get("ddb.geometry.heads"), Some("16"));
        assert_eq!(d.total_sectors(), Some(4194412));
        let again = Descriptor::parse(&d.render(), 0).unwrap();
        assert_eq!(again, d);
        assert!(looks_like_descriptor(b"# Disk Descriptor File\nversion=1"));
        assert!(looks_like_descriptor(t.as_bytes()));
        assert!(!looks_like_descriptor(b"hello"));
    }

    #[test]
    fn rejects_bad_lines() {
        assert!(Descriptor::parse("CID=zz\n", 0).is_err());
        assert!(Descriptor::parse("RW abc SPARSE \"x\"\n", 0).is_err());
        assert!(Descriptor::parse("RW 1 BOGUS \"x\"\n", 0).is_err());
        assert!(Descriptor::parse("RW 1 FLAT\n", 0).is_err());
        // Unknown lines are skipped, but a text with nothing of a descriptor is refused.
        assert!(Descriptor::parse("random text\n", 0).is_err());
        let d = Descriptor::parse("CID=1\nsome vendor line\nRW 8 ZERO\n", 0).unwrap();
        assert_eq!(d.extents.len(), 1);
    }
}

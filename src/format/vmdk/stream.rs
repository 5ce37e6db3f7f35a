//! Reading a streamOptimized VMDK sequentially from a pipe: header, descriptor, then
//! grain markers in order, with no seeking. The device it gives is `sequential_only`.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Mutex};

use crate::details::{FormatDetails, VmdkDetails, VmdkExtent};
use crate::detect::Format;
use crate::device::{clamp_map_request, BlockDevice, Extent, ExtentKind};
use crate::error::{Error, Result};
use crate::image::{ImageInfo, OpenContext, Opened};

use super::descriptor::{decode_text, Descriptor, NO_PARENT_CID};
use super::header::{Marker, SparseHeader, FMT, MARKER_EOS, SECTOR};
use super::sparse::inflate;

/// Most decompressed bytes held between `map` and `read_at` calls.
const MAX_BUFFERED: usize = 256 << 20;

struct State {
    r: Box<dyn Read + Send>,
    /// Bytes read from the stream so far.
    pos: u64,
    /// Decompressed grains not yet read: (guest offset, bytes).
    grains: VecDeque<(u64, Vec<u8>)>,
    buffered: usize,
    /// The end marker (or the end of the input) has been reached.
    eos: bool,
    /// Guest offset below which nothing can be served any more.
    consumed: u64,
    /// End of the last grain seen (grains must ascend).
    last_end: u64,
}

/// A streamOptimized VMDK read from a pipe, served in ascending order.
pub struct StreamDevice {
    size: u64,
    grain_bytes: u64,
    grain_sectors: u64,
    state: Mutex<State>,
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of input before any.
fn read_full(r: &mut dyn Read, buf: &mut [u8], pos: u64, what: &'static str) -> Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(Error::corrupt(
                    FMT,
                    what,
                    pos,
                    format!("stream ends after {got} of {} bytes", buf.len()),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Stream(e)),
        }
    }
    Ok(true)
}

fn skip(st: &mut State, bytes: u64, what: &'static str) -> Result<()> {
    let mut left = bytes;
    let mut b = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = left.min(b.len() as u64) as usize;
        if !read_full(st.r.as_mut(), &mut b[..n], st.pos, what)? {
            return Err(Error::corrupt(FMT, what, st.pos, "stream ends early"));
        }
        st.pos += n as u64;
        left -= n as u64;
    }
    Ok(())
}

impl StreamDevice {
    /// Reads on until one more grain is buffered or the stream ends.
    fn fetch(&self, st: &mut State) -> Result<()> {
        let gb = self.grain_bytes;
        while !st.eos {
            let mut sec = [0u8; 512];
            let at = st.pos;
            if !read_full(st.r.as_mut(), &mut sec, at, "marker")? {
                st.eos = true; // a stream may end without an explicit marker (qemu-img)
                break;
            }
            st.pos += SECTOR;
            match Marker::parse(&sec) {
                Marker::Meta {
                    sectors: 0,
                    kind: MARKER_EOS,
                } => st.eos = true,
                Marker::Meta { sectors, .. } => {
                    let bytes = sectors.checked_mul(SECTOR).ok_or_else(|| {
                        Error::corrupt(FMT, "metadata marker", at, "size overflows")
                    })?;
                    skip(st, bytes, "metadata")?;
                }
                Marker::Grain { lba, size } => {
                    let size = size as u64;
                    if size > gb * 2 + 4096 {
                        return Err(Error::corrupt(
                            FMT,
                            "grain marker",
                            at,
                            format!("compressed size {size} is too large"),
                        ));
                    }
                    let total = (12 + size).div_ceil(SECTOR) * SECTOR;
                    let mut comp = vec![0u8; total as usize];
                    comp[..512].copy_from_slice(&sec);
                    if !read_full(st.r.as_mut(), &mut comp[512..], st.pos, "compressed grain")?
                        && total > 512
                    {
                        return Err(Error::corrupt(
                            FMT,
                            "compressed grain",
                            st.pos,
                            "stream ends early",
                        ));
                    }
                    st.pos += total - SECTOR;
                    let off = lba.checked_mul(SECTOR).filter(|&o| o < self.size);
                    let Some(off) = off.filter(|_| lba % self.grain_sectors == 0) else {
                        return Err(Error::corrupt(
                            FMT,
                            "grain marker",
                            at,
                            format!("sector {lba} is not the start of a grain inside the disk"),
                        ));
                    };
                    if off < st.last_end {
                        return Err(Error::corrupt(
                            FMT,
                            "grain marker",
                            at,
                            format!("grain for sector {lba} comes after a later grain: not readable as a stream"),
                        ));
                    }
                    let mut data = inflate(&comp[12..12 + size as usize], gb as usize)
                        .map_err(|r| Error::corrupt(FMT, "compressed grain", at, r))?;
                    let need = (self.size - off).min(gb) as usize;
                    if data.len() < need {
                        return Err(Error::corrupt(
                            FMT,
                            "compressed grain",
                            at,
                            format!("decompresses to {} bytes, {need} expected", data.len()),
                        ));
                    }
                    data.truncate(need);
                    st.last_end = off + gb;
                    st.buffered += data.len();
                    if st.buffered > MAX_BUFFERED {
                        return Err(Error::Format(
                            "vmdk: stream reader asked to look too far ahead".into(),
                        ));
                    }
                    st.grains.push_back((off, data));
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Makes sure the first buffered grain ending after `offset` is known (or the
    /// stream has ended); returns its index.
    fn find(&self, st: &mut State, offset: u64) -> Result<Option<usize>> {
        loop {
            if let Some(i) = st
                .grains
                .iter()
                .position(|(o, d)| o + d.len() as u64 > offset)
            {
                return Ok(Some(i));
            }
            if st.eos {
                return Ok(None);
            }
            self.fetch(st)?;
        }
    }

    fn order_check(st: &State, offset: u64) -> Result<()> {
        if offset < st.consumed {
            return Err(Error::Format(format!(
                "vmdk: stream read at {offset:#x} after {:#x}: a stream can only be read in order",
                st.consumed
            )));
        }
        Ok(())
    }
}

impl BlockDevice for StreamDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn sequential_only(&self) -> bool {
        true
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = clamp_map_request(offset, len, self.size)?;
        let mut st = self
            .state
            .lock()
            .map_err(|_| Error::Format("vmdk: stream state poisoned".into()))?;
        Self::order_check(&st, offset)?;
        let end = offset + len;
        Ok(match self.find(&mut st, offset)? {
            None => Extent::new(offset, len, ExtentKind::Unallocated),
            Some(i) => {
                let (o, d) = &st.grains[i];
                if *o <= offset {
                    let mut e = Extent::new(
                        offset,
                        (o + d.len() as u64).min(end) - offset,
                        ExtentKind::Data,
                    );
                    e.compressed = true;
                    e
                } else {
                    Extent::new(offset, (*o).min(end) - offset, ExtentKind::Unallocated)
                }
            }
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::device::check_bounds(offset, buf.len() as u64, self.size)?;
        let mut st = self
            .state
            .lock()
            .map_err(|_| Error::Format("vmdk: stream state poisoned".into()))?;
        Self::order_check(&st, offset)?;
        st.consumed = offset;
        while let Some((o, d)) = st.grains.front() {
            if o + d.len() as u64 > offset {
                break;
            }
            let n = d.len();
            st.grains.pop_front();
            st.buffered -= n;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = buf.len() - done;
            match self.find(&mut st, pos)? {
                None => {
                    buf[done..].fill(0);
                    done = buf.len();
                }
                Some(i) => {
                    let (o, d) = &st.grains[i];
                    if *o > pos {
                        let n = ((o - pos) as usize).min(rest);
                        buf[done..done + n].fill(0);
                        done += n;
                    } else {
                        let s = (pos - o) as usize;
                        let n = (d.len() - s).min(rest);
                        buf[done..done + n].copy_from_slice(&d[s..s + n]);
                        done += n;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Opens a streamOptimized VMDK from a sequential reader (a pipe, a decompressor).
pub fn open_stream(mut reader: Box<dyn Read + Send>, ctx: &OpenContext) -> Result<Opened> {
    let mut hb = [0u8; 512];
    if !read_full(reader.as_mut(), &mut hb, 0, "sparse extent header")? {
        return Err(Error::corrupt(
            FMT,
            "sparse extent header",
            0,
            "empty stream",
        ));
    }
    let h = SparseHeader::parse(&hb, 0)?;
    h.validate(0)?;
    if !(h.compressed() && h.has_markers()) {
        return Err(Error::unsupported(
            FMT,
            "reading a VMDK from a stream unless it is streamOptimized (compressed grains with markers)",
        ));
    }
    let mut st = State {
        r: reader,
        pos: SECTOR,
        grains: VecDeque::new(),
        buffered: 0,
        eos: false,
        consumed: 0,
        last_end: 0,
    };
    let mut desc = None;
    if let Some((at, bytes)) = h.embedded_descriptor()? {
        let gap = at.saturating_sub(st.pos);
        skip(&mut st, gap, "header area")?;
        let mut b = vec![0u8; bytes as usize];
        if !read_full(st.r.as_mut(), &mut b, st.pos, "embedded descriptor")? {
            return Err(Error::corrupt(
                FMT,
                "embedded descriptor",
                at,
                "stream ends early",
            ));
        }
        st.pos += bytes;
        desc = Some(Descriptor::parse(&decode_text(&b), at)?);
    }
    if let Some(d) = &desc {
        if d.parent_hint.is_some() {
            return Err(Error::unsupported(FMT, "delta disks read from a stream"));
        }
    }
    let over = h.overhead.saturating_mul(SECTOR);
    if over < st.pos {
        return Err(Error::corrupt(
            FMT,
            "sparse extent header",
            64,
            "overhead ends inside the descriptor",
        ));
    }
    let gap = over - st.pos;
    skip(&mut st, gap, "header area")?;
    let size = h.capacity * SECTOR;
    let gb = h.grain_bytes();
    let (cid, pcid, ct) = match &desc {
        Some(d) => (d.cid, d.parent_cid, d.create_type.clone()),
        None => (0, NO_PARENT_CID, "streamOptimized".to_string()),
    };
    let mut info = ImageInfo::new(ctx.filename.clone(), Format::Vmdk, size);
    info.cluster_size = Some(gb);
    info.format_specific = Some(FormatDetails::Vmdk(VmdkDetails {
        cid,
        parent_cid: pcid,
        create_type: ct,
        extents: vec![VmdkExtent {
            compressed: Some(true),
            virtual_size: size,
            filename: ctx.filename.clone(),
            cluster_size: Some(gb),
            format: String::new(),
        }],
    }));
    Ok(Opened {
        device: Arc::new(StreamDevice {
            size,
            grain_bytes: gb,
            grain_sectors: h.grain_size,
            state: Mutex::new(st),
        }),
        info,
    })
}

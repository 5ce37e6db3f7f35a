//! `measure` for qcow2 and raw targets: the file size an image needs, computed as
//! qemu-img does (`required` for the given contents, `fully-allocated` for every
//! cluster written).

use super::refcount::metadata_clusters;
use super::writer::{Prealloc, Qcow2Options};
use crate::detect::Format;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::writer::WriteOptions;

/// The two numbers `qemu-img measure` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes needed for the given contents (or an empty image of the given size).
    pub required: u64,
    /// Bytes needed when every cluster is allocated.
    pub fully_allocated: u64,
    /// Bytes for persistent bitmaps, shown when source and target both can hold them
    /// (qcow2 to qcow2). imgconv copies no bitmaps, so this is 0 when present.
    pub bitmaps: Option<u64>,
}

/// What is measured: an image's contents, or just a virtual size.
pub enum MeasureSource<'a> {
    /// A new, empty image of this many bytes.
    Size(u64),
    /// The contents of an existing image, and its format.
    Device(&'a dyn BlockDevice, Format),
}

/// File size of a fully allocated qcow2 image (QEMU's `qcow2_calc_prealloc_size`).
pub fn qcow2_fully_allocated(size: u64, o: &Qcow2Options) -> u64 {
    let cs = o.cluster_size();
    let aligned = size.next_multiple_of(cs);
    let mut meta = cs; // header
    let l2e = o.l2_entry_size();
    let nl2e = (aligned / cs).next_multiple_of(cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).next_multiple_of(cs / 8);
    meta += nl1e * 8;
    let (blocks, table) =
        metadata_clusters((meta + aligned) / cs, o.cluster_bits, o.refcount_order);
    meta + (blocks + table) * cs + aligned
}

/// Guest bytes holding data, rounded out to whole clusters as QEMU counts them.
fn allocated_bytes(dev: &dyn BlockDevice, cs: u64) -> Result<u64> {
    let size = dev.size();
    let mut required = 0u64;
    let mut off = 0u64;
    while off < size {
        let e = dev.map(off, size - off)?;
        if e.len == 0 {
            return Err(Error::Format(format!(
                "internal error: empty extent at {off:#x}"
            )));
        }
        if e.kind.reads_as_zero() {
            off = e.end();
        } else {
            // Extend to the end of the cluster, and count from the cluster start.
            let end = e.end().next_multiple_of(cs).min(size.next_multiple_of(cs));
            required += off % cs + (end - off);
            off = end.min(size);
        }
    }
    Ok(required)
}

/// Measures `src` as an image of `format` written with `opts`.
pub fn measure(format: Format, opts: &WriteOptions, src: MeasureSource<'_>) -> Result<Measurement> {
    match format {
        Format::Raw => {
            let mut o = opts.clone();
            let _ = o.take("preallocation");
            o.reject_unknown(Format::Raw)?;
            let size = match src {
                MeasureSource::Size(s) => s,
                MeasureSource::Device(d, _) => d.size(),
            };
            let n = size.next_multiple_of(512);
            Ok(Measurement {
                required: n,
                fully_allocated: n,
                bitmaps: None,
            })
        }
        Format::Qcow2 => {
            let o = Qcow2Options::parse(opts)?;
            let cs = o.cluster_size();
            let bitmaps = match src {
                MeasureSource::Device(_, Format::Qcow2) if o.version >= 3 => Some(0),
                _ => None,
            };
            let (size, mut data) = match src {
                MeasureSource::Size(s) => (s, 0),
                MeasureSource::Device(d, _) => {
                    let s = d.size();
                    let data = if o.backing_file.is_some() {
                        // Nothing is known of what the backing file shares: count all.
                        s.next_multiple_of(cs)
                    } else {
                        allocated_bytes(d, cs)?
                    };
                    (s, data)
                }
            };
            let virtual_size = size.next_multiple_of(cs);
            if matches!(o.prealloc, Prealloc::Full | Prealloc::Falloc) {
                data = virtual_size;
            }
            let full = qcow2_fully_allocated(virtual_size, &o);
            Ok(Measurement {
                required: full - virtual_size + data,
                fully_allocated: full,
                bitmaps,
            })
        }
        other => Err(Error::unsupported(
            other.name(),
            "measure (only raw and qcow2 targets can be measured)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_qemu_numbers() {
        let o = WriteOptions::default();
        let m = measure(Format::Qcow2, &o, MeasureSource::Size(64 << 20)).unwrap();
        assert_eq!((m.required, m.fully_allocated), (327680, 67436544));
        // 64 MiB with 8 MiB of data at the start (the spec's qemu-img figure).
        struct Half;
        impl BlockDevice for Half {
            fn size(&self) -> u64 {
                64 << 20
            }
            fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
                buf.fill(1);
                Ok(())
            }
            fn map(&self, offset: u64, len: u64) -> Result<crate::device::Extent> {
                use crate::device::{Extent, ExtentKind};
                Ok(if offset < 8 << 20 {
                    Extent::new(offset, len.min((8 << 20) - offset), ExtentKind::Data)
                } else {
                    Extent::new(offset, len.min((64 << 20) - offset), ExtentKind::Zero)
                })
            }
        }
        let m = measure(Format::Qcow2, &o, MeasureSource::Device(&Half, Format::Raw)).unwrap();
        assert_eq!(
            m,
            Measurement {
                required: 8716288,
                fully_allocated: 67436544,
                bitmaps: None
            }
        );
        let m = measure(Format::Raw, &o, MeasureSource::Size(1000)).unwrap();
        assert_eq!(m.required, 1024);
    }
}

//! The crate as a dependency: the traps a library user met (issue 12), each pinned by a
//! test — cancellation per conversion, typed errors through `Read`, random access to
//! forward-only sources, entry points for one's own devices and writers, extents.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use imgconv::convert::CancelToken;
use imgconv::device::{BlockDevice, MemDevice};
use imgconv::{ConvertOptions, Error, ExtentKind, Format, Image, OpenOptions};

/// A disk of `len` bytes with a pattern in its first half and zeros after.
fn pattern_disk(len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    for (i, b) in d[..len / 2].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    d
}

#[test]
fn a_cancelled_conversion_does_not_stop_the_next_ones() {
    let d = scratch();
    let img = Image::from_device(MemDevice::new(pattern_disk(8 << 20)));
    let token = CancelToken::new();
    let seen = Arc::new(AtomicU64::new(0));
    let (t, s) = (token.clone(), seen.clone());
    // Cancels from the progress callback after the first unit.
    let opts = ConvertOptions::new(Format::Qcow2)
        .threads(1)
        .cancel_token(&token)
        .progress(move |done, _| {
            s.store(done, Ordering::SeqCst);
            t.cancel();
        });
    let out = d.path().join("cancelled.qcow2");
    let r = imgconv::convert(&img, &out, &opts);
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    assert!(!out.exists(), "a cancelled conversion left its output");
    // The same process converts again, twice, with fresh options.
    for name in ["a.qcow2", "b.raw"] {
        let fmt = if name.ends_with("raw") {
            Format::Raw
        } else {
            Format::Qcow2
        };
        let out = d.path().join(name);
        imgconv::convert(&img, &out, &ConvertOptions::new(fmt)).unwrap();
        assert_eq!(
            imgconv::open(&out, &OpenOptions::default()).unwrap().size(),
            8 << 20
        );
    }
}

#[test]
fn a_corrupt_image_read_through_reader_keeps_its_typed_error() {
    let d = scratch();
    let img = d.path().join("c.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        s(&img),
        "4M",
    ]);
    qemu_io(&["-c", "write -P 0x11 0 64k", s(&img)]);
    // Point the first L2 entry far past the end of the file.
    let mut b = std::fs::read(&img).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    b[l2..l2 + 8].copy_from_slice(&(0x8000_0000_0000_0000u64 | (1 << 40)).to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    let opened = imgconv::open(&img, &OpenOptions::untrusted()).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = opened.reader().read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    let back = Error::from(e);
    assert!(back.is_corrupt(), "{back:?}");
    assert!(
        matches!(
            back,
            Error::Corrupt {
                format: "qcow2",
                ..
            }
        ),
        "{back:?}"
    );
}

#[test]
fn random_access_makes_a_compressed_raw_disk_seekable() {
    let d = scratch();
    let disk = pattern_disk(3 << 20);
    let raw = d.path().join("d.raw");
    std::fs::write(&raw, &disk).unwrap();
    run_ok("xz", &["-k", "-0", s(&raw)]);
    let xz = d.path().join("d.raw.xz");
    // Forward only by default: a backward seek is a typed refusal naming the way out.
    let img = imgconv::open(&xz, &OpenOptions::default()).unwrap();
    let mut r = img.reader();
    let mut buf = vec![0u8; 1 << 20];
    r.seek(SeekFrom::Start(2 << 20)).unwrap();
    r.read_exact(&mut buf).unwrap();
    r.seek(SeekFrom::Start(0)).unwrap();
    let e = Error::from(r.read_exact(&mut buf).unwrap_err());
    assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
    assert!(e.to_string().contains("random_access"), "{e}");
    // With random_access(): any order, any number of times, and converted twice.
    let opts = OpenOptions::default().random_access().tmpdir(d.path());
    let img = imgconv::open(&xz, &opts).unwrap();
    assert!(!img.device().sequential_only());
    let mut r = img.reader();
    r.seek(SeekFrom::Start(2 << 20)).unwrap();
    r.read_exact(&mut buf).unwrap();
    assert!(buf == disk[2 << 20..3 << 20]);
    r.seek(SeekFrom::Start(1000)).unwrap();
    r.read_exact(&mut buf).unwrap();
    assert!(buf == disk[1000..1000 + (1 << 20)]);
    for name in ["x.qcow2", "y.qcow2"] {
        let out = d.path().join(name);
        imgconv::convert(&img, &out, &ConvertOptions::new(Format::Qcow2)).unwrap();
        assert_same(&raw, &out);
    }
    // The spooled copy is unlinked: nothing is left in the folder but our files.
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
}

#[test]
fn convert_to_writer_takes_any_write_and_gives_it_back() {
    let disk = pattern_disk(2 << 20);
    let img = Image::from_device(MemDevice::new(disk.clone()));
    // A borrowed Vec, no Arc<Mutex<_>> needed.
    let mut out = Vec::new();
    let w = imgconv::convert_to_writer(&img, &mut out, &ConvertOptions::new(Format::Raw)).unwrap();
    w.flush().unwrap();
    assert!(out == disk);
    // A writer that must be finished afterwards: gzip around a streamOptimized VMDK.
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let opts = ConvertOptions::new(Format::Vmdk).subformat("streamOptimized");
    let gz = imgconv::convert_to_writer(&img, gz, &opts).unwrap();
    let bytes = gz.finish().unwrap();
    let back =
        imgconv::open_reader(std::io::Cursor::new(bytes), &OpenOptions::untrusted()).unwrap();
    assert_eq!(back.format(), Format::Vmdk);
    let mut got = Vec::new();
    back.reader().read_to_end(&mut got).unwrap();
    assert!(got == disk);
    // Formats that need to seek say so, with one error variant for all of them.
    for (fmt, sub) in [
        (Format::Qcow2, None),
        (Format::Vdi, None),
        (Format::Vmdk, Some("monolithicSparse")),
    ] {
        let mut opts = ConvertOptions::new(fmt);
        if let Some(sub) = sub {
            opts = opts.subformat(sub);
        }
        let e = imgconv::convert_to_writer(&img, Vec::new(), &opts).unwrap_err();
        assert!(
            matches!(e, Error::NeedsSeekableOutput { .. }),
            "{fmt}: {e:?}"
        );
        assert!(!e.to_string().contains("pipe"), "{e}");
    }
}

/// A device of one's own: 4 MiB where every odd MiB is a hole.
struct Striped;

impl BlockDevice for Striped {
    fn size(&self) -> u64 {
        4 << 20
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> imgconv::Result<()> {
        imgconv::device::check_bounds(offset, buf.len() as u64, self.size())?;
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = if (at >> 20) % 2 == 0 { 0x42 } else { 0 };
        }
        Ok(())
    }
    fn map(&self, offset: u64, len: u64) -> imgconv::Result<imgconv::Extent> {
        let len = imgconv::device::clamp_map_request(offset, len, self.size())?;
        let end = ((offset >> 20) + 1) << 20;
        let kind = if (offset >> 20) % 2 == 0 {
            ExtentKind::Data
        } else {
            ExtentKind::Unallocated
        };
        Ok(imgconv::Extent::new(offset, len.min(end - offset), kind))
    }
}

#[test]
fn own_devices_convert_and_extents_walk_them() {
    let d = scratch();
    let out = d.path().join("own.qcow2");
    let opts = ConvertOptions::new(Format::Qcow2).compressed(true);
    imgconv::convert::convert_device(&Striped, &out, &opts).unwrap();
    assert_qemu_check_clean(&out);
    let img = imgconv::open(&out, &OpenOptions::default()).unwrap();
    let kinds: Vec<(u64, u64, bool)> = img
        .extents()
        .map(|e| e.map(|e| (e.offset, e.len, e.kind == ExtentKind::Data)))
        .collect::<imgconv::Result<_>>()
        .unwrap();
    let data: u64 = kinds.iter().filter(|k| k.2).map(|k| k.1).sum();
    assert_eq!(data, 2 << 20, "{kinds:?}");
    assert_eq!(kinds.last().map(|k| k.0 + k.1), Some(4 << 20));
    let wrapped = Image::from_device(Striped);
    assert_eq!(wrapped.extents().count(), 4);
}

#[test]
fn metadata_only_reads_that_need_a_reference_say_so() {
    let d = scratch();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_io(&["-c", "write -P 0x33 0 64k", s(&base)]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    let img = imgconv::open(&top, &OpenOptions::default().metadata_only()).unwrap();
    let first = img.extents().next().unwrap().unwrap();
    assert_eq!(first.kind, ExtentKind::Unallocated);
    let mut buf = [0u8; 512];
    let e = img.device().read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(e, Error::NotOpened { .. }), "{e:?}");
}

//! Benchmarks of the conversion hot paths, so that a regression shows up in `cargo bench`:
//!
//! - `is_zero`: the engine's zero scan on zero and non-zero buffers;
//! - `codec`: one 64 KiB cluster through raw deflate (4 KiB window, level 6, as qemu
//!   writes compressed qcow2 clusters) and zstd (level 3, qemu's default), both ways;
//! - `engine`: the whole pipeline on an in-memory disk, into a writer that discards
//!   everything (with and without a compressing encoder) and into a sparse raw file;
//! - `qcow2_l2`: L2 table lookups of the qcow2 reader through the public `BlockDevice`
//!   API (a `map` walk of a disk with every eighth cluster allocated, and 4 KiB reads of
//!   allocated clusters), on an image that qemu-img makes. Skipped, with a note, when
//!   qemu-img is missing or this build cannot read qcow2 yet.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use imgconv::convert::{convert_to, run, ConvertOptions, EngineOptions};
use imgconv::device::MemDevice;
use imgconv::io::OutputSet;
use imgconv::writer::{DataRun, GrainEncoder, ImageWriter};
use imgconv::zero::is_zero;
use imgconv::{BlockDevice, Format, OpenOptions, Result};

const CLUSTER: usize = 64 * 1024;

/// Deterministic bytes that compress roughly like a filesystem image: runs of text
/// (this crate's sources), small integers and incompressible noise.
fn disk_like(len: usize, seed: u64) -> Vec<u8> {
    const TEXT: &[&[u8]] = &[
        include_bytes!("../src/convert.rs"),
        include_bytes!("../src/device.rs"),
        include_bytes!("../src/writer.rs"),
    ];
    let mut out = Vec::with_capacity(len);
    let mut x = seed | 1;
    let mut next = || {
        // xorshift64: cheap, reproducible noise.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    while out.len() < len {
        let n = (4096 + next() % 8192) as usize;
        match next() % 4 {
            0 => {
                let t = TEXT[(next() % 3) as usize];
                let s = (next() as usize) % t.len();
                out.extend(t[s..].iter().cycle().take(n));
            }
            1 => out.extend((0..n / 8).flat_map(|_| (next() % 1000).to_le_bytes())),
            2 => out.extend((0..n / 8).flat_map(|_| next().to_le_bytes())),
            _ => out.extend(std::iter::repeat(0u8).take(n / 4)),
        }
    }
    out.truncate(len);
    out
}

fn bench_is_zero(c: &mut Criterion) {
    let mut g = c.benchmark_group("is_zero");
    for size in [4096usize, CLUSTER, 2 << 20] {
        let zeros = vec![0u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("zeros", size), &zeros, |b, buf| {
            b.iter(|| is_zero(black_box(buf)))
        });
        let mut last = vec![0u8; size];
        last[size - 1] = 1;
        g.bench_with_input(BenchmarkId::new("last_byte_set", size), &last, |b, buf| {
            b.iter(|| is_zero(black_box(buf)))
        });
        let data = disk_like(size, 7);
        g.bench_with_input(BenchmarkId::new("data", size), &data, |b, buf| {
            b.iter(|| is_zero(black_box(buf)))
        });
    }
    g.finish();
}

/// Raw deflate with a 4 KiB window, as qemu's qcow2 driver compresses clusters.
fn deflate(input: &[u8], out: &mut Vec<u8>) -> usize {
    let mut c = Compress::new_with_window_bits(Compression::new(6), false, 12);
    out.clear();
    out.reserve(input.len() + 64);
    let st = c
        .compress_vec(input, out, FlushCompress::Finish)
        .expect("deflate");
    assert_eq!(st, Status::StreamEnd);
    out.len()
}

fn inflate(input: &[u8], out: &mut Vec<u8>) {
    let mut d = Decompress::new_with_window_bits(false, 12);
    out.clear();
    d.decompress_vec(input, out, FlushDecompress::Finish)
        .expect("inflate");
}

fn bench_codecs(c: &mut Criterion) {
    let cluster = disk_like(CLUSTER, 42);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(CLUSTER as u64));

    let mut out = Vec::new();
    g.bench_function("deflate_compress_64k", |b| {
        b.iter(|| deflate(black_box(&cluster), &mut out))
    });
    let mut packed = Vec::new();
    deflate(&cluster, &mut packed);
    let mut plain = Vec::with_capacity(CLUSTER);
    inflate(&packed, &mut plain);
    assert_eq!(plain, cluster);
    g.bench_function("deflate_decompress_64k", |b| {
        b.iter(|| inflate(black_box(&packed), &mut plain))
    });

    let mut zc = zstd::bulk::Compressor::new(3).expect("zstd compressor");
    g.bench_function("zstd_compress_64k", |b| {
        b.iter(|| zc.compress(black_box(&cluster)).expect("zstd"))
    });
    let zpacked = zc.compress(&cluster).expect("zstd");
    let mut zd = zstd::bulk::Decompressor::new().expect("zstd decompressor");
    assert_eq!(zd.decompress(&zpacked, CLUSTER).expect("unzstd"), cluster);
    g.bench_function("zstd_decompress_64k", |b| {
        b.iter(|| zd.decompress(black_box(&zpacked), CLUSTER).expect("unzstd"))
    });
    g.finish();
}

/// A writer that drops everything: the engine's own cost.
struct NullWriter {
    grain: u64,
    encoder: Option<Arc<dyn GrainEncoder>>,
    bytes: u64,
}

impl ImageWriter for NullWriter {
    fn grain_size(&self) -> u64 {
        self.grain
    }
    fn encoder(&self) -> Option<Arc<dyn GrainEncoder>> {
        self.encoder.clone()
    }
    fn write_data(&mut self, run: DataRun<'_>) -> Result<()> {
        self.bytes += black_box(run.data.len() as u64);
        Ok(())
    }
    fn write_zeros(&mut self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<()> {
        black_box(self.bytes);
        Ok(())
    }
}

/// Compresses each grain with raw deflate, as a compressing qcow2 writer would.
struct DeflateEncoder;

impl GrainEncoder for DeflateEncoder {
    fn encode(&self, _offset: u64, grain: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut out = Vec::new();
        let n = deflate(grain, &mut out);
        Ok((n < grain.len()).then_some(out))
    }
}

fn bench_engine(c: &mut Criterion) {
    const DISK: usize = 64 << 20;
    // A disk whose every fourth 1 MiB stretch is zeros, so the zero scan has work.
    let mut data = disk_like(DISK, 3);
    for mb in (0..DISK >> 20).step_by(4) {
        data[mb << 20..(mb + 1) << 20].fill(0);
    }
    let dev = MemDevice::new(data);
    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(DISK as u64));
    for threads in [1usize, 2] {
        let opts = EngineOptions {
            threads,
            ..Default::default()
        };
        g.bench_with_input(BenchmarkId::new("mem_to_null", threads), &opts, |b, o| {
            b.iter(|| {
                let w = NullWriter {
                    grain: CLUSTER as u64,
                    encoder: None,
                    bytes: 0,
                };
                run(&dev, Box::new(w), o).expect("engine")
            })
        });
        g.bench_with_input(
            BenchmarkId::new("mem_to_null_deflate", threads),
            &opts,
            |b, o| {
                b.iter(|| {
                    let w = NullWriter {
                        grain: CLUSTER as u64,
                        encoder: Some(Arc::new(DeflateEncoder)),
                        bytes: 0,
                    };
                    run(&dev, Box::new(w), o).expect("engine")
                })
            },
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("out.raw");
    let copts = ConvertOptions::new(Format::Raw);
    g.bench_function("mem_to_raw_file", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_file(&target);
            },
            |()| convert_to(&dev, &target, OutputSet::new(), &copts).expect("convert"),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// Makes a 256 MiB qcow2 (64 KiB clusters) with every eighth cluster allocated.
fn make_qcow2(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::FileExt;
    let raw = dir.join("l2.raw");
    let f = std::fs::File::create(&raw).ok()?;
    f.set_len(256 << 20).ok()?;
    let block = disk_like(4096, 9);
    for c in (0..(256u64 << 20) / CLUSTER as u64).step_by(8) {
        f.write_all_at(&block, c * CLUSTER as u64).ok()?;
    }
    drop(f);
    let q = dir.join("l2.qcow2");
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(q)
}

fn bench_qcow2_l2(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(path) = make_qcow2(dir.path()) else {
        eprintln!("qcow2_l2: skipped (qemu-img could not make the image)");
        return;
    };
    let img = match imgconv::open(&path, &OpenOptions::default().format(Format::Qcow2)) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("qcow2_l2: skipped ({e})");
            return;
        }
    };
    let dev = img.device().clone();
    let size = dev.size();
    let mut g = c.benchmark_group("qcow2_l2");
    g.throughput(Throughput::Elements(size / CLUSTER as u64));
    g.bench_function("map_walk_256m", |b| {
        b.iter(|| {
            let (mut pos, mut n) = (0u64, 0u32);
            while pos < size {
                let e = dev.map(pos, size - pos).expect("map");
                pos = e.end();
                n += 1;
            }
            black_box(n)
        })
    });
    let mut buf = vec![0u8; 4096];
    let clusters = size / CLUSTER as u64;
    g.throughput(Throughput::Elements(1));
    let mut k = 0u64;
    g.bench_function("read_4k_allocated", |b| {
        b.iter(|| {
            // A different allocated cluster each time, in a scattered order.
            k = (k + 97) % (clusters / 8);
            dev.read_at(&mut buf, k * 8 * CLUSTER as u64).expect("read");
            black_box(buf[0])
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_is_zero,
    bench_codecs,
    bench_engine,
    bench_qcow2_l2
);
criterion_main!(benches);

//! Issue 13, finding 2: `map` streams its output as it walks the image, so its memory
//! stays the same whatever the number of extents. The image is the attack's: a small
//! qcow2 whose L1 entries all point at one L2 table alternating data and unallocated
//! clusters, a million map entries from 131 KiB.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const L1_ENTRIES: u64 = 16384;

/// Builds the image with qemu-img and qemu-io, then points every L1 entry at the first
/// L2 table and makes that table alternate data and unallocated clusters.
fn alternating_qcow2(path: &Path) {
    let size = L1_ENTRIES * 64 * 512;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        s(path),
        &size.to_string(),
    ]);
    qemu_io(&["-c", "write -P 1 0 512", s(path)]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = [0u8; 48];
    f.read_exact_at(&mut h, 0).unwrap();
    let l1_size = u32::from_be_bytes(h[36..40].try_into().unwrap()) as u64;
    let l1_offset = u64::from_be_bytes(h[40..48].try_into().unwrap());
    assert_eq!(l1_size, L1_ENTRIES);
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, l1_offset).unwrap();
    let l1: Vec<u8> = e.repeat(l1_size as usize);
    f.write_all_at(&l1, l1_offset).unwrap();
    let l2 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    let mut d = [0u8; 8];
    f.read_exact_at(&mut d, l2).unwrap();
    let table: Vec<u8> = (0..64)
        .flat_map(|i| if i % 2 == 0 { d } else { [0; 8] })
        .collect();
    f.write_all_at(&table, l2).unwrap();
}

/// Runs `imgconv ARGS`, counting its output lines; returns (lines, peak RSS in KiB).
// The child is reaped with wait4 (for its rusage), which clippy does not see.
#[allow(clippy::zombie_processes)]
fn run_measured(args: &[&str]) -> (u64, i64) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(imgconv_bin())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let lines = BufReader::new(out).split(b'\n').count() as u64;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: waits for the child spawned above, which nothing else reaps.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status}"
    );
    (lines, usage.ru_maxrss)
}

#[test]
fn map_memory_stays_flat_for_a_million_extents() {
    let d = scratch();
    let img = d.path().join("alt.qcow2");
    alternating_qcow2(&img);
    assert!(std::fs::metadata(&img).unwrap().len() < 200 << 10);
    let entries = L1_ENTRIES * 64;
    // JSON: one entry per line.
    let (lines, rss) = run_measured(&["map", "--output=json", s(&img)]);
    assert_eq!(lines, entries);
    assert!(rss < 64 << 10, "JSON map peaked at {rss} KiB");
    // Human: a line per data cluster, after the header.
    let (lines, rss) = run_measured(&["map", s(&img)]);
    assert_eq!(lines, entries / 2 + 1);
    assert!(rss < 64 << 10, "human map peaked at {rss} KiB");
}

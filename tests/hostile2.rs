//! Hostile input, round two (issue 13): bounded memory and disk for every command, no
//! host file touched, nothing left behind. One test (or more) per finding, each with a
//! file the test builds; limits asserted with generous margins.

mod common;
use common::watch::watched;
use common::*;

use std::time::Duration;

/// Runs `tool ARGS` with `input` on stdin; returns stdout.
fn pipe_through(tool: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut c = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let o = c.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(o.status.success(), "{tool} {args:?} failed");
    o.stdout
}

/// A small raw disk with a little data.
fn small_disk(len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in d[4096..4096 + 8192].iter_mut() {
        *b = xorshift64(&mut x) as u8;
    }
    d
}

/// Finding 5: 256 MiB of xz stream padding is read in big pieces (it took 25 s, 4 bytes
/// per read), when the index is walked for the size and when the stream is decoded.
#[test]
fn finding5_xz_stream_padding_is_read_in_big_pieces() {
    let d = scratch();
    let disk = small_disk(1 << 20);
    let xz = d.path().join("padded.raw.xz");
    std::fs::write(&xz, pipe_through("xz", &["-c", "-0"], &disk)).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&xz).unwrap();
    let len = f.metadata().unwrap().len();
    // Padding is zeros in multiples of four: a hole is as good as written zeros.
    f.set_len(len.next_multiple_of(4) + (256 << 20)).unwrap();
    drop(f);
    let w = watched(&["info", "--output=json", s(&xz)]);
    w.assert_code("info", 0);
    assert!(
        w.stdout.contains("\"virtual-size\": 1048576"),
        "{}",
        w.stdout
    );
    w.assert_faster_than("info of padded xz", Duration::from_secs(3));
    let out = d.path().join("out.raw");
    let w = watched(&["convert", "-O", "raw", s(&xz), s(&out)]);
    w.assert_code("convert", 0);
    w.assert_faster_than("convert of padded xz", Duration::from_secs(10));
    assert_eq!(std::fs::read(&out).unwrap(), disk);
}

/// Finding 11: a qcow2 whose backing file name starts right after the header, leaving
/// no room for header extensions or their end marker, is read as qemu-img reads it.
#[test]
fn finding11_backing_name_right_after_the_header_is_read_as_qemu_reads_it() {
    let d = scratch();
    let base_raw = d.path().join("base.raw");
    make_raw(&base_raw, 1 << 20, &[(0, 8192, 3), (600 << 10, 4096, 9)]);
    for compat in ["1.1", "0.10"] {
        let base = d.path().join("base.qcow2");
        qemu_img(&["convert", "-O", "qcow2", s(&base_raw), s(&base)]);
        let top = d.path().join(format!("top-{compat}.qcow2"));
        let mut args = overlay_args("qcow2", &[], "base.qcow2", &top, "");
        args.extend([
            "-o",
            if compat == "1.1" {
                "compat=1.1"
            } else {
                "compat=0.10"
            },
        ]);
        qemu_img(&args);
        let mut bytes = std::fs::read(&top).unwrap();
        let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
        let header_len = if compat == "1.1" {
            be32(&bytes, 100) as usize
        } else {
            72
        };
        let name = b"base.qcow2";
        bytes[header_len..4096].fill(0);
        bytes[header_len..header_len + name.len()].copy_from_slice(name);
        bytes[8..16].copy_from_slice(&(header_len as u64).to_be_bytes());
        bytes[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        std::fs::write(&top, &bytes).unwrap();
        let q = qemu_info(&top);
        assert_eq!(q["backing-filename"], "base.qcow2", "{compat}");
        let w = watched(&["info", "--output=json", s(&top)]);
        w.assert_code(compat, 0);
        let ours: serde_json::Value = serde_json::from_str(&w.stdout).unwrap();
        assert_eq!(ours["backing-filename"], q["backing-filename"], "{compat}");
        let out = d.path().join("out.raw");
        imgconv(&["convert", "-O", "raw", s(&top), s(&out)]);
        assert_same(&base_raw, &out);
    }
}

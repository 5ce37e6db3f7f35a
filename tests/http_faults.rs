//! HTTP sources against a misbehaving server (a small std-only server in this file, on
//! 127.0.0.1): dropped connections, stalls, 503s, an object that changes, a lying
//! Content-Length, redirect loops, 4xx. Every case ends in an image identical to the
//! source (resumed) or in a typed error with no output file. Each case is bounded: a
//! 1 s read timeout, short pauses between tries, at most a few hundred connections.
#![cfg(feature = "http")]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{imgconv_bin, qemu_img, scratch};

/// What the server does wrong, and on which requests.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Serves correctly.
    None,
    /// The first `n` responses send half their body, then close the connection.
    DropMidBody(u32),
    /// The first response sends half its body, then stalls for 3 s.
    Stall,
    /// The first `n` requests get 503.
    Unavailable(u32),
    /// From the second request on, the object is different (new ETag and bytes).
    ChangeAfterFirst,
    /// Every response claims twice the body it sends, then closes.
    LongContentLength,
    /// Every request is redirected to itself.
    RedirectLoop,
    /// Every request gets this status.
    Status(u16),
    /// No range support: always 200 with the whole object; the first response drops
    /// half-way.
    NoRangesDrop,
}

struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(data: Vec<u8>, fault: Fault) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU32::new(0));
        let state = Arc::new(Mutex::new(data));
        let (s, r) = (stop.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: at most 400 connections, then the server stops by itself.
            for conn in listener.incoming().take(400) {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (state, r) = (state.clone(), r.clone());
                std::thread::spawn(move || serve(conn, &state, fault, &r));
            }
        });
        Server {
            port,
            stop,
            requests,
            thread: Some(thread),
        }
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    fn requests(&self) -> u32 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves the requests of one connection (keep-alive).
fn serve(conn: TcpStream, state: &Mutex<Vec<u8>>, fault: Fault, count: &AtomicU32) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (mut range, mut if_match) = (None, None);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "if-match" => if_match = Some(v.trim().to_string()),
                _ => {}
            }
        }
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        let version = if fault == Fault::ChangeAfterFirst && n > 1 {
            2
        } else {
            1
        };
        let mut data = state.lock().unwrap().clone();
        if version == 2 {
            for b in data.iter_mut().step_by(4096) {
                *b ^= 0xff;
            }
        }
        let etag = format!("\"v{version}\"");
        let status_only = |out: &mut TcpStream, code: u16, extra: &str| {
            let _ = write!(out, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\n{extra}\r\n");
        };
        match fault {
            Fault::Unavailable(k) if n <= k => {
                status_only(&mut out, 503, "");
                continue;
            }
            Fault::RedirectLoop => {
                status_only(&mut out, 302, &format!("Location: {path}\r\n"));
                continue;
            }
            Fault::Status(code) => {
                status_only(&mut out, code, "");
                continue;
            }
            _ => {}
        }
        if if_match.as_ref().is_some_and(|m| *m != etag) {
            status_only(&mut out, 412, "");
            continue;
        }
        let total = data.len() as u64;
        let ranged = fault != Fault::NoRangesDrop;
        let (status, start, end) = match range.as_deref().and_then(parse_range) {
            Some((a, b)) if ranged && a < total => (206, a, b.unwrap_or(total - 1).min(total - 1)),
            Some(_) if ranged => {
                status_only(
                    &mut out,
                    416,
                    &format!("Content-Range: bytes */{total}\r\n"),
                );
                continue;
            }
            _ => (200, 0, total.saturating_sub(1)),
        };
        let body = if total == 0 {
            &data[..0]
        } else {
            &data[start as usize..=end as usize]
        };
        let mut head = format!(
            "HTTP/1.1 {status} X\r\nETag: {etag}\r\nLast-Modified: Mon, 01 Jan 2024 00:00:0{version} GMT\r\n"
        );
        if ranged {
            head.push_str("Accept-Ranges: bytes\r\n");
        }
        if status == 206 {
            head.push_str(&format!("Content-Range: bytes {start}-{end}/{total}\r\n"));
        }
        let claimed = if fault == Fault::LongContentLength {
            body.len() * 2
        } else {
            body.len()
        };
        head.push_str(&format!("Content-Length: {claimed}\r\n\r\n"));
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
        let half = body.len() / 2;
        match fault {
            Fault::DropMidBody(k) if n <= k => {
                let _ = out.write_all(&body[..half]);
                return;
            }
            Fault::NoRangesDrop if n == 1 => {
                let _ = out.write_all(&body[..half]);
                return;
            }
            Fault::Stall if n == 1 => {
                let _ = out.write_all(&body[..half]);
                let _ = out.flush();
                std::thread::sleep(Duration::from_secs(3));
                return;
            }
            Fault::LongContentLength => {
                let _ = out.write_all(body);
                return;
            }
            _ => {
                if out.write_all(body).is_err() {
                    return;
                }
            }
        }
    }
}

fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let r = v.strip_prefix("bytes=")?;
    let (a, b) = r.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()))
}

/// A 16 MiB raw disk with data at a few places, as a qcow2 and as a gzip stream.
fn inputs(dir: &Path) -> (std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let raw = dir.join("src.raw");
    let mut disk = vec![0u8; 16 << 20];
    for (i, b) in disk[1 << 20..(5 << 20)].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    disk[(16 << 20) - 10..].fill(9);
    std::fs::write(&raw, &disk).unwrap();
    let q = dir.join("src.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&disk).unwrap();
        e.finish().unwrap()
    };
    (raw, std::fs::read(q).unwrap(), gz)
}

/// `imgconv convert -O raw URL out` with a 1 s timeout; returns (success, stderr).
fn convert(url: &str, out: &Path) -> (bool, String) {
    let start = Instant::now();
    let o = std::process::Command::new(imgconv_bin())
        .args(["convert", "--timeout", "1", "-O", "raw", url])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{url}: took {:?}",
        start.elapsed()
    );
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn expect_identical(fault: Fault, raw: &Path, body: &[u8], name: &str) {
    let dir = scratch();
    let server = Server::start(body.to_vec(), fault);
    let out = dir.path().join("out.raw");
    let (ok, err) = convert(&server.url(name), &out);
    assert!(ok, "{fault:?} {name}: {err}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(raw).unwrap(),
        "{fault:?} {name}"
    );
}

fn expect_error(fault: Fault, body: &[u8], name: &str, needle: &str) {
    let dir = scratch();
    let server = Server::start(body.to_vec(), fault);
    let out = dir.path().join("out.raw");
    let (ok, err) = convert(&server.url(name), &out);
    assert!(!ok, "{fault:?} {name}: succeeded");
    assert!(
        err.contains(needle),
        "{fault:?} {name}: error does not say {needle:?}: {err}"
    );
    assert!(
        err.contains(&format!("127.0.0.1:{}", server.port)),
        "{fault:?}: the error names the URL: {err}"
    );
    // No output, not even a temporary file.
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "{fault:?} {name}: files left"
    );
    assert!(server.requests() < 400);
}

#[test]
fn faults_end_in_identical_image_or_typed_error() {
    let dir = scratch();
    let (raw, qcow2, gz) = inputs(dir.path());
    for (body, name) in [(&qcow2, "d.qcow2"), (&gz, "d.raw.gz")] {
        expect_identical(Fault::None, &raw, body, name);
        expect_identical(Fault::DropMidBody(2), &raw, body, name);
        expect_identical(Fault::Stall, &raw, body, name);
        expect_identical(Fault::Unavailable(2), &raw, body, name);
        expect_error(Fault::ChangeAfterFirst, body, name, "changed");
        expect_error(Fault::RedirectLoop, body, name, "redirect");
        expect_error(Fault::Status(404), body, name, "HTTP 404");
        expect_error(Fault::Status(401), body, name, "HTTP 401");
    }
    // A Content-Length longer than the body: range reads take the bytes that
    // Content-Range names (all there); a stream notices the two lengths disagree.
    expect_identical(Fault::LongContentLength, &raw, &qcow2, "d.qcow2");
    // 503 to the end: the tries run out (about 8 s of pauses).
    expect_error(Fault::Unavailable(100), &qcow2, "d.qcow2", "HTTP 503");
    expect_error(Fault::LongContentLength, &gz, "d.raw.gz", "Content-Length");
    // Without range support a compressed stream cannot be resumed: a typed error
    // naming the byte reached. A server with ranges resumes (above).
    expect_error(Fault::NoRangesDrop, &gz, "d.raw.gz", "cannot be resumed");
    expect_identical(Fault::None, &raw, &gz, "d.raw.gz");
}

//! The image-changing commands under stress: killed (SIGKILL) at many points of their
//! run, the image must still open in qemu-img, check clean and read as before or as
//! after; and QEMU's image locks, both ways: imgconv refuses an image qemu-io holds
//! open for writing (reading too, unless -U), and qemu refuses one imgconv is writing.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn io(img: &Path, cmds: &[&str]) {
    let mut a = Vec::new();
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(s(img));
    qemu_io(&a);
}

/// The guest-visible bytes of an image (with its backing chain).
fn contents(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("view.raw");
    qemu_img(&["convert", "-U", "-O", "raw", s(img), s(&raw)]);
    let v = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    v
}

fn backing_of(img: &Path) -> Option<String> {
    qemu_info(img)
        .get("backing-filename")
        .and_then(|b| b.as_str())
        .map(str::to_string)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// What must hold after a run, killed or not: given the folder, `Ok` or why not.
type Verdict = Box<dyn Fn(&Path, bool) -> Result<(), String>>;

/// Runs `args` in fresh copies of `template`, killed after 0, 1, 2, 3, 5, 8… changes
/// (and a few random counts), until a run completes; `verdict` judges each outcome.
fn crash_at_many_points(name: &str, template: &Path, args: &[&str], verdict: Verdict) {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ name.len() as u64;
    let mut k = 0u64;
    let mut step = 1u64;
    let mut runs = 0;
    loop {
        let dir = template.with_file_name(format!("{name}-{k}"));
        copy_dir(template, &dir);
        let o = Command::new(imgconv_bin())
            .args(args)
            .current_dir(&dir)
            .env("IMGCONV_TEST_CRASH_AFTER_WRITES", k.to_string())
            .output()
            .unwrap();
        let killed = o.status.code().is_none();
        if !killed {
            assert!(
                o.status.success(),
                "{name}: {args:?} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        if let Err(why) = verdict(&dir, killed) {
            panic!("{name}: killed after {k} changes: {why}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
        runs += 1;
        if !killed {
            assert!(runs > 1, "{name}: the run never made a change");
            return;
        }
        // Dense at first, then spread out, with some random points in between.
        k += if k < 12 {
            1
        } else {
            step += 1;
            1 + xorshift64(&mut seed) % (step * 3)
        };
    }
}

fn check_clean(img: &Path) -> Result<(), String> {
    let o = run("qemu-img", &["check", s(img)]);
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img check {}: {}{}",
            img.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

fn template(root: &Path, name: &str, build: impl Fn(&Path)) -> PathBuf {
    let t = root.join(name);
    std::fs::create_dir_all(&t).unwrap();
    build(&t);
    t
}

fn chain(dir: &Path) {
    qemu_create("qcow2", "", &dir.join("base.qcow2"), "8M");
    io(
        &dir.join("base.qcow2"),
        &["write -P 1 0 2M", "write -P 5 4M 1M"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&dir.join("top.qcow2")),
    ]);
    io(
        &dir.join("top.qcow2"),
        &[
            "write -P 9 512k 64k",
            "write -z 4M 64k",
            "write -P 3 7M 100k",
        ],
    );
}

#[test]
fn rebase_survives_kills() {
    let root = scratch();
    let t = template(root.path(), "rebase", chain);
    let before = contents(&t.join("top.qcow2"));
    crash_at_many_points(
        "rebase",
        &t,
        &["rebase", "-b", "", "top.qcow2"],
        Box::new(move |d, killed| {
            let top = d.join("top.qcow2");
            check_clean(&top)?;
            if contents(&top) != before {
                return Err("the overlay reads differently".into());
            }
            match (backing_of(&top), killed) {
                (None, _) | (Some(_), true) => Ok(()),
                (Some(b), false) => Err(format!("still on {b}")),
            }
        }),
    );
}

#[test]
fn commit_survives_kills() {
    let root = scratch();
    let t = template(root.path(), "commit", chain);
    let top_view = contents(&t.join("top.qcow2"));
    let old_base = contents(&t.join("base.qcow2"));
    crash_at_many_points(
        "commit",
        &t,
        &["commit", "top.qcow2"],
        Box::new(move |d, _| {
            let (top, base) = (d.join("top.qcow2"), d.join("base.qcow2"));
            check_clean(&top)?;
            check_clean(&base)?;
            // What the overlay shows never changes; the base is old or new, whole.
            if contents(&top) != top_view {
                return Err("the overlay reads differently".into());
            }
            let b = contents(&base);
            if b != old_base && b != top_view {
                return Err("the base is neither the old one nor the committed one".into());
            }
            Ok(())
        }),
    );
}

#[test]
fn commit_into_vdi_survives_kills() {
    let root = scratch();
    let t = template(root.path(), "commit-vdi", |d| {
        qemu_create("vdi", "", &d.join("base.vdi"), "8M");
        qemu_io(&[
            "-f",
            "vdi",
            "-c",
            "write -P 1 0 1536k",
            s(&d.join("base.vdi")),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.vdi",
            "-F",
            "vdi",
            s(&d.join("top.qcow2")),
        ]);
        io(
            &d.join("top.qcow2"),
            &["write -P 9 512k 64k", "write -P 3 5M 1M"],
        );
    });
    let top_view = contents(&t.join("top.qcow2"));
    crash_at_many_points(
        "commit-vdi",
        &t,
        &["commit", "top.qcow2"],
        Box::new(move |d, killed| {
            let (top, base) = (d.join("top.qcow2"), d.join("base.vdi"));
            check_clean(&top)?;
            // The base is written in place: it may hold part of the data, but the
            // overlay is emptied only once all of it is there.
            if contents(&top) != top_view {
                return Err("the overlay reads differently".into());
            }
            if !killed {
                check_clean(&base)?;
                if contents(&base) != top_view {
                    return Err("the base does not hold the committed data".into());
                }
            }
            Ok(())
        }),
    );
}

#[test]
fn amend_survives_kills() {
    let root = scratch();
    let t = template(root.path(), "amend", |d| {
        chain(d);
        qemu_img(&["snapshot", "-c", "s1", s(&d.join("top.qcow2"))]);
        io(
            &d.join("top.qcow2"),
            &["write -z 0 64k", "write -P 2 6M 64k"],
        );
    });
    let before = contents(&t.join("top.qcow2"));
    crash_at_many_points(
        "amend",
        &t,
        &["amend", "-o", "compat=0.10", "top.qcow2"],
        Box::new(move |d, killed| {
            let top = d.join("top.qcow2");
            check_clean(&top)?;
            if contents(&top) != before {
                return Err("the image reads differently".into());
            }
            let compat = qemu_info(&top)["format-specific"]["data"]["compat"].clone();
            if !killed && compat != "0.10" {
                return Err(format!("compat is {compat}"));
            }
            Ok(())
        }),
    );
    let t = template(root.path(), "refcounts", |d| {
        qemu_create("qcow2", "cluster_size=4k", &d.join("img.qcow2"), "8M");
        io(&d.join("img.qcow2"), &["write -P 1 0 3M"]);
    });
    let before = contents(&t.join("img.qcow2"));
    crash_at_many_points(
        "refcount_bits",
        &t,
        &["amend", "-o", "refcount_bits=2", "img.qcow2"],
        Box::new(move |d, _| {
            let img = d.join("img.qcow2");
            check_clean(&img)?;
            (contents(&img) == before)
                .then_some(())
                .ok_or_else(|| "the image reads differently".into())
        }),
    );
}

#[test]
fn snapshots_survive_kills() {
    let root = scratch();
    let t = template(root.path(), "snap", |d| {
        qemu_create("qcow2", "", &d.join("img.qcow2"), "8M");
        io(&d.join("img.qcow2"), &["write -P 1 0 3M"]);
        qemu_img(&["snapshot", "-c", "s1", s(&d.join("img.qcow2"))]);
        io(&d.join("img.qcow2"), &["write -P 2 1M 2M"]);
    });
    let now = contents(&t.join("img.qcow2"));
    let mut s1 = vec![0u8; 8 << 20];
    s1[..3 << 20].fill(1);
    for (name, args) in [
        ("snap-create", &["snapshot", "-c", "s2", "img.qcow2"][..]),
        ("snap-delete", &["snapshot", "-d", "s1", "img.qcow2"][..]),
        ("snap-apply", &["snapshot", "-a", "s1", "img.qcow2"][..]),
    ] {
        let (now, s1) = (now.clone(), s1.clone());
        let apply = name == "snap-apply";
        crash_at_many_points(
            name,
            &t,
            args,
            Box::new(move |d, killed| {
                let img = d.join("img.qcow2");
                check_clean(&img)?;
                let c = contents(&img);
                let ok = c == now || (apply && c == s1);
                if !ok || (apply && !killed && c != s1) {
                    return Err("the image reads neither as before nor as after".into());
                }
                Ok(())
            }),
        );
    }
}

#[test]
fn bitmaps_survive_kills() {
    let root = scratch();
    let t = template(root.path(), "bitmap", |d| {
        qemu_create("qcow2", "", &d.join("img.qcow2"), "64M");
        qemu_img(&["bitmap", "--add", s(&d.join("img.qcow2")), "b0"]);
        io(&d.join("img.qcow2"), &["write -P 1 0 3M"]);
    });
    crash_at_many_points(
        "bitmap",
        &t,
        &[
            "bitmap",
            "--add",
            "-g",
            "4k",
            "--merge",
            "b0",
            "img.qcow2",
            "b1",
        ],
        Box::new(|d, killed| {
            let img = d.join("img.qcow2");
            check_clean(&img)?;
            let n = qemu_info(&img)["format-specific"]["data"]["bitmaps"]
                .as_array()
                .map_or(0, |a| a.len());
            if !(n == 2 || (n == 1 && killed)) {
                return Err(format!("{n} bitmaps"));
            }
            Ok(())
        }),
    );
}

/// qemu-io holding `img` open read-write until dropped.
struct QemuIo(Child);

impl QemuIo {
    fn hold(img: &Path) -> QemuIo {
        let spawn = || {
            // Sleeps (holding the image) until killed.
            Command::new("qemu-io")
                .args(["-c", "sleep 600000", s(img)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut child = spawn();
        // Wait until it holds the image. The probe takes read locks of its own: a
        // qemu-io that starts at that moment cannot get its write lock and exits, and
        // is started again.
        let t0 = Instant::now();
        while run("qemu-img", &["info", s(img)]).status.success() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "qemu-io did not open"
            );
            if let Ok(Some(_)) = child.try_wait() {
                child = spawn();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuIo(child)
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stderr_of(args: &[&str]) -> (Option<i32>, String) {
    let o = imgconv_out(args);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn imgconv_respects_qemus_locks() {
    let root = scratch();
    let d = root.path();
    chain(d);
    let (top, base) = (d.join("top.qcow2"), d.join("base.qcow2"));
    let held = QemuIo::hold(&top);
    let before = std::fs::read(&top).unwrap();
    for args in [
        vec!["rebase", "-u", "-b", "", s(&top)],
        vec!["commit", s(&top)],
        vec!["amend", "-o", "lazy_refcounts=on", s(&top)],
        vec!["snapshot", "-c", "x", s(&top)],
        vec!["bitmap", "--add", s(&top), "b"],
        vec!["resize", s(&top), "16M"],
        vec!["check", "-r", "leaks", s(&top)],
    ] {
        let (code, err) = stderr_of(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains("Failed to get \"write\" lock")
                && err.contains("Is another process using the image"),
            "{args:?}: {err}"
        );
    }
    // Reads are refused too, with qemu's words, unless -U.
    let (code, err) = stderr_of(&["info", s(&top)]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    for args in [
        vec!["info", "-U", s(&top)],
        vec!["map", "-U", s(&top)],
        vec!["check", "-U", s(&top)],
        vec!["snapshot", "-l", "-U", s(&top)],
    ] {
        imgconv(&args);
    }
    let out = d.join("copy.raw");
    imgconv(&["convert", "-U", "-O", "raw", s(&top), s(&out)]);
    // A backing file read-locked by qemu-io can still be read by imgconv.
    imgconv(&["info", s(&base)]);
    drop(held);
    assert_eq!(std::fs::read(&top).unwrap(), before, "the image changed");
    // A commit into a base that qemu-io writes is refused before anything changes.
    let held = QemuIo::hold(&base);
    let (code, err) = stderr_of(&["commit", s(&top)]);
    assert_eq!(code, Some(1), "{err}");
    drop(held);
    assert_eq!(std::fs::read(&top).unwrap(), before, "the image changed");
}

#[test]
fn qemu_respects_imgconvs_locks() {
    let root = scratch();
    let d = root.path();
    chain(d);
    let top = d.join("top.qcow2");
    // imgconv takes its writer's locks, then pauses (test hook) before changing.
    let mut child = Command::new(imgconv_bin())
        .args(["snapshot", "-c", "x", s(&top)])
        .env("IMGCONV_TEST_PAUSE_AFTER_LOCK_MS", "10000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let err = loop {
        let o = run("qemu-img", &["info", s(&top)]);
        if !o.status.success() {
            break String::from_utf8_lossy(&o.stderr).into_owned();
        }
        // Well within the pause, even on a loaded machine.
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "imgconv took no lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    let o = run("qemu-io", &["-c", "write -P 1 0 4k", s(&top)]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Failed to get \"write\" lock"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // qemu's -U reads still work meanwhile.
    qemu_img(&["info", "-U", s(&top)]);
    let status = child.wait().unwrap();
    assert!(status.success());
    let sn = qemu_info(&top)["snapshots"].as_array().unwrap().len();
    assert_eq!(sn, 1);
    assert_qemu_check_clean(&top);
}

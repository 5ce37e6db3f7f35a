//! `imgconv`: qemu-img's command line for raw, qcow2, VMDK, VDI and VHD images.

mod amend;
mod bench;
mod bitmap;
mod check;
mod commit;
mod common;
mod compare;
mod convert;
mod create;
mod dd;
mod devices;
mod info;
mod map;
mod measure;
mod ops_common;
mod optionhelp;
mod progress;
mod qjson;
mod rebase;
mod release;
mod resize;
mod snapshot;
mod spec;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Read, write, inspect and convert virtual-disk images (raw, qcow2, VMDK, VDI, VHD).
///
/// The syntax follows qemu-img: `imgconv convert -f qcow2 -O vmdk in.qcow2 out.vmdk`.
#[derive(Parser)]
#[command(name = "imgconv", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what an image is: format, sizes, backing file, format-specific details.
    Info(info::Args),
    /// Convert an image to another format (or the same one, compacted).
    Convert(convert::Args),
    /// Compare the guest-visible contents of two images.
    Compare(compare::Args),
    /// Show where the data of an image lies.
    Map(map::Args),
    /// Check an image's metadata for errors and leaks (qcow2, VMDK, VDI, VHD).
    Check(check::Args),
    /// Compute the size an image needs in a given format.
    Measure(measure::Args),
    /// Create a new empty image.
    Create(create::Args),
    /// Change the virtual size of an image.
    Resize(resize::Args),
    /// Copy part of an image into a new one (`if=`, `of=`, `bs=`, `count=`, `skip=`).
    Dd(dd::Args),
    /// Time a run of read (or, on raw images, write) requests.
    Bench(bench::Args),
    /// Change the backing file of an image (copying what differs, unless -u).
    Rebase(rebase::Args),
    /// Write an image's data into its backing file.
    Commit(commit::Args),
    /// Change format-specific options of an image (qcow2).
    Amend(amend::Args),
    /// List, create, apply or delete internal snapshots (qcow2).
    Snapshot(snapshot::Args),
    /// Add, remove, clear, enable, disable or merge persistent bitmaps (qcow2).
    Bitmap(bitmap::Args),
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), each
/// reserving 64 MiB of address space: with many workers that alone would break an
/// address-space limit such as `prlimit --as=1GiB`. Four arenas are plenty: the
/// conversion's buffers are pooled and reused.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    common::install_signal_handlers();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // qemu-img exits 1 on a bad command line (2 for compare, whose 1 means
            // "different"); --help and --version succeed.
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ if std::env::args().nth(1).as_deref() == Some("compare") => 2,
                _ => 1,
            };
            return ExitCode::from(code);
        }
    };
    let r = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Map(a) => map::run(a),
        Command::Check(a) => check::run(a),
        Command::Measure(a) => measure::run(a),
        Command::Create(a) => create::run(a),
        Command::Resize(a) => resize::run(a),
        Command::Dd(a) => dd::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Rebase(a) => rebase::run(a),
        Command::Commit(a) => commit::run(a),
        Command::Amend(a) => amend::run(a),
        Command::Snapshot(a) => snapshot::run(a),
        Command::Bitmap(a) => bitmap::run(a),
    };
    match r {
        Ok(code) => code,
        Err((code, e)) => {
            // qemu-img's form (`imgconv: Could not open 'x': …`), with any control
            // character from an image's metadata escaped.
            eprintln!("imgconv: {}", common::error_text(&e.to_string()));
            ExitCode::from(code)
        }
    }
}

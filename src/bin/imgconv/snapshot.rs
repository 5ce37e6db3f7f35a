//! `imgconv snapshot`: lists, creates, applies and deletes qcow2 internal snapshots
//! (qemu-img's syntax and table).

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::image::SnapshotInfo;
use imgconv::ops::SnapshotAction;
use imgconv::Format;

use crate::common::{human_size, parse_format, CmdResult};
use crate::ops_common::Unsupported;

/// Arguments of `imgconv snapshot`.
///
/// `-c` stores the image's current state as a new snapshot (QEMU's layout: a copy of
/// the L1 table, shared clusters counted twice), `-a` reverts the current state to a
/// snapshot (found by ID, then by name), `-d` deletes one (found by name) and frees
/// what only it used, `-l` (the default) lists them as qemu-img does. Changes are made
/// in one crash-safe step.
#[derive(ClapArgs)]
pub struct Args {
    /// Image format (probed when omitted; snapshots exist in qcow2 images).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// List the snapshots (the default).
    #[arg(short = 'l', long = "list")]
    list: bool,
    /// Create a snapshot of the current state.
    #[arg(short = 'c', long = "create", value_name = "SNAPSHOT")]
    create: Option<String>,
    /// Revert the current state to a snapshot.
    #[arg(short = 'a', long = "apply", value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Delete a snapshot.
    #[arg(short = 'd', long = "delete", value_name = "SNAPSHOT")]
    delete: Option<String>,
    /// Read without QEMU's image locks (listing only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[command(flatten)]
    unsupported: Unsupported,
    /// The image.
    file: String,
}

/// Runs `imgconv snapshot`.
pub fn run(a: Args) -> CmdResult {
    a.unsupported.refuse()?;
    let given = [
        a.list,
        a.create.is_some(),
        a.apply.is_some(),
        a.delete.is_some(),
    ];
    if given.iter().filter(|&&g| g).count() > 1 {
        return Err((
            1,
            imgconv::Error::invalid(
                "Cannot mix '-l', '-a', '-c', '-d'\nTry 'imgconv snapshot --help' for more info",
            ),
        ));
    }
    let path = Path::new(&a.file);
    let (action, verb, name) = match (&a.create, &a.apply, &a.delete) {
        (Some(n), _, _) => (SnapshotAction::Create(n.clone()), "create", n),
        (_, Some(n), _) => (SnapshotAction::Apply(n.clone()), "apply", n),
        (_, _, Some(n)) => (SnapshotAction::Delete(n.clone()), "delete", n),
        _ => {
            let list =
                imgconv::ops::list_snapshots(path, a.format, a.force_share).map_err(|e| (1, e))?;
            print!("{}", table(&list));
            return Ok(ExitCode::SUCCESS);
        }
    };
    if a.force_share {
        return Err((
            1,
            imgconv::Error::invalid("force-share (-U) is only allowed for listing snapshots (-l)"),
        ));
    }
    imgconv::ops::snapshot(path, a.format, &action).map_err(|e| {
        (
            1,
            imgconv::Error::Format(format!("Could not {verb} snapshot '{name}': {e}")),
        )
    })?;
    let _ = a.quiet;
    Ok(ExitCode::SUCCESS)
}

/// The snapshot list exactly as qemu-img prints it (nothing when there is none).
pub fn table(list: &[SnapshotInfo]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let mut s = String::from("Snapshot list:\n");
    s += &format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in list {
        let clock = sn.vm_clock_sec;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            clock / 3600,
            (clock / 60) % 60,
            clock % 60,
            sn.vm_clock_nsec / 1_000_000
        );
        s += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            human_size(sn.vm_state_size),
            local_date(sn.date_sec as i64),
            clock,
            sn.icount
                .map(|c| c.to_string())
                .unwrap_or_else(|| "--".into())
        );
    }
    s
}

/// `YYYY-MM-DD hh:mm:ss` in local time, as qemu-img prints snapshot dates.
fn local_date(secs: i64) -> String {
    // SAFETY: localtime_r writes into the tm we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let t: libc::time_t = secs as libc::time_t;
    unsafe { libc::localtime_r(&t, &mut tm) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

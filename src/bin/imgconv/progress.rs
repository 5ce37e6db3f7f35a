//! `-p`: qemu-img's progress lines, byte for byte.
//!
//! qemu-img prints `    (47.06/100%)\r` on stdout — also when stdout is a pipe, which
//! is how importers read it (KubeVirt CDI matches `\((\d?\d\.\d\d)\/100%\)`, Proxmox
//! `\((\S+)\/100\%\)`) — then a newline when the command ends. The value is kept in
//! single precision and a line is printed only when it has grown by more than a
//! command-specific step since the last line (1 % for convert, 2 % for compare), or
//! when it is 0 or 100: the same arithmetic gives the same lines.

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::status::{CopySteps, StatusReader, Step};

/// The progress state of one command (qemu's `qemu_progress_*`).
pub struct Progress {
    out: Option<Box<dyn Write + Send>>,
    current: f32,
    last_print: f32,
    min_skip: f32,
}

impl Progress {
    /// Progress printed on stdout when `enabled`, a line per `min_skip` percent.
    pub fn new(enabled: bool, min_skip: f32) -> Self {
        let out: Option<Box<dyn Write + Send>> = if enabled {
            Some(Box::new(std::io::stdout()))
        } else {
            None
        };
        Progress {
            out,
            current: 0.0,
            last_print: 0.0,
            min_skip,
        }
    }

    /// Progress printed on stderr: for `convert … -`, whose stdout carries the image.
    pub fn on_stderr(enabled: bool, min_skip: f32) -> Self {
        let mut p = Progress::new(false, min_skip);
        if enabled {
            p.out = Some(Box::new(std::io::stderr()));
        }
        p
    }

    /// Sets the progress to `percent` (qemu: `qemu_progress_print(percent, 0)`).
    pub fn set(&mut self, percent: f32) {
        self.update(percent);
    }

    /// Adds `delta` percent of a part worth `max` percent of the whole (qemu:
    /// `qemu_progress_print(delta, max)`).
    pub fn advance(&mut self, delta: f32, max: u8) {
        let current = self.current + delta / 100.0 * f32::from(max);
        self.update(current);
    }

    fn update(&mut self, current: f32) {
        let current = current.min(100.0);
        self.current = current;
        if current > self.last_print + self.min_skip || current == 100.0 || current == 0.0 {
            self.last_print = current;
            if let Some(out) = &mut self.out {
                let _ = write!(out, "{}", line(current));
                let _ = out.flush();
            }
        }
    }

    /// Ends the progress output with a newline (qemu: `qemu_progress_end`).
    pub fn end(&mut self) {
        if let Some(out) = &mut self.out {
            let _ = writeln!(out);
            let _ = out.flush();
        }
    }
}

/// How far a conversion is, in qemu-img convert's terms: the share of the source's data
/// units (see [`CopySteps`]) written so far, a line per percent.
pub struct ConvertProgress {
    progress: Arc<Mutex<Progress>>,
    /// The units still to be reached; `None` when progress follows bytes instead.
    steps: Option<CopySteps>,
    /// The next unit and where it ends.
    pending: Option<(u64, Step)>,
    size: u64,
    total: u64,
    done: u64,
}

impl ConvertProgress {
    /// Progress of copying `status`'s disk, counted as qemu-img counts it (which walks
    /// the source's allocation first). `by_bytes` (a source read once, in order, that
    /// cannot be walked twice) counts bytes instead.
    pub fn new(
        progress: Arc<Mutex<Progress>>,
        status: StatusReader,
        by_bytes: bool,
        write_zeros: bool,
        target_has_backing: bool,
        compressed_cluster: Option<u64>,
    ) -> imgconv::Result<Self> {
        let size = status.size();
        if by_bytes {
            return Ok(ConvertProgress {
                progress,
                steps: None,
                pending: None,
                size,
                total: size,
                done: 0,
            });
        }
        let make = || {
            CopySteps::new(
                status.clone(),
                write_zeros,
                target_has_backing,
                compressed_cluster,
            )
        };
        let mut walk = make();
        let mut total = 0;
        while let Some(s) = walk.next_step()? {
            if s.counts {
                total += s.sectors;
            }
        }
        Ok(ConvertProgress {
            progress,
            steps: Some(make()),
            pending: None,
            size,
            total,
            done: 0,
        })
    }

    fn set(progress: &Mutex<Progress>, percent: f32) {
        if let Ok(mut p) = progress.lock() {
            p.set(percent);
        }
    }

    /// Everything below `pos` has been written.
    pub fn reached(&mut self, pos: u64) {
        let Some(steps) = &mut self.steps else {
            if self.total > 0 {
                Self::set(
                    &self.progress,
                    (100.0 * pos as f64 / self.total as f64) as f32,
                );
            }
            return;
        };
        loop {
            if self.pending.is_none() {
                let start = steps.position();
                match steps.next_step() {
                    Ok(Some(s)) => self.pending = Some((start + s.sectors * 512, s)),
                    _ => return,
                }
            }
            let Some((end, step)) = self.pending else {
                return;
            };
            if end.min(self.size) > pos {
                return;
            }
            self.pending = None;
            if step.counts {
                self.done += step.sectors;
                let p = (100.0 * self.done as f64 / self.total as f64) as f32;
                Self::set(&self.progress, p);
            }
        }
    }
}

/// One progress line as qemu prints it (`printf("    (%3.2f/100%%)\r")` of a float).
pub fn line(percent: f32) -> String {
    format!("    ({:3.2}/100%)\r", f64::from(percent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_qemus() {
        assert_eq!(line(0.0), "    (0.00/100%)\r");
        assert_eq!(line(5.714_285_6), "    (5.71/100%)\r");
        assert_eq!(line(100.0), "    (100.00/100%)\r");
        // 2/3 of a percent rounds as printf does.
        assert_eq!(line((100.0f64 * 2.0 / 3.0) as f32), "    (66.67/100%)\r");
    }
}

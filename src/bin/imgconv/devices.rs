//! Adapters over a source disk for `convert` options: several sources one after the
//! other, `--salvage` (unreadable sectors read as zeros) and `-r` (a bandwidth limit).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imgconv::{BlockDevice, Extent, ExtentKind};

/// Several disks one after the other, as qemu-img convert concatenates its sources.
pub struct ConcatDevice {
    parts: Vec<(u64, Arc<dyn BlockDevice>)>,
    size: u64,
}

impl ConcatDevice {
    /// `devs` in order; each must know its length.
    pub fn new(devs: Vec<Arc<dyn BlockDevice>>) -> Self {
        let mut parts = Vec::with_capacity(devs.len());
        let mut size = 0u64;
        for d in devs {
            let s = d.size();
            parts.push((size, d));
            size += s;
        }
        ConcatDevice { parts, size }
    }

    fn part(&self, offset: u64) -> (u64, &Arc<dyn BlockDevice>) {
        let i = self.parts.partition_point(|(start, _)| *start <= offset);
        let (start, d) = &self.parts[i.saturating_sub(1)];
        (*start, d)
    }
}

impl BlockDevice for ConcatDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> imgconv::Result<()> {
        imgconv::device::check_bounds(offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (start, d) = self.part(pos);
            let local = pos - start;
            let n = ((d.size() - local) as usize).min(buf.len() - done);
            d.read_at(&mut buf[done..done + n], local)?;
            done += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> imgconv::Result<Extent> {
        let len = imgconv::device::clamp_map_request(offset, len, self.size)?;
        let (start, d) = self.part(offset);
        let local = offset - start;
        let mut e = d.map(local, len.min(d.size() - local))?;
        e.offset += start;
        Ok(e)
    }

    fn sequential_only(&self) -> bool {
        self.parts.iter().any(|(_, d)| d.sequential_only())
    }
}

/// A stretch of another disk, seen as a disk of its own (`dd skip=`).
pub struct WindowDevice {
    inner: Arc<dyn BlockDevice>,
    start: u64,
    len: u64,
}

impl WindowDevice {
    /// `[start, start + len)` of `inner`, which must lie inside it.
    pub fn new(inner: Arc<dyn BlockDevice>, start: u64, len: u64) -> Self {
        WindowDevice { inner, start, len }
    }
}

impl BlockDevice for WindowDevice {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> imgconv::Result<()> {
        imgconv::device::check_bounds(offset, buf.len() as u64, self.len)?;
        self.inner.read_at(buf, self.start + offset)
    }

    fn map(&self, offset: u64, len: u64) -> imgconv::Result<Extent> {
        let len = imgconv::device::clamp_map_request(offset, len, self.len)?;
        let mut e = self.inner.map(self.start + offset, len)?;
        e.offset -= self.start;
        e.len = e.len.min(self.len - e.offset);
        Ok(e)
    }

    fn sequential_only(&self) -> bool {
        self.inner.sequential_only()
    }
}

/// `--salvage`: a read error becomes zeros, sector by sector, with a warning (as qemu).
pub struct SalvageDevice {
    inner: Arc<dyn BlockDevice>,
    quiet: bool,
}

impl SalvageDevice {
    /// Salvaging reads of `inner`; warnings on stderr unless `quiet`.
    pub fn new(inner: Arc<dyn BlockDevice>, quiet: bool) -> Self {
        SalvageDevice { inner, quiet }
    }

    fn warn(&self, what: &str, offset: u64, e: &imgconv::Error) {
        if !self.quiet {
            eprintln!("imgconv: warning: error while reading {what}{offset}: {e}");
        }
    }
}

impl BlockDevice for SalvageDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> imgconv::Result<()> {
        if self.inner.read_at(buf, offset).is_ok() {
            return Ok(());
        }
        // Again, one sector at a time: keep every sector that reads.
        imgconv::device::check_bounds(offset, buf.len() as u64, self.size())?;
        for (i, sector) in buf.chunks_mut(512).enumerate() {
            let at = offset + i as u64 * 512;
            if let Err(e) = self.inner.read_at(sector, at) {
                self.warn("offset ", at, &e);
                sector.fill(0);
            }
        }
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> imgconv::Result<Extent> {
        match self.inner.map(offset, len) {
            Ok(e) => Ok(e),
            Err(e) => {
                let len = imgconv::device::clamp_map_request(offset, len, self.size())?;
                self.warn("block status at offset ", offset, &e);
                // Try to read it, then (qemu does the same, a sector at a time).
                Ok(Extent::new(offset, len.min(512), ExtentKind::Data))
            }
        }
    }

    fn sequential_only(&self) -> bool {
        self.inner.sequential_only()
    }

    fn length_known(&self) -> bool {
        self.inner.length_known()
    }
}

/// `-r RATE`: reads of the source's data at no more than `rate` bytes per second.
pub struct RateLimitedDevice {
    inner: Arc<dyn BlockDevice>,
    rate: u64,
    /// When the limit started, and the bytes read since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedDevice {
    /// `inner` read at `rate` bytes per second at most.
    pub fn new(inner: Arc<dyn BlockDevice>, rate: u64) -> Self {
        RateLimitedDevice {
            inner,
            rate: rate.max(1),
            state: Mutex::new((None, 0)),
        }
    }

    /// Books `n` bytes and waits until reading them keeps within the rate.
    fn throttle(&self, n: u64) {
        let due = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            let start = *st.0.get_or_insert_with(Instant::now);
            // The bytes before this read may go at once; this read waits its turn.
            let due = start + Duration::from_secs_f64(st.1 as f64 / self.rate as f64);
            st.1 += n;
            due
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

impl BlockDevice for RateLimitedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> imgconv::Result<()> {
        self.throttle(buf.len() as u64);
        self.inner.read_at(buf, offset)
    }

    fn map(&self, offset: u64, len: u64) -> imgconv::Result<Extent> {
        self.inner.map(offset, len)
    }

    fn sequential_only(&self) -> bool {
        self.inner.sequential_only()
    }

    fn length_known(&self) -> bool {
        self.inner.length_known()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgconv::device::MemDevice;

    #[test]
    fn concatenates() {
        let a: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(vec![1; 1000]));
        let b: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(vec![2; 500]));
        let c = ConcatDevice::new(vec![a, b]);
        assert_eq!(c.size(), 1500);
        let mut buf = vec![0; 100];
        c.read_at(&mut buf, 950).unwrap();
        assert_eq!(&buf[..50], &[1; 50][..]);
        assert_eq!(&buf[50..], &[2; 50][..]);
        let e = c.map(900, 1000).unwrap();
        assert_eq!((e.offset, e.len), (900, 100));
        let e = c.map(1000, 1000).unwrap();
        assert_eq!((e.offset, e.len), (1000, 500));
        assert!(c.read_at(&mut buf, 1450).is_err());
    }

    #[test]
    fn windows() {
        let data: Vec<u8> = (0..=255).collect();
        let w = WindowDevice::new(Arc::new(MemDevice::new(data)), 100, 50);
        assert_eq!(w.size(), 50);
        let mut b = [0u8; 3];
        w.read_at(&mut b, 47).unwrap();
        assert_eq!(b, [147, 148, 149]);
        assert!(w.read_at(&mut b, 48).is_err());
        let e = w.map(10, 100).unwrap();
        assert_eq!((e.offset, e.len), (10, 40));
    }

    struct Broken;
    impl BlockDevice for Broken {
        fn size(&self) -> u64 {
            4096
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> imgconv::Result<()> {
            if offset < 1024 && offset + buf.len() as u64 > 512 {
                return Err(imgconv::Error::invalid("bad sector"));
            }
            buf.fill(7);
            Ok(())
        }
        fn map(&self, offset: u64, len: u64) -> imgconv::Result<Extent> {
            Ok(Extent::new(offset, len, ExtentKind::Data))
        }
    }

    #[test]
    fn salvage_zeroes_only_bad_sectors() {
        let d = SalvageDevice::new(Arc::new(Broken), true);
        let mut buf = vec![1u8; 4096];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 7));
        assert!(buf[512..1024].iter().all(|&b| b == 0));
        assert!(buf[1024..].iter().all(|&b| b == 7));
    }

    #[test]
    fn rate_limit_holds() {
        let d = RateLimitedDevice::new(Arc::new(MemDevice::new(vec![0; 1 << 20])), 4 << 20);
        let t = Instant::now();
        let mut buf = vec![0u8; 256 << 10];
        for i in 0..4 {
            d.read_at(&mut buf, i * (256 << 10)).unwrap();
        }
        // 1 MiB at 4 MiB/s: the last 256 KiB may start after 0.1875 s.
        assert!(
            t.elapsed() >= Duration::from_millis(180),
            "{:?}",
            t.elapsed()
        );
    }
}

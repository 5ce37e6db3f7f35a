//! The virtual disk as every format reader exposes it.

use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;

use crate::error::{Error, Result};

/// What a stretch of the virtual disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Holds data (which may still happen to be zeros).
    Data,
    /// Known to read as zeros, and recorded as such in some layer of the image.
    Zero,
    /// Allocated in no layer of the image: reads as zeros.
    Unallocated,
}

impl ExtentKind {
    /// True for [`ExtentKind::Zero`] and [`ExtentKind::Unallocated`]: no data to copy.
    pub fn reads_as_zero(self) -> bool {
        !matches!(self, ExtentKind::Data)
    }
}

/// One stretch of the virtual disk with a uniform [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset where the stretch starts.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// What it is.
    pub kind: ExtentKind,
    /// Which layer of a backing chain holds it (0 = the image itself).
    pub depth: u32,
    /// True when the data is stored compressed.
    pub compressed: bool,
    /// Where the data lives in the image file, when it is stored plainly there.
    pub host_offset: Option<u64>,
}

impl Extent {
    /// An extent of `kind` at layer 0 with no host offset.
    pub fn new(offset: u64, len: u64, kind: ExtentKind) -> Self {
        Extent {
            offset,
            len,
            kind,
            depth: 0,
            compressed: false,
            host_offset: None,
        }
    }

    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A virtual disk: the guest-visible bytes of an image, and where its data lies.
///
/// Implementations are thread-safe: the conversion engine calls `read_at` and `map` from
/// several worker threads at once.
pub trait BlockDevice: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the guest bytes at `offset`. Reading past [`size`](Self::size) is
    /// an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Describes the stretch starting at `offset`: its kind and how far it goes, at most
    /// `len` bytes (and never past the end of the disk). `len` must be > 0 and
    /// `offset < size()`.
    fn map(&self, offset: u64, len: u64) -> Result<Extent>;

    /// True when `read_at` only works at ascending offsets (a device read from a pipe or
    /// a compressed stream). The conversion engine then reads on one thread, in order.
    fn sequential_only(&self) -> bool {
        false
    }

    /// False for a disk read from a stream that records its length nowhere, until the
    /// stream has ended: [`size`](Self::size) is then only an upper bound. Only the
    /// conversion engine reads such a device (into a writer made for an unknown size).
    fn length_known(&self) -> bool {
        true
    }

    /// The file that holds this disk's plainly stored data at the extents'
    /// `host_offset`s (a raw image's own file), for copy offloading (`convert -C`).
    fn plain_file(&self) -> Option<&std::fs::File> {
        None
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        (**self).map(offset, len)
    }
    fn sequential_only(&self) -> bool {
        (**self).sequential_only()
    }
    fn length_known(&self) -> bool {
        (**self).length_known()
    }
    fn plain_file(&self) -> Option<&std::fs::File> {
        (**self).plain_file()
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for Box<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        (**self).map(offset, len)
    }
    fn sequential_only(&self) -> bool {
        (**self).sequential_only()
    }
    fn length_known(&self) -> bool {
        (**self).length_known()
    }
    fn plain_file(&self) -> Option<&std::fs::File> {
        (**self).plain_file()
    }
}

/// Walks a device's map from offset 0 to its end: one [`Extent`] per item, ascending and
/// adjacent. After an error the walk ends. Made by [`extents`] (or
/// [`Image::extents`](crate::Image::extents)).
pub struct Extents<'a> {
    device: &'a dyn BlockDevice,
    pos: u64,
    failed: bool,
}

/// The extents of `device`, from offset 0 to its end.
pub fn extents(device: &dyn BlockDevice) -> Extents<'_> {
    Extents {
        device,
        pos: 0,
        failed: false,
    }
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Result<Extent>> {
        let size = self.device.size();
        if self.failed || self.pos >= size {
            return None;
        }
        match self.device.map(self.pos, size - self.pos) {
            Ok(e) if e.offset == self.pos && e.len > 0 => {
                self.pos = e.end();
                Some(Ok(e))
            }
            Ok(e) => {
                self.failed = true;
                Some(Err(Error::Format(format!(
                    "the device mapped offset {:#x} to the extent {e:?}",
                    self.pos
                ))))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub fn check_bounds(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfBounds { offset, len, size }),
    }
}

/// Checks the arguments of [`BlockDevice::map`] and clamps `len` to the disk.
pub fn clamp_map_request(offset: u64, len: u64, size: u64) -> Result<u64> {
    if offset >= size || len == 0 {
        return Err(Error::OutOfBounds { offset, len, size });
    }
    Ok(len.min(size - offset))
}

/// A disk of a given size that reads as zeros everywhere (used by `create`).
#[derive(Debug, Clone, Copy)]
pub struct ZeroDevice {
    size: u64,
}

impl ZeroDevice {
    /// A zero disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        ZeroDevice { size }
    }
}

impl BlockDevice for ZeroDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size)?;
        buf.fill(0);
        Ok(())
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = clamp_map_request(offset, len, self.size)?;
        Ok(Extent::new(offset, len, ExtentKind::Unallocated))
    }
}

/// A disk held in memory (tests, fuzzing, benches). Runs of zero bytes are not
/// reported specially: everything is [`ExtentKind::Data`].
#[derive(Debug, Clone)]
pub struct MemDevice {
    data: Vec<u8>,
}

impl MemDevice {
    /// A disk whose contents are `data`.
    pub fn new(data: Vec<u8>) -> Self {
        MemDevice { data }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size())?;
        let start = offset as usize;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = clamp_map_request(offset, len, self.size())?;
        Ok(Extent::new(offset, len, ExtentKind::Data))
    }
}

/// `Read + Seek` over any [`BlockDevice`]: the guest-visible bytes as a stream.
pub struct DeviceReader<D> {
    device: D,
    pos: u64,
}

impl<D: BlockDevice> DeviceReader<D> {
    /// A reader positioned at offset 0.
    pub fn new(device: D) -> Self {
        DeviceReader { device, pos: 0 }
    }

    /// The device being read.
    pub fn get_ref(&self) -> &D {
        &self.device
    }
}

impl<D: BlockDevice> Read for DeviceReader<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.device.size();
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - self.pos) as usize;
        // The crate's error travels inside the io::Error (its kind from Error::kind) and
        // comes back out with `imgconv::Error::from`.
        self.device.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<D: BlockDevice> Seek for DeviceReader<D> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.device.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative offset",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_and_seeks() {
        let dev = MemDevice::new((0..=255u8).collect());
        let mut r = DeviceReader::new(dev);
        let mut b = [0u8; 4];
        r.seek(SeekFrom::Start(10)).unwrap();
        r.read_exact(&mut b).unwrap();
        assert_eq!(b, [10, 11, 12, 13]);
        r.seek(SeekFrom::End(-2)).unwrap();
        assert_eq!(r.read(&mut b).unwrap(), 2);
        assert_eq!(&b[..2], &[254, 255]);
        assert_eq!(r.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn extents_cover_the_disk() {
        let dev = ZeroDevice::new(1000);
        let all: Vec<Extent> = extents(&dev).collect::<Result<_>>().unwrap();
        assert_eq!(all, vec![Extent::new(0, 1000, ExtentKind::Unallocated)]);
        assert_eq!(extents(&ZeroDevice::new(0)).count(), 0);
    }

    #[test]
    fn bounds_are_checked() {
        let dev = ZeroDevice::new(100);
        let mut b = [1u8; 10];
        assert!(dev.read_at(&mut b, 95).is_err());
        assert!(dev.read_at(&mut b, u64::MAX - 2).is_err());
        dev.read_at(&mut b, 90).unwrap();
        assert_eq!(b, [0; 10]);
        assert!(dev.map(100, 1).is_err());
        assert_eq!(dev.map(50, 1000).unwrap().len, 50);
    }
}

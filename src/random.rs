//! Random bytes from the operating system (`getrandom(2)`), for the UUIDs and content IDs
//! the writers put into new images and for unique temporary names. No state is kept.

/// Fills `buf` with random bytes from the kernel.
pub fn fill(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n > 0 {
            done += n as usize;
        } else if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
        {
            // No getrandom (very old kernels): fall back to a mix of time and address
            // bits; these values need to be unique, not secret.
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ (rest.as_ptr() as u64).rotate_left(32)
                ^ u64::from(std::process::id());
            let mut x = seed | 1;
            for b in rest.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            return;
        }
    }
}

/// `N` random bytes.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    fill(&mut b);
    b
}

/// A random `u32`.
pub fn u32() -> u32 {
    u32::from_le_bytes(bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_differ() {
        let a: [u8; 16] = super::bytes();
        let b: [u8; 16] = super::bytes();
        assert_ne!(a, b);
    }
}

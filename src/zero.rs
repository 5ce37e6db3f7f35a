//! The zero test every layer needs: the engine's zero scan, the spool's and the stream's
//! hole finding, and the writers that skip all-zero blocks.

/// True when every byte of `buf` is zero (fast path for the zero scan).
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to gives the aligned middle.
    let (head, mid, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && mid.chunks(8).all(|c| c.iter().fold(0, |a, &x| a | x) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_checks_every_byte() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        for i in [0, 1, 17, 2048, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v[1..]) || i == 0);
            v[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}

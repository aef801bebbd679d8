//! The virtio-rng device model (virtio 1.2 section 5.4): fills every device-writable buffer
//! from `getrandom(2)`. It owns nothing but a counter.

use std::io;

use xenvirtio_xen::mem::SharedMem;

use crate::chain_io::ChainWriter;

/// Largest request served in one go; a larger buffer gets this many bytes (the driver asks again).
pub const MAX_REQUEST: usize = 64 * 1024;

/// The entropy device.
#[derive(Debug, Default)]
pub struct RngDevice {
    bytes: u64,
}

impl RngDevice {
    /// A new device.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of entropy handed out so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes
    }

    /// Fills the writable buffers of one request; returns the bytes written.
    pub fn handle(&mut self, writable: &[SharedMem<'_>]) -> io::Result<u32> {
        let mut w = ChainWriter::new(writable);
        let len = w.remaining().min(MAX_REQUEST);
        let mut buf = vec![0u8; len];
        fill_random(&mut buf)?;
        w.write_all(&buf).map_err(io::Error::other)?;
        self.bytes += len as u64;
        // len <= MAX_REQUEST.
        Ok(len as u32)
    }
}

/// Fills `buf` from the kernel's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most `buf.len() - done` bytes into the unfilled tail of
        // `buf`, which is valid, writable private memory.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n.unsigned_abs();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenvirtio_xen::mem::PageBuf;

    #[test]
    fn fills_every_writable_byte_with_entropy() {
        let buf = PageBuf::new(2);
        let m = buf.mem();
        let w = [m.slice(0, 100).unwrap(), m.slice(4096, 4096).unwrap()];
        let mut dev = RngDevice::new();
        assert_eq!(dev.handle(&w).unwrap(), 4196);
        let mut a = vec![0u8; 4096];
        m.read(4096, &mut a).unwrap();
        // 4096 random bytes have (almost surely) many distinct values and few zeros.
        let distinct = a.iter().collect::<std::collections::HashSet<_>>().len();
        assert!(distinct > 200, "{distinct} distinct byte values");
        assert!(a.iter().filter(|&&b| b == 0).count() < 64);
        assert_eq!(dev.bytes_served(), 4196);
        assert_eq!(
            m.read_array::<1>(100).unwrap(),
            [0],
            "outside the buffers stays untouched"
        );
        assert!(dev.handle(&[m.slice(0, 10).unwrap().read_only()]).is_err());
    }
}

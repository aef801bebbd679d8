//! virtio-console configuration (virtio 1.2 section 5.3). xenvirtio serves port 0 only, without
//! MULTIPORT: queue 0 is receiveq (device to driver), queue 1 is transmitq (driver to device).

use crate::le;

/// Queue index of port 0's receive queue (device writes, driver reads).
pub const RECEIVEQ: u16 = 0;
/// Queue index of port 0's transmit queue (driver writes, device reads).
pub const TRANSMITQ: u16 = 1;

/// `struct virtio_console_config` (5.3.4).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsoleConfig {
    /// Columns (SIZE).
    pub cols: u16,
    /// Rows (SIZE).
    pub rows: u16,
    /// Maximum ports (MULTIPORT).
    pub max_nr_ports: u32,
    /// Emergency write register (EMERG_WRITE).
    pub emerg_wr: u32,
}

/// Size of [`ConsoleConfig`] on the wire.
pub const CONSOLE_CONFIG_SIZE: usize = 12;

impl ConsoleConfig {
    /// Encodes the configuration.
    pub fn to_bytes(&self) -> [u8; CONSOLE_CONFIG_SIZE] {
        let mut b = [0u8; CONSOLE_CONFIG_SIZE];
        le::put_u16(&mut b, std::mem::offset_of!(ConsoleConfig, cols), self.cols);
        le::put_u16(&mut b, std::mem::offset_of!(ConsoleConfig, rows), self.rows);
        le::put_u32(
            &mut b,
            std::mem::offset_of!(ConsoleConfig, max_nr_ports),
            self.max_nr_ports,
        );
        le::put_u32(
            &mut b,
            std::mem::offset_of!(ConsoleConfig, emerg_wr),
            self.emerg_wr,
        );
        b
    }

    /// Decodes a configuration; missing trailing bytes read as zero.
    pub fn from_bytes(input: &[u8]) -> Self {
        let mut b = [0u8; CONSOLE_CONFIG_SIZE];
        let n = input.len().min(CONSOLE_CONFIG_SIZE);
        b[..n].copy_from_slice(&input[..n]);
        Self {
            cols: le::u16_at(&b, std::mem::offset_of!(ConsoleConfig, cols)),
            rows: le::u16_at(&b, std::mem::offset_of!(ConsoleConfig, rows)),
            max_nr_ports: le::u32_at(&b, std::mem::offset_of!(ConsoleConfig, max_nr_ports)),
            emerg_wr: le::u32_at(&b, std::mem::offset_of!(ConsoleConfig, emerg_wr)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec() {
        use std::mem::{offset_of, size_of};
        assert_eq!(size_of::<ConsoleConfig>(), CONSOLE_CONFIG_SIZE);
        assert_eq!(offset_of!(ConsoleConfig, rows), 2);
        assert_eq!(offset_of!(ConsoleConfig, max_nr_ports), 4);
        assert_eq!(offset_of!(ConsoleConfig, emerg_wr), 8);
        let c = ConsoleConfig {
            cols: 80,
            rows: 25,
            max_nr_ports: 1,
            emerg_wr: 0,
        };
        assert_eq!(ConsoleConfig::from_bytes(&c.to_bytes()), c);
        assert_eq!(ConsoleConfig::from_bytes(&[80, 0]).cols, 80);
    }
}

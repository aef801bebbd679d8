//! Virtio device ids (virtio 1.2 section 5) and the `type` string of the xenstore layout.

/// virtio-net.
pub const VIRTIO_ID_NET: u32 = 1;
/// virtio-blk.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// virtio-console.
pub const VIRTIO_ID_CONSOLE: u32 = 3;
/// virtio-rng (entropy source).
pub const VIRTIO_ID_RNG: u32 = 4;

/// The device kinds xenvirtio serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// virtio-blk.
    Block,
    /// virtio-console.
    Console,
    /// virtio-rng.
    Rng,
    /// virtio-net.
    Net,
}

impl DeviceKind {
    /// The virtio device id.
    pub fn device_id(self) -> u32 {
        match self {
            DeviceKind::Block => VIRTIO_ID_BLOCK,
            DeviceKind::Console => VIRTIO_ID_CONSOLE,
            DeviceKind::Rng => VIRTIO_ID_RNG,
            DeviceKind::Net => VIRTIO_ID_NET,
        }
    }

    /// The kind for a virtio device id, if xenvirtio serves it.
    pub fn from_device_id(id: u32) -> Option<Self> {
        match id {
            VIRTIO_ID_BLOCK => Some(DeviceKind::Block),
            VIRTIO_ID_CONSOLE => Some(DeviceKind::Console),
            VIRTIO_ID_RNG => Some(DeviceKind::Rng),
            VIRTIO_ID_NET => Some(DeviceKind::Net),
            _ => None,
        }
    }

    /// The short name used on command lines: `blk`, `console`, `rng`, `net`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Block => "blk",
            DeviceKind::Console => "console",
            DeviceKind::Rng => "rng",
            DeviceKind::Net => "net",
        }
    }

    /// Parses a short name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "blk" => Some(DeviceKind::Block),
            "console" => Some(DeviceKind::Console),
            "rng" => Some(DeviceKind::Rng),
            "net" => Some(DeviceKind::Net),
            _ => None,
        }
    }

    /// The xenstore `type` value, in the libxl/device-tree convention: `virtio,device<hex id>`.
    pub fn type_string(self) -> String {
        format!("virtio,device{:x}", self.device_id())
    }

    /// Parses a `type` value such as `virtio,device2`. Returns the raw device id, so that a
    /// caller can report an id it does not serve.
    pub fn parse_type_string(s: &str) -> Option<u32> {
        let hex = s.strip_prefix("virtio,device")?;
        // Hex digits only: `from_str_radix` alone also takes a sign (`virtio,device+2`; found
        // by the `wire_codecs` fuzz target's strictness check).
        if hex.is_empty() || hex.len() > 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(hex, 16).ok()
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_the_linux_headers() {
        use virtio_bindings::virtio_ids as v;
        assert_eq!(VIRTIO_ID_BLOCK, v::VIRTIO_ID_BLOCK);
        assert_eq!(VIRTIO_ID_CONSOLE, v::VIRTIO_ID_CONSOLE);
        assert_eq!(VIRTIO_ID_RNG, v::VIRTIO_ID_RNG);
        assert_eq!(VIRTIO_ID_NET, v::VIRTIO_ID_NET);
    }

    #[test]
    fn type_strings_round_trip() {
        for k in [
            DeviceKind::Block,
            DeviceKind::Console,
            DeviceKind::Rng,
            DeviceKind::Net,
        ] {
            let s = k.type_string();
            assert_eq!(DeviceKind::parse_type_string(&s), Some(k.device_id()));
            assert_eq!(DeviceKind::from_name(k.name()), Some(k));
        }
        assert_eq!(DeviceKind::Block.type_string(), "virtio,device2");
        assert_eq!(DeviceKind::parse_type_string("virtio,device1a"), Some(0x1a));
        assert_eq!(DeviceKind::parse_type_string("virtio,device"), None);
        assert_eq!(DeviceKind::parse_type_string("virtio,devicezz"), None);
        assert_eq!(DeviceKind::parse_type_string("vbd"), None);
    }

    /// Fuzz finding (`wire_codecs`): a sign before the hex digits was accepted.
    #[test]
    fn test_regression_type_string_takes_hex_digits_only() {
        assert_eq!(DeviceKind::parse_type_string("virtio,device+2"), None);
        assert_eq!(DeviceKind::parse_type_string("virtio,device-2"), None);
        assert_eq!(DeviceKind::parse_type_string("virtio,device 2"), None);
        assert_eq!(DeviceKind::parse_type_string("virtio,deviceFF"), Some(0xff));
    }
}

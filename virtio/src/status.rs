//! Device status bits (virtio 1.2 section 2.1). The xenvirtio transport has no status register:
//! `docs/PROTOCOL.md` maps each bit to a xenbus state, and the frontend keeps this value for
//! logging and for its own state machine.

/// The guest noticed the device.
pub const ACKNOWLEDGE: u8 = 1;
/// The guest has a driver for the device.
pub const DRIVER: u8 = 2;
/// The driver is set up and ready to drive the device.
pub const DRIVER_OK: u8 = 4;
/// Feature negotiation is complete.
pub const FEATURES_OK: u8 = 8;
/// The device hit an error it cannot recover from without a reset.
pub const DEVICE_NEEDS_RESET: u8 = 64;
/// The driver gave up on the device.
pub const FAILED: u8 = 128;

#[cfg(test)]
mod tests {
    #[test]
    fn status_bits_match_the_linux_headers() {
        use virtio_bindings::virtio_config as v;
        assert_eq!(
            u32::from(super::ACKNOWLEDGE),
            v::VIRTIO_CONFIG_S_ACKNOWLEDGE
        );
        assert_eq!(u32::from(super::DRIVER), v::VIRTIO_CONFIG_S_DRIVER);
        assert_eq!(u32::from(super::DRIVER_OK), v::VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(
            u32::from(super::FEATURES_OK),
            v::VIRTIO_CONFIG_S_FEATURES_OK
        );
        assert_eq!(
            u32::from(super::DEVICE_NEEDS_RESET),
            v::VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert_eq!(u32::from(super::FAILED), v::VIRTIO_CONFIG_S_FAILED);
    }
}

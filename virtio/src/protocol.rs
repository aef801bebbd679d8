//! Constants and codecs of the xenvirtio transport that both ends must agree on. The normative
//! text is `docs/PROTOCOL.md`; this module is its executable half.

/// Page size of grants, rings and the bounce pool.
pub const PAGE_SIZE: usize = 4096;
/// Value of the backend's `transport` key.
pub const TRANSPORT: &str = "xenbus";
/// Largest queue size any xenvirtio device offers (its ring area is 7 pages).
pub const MAX_QUEUE_SIZE: u32 = 1024;
/// Largest number of queues of one device.
pub const MAX_QUEUES: u32 = 16;
/// Grant references held by one bounce-pool directory page (4096 / 4).
pub const REFS_PER_DIRECTORY_PAGE: usize = PAGE_SIZE / 4;
/// Largest bounce pool a backend maps: 64 MiB.
pub const MAX_BOUNCE_PAGES: u32 = 16384;

/// Keys of the backend directory `/local/domain/<B>/backend/virtio/<F>/<devid>/`.
pub mod backend_keys {
    /// Path of the frontend directory (toolstack).
    pub const FRONTEND: &str = "frontend";
    /// Frontend domid (toolstack).
    pub const FRONTEND_ID: &str = "frontend-id";
    /// `1` while the device should exist; the toolstack writes `0` to remove it.
    pub const ONLINE: &str = "online";
    /// Backend `XenbusState`.
    pub const STATE: &str = "state";
    /// `virtio,device<hex id>` (toolstack).
    pub const TYPE: &str = "type";
    /// `xenbus` (toolstack).
    pub const TRANSPORT: &str = "transport";
    /// `1`: the backend needs translated addresses (grant or bounce); `0`: a trusted Dom0
    /// backend also accepts `direct`. Written by the toolstack (libxl's meaning), then
    /// rewritten by the backend with the effective value before InitWait (PROTOCOL.md 2.2).
    pub const GRANT_USAGE: &str = "grant_usage";
    /// The toolstack's own `grant_usage`, kept by the backend the first time it rewrites
    /// `grant_usage`, so that a restarted backend recomputes the effective value from it.
    pub const TOOLSTACK_GRANT_USAGE: &str = "toolstack-grant-usage";
    /// Strategy the operator pinned for this device: `auto`, `grant`, `bounce` or `direct`
    /// (toolstack).
    pub const DMA: &str = "dma";
    /// blk: path of the image file or block device (toolstack).
    pub const PARAMS: &str = "params";
    /// blk: `r` (read-only) or `w` (toolstack).
    pub const MODE: &str = "mode";
    /// blk: `1` to take no image lock and respect none (toolstack, optional; absent is `0`).
    pub const FORCE_SHARE: &str = "force-share";
    /// console: `pty` or `socket:<path>` (toolstack).
    pub const CONSOLE: &str = "console";
    /// console: the pty the backend opened (backend).
    pub const TTY: &str = "tty";
    /// net: the guest's MAC address, `00:16:3e:12:34:56` (toolstack; xl's `mac`).
    pub const MAC: &str = "mac";
    /// net: the MTU offered, 68 to 9000 (toolstack, optional; absent is 1500).
    pub const MTU: &str = "mtu";
    /// net: `tap` (absent too) or `socket:<path>`, where the frames go (toolstack).
    pub const LINK: &str = "link";
    /// net: the bridge the TAP becomes a port of (toolstack, optional; xl's `bridge`).
    pub const BRIDGE: &str = "bridge";
    /// net: the TAP's name (toolstack, optional; xl's `vifname`; absent is `xvn<domid>.<devid>`).
    pub const VIFNAME: &str = "vifname";
    /// net: the TAP the backend made (backend).
    pub const TAP: &str = "tap";
    /// Requested number of queues (toolstack, optional).
    pub const REQUESTED_QUEUES: &str = "requested-queues";
    /// Offered features, hex u64 (backend, before InitWait).
    pub const DEVICE_FEATURES: &str = "device-features";
    /// Most queues the frontend may use (backend).
    pub const MAX_QUEUES: &str = "max-queues";
    /// Largest queue size (backend).
    pub const MAX_QUEUE_SIZE: &str = "max-queue-size";
    /// `1` if the backend keeps grants of a persistent arena mapped (backend).
    pub const FEATURE_PERSISTENT: &str = "feature-persistent";
    /// Most persistent grants the backend keeps mapped per device (backend).
    pub const MAX_PERSISTENT_GRANTS: &str = "max-persistent-grants";
    /// Pages all devices of the frontend's domain may have mapped together (backend).
    pub const MAX_PAGES_PER_DOMAIN: &str = "max-pages-per-domain";
    /// Largest bounce pool, in pages, the frontend should ask for on this device (backend).
    pub const MAX_BOUNCE_PAGES: &str = "max-bounce-pages";
    /// Device config space: lowercase hex of the little-endian struct (backend).
    pub const CONFIG: &str = "config";
    /// Incremented on every config change (backend).
    pub const CONFIG_GENERATION: &str = "config-generation";
    /// Why the backend gave up on the device (backend).
    pub const ERROR: &str = "error";
}

/// Keys of the frontend directory `/local/domain/<F>/device/virtio/<devid>/`.
pub mod frontend_keys {
    /// Path of the backend directory (toolstack).
    pub const BACKEND: &str = "backend";
    /// Backend domid (toolstack).
    pub const BACKEND_ID: &str = "backend-id";
    /// Frontend `XenbusState`.
    pub const STATE: &str = "state";
    /// Accepted features, hex u64 (frontend, at Initialised).
    pub const DRIVER_FEATURES: &str = "driver-features";
    /// The DMA strategy in use (frontend, at Initialised).
    pub const DMA: &str = "dma";
    /// Why this strategy was chosen, one line (frontend, at Initialised).
    pub const DMA_REASON: &str = "dma-reason";
    /// Number of queues set up (frontend).
    pub const NUM_QUEUES: &str = "num-queues";
    /// `1` if buffers come from a persistent arena of grants (frontend, `grant` only).
    pub const FEATURE_PERSISTENT: &str = "feature-persistent";
    /// Bounce pool size in pages (frontend, `bounce` only).
    pub const BOUNCE_PAGES: &str = "bounce/pages";
    /// Grant references of the bounce pool's directory pages (frontend, `bounce` only).
    pub const BOUNCE_DIR_REF: &str = "bounce/dir-ref";
    /// Why the frontend gave up on the device (frontend).
    pub const ERROR: &str = "error";

    /// `queue-<n>/<leaf>`.
    pub fn queue(n: u32, leaf: &str) -> String {
        format!("queue-{n}/{leaf}")
    }
    /// Leaf: queue size.
    pub const QUEUE_SIZE: &str = "size";
    /// Leaf: grant references of the ring area (`grant`, `bounce`).
    pub const QUEUE_RING_REF: &str = "ring-ref";
    /// Leaf: frame numbers of the ring area (`direct`).
    pub const QUEUE_RING_GFN: &str = "ring-gfn";
    /// Leaf: the frontend's unbound event-channel port.
    pub const QUEUE_EVENT_CHANNEL: &str = "event-channel";
}

/// Formats a feature word as xenstore holds it: `0x` and lowercase hex.
pub fn format_features(features: u64) -> String {
    format!("{features:#x}")
}

/// Lowercase hex of `bytes`, as the `config` key holds it.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// A `config` value that is not hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an even number of hex digits")]
pub struct BadHex(pub String);

/// Parses lowercase or uppercase hex.
pub fn decode_hex(s: &str) -> Result<Vec<u8>, BadHex> {
    let s = s.trim();
    if s.len() % 2 != 0 {
        return Err(BadHex(s.to_string()));
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| BadHex(s.to_string()))
}

/// Number of directory pages that list `pool_pages` grant references.
pub fn directory_pages(pool_pages: usize) -> usize {
    pool_pages.div_ceil(REFS_PER_DIRECTORY_PAGE)
}

/// Fills directory page `index` with its share of `refs` (little-endian `u32`s, unused
/// entries zero).
pub fn encode_directory_page(refs: &[u32], index: usize) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    let start = index * REFS_PER_DIRECTORY_PAGE;
    for (i, r) in refs
        .iter()
        .skip(start)
        .take(REFS_PER_DIRECTORY_PAGE)
        .enumerate()
    {
        page[4 * i..4 * i + 4].copy_from_slice(&r.to_le_bytes());
    }
    page
}

/// Reads the first `count` references of a private copy of a directory page.
pub fn decode_directory_page(page: &[u8; PAGE_SIZE], count: usize) -> Vec<u32> {
    page.chunks_exact(4)
        .take(count.min(REFS_PER_DIRECTORY_PAGE))
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(encode_hex(&b), "0001abff");
        assert_eq!(decode_hex("0001ABff").unwrap(), b);
        assert_eq!(decode_hex("").unwrap(), Vec::<u8>::new());
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("zz").is_err());
        assert_eq!(format_features(0x1_0000_0200), "0x100000200");
    }

    #[test]
    fn directory_pages_list_refs_in_order() {
        let refs: Vec<u32> = (100..100 + 1500).collect();
        assert_eq!(directory_pages(refs.len()), 2);
        assert_eq!(directory_pages(1024), 1);
        assert_eq!(directory_pages(0), 0);
        let p0 = encode_directory_page(&refs, 0);
        let p1 = encode_directory_page(&refs, 1);
        let mut back = decode_directory_page(&p0, 1024);
        back.extend(decode_directory_page(&p1, refs.len() - 1024));
        assert_eq!(back, refs);
        assert_eq!(&p1[4 * 476..4 * 477], &[0, 0, 0, 0]);
    }
}

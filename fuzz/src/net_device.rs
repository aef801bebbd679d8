//! Target `net_device`: the virtio-net device model ([`NetDevice`]) with any sequence of
//! transmit chains (any header, any frame length, any layout of windows), frames from the host
//! side of any length, and receive chains of any layout, over a datagram socket pair that
//! stands for the TAP.
//!
//! Each step is driven the way the daemon's data path drives it (`check_tx` on the lengths,
//! then `transmit` on the mapped windows; `next_frame`, then `drop_pending` or `deliver`).
//! Checked:
//! - nothing panics;
//! - a transmit chain reaches the host side exactly when it has no device-writable window, its
//!   length is a header plus 14 to `mtu + 18` bytes, and its header asks for no offload; then
//!   the host side gets a zeroed header and exactly the frame's bytes;
//! - a frame from the host side reaches a receive chain exactly when it is 14 to `mtu + 18`
//!   bytes, asks for no segmentation offload, names a partial checksum (if any) inside itself,
//!   and the chain holds it; then the chain holds the device's header and the frame (its partial
//!   checksum completed: the harness negotiates no offload), the used length is the packet's,
//!   and nothing past it, or outside the windows, is written;
//! - every dropped frame is counted once (`dropped`), and the sent and delivered ones too.

use std::collections::VecDeque;
use std::os::unix::net::UnixDatagram;

use xenvirtio_backend::net::NetDevice;
use xenvirtio_virtio::net::{self, ETH_HLEN, HDR_SIZE, MacAddr, NetHeader};
use xenvirtio_xen::mem::{PageBuf, SharedMem};

use crate::input::{Reader, Structured, Writer};

/// Bytes of the guest buffer the windows are cut from (a header and a 9018-byte frame fit).
const BUF_LEN: usize = 3 * 4096;

/// One window of a chain, in the guest buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Offset (modulo the buffer).
    pub offset: u16,
    /// Length (cut at the end of the buffer).
    pub len: u16,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A transmit chain: `header` at the buffer's start, then the pattern; its readable
    /// windows, and `writable` bytes of device-writable buffers (never mapped).
    Tx {
        /// The 12 header bytes.
        header: Vec<u8>,
        /// The readable windows.
        windows: Vec<Window>,
        /// Bytes of device-writable descriptors in the chain.
        writable: u16,
    },
    /// The host side sends a packet of `len` bytes (header included): a pattern, under a zeroed
    /// header when `seed` is even.
    Host {
        /// Its length.
        len: u16,
        /// Its pattern.
        seed: u8,
    },
    /// A receive chain of these writable windows.
    Rx {
        /// Its windows.
        windows: Vec<Window>,
    },
}

/// One fuzz input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetInput {
    /// The MTU: `68 + mtu % 8933`.
    pub mtu: u16,
    /// The steps.
    pub steps: Vec<Step>,
}

fn window(r: &mut Reader<'_>) -> Window {
    Window {
        offset: r.u16(),
        len: r.u16(),
    }
}

impl Structured for NetInput {
    fn read(r: &mut Reader<'_>) -> Self {
        Self {
            mtu: r.u16(),
            steps: r.list(16, |r| match r.choice(3) {
                0 => Step::Tx {
                    header: r.bytes(HDR_SIZE),
                    windows: r.list(6, window),
                    writable: r.u16(),
                },
                1 => Step::Host {
                    len: r.u16(),
                    seed: r.u8(),
                },
                _ => Step::Rx {
                    windows: r.list(6, window),
                },
            }),
        }
    }

    fn write(&self, w: &mut Writer) {
        w.u16(self.mtu);
        let win = |w: &mut Writer, x: &Window| {
            w.u16(x.offset);
            w.u16(x.len);
        };
        w.list(&self.steps, 16, |w, s| match s {
            Step::Tx {
                header,
                windows,
                writable,
            } => {
                w.choice(0, 3);
                w.bytes(header, HDR_SIZE);
                w.list(windows, 6, win);
                w.u16(*writable);
            }
            Step::Host { len, seed } => {
                w.choice(1, 3);
                w.u16(*len);
                w.u8(*seed);
            }
            Step::Rx { windows } => {
                w.choice(2, 3);
                w.list(windows, 6, win);
            }
        });
    }
}

crate::structured_input!(NetInput);

fn pattern(seed: u8, i: usize) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(seed) | 1
}

/// The windows inside the buffer, as the address resolver would cut them.
fn cut<'a>(mem: &SharedMem<'a>, windows: &[Window]) -> Vec<(usize, SharedMem<'a>)> {
    windows
        .iter()
        .map(|w| {
            let off = usize::from(w.offset) % BUF_LEN;
            let len = usize::from(w.len).min(BUF_LEN - off);
            (off, mem.slice(off, len).expect("inside the buffer"))
        })
        .collect()
}

fn header_of(packet: &[u8]) -> NetHeader {
    let mut h = [0u8; HDR_SIZE];
    h.copy_from_slice(&packet[..HDR_SIZE]);
    NetHeader::from_bytes(&h)
}

/// Whether a packet from the host side can reach a guest that negotiated no offload.
fn deliverable(p: &[u8], max: usize) -> bool {
    if p.len() > HDR_SIZE + max || p.len() < HDR_SIZE + ETH_HLEN {
        return false;
    }
    let h = header_of(p);
    h.gso_type == net::GSO_NONE
        && (h.flags & net::HDR_F_NEEDS_CSUM == 0 || h.csum_fits(p.len() - HDR_SIZE))
}

/// Runs one input and checks it.
pub fn run(input: &NetInput) {
    let mtu = 68 + input.mtu % 8933;
    let max = net::max_frame(mtu);
    let (ours, host) = UnixDatagram::pair().expect("a socket pair");
    // Non-blocking both ways: the device's queue holds few datagrams (`max_dgram_qlen`), and a
    // send to a full one must not block the harness; what the device sent is there at once.
    host.set_nonblocking(true).expect("non-blocking");
    let mut dev = NetDevice::over_socket(ours.into(), MacAddr::xen([1, 2, 3]), mtu)
        .expect("a device over the pair");
    let mut dropped = 0u64;
    let (mut sent, mut delivered) = (0u64, 0u64);
    // Packets the host side sent and the device has not consumed yet, in order.
    let mut queued: VecDeque<Vec<u8>> = VecDeque::new();
    let mut got = vec![0u8; 70_000];
    for step in &input.steps {
        match step {
            Step::Tx {
                header,
                windows,
                writable,
            } => {
                let buf = PageBuf::new(BUF_LEN / 4096);
                let mem = buf.mem();
                let mut init: Vec<u8> = (0..BUF_LEN).map(|i| pattern(7, i)).collect();
                init[..header.len()].copy_from_slice(header);
                mem.write(0, &init).expect("the buffer");
                let wins = cut(&mem, windows);
                let readable: Vec<SharedMem<'_>> =
                    wins.iter().map(|(_, m)| m.read_only()).collect();
                let len: usize = readable.iter().map(SharedMem::len).sum();
                let mut stream = Vec::with_capacity(len);
                for m in &readable {
                    let mut part = vec![0u8; m.len()];
                    m.read(0, &mut part).expect("readable");
                    stream.extend(part);
                }
                let asks = stream.len() >= HDR_SIZE && {
                    let mut h = [0u8; HDR_SIZE];
                    h.copy_from_slice(&stream[..HDR_SIZE]);
                    NetHeader::from_bytes(&h).asks_offload()
                };
                let valid = *writable == 0
                    && (HDR_SIZE + ETH_HLEN..=HDR_SIZE + max).contains(&len)
                    && !asks;
                let ok = u32::try_from(len)
                    .ok()
                    .is_some_and(|l| dev.check_tx(l, u32::from(*writable)).is_ok())
                    && dev.transmit(&readable).is_ok();
                assert_eq!(
                    ok, valid,
                    "sent {ok}, valid {valid}: len {len}, writable {writable}, asks {asks}"
                );
                match host.recv(&mut got) {
                    Ok(n) => {
                        assert!(valid, "an invalid chain reached the host side");
                        assert_eq!(&got[..HDR_SIZE], &[0u8; HDR_SIZE], "a clean header");
                        assert_eq!(&got[HDR_SIZE..n], &stream[HDR_SIZE..], "the frame's bytes");
                        sent += 1;
                    }
                    Err(_) => {
                        assert!(!valid, "a valid chain did not reach the host side");
                        dropped += 1;
                    }
                }
                let mut after = vec![0u8; BUF_LEN];
                mem.read(0, &mut after).expect("the buffer");
                assert!(
                    after == init,
                    "the guest's buffer is never written on transmit"
                );
            }
            Step::Host { len, seed } => {
                let mut p: Vec<u8> = (0..usize::from(*len)).map(|i| pattern(*seed, i)).collect();
                // An even seed sends a clean header (the pattern's would ask for offloads).
                if seed % 2 == 0 {
                    p.iter_mut().take(HDR_SIZE).for_each(|b| *b = 0);
                }
                if host.send(&p).is_ok() {
                    queued.push_back(p);
                }
            }
            Step::Rx { windows } => {
                let buf = PageBuf::new(BUF_LEN / 4096);
                let mem = buf.mem();
                let init: Vec<u8> = (0..BUF_LEN).map(|i| pattern(9, i)).collect();
                mem.write(0, &init).expect("the buffer");
                let wins = cut(&mem, windows);
                let room: usize = wins.iter().map(|(_, m)| m.len()).sum();
                // The device skips what it cannot deliver to anyone: too long, a runt, a
                // segmentation offload, a partial checksum whose place is outside the frame.
                while queued.front().is_some_and(|p| !deliverable(p, max)) {
                    queued.pop_front();
                    dropped += 1;
                }
                let next = dev.next_frame().expect("reading the pair");
                assert_eq!(
                    next,
                    queued.front().map(Vec::len),
                    "the next frame is the next good packet"
                );
                let Some(n) = next else { continue };
                let packet = queued.pop_front().expect("checked above");
                if room < n {
                    dev.drop_pending();
                    dropped += 1;
                    let mut after = vec![0u8; BUF_LEN];
                    mem.read(0, &mut after).expect("the buffer");
                    assert_eq!(after, init, "a small buffer is not written");
                    continue;
                }
                // The data path maps only the first `n` bytes of the chain.
                let mut left = n;
                let mut clipped = Vec::new();
                let mut spans = Vec::new();
                for (off, m) in &wins {
                    if left == 0 {
                        break;
                    }
                    let take = m.len().min(left);
                    clipped.push(m.slice(0, take).expect("inside"));
                    spans.push((*off, take));
                    left -= take;
                }
                let used = dev.deliver(&clipped).expect("delivering");
                assert_eq!(used as usize, n);
                delivered += 1;
                let mut after = vec![0u8; BUF_LEN];
                mem.read(0, &mut after).expect("the buffer");
                let mut inside = vec![false; BUF_LEN];
                for &(off, take) in &spans {
                    inside[off..off + take].iter_mut().for_each(|b| *b = true);
                }
                for (i, (a, b)) in after.iter().zip(&init).enumerate() {
                    assert!(
                        inside[i] || a == b,
                        "byte {i} outside the clipped windows changed"
                    );
                }
                // Windows may overlap: the last write of each byte wins. Replay the stream.
                let mut expect = init.clone();
                let mut stream = NetHeader::received().to_bytes().to_vec();
                stream.extend(&packet[HDR_SIZE..]);
                // No GUEST_CSUM was negotiated: a partial checksum is completed for the guest.
                let h = header_of(&packet);
                if h.flags & net::HDR_F_NEEDS_CSUM != 0 {
                    assert!(net::complete_checksum(
                        &mut stream[HDR_SIZE..],
                        h.csum_start,
                        h.csum_offset
                    ));
                }
                let mut at = 0;
                for &(off, take) in &spans {
                    expect[off..off + take].copy_from_slice(&stream[at..at + take]);
                    at += take;
                }
                assert_eq!(after, expect, "the chain holds the header and the frame");
            }
        }
    }
    let c = dev.counters();
    assert_eq!(c.tx_frames, sent);
    assert_eq!(c.rx_frames, delivered);
    assert_eq!(c.dropped(), dropped, "every dropped frame is counted once");
}

/// Seeds: a frame each way, a too-long one, an offload header, a small receive buffer.
pub fn seeds() -> Vec<(&'static str, NetInput)> {
    let w = |offset, len| Window { offset, len };
    let zero = vec![0u8; HDR_SIZE];
    let mut csum = zero.clone();
    csum[0] = 1;
    vec![
        (
            "both_ways",
            NetInput {
                mtu: 1500 - 68,
                steps: vec![
                    Step::Tx {
                        header: zero.clone(),
                        windows: vec![w(0, 12), w(12, 1000)],
                        writable: 0,
                    },
                    Step::Host { len: 1012, seed: 3 },
                    Step::Rx {
                        windows: vec![w(0, 600), w(4096, 1000)],
                    },
                ],
            },
        ),
        (
            "too_long_and_offload",
            NetInput {
                mtu: 0,
                steps: vec![
                    Step::Tx {
                        header: zero.clone(),
                        windows: vec![w(0, 12 + 87)],
                        writable: 0,
                    },
                    Step::Tx {
                        header: csum,
                        windows: vec![w(0, 100)],
                        writable: 0,
                    },
                    Step::Tx {
                        header: zero,
                        windows: vec![w(0, 100)],
                        writable: 8,
                    },
                ],
            },
        ),
        (
            "small_rx_buffer",
            NetInput {
                mtu: 1500 - 68,
                steps: vec![
                    Step::Host { len: 5000, seed: 1 },
                    Step::Host { len: 200, seed: 2 },
                    Step::Host { len: 20, seed: 4 },
                    Step::Host { len: 300, seed: 5 },
                    Step::Rx {
                        windows: vec![w(0, 100)],
                    },
                    Step::Rx {
                        windows: vec![w(100, 100), w(100, 250)],
                    },
                ],
            },
        ),
    ]
}

//! Target `wire_codecs`: the small parsers of values a peer controls, each with its
//! round-trip or strictness property.
//!
//! - xenstore framing ([`Framer`]): the messages it yields, re-encoded, are exactly the bytes
//!   pushed, in order; it errs only on a payload over 4096 bytes, and holds the rest;
//! - NUL-separated strings and `GET_PERMS` lists: parsed names hold no NUL and re-parse the
//!   same; a parsed permission prints back to an equal one;
//! - DMA addresses ([`DmaAddr::decode`], `decode_range`): a decoded address encodes back to
//!   the same 64 bits (nothing is dropped or reinterpreted), and an accepted range obeys its
//!   strategy's rule of PROTOCOL.md section 4;
//! - `config` hex ([`decode_hex`]) and bounce directory pages round-trip;
//! - node values: `state`, the `type` string, the DMA strategy name, and the typed xenbus reads
//!   (over the in-memory store) accept only what their documentation says, and read back
//!   what they accepted;
//! - the blk and console config structs re-encode to the bytes they were decoded from.

use xenvirtio_virtio::blk::{BLK_CONFIG_SIZE, BlkConfig};
use xenvirtio_virtio::console::{CONSOLE_CONFIG_SIZE, ConsoleConfig};
use xenvirtio_virtio::dma::{DmaAddr, DmaStrategy};
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::protocol::{
    PAGE_SIZE, REFS_PER_DIRECTORY_PAGE, decode_directory_page, decode_hex, encode_directory_page,
    encode_hex,
};
use xenvirtio_xenstore::wire::{self, Framer, HEADER_LEN, MsgHeader, PAYLOAD_MAX};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{MemStore, Perm, TxId, XenStore};

use crate::input::{Reader, Structured, Writer};

/// One fuzz input: which codec, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodecInput {
    /// Chunks pushed into a framer one after the other.
    Framer(Vec<Vec<u8>>),
    /// A NUL-separated payload (directory listing, perms).
    Strings(Vec<u8>),
    /// A DMA address under a strategy (`% 3`), with a length and a pool of `pool_pages`.
    Dma {
        /// Strategy index.
        strategy: u8,
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
        /// Pool pages for `bounce`.
        pool_pages: u16,
    },
    /// A `config` value.
    Hex(Vec<u8>),
    /// A directory page (zero-padded to 4096 bytes) and the count to read.
    Directory(Vec<u8>, u16),
    /// A node value read as every typed value.
    Value(Vec<u8>),
    /// A config space as blk and console decode it.
    Config(Vec<u8>),
}

impl Structured for CodecInput {
    fn read(r: &mut Reader<'_>) -> Self {
        match r.choice(7) {
            0 => CodecInput::Framer(r.list(8, |r| r.bytes(600))),
            1 => CodecInput::Strings(r.bytes(512)),
            2 => CodecInput::Dma {
                strategy: r.u8(),
                addr: r.u64(),
                len: r.u32(),
                pool_pages: r.u16(),
            },
            3 => CodecInput::Hex(r.bytes(256)),
            4 => CodecInput::Directory(r.bytes(4096), r.u16()),
            5 => CodecInput::Value(r.bytes(128)),
            _ => CodecInput::Config(r.bytes(96)),
        }
    }

    fn write(&self, w: &mut Writer) {
        match self {
            CodecInput::Framer(chunks) => {
                w.choice(0, 7);
                w.list(chunks, 8, |w, c| w.bytes(c, 600));
            }
            CodecInput::Strings(b) => {
                w.choice(1, 7);
                w.bytes(b, 512);
            }
            CodecInput::Dma {
                strategy,
                addr,
                len,
                pool_pages,
            } => {
                w.choice(2, 7);
                w.u8(*strategy);
                w.u64(*addr);
                w.u32(*len);
                w.u16(*pool_pages);
            }
            CodecInput::Hex(b) => {
                w.choice(3, 7);
                w.bytes(b, 256);
            }
            CodecInput::Directory(b, n) => {
                w.choice(4, 7);
                w.bytes(b, 4096);
                w.u16(*n);
            }
            CodecInput::Value(b) => {
                w.choice(5, 7);
                w.bytes(b, 128);
            }
            CodecInput::Config(b) => {
                w.choice(6, 7);
                w.bytes(b, 96);
            }
        }
    }
}

crate::structured_input!(CodecInput);

/// Runs one input.
pub fn run(input: &CodecInput) {
    match input {
        CodecInput::Framer(chunks) => framer(chunks),
        CodecInput::Strings(b) => strings(b),
        CodecInput::Dma {
            strategy,
            addr,
            len,
            pool_pages,
        } => dma(
            DmaStrategy::ALL[usize::from(strategy % 3)],
            *addr,
            *len,
            u64::from(*pool_pages) * PAGE_SIZE as u64,
        ),
        CodecInput::Hex(b) => hex(b),
        CodecInput::Directory(b, n) => directory(b, usize::from(*n)),
        CodecInput::Value(b) => value(b),
        CodecInput::Config(b) => config(b),
    }
}

fn framer(chunks: &[Vec<u8>]) {
    let mut framer = Framer::new();
    let stream: Vec<u8> = chunks.concat();
    let mut consumed = 0usize;
    let mut pushed = 0usize;
    for c in chunks {
        framer.push(c);
        pushed += c.len();
        loop {
            match framer.next_message() {
                Ok(Some(m)) => {
                    assert_eq!(m.header.len as usize, m.payload.len());
                    let mut bytes = m.header.encode().to_vec();
                    bytes.extend_from_slice(&m.payload);
                    assert_eq!(
                        stream[consumed..consumed + bytes.len()],
                        bytes,
                        "a message that is not the stream's next bytes"
                    );
                    consumed += bytes.len();
                }
                Ok(None) => {
                    let left = pushed - consumed;
                    assert_eq!(framer.pending(), left);
                    if left >= HEADER_LEN {
                        let head: [u8; HEADER_LEN] = stream[consumed..consumed + HEADER_LEN]
                            .try_into()
                            .expect("a header");
                        let len = MsgHeader::decode(&head).len as usize;
                        assert!(
                            len <= PAYLOAD_MAX && left < HEADER_LEN + len,
                            "a whole message held back"
                        );
                    }
                    break;
                }
                Err(e) => {
                    let head: [u8; HEADER_LEN] = stream[consumed..consumed + HEADER_LEN]
                        .try_into()
                        .expect("an error needs a header");
                    assert_eq!(MsgHeader::decode(&head).len, e.len);
                    assert!(e.len as usize > PAYLOAD_MAX);
                    return;
                }
            }
        }
    }
}

fn strings(b: &[u8]) {
    let first = wire::first_string(b);
    assert!(!first.contains(&0) && b.starts_with(first));
    if let Some(names) = wire::split_strings(b) {
        for n in &names {
            assert!(!n.contains('\0'));
        }
        let again = wire::split_strings(&wire::join_strings(&names));
        // A list whose last name is empty loses it in the round trip ("a\0\0" is "a" ended
        // twice); every other list comes back whole.
        if names.last().is_some_and(|n| !n.is_empty()) || names.is_empty() {
            assert_eq!(again.as_ref(), Some(&names), "names re-parse differently");
        }
    }
    if let Ok(perms) = Perm::parse_list(b) {
        for p in perms {
            assert_eq!(
                Perm::parse(&p.to_string()).expect("a printed perm parses"),
                p
            );
        }
    }
}

fn dma(strategy: DmaStrategy, addr: u64, len: u32, pool_len: u64) {
    if let Ok(a) = DmaAddr::decode(strategy, addr) {
        assert_eq!(
            a.encode(),
            addr,
            "{strategy} address {addr:#x} decoded lossily as {a:?}"
        );
        match a {
            DmaAddr::Grant { offset, .. } => assert!(offset < 4096),
            DmaAddr::Bounce { offset } => assert!(offset < 1 << 62),
            DmaAddr::Direct { gpa } => assert!(gpa < 1 << 62),
        }
    }
    if let Ok(a) = DmaAddr::decode_range(strategy, addr, len, pool_len) {
        assert_eq!(DmaAddr::decode(strategy, addr), Ok(a));
        let len = u64::from(len);
        match a {
            DmaAddr::Grant { offset, .. } => assert!(u64::from(offset) + len <= 4096),
            DmaAddr::Bounce { offset } => assert!(offset + len <= pool_len),
            DmaAddr::Direct { gpa } => assert!(gpa + len <= 1 << 62),
        }
    }
}

fn hex(b: &[u8]) {
    let s = String::from_utf8_lossy(b);
    if let Ok(bytes) = decode_hex(&s) {
        assert_eq!(
            encode_hex(&bytes),
            s.trim().to_ascii_lowercase(),
            "hex {s:?}"
        );
    }
}

fn directory(b: &[u8], count: usize) {
    let mut page = [0u8; PAGE_SIZE];
    page[..b.len()].copy_from_slice(b);
    let refs = decode_directory_page(&page, count);
    let n = count.min(REFS_PER_DIRECTORY_PAGE);
    assert_eq!(refs.len(), n);
    assert_eq!(encode_directory_page(&refs, 0)[..4 * n], page[..4 * n]);
}

fn value(b: &[u8]) {
    let text = std::str::from_utf8(b).map(str::trim_ascii);
    if let Some(state) = XenbusState::from_node_value(b) {
        let t = text.expect("a state is UTF-8");
        assert!(
            t.is_empty()
                || (t.bytes().all(|c| c.is_ascii_digit()) && t.parse::<u32>() == Ok(state.value())),
            "{t:?} read as state {state}"
        );
    }
    let s = String::from_utf8_lossy(b);
    if let Some(id) = DeviceKind::parse_type_string(&s) {
        let hex = s.strip_prefix("virtio,device").expect("the prefix");
        assert!(
            !hex.is_empty() && hex.bytes().all(|c| c.is_ascii_hexdigit()),
            "type {s:?} read as device {id:#x}"
        );
    }
    if let Ok(strategy) = s.parse::<DmaStrategy>() {
        assert_eq!(strategy.name(), s);
    }
    // The typed reads, through a store holding the value.
    let store = MemStore::new();
    let c = store.connect(0).expect("dom0 connects");
    let path = "/v";
    if c.write(TxId::NONE, path, b).is_err() {
        return;
    }
    let tx = TxId::NONE;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit());
    if let Ok(v) = xenbus::read_u64(&c, tx, path) {
        let t = text.expect("UTF-8");
        assert!(
            digits(t) && t.parse::<u64>() == Ok(v),
            "{t:?} read as u64 {v}"
        );
    }
    if let Ok(v) = xenbus::read_u32(&c, tx, path) {
        let t = text.expect("UTF-8");
        assert!(
            digits(t) && t.parse::<u32>() == Ok(v),
            "{t:?} read as u32 {v}"
        );
    }
    if let Ok(v) = xenbus::read_hex_u64(&c, tx, path) {
        let t = text.expect("UTF-8");
        let d = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .unwrap_or(t);
        assert!(
            !d.is_empty()
                && d.bytes().all(|c| c.is_ascii_hexdigit())
                && u64::from_str_radix(d, 16) == Ok(v),
            "{t:?} read as hex {v:#x}"
        );
        assert_eq!(
            xenbus::read_hex_u64(&c, tx, path).ok(),
            Some(v),
            "reads are stable"
        );
    }
    if let Ok(v) = xenbus::read_bool(&c, tx, path) {
        assert_eq!(text.expect("UTF-8"), if v { "1" } else { "0" });
    }
    if let Ok(words) = xenbus::read_list(&c, tx, path) {
        for w in &words {
            assert!(!w.is_empty() && !w.bytes().any(|c| c.is_ascii_whitespace()));
        }
        assert_eq!(
            words.join(" "),
            text.expect("UTF-8")
                .split_ascii_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if let Ok(state) = xenbus::read_state(&c, tx, path) {
        assert_eq!(XenbusState::from_node_value(b), Some(state));
    }
}

fn config(b: &[u8]) {
    let mut padded = b.to_vec();
    padded.resize(BLK_CONFIG_SIZE, 0);
    assert_eq!(
        BlkConfig::from_bytes(b).to_bytes()[..],
        padded[..BLK_CONFIG_SIZE]
    );
    let mut padded = b.to_vec();
    padded.resize(CONSOLE_CONFIG_SIZE.max(b.len()), 0);
    assert_eq!(
        ConsoleConfig::from_bytes(b).to_bytes()[..],
        padded[..CONSOLE_CONFIG_SIZE]
    );
}

/// Seeds: values from the codecs' unit tests.
pub fn seeds() -> Vec<(&'static str, CodecInput)> {
    let msg = |ty: u32, payload: &[u8]| {
        let mut v = MsgHeader {
            msg_type: ty,
            req_id: 1,
            tx_id: 0,
            len: payload.len() as u32,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(payload);
        v
    };
    let two = [msg(2, b"OK\0"), msg(15, b"/a\0tok\0")].concat();
    let mut oversized = msg(2, b"");
    oversized[12..16].copy_from_slice(&4097u32.to_le_bytes());
    let dma = |strategy, addr, len, pool_pages| CodecInput::Dma {
        strategy,
        addr,
        len,
        pool_pages,
    };
    let mut dir = Vec::new();
    for r in 100u32..110 {
        dir.extend_from_slice(&r.to_le_bytes());
    }
    vec![
        (
            "framer_split",
            CodecInput::Framer(vec![
                two[..5].to_vec(),
                two[5..30].to_vec(),
                two[30..].to_vec(),
            ]),
        ),
        ("framer_oversized", CodecInput::Framer(vec![oversized])),
        ("strings", CodecInput::Strings(b"a\0bb\0\0c".to_vec())),
        ("perms", CodecInput::Strings(b"n5\0r7\0b32752\0".to_vec())),
        ("grant_addr", dma(0, 0x8000_0000_0123_4010, 96, 0)),
        ("grant_reserved", dma(0, (1 << 63) | (1 << 50), 1, 0)),
        ("bounce_addr", dma(1, (1 << 62) | 8192, 4096, 3)),
        ("direct_addr", dma(2, (1 << 62) - 2, 4, 0)),
        ("hex", CodecInput::Hex(b"0001ABff".to_vec())),
        ("directory", CodecInput::Directory(dir, 10)),
        ("state", CodecInput::Value(b"4\n".to_vec())),
        ("hex_value", CodecInput::Value(b"0x1f".to_vec())),
        ("list_value", CodecInput::Value(b"a  b c".to_vec())),
        (
            "type_string",
            CodecInput::Value(b"virtio,device1a".to_vec()),
        ),
        ("strategy", CodecInput::Value(b"bounce".to_vec())),
        ("config", CodecInput::Config((0..72).collect())),
    ]
}

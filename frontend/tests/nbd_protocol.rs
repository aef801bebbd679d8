//! `NbdServer` against a raw socket: the handshake byte by byte, every refusal the protocol
//! names, the caps on what a client can make the server allocate, and the shutdown paths.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod nbd_support;

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_support::raw::{Raw, info_data};
use nbd_support::*;
use xenvirtio_frontend::nbd::proto::{self, OptionHeader, Request};
use xenvirtio_frontend::nbd::{FileExport, NbdServer, NbdServerConfig, NbdServerError};

const SIZE: u64 = 8 << 20;
const MAX: u32 = 32 << 20;

fn served(
    config: impl FnOnce(NbdServerConfig) -> NbdServerConfig,
    read_only: bool,
) -> (Image, NbdServer) {
    let img = Image::new(SIZE as usize, Some(3));
    let config = config(NbdServerConfig::new(EXPORT).unix(img.socket()));
    let server = NbdServer::start(img.export(read_only), config).unwrap();
    (img, server)
}

fn plain() -> (Image, NbdServer) {
    served(|c| c, false)
}

#[test]
fn greeting_is_fixed_newstyle_offering_no_zeroes() {
    let (img, _server) = plain();
    let mut raw = Raw::connect(&img.socket());
    let mut greeting = [0u8; 18];
    raw.s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(
        u16::from_be_bytes([greeting[16], greeting[17]]),
        0b11,
        "FIXED_NEWSTYLE | NO_ZEROES"
    );
}

#[test]
fn unknown_client_flags_and_bad_option_magic_close_only_that_connection() {
    let (img, server) = plain();
    // A good client is connected throughout.
    let (mut good, _, _) = Raw::transmission(&img.socket());

    let mut bad_flags = Raw::hello(&img.socket(), 1 << 5);
    bad_flags.expect_closed();

    let mut bad_magic = Raw::hello(&img.socket(), 1);
    bad_magic.send(b"GARBAGE!GARBAGE!GARBAGE!");
    bad_magic.expect_closed();

    let nothing = Raw::connect(&img.socket());
    drop(nothing.s.shutdown(std::net::Shutdown::Both));

    assert_eq!(good.read(0, 512), img.contents()[..512]);
    assert!(
        wait_until(Duration::from_secs(5), || server.stats().protocol_errors
            == 2),
        "{:?}",
        server.stats()
    );
}

#[test]
fn unsupported_options_get_err_unsup_and_the_session_continues() {
    let (img, _server) = plain();
    let mut raw = Raw::hello(&img.socket(), 3);
    for (option, data) in [
        (0xdead_u32, b"some data".to_vec()),
        (proto::OPT_STARTTLS, vec![]),
        (4, vec![]),  // the withdrawn PEEK_EXPORT
        (11, vec![]), // EXTENDED_HEADERS
    ] {
        raw.option(option, &data);
        let (echo, reply, message) = raw.option_reply();
        assert_eq!(
            (echo, reply),
            (option, proto::REP_ERR_UNSUP),
            "option {option}"
        );
        assert!(
            String::from_utf8(message)
                .unwrap()
                .contains("not supported")
        );
    }
    raw.option(proto::OPT_LIST, &[]);
    let (option, reply, data) = raw.option_reply();
    assert_eq!((option, reply), (proto::OPT_LIST, proto::REP_SERVER));
    assert_eq!(data, [&[0, 0, 0, 4][..], b"xvda"].concat());
    assert_eq!(raw.option_reply().1, proto::REP_ACK);

    let (size, flags) = raw.go("");
    assert_eq!(size, SIZE);
    let expected = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_TRIM
        | proto::FLAG_SEND_WRITE_ZEROES
        | proto::FLAG_CAN_MULTI_CONN;
    assert_eq!(flags, expected);
    assert_eq!(raw.read(4096, 4096), img.contents()[4096..8192]);
}

#[test]
fn info_describes_the_export_and_refuses_what_it_must() {
    let (img, _server) = served(
        |c| NbdServerConfig {
            description: Some("test disk".into()),
            ..c
        },
        false,
    );
    let mut raw = Raw::hello(&img.socket(), 3);

    raw.option(
        proto::OPT_INFO,
        &info_data(
            "",
            &[
                proto::INFO_NAME,
                proto::INFO_DESCRIPTION,
                proto::INFO_BLOCK_SIZE,
                99,
            ],
        ),
    );
    let mut seen = Vec::new();
    loop {
        let (option, reply, data) = raw.option_reply();
        assert_eq!(option, proto::OPT_INFO);
        if reply == proto::REP_ACK {
            break;
        }
        assert_eq!(reply, proto::REP_INFO);
        let kind = u16::from_be_bytes([data[0], data[1]]);
        let payload = &data[2..];
        match kind {
            proto::INFO_EXPORT => {
                assert_eq!(&payload[..8], &SIZE.to_be_bytes());
                assert_eq!(payload.len(), 10);
            }
            proto::INFO_NAME => assert_eq!(payload, b"xvda"),
            proto::INFO_DESCRIPTION => assert_eq!(payload, b"test disk"),
            proto::INFO_BLOCK_SIZE => {
                let be = |i: usize| u32::from_be_bytes(payload[i..i + 4].try_into().unwrap());
                assert_eq!((be(0), be(4), be(8)), (512, 4096, MAX));
            }
            other => panic!("unexpected information type {other}"),
        }
        seen.push(kind);
    }
    seen.sort();
    assert_eq!(seen, [0, 1, 2, 3]);

    raw.option(proto::OPT_INFO, &info_data("nope", &[]));
    let (_, reply, message) = raw.option_reply();
    assert_eq!(reply, proto::REP_ERR_UNKNOWN);
    assert!(String::from_utf8(message).unwrap().contains("xvda"));

    // A name length running past the data, and a count that does not match the data.
    raw.option(proto::OPT_GO, &[0, 0, 0, 9, b'x', 0, 0]);
    assert_eq!(raw.option_reply().1, proto::REP_ERR_INVALID);
    raw.option(proto::OPT_GO, &[0, 0, 0, 0, 0, 2, 0, 3]);
    assert_eq!(raw.option_reply().1, proto::REP_ERR_INVALID);
    raw.option(proto::OPT_LIST, b"x");
    assert_eq!(raw.option_reply().1, proto::REP_ERR_INVALID);

    // The session is still in option haggling; GO enters transmission (no zeroes follow).
    assert_eq!(raw.go(EXPORT).0, SIZE);
    assert_eq!(raw.read(0, 512), img.contents()[..512]);
}

#[test]
fn export_name_sends_zeroes_unless_the_client_agreed_otherwise() {
    let (img, _server) = plain();
    let data = img.contents();
    for (client_flags, padding) in [(3u32, 0usize), (1, 124), (0, 124)] {
        let mut raw = Raw::hello(&img.socket(), client_flags);
        raw.option(proto::OPT_EXPORT_NAME, b"xvda");
        let mut reply = vec![0u8; 10 + padding];
        raw.s.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..8], &SIZE.to_be_bytes());
        assert!(reply[10..].iter().all(|&b| b == 0));
        // Transmission starts right after: a read proves no stray bytes were sent.
        assert_eq!(
            raw.read(512, 512),
            data[512..1024],
            "client flags {client_flags}"
        );
    }
}

#[test]
fn export_name_of_an_unknown_export_and_options_from_a_plain_newstyle_client_close() {
    let (img, _server) = plain();
    let mut raw = Raw::hello(&img.socket(), 1);
    raw.option(proto::OPT_EXPORT_NAME, b"nope");
    raw.expect_closed();

    // Without NBD_FLAG_C_FIXED_NEWSTYLE there are no option replies to refuse with.
    let mut raw = Raw::hello(&img.socket(), 0);
    raw.option(proto::OPT_LIST, &[]);
    raw.expect_closed();
}

#[test]
fn abort_is_acknowledged_and_oversized_options_are_cut_off() {
    let (img, server) = plain();
    let mut raw = Raw::hello(&img.socket(), 1);
    raw.option(proto::OPT_ABORT, b"ignored");
    let (option, reply, _) = raw.option_reply();
    assert_eq!((option, reply), (proto::OPT_ABORT, proto::REP_ACK));
    raw.expect_closed();

    // An option claiming 16 MiB of data is not read into memory: the connection ends.
    let mut raw = Raw::hello(&img.socket(), 1);
    raw.send(
        &OptionHeader {
            option: proto::OPT_GO,
            length: 16 << 20,
        }
        .encode(),
    );
    raw.expect_closed();
    assert_eq!(server.stats().protocol_errors, 1);
}

#[test]
fn out_of_range_and_misaligned_requests_are_refused_and_the_session_continues() {
    let (img, server) = plain();
    let (mut raw, _, _) = Raw::transmission(&img.socket());
    // Reads and trims past the end: EINVAL; writes past the end: ENOSPC.
    assert_eq!(
        raw.error_of(0, proto::CMD_READ, SIZE - 512, 1024),
        proto::EINVAL
    );
    assert_eq!(raw.error_of(0, proto::CMD_READ, SIZE, 512), proto::EINVAL);
    assert_eq!(
        raw.error_of(0, proto::CMD_READ, u64::MAX - 511, 512),
        proto::EINVAL
    );
    assert_eq!(
        raw.error_of(0, proto::CMD_TRIM, SIZE - 512, 1024),
        proto::EINVAL
    );
    assert_eq!(
        raw.error_of(0, proto::CMD_WRITE, SIZE - 512, 1024),
        proto::ENOSPC
    );
    assert_eq!(
        raw.error_of(0, proto::CMD_WRITE_ZEROES, SIZE, 512),
        proto::ENOSPC
    );
    // Misaligned offsets and lengths: EINVAL (the WRITE payload is drained).
    assert_eq!(raw.error_of(0, proto::CMD_READ, 100, 512), proto::EINVAL);
    assert_eq!(raw.error_of(0, proto::CMD_READ, 512, 100), proto::EINVAL);
    assert_eq!(raw.error_of(0, proto::CMD_WRITE, 1, 512), proto::EINVAL);
    assert_eq!(raw.error_of(0, proto::CMD_WRITE, 0, 1000), proto::EINVAL);
    assert_eq!(raw.error_of(0, proto::CMD_TRIM, 256, 512), proto::EINVAL);
    assert_eq!(
        raw.error_of(0, proto::CMD_WRITE_ZEROES, 0, 513),
        proto::EINVAL
    );
    // Nothing was written, and the session is in step.
    assert!(img.contents() == Image::new(SIZE as usize, Some(3)).contents());
    assert_eq!(raw.read(0, 1024), img.contents()[..1024]);
    assert_eq!(server.stats().request_errors, 12);
    assert_eq!(server.stats().protocol_errors, 0);
}

#[test]
fn oversized_requests_are_refused_without_allocating() {
    let (img, _server) = plain();
    let (mut raw, _, _) = Raw::transmission(&img.socket());
    // Over the advertised maximum block size: EINVAL, no data follows.
    assert_eq!(
        raw.error_of(0, proto::CMD_READ, 0, MAX + 512),
        proto::EINVAL
    );
    assert_eq!(
        raw.error_of(0, proto::CMD_READ, 0, 0xffff_fe00),
        proto::EINVAL
    );
    assert_eq!(
        raw.error_of(0, proto::CMD_WRITE_ZEROES, 0, MAX + 512),
        proto::EINVAL
    );
    // An oversized WRITE's payload is drained through the bounded buffer, then refused.
    assert_eq!(
        raw.error_of(0, proto::CMD_WRITE, 0, MAX + 512),
        proto::EINVAL
    );
    // A read of exactly the maximum would pass the cap (it fails only on the export's size).
    assert_eq!(raw.error_of(0, proto::CMD_READ, 0, MAX), proto::EINVAL);
    assert_eq!(raw.read(0, 4096), img.contents()[..4096]);
}

#[test]
fn large_requests_cross_the_io_chunk_and_trim_is_not_capped() {
    let img = Image::new(40 << 20, Some(4));
    let server = img.serve(false);
    let (mut raw, size, _) = Raw::transmission(&img.socket());
    assert_eq!(size, 40 << 20);
    let mut data = vec![0u8; MAX as usize];
    Rng::new(10).fill(&mut data);
    raw.write(proto::CMD_FLAG_FUA, 4 << 20, &data);
    assert!(
        raw.read(4 << 20, MAX) == data,
        "a 32 MiB read returned other data"
    );
    assert!(img.contents()[4 << 20..(4 << 20) + MAX as usize] == data[..]);
    // TRIM is bound by the export, not by the maximum block size.
    assert_eq!(raw.error_of(0, proto::CMD_TRIM, 0, 40 << 20), 0);
    assert_eq!(server.stats().request_errors, 0);
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let (img, _server) = plain();
    let (mut raw, _, _) = Raw::transmission(&img.socket());
    assert_eq!(raw.error_of(0, proto::CMD_CACHE, 0, 512), proto::EINVAL);
    assert_eq!(
        raw.error_of(0, proto::CMD_BLOCK_STATUS, 0, 512),
        proto::EINVAL
    );
    assert_eq!(raw.error_of(0, 0x99, 0, 512), proto::EINVAL);
    assert_eq!(
        raw.error_of(proto::CMD_FLAG_DF, proto::CMD_READ, 0, 512),
        proto::EINVAL
    );
    assert_eq!(raw.error_of(1 << 9, proto::CMD_READ, 0, 512), proto::EINVAL);
    assert_eq!(
        raw.error_of(proto::CMD_FLAG_NO_HOLE, proto::CMD_WRITE, 0, 512),
        proto::EINVAL
    );
    assert_eq!(
        raw.error_of(proto::CMD_FLAG_FAST_ZERO, proto::CMD_WRITE_ZEROES, 0, 512),
        proto::EINVAL
    );
    assert_eq!(raw.error_of(0, proto::CMD_FLUSH, 512, 0), proto::EINVAL);
    assert_eq!(raw.error_of(0, proto::CMD_FLUSH, 0, 512), proto::EINVAL);
    // FUA is valid on every command once negotiated.
    assert_eq!(raw.error_of(proto::CMD_FLAG_FUA, proto::CMD_FLUSH, 0, 0), 0);
    raw.request(proto::CMD_FLAG_FUA, proto::CMD_READ, 5, 0, 512);
    assert_eq!(raw.reply().error, 0);
    let mut sector = [0u8; 512];
    raw.s.read_exact(&mut sector).unwrap();
    assert_eq!(sector[..], img.contents()[..512]);
}

#[test]
fn writes_flush_trim_and_write_zeroes_reach_the_file() {
    let (img, server) = plain();
    let (mut raw, _, _) = Raw::transmission(&img.socket());
    let mut expected = img.contents();
    raw.write(0, 512, &[0x12; 1536]);
    raw.write(proto::CMD_FLAG_FUA, 1 << 20, &[0x34; 4096]);
    assert_eq!(raw.error_of(0, proto::CMD_FLUSH, 0, 0), 0);
    assert_eq!(
        raw.error_of(
            proto::CMD_FLAG_NO_HOLE,
            proto::CMD_WRITE_ZEROES,
            65536,
            8192
        ),
        0
    );
    assert_eq!(
        raw.error_of(proto::CMD_FLAG_FUA, proto::CMD_WRITE_ZEROES, 131072, 4096),
        0
    );
    assert_eq!(raw.error_of(0, proto::CMD_TRIM, 262144, 4096), 0);
    // Zero-length requests are answered, not disconnected.
    assert_eq!(raw.error_of(0, proto::CMD_READ, 0, 0), 0);
    assert_eq!(raw.error_of(0, proto::CMD_WRITE, 0, 0), 0);
    assert_eq!(raw.error_of(0, proto::CMD_TRIM, 0, 0), 0);
    expected[512..2048].fill(0x12);
    expected[1 << 20..(1 << 20) + 4096].fill(0x34);
    expected[65536..73728].fill(0);
    expected[131072..135168].fill(0);
    let actual = img.contents();
    assert!(actual[..262144] == expected[..262144]);
    assert!(actual[266240..] == expected[266240..]);
    assert_eq!(server.stats().bytes_written, 1536 + 4096);
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    let (img, _server) = served(|c| c, true);
    let before = img.contents();
    let (mut raw, _, flags) = Raw::transmission(&img.socket());
    assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
    assert_eq!(
        flags & (proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES | proto::FLAG_SEND_FUA),
        0
    );
    assert_eq!(raw.error_of(0, proto::CMD_WRITE, 0, 4096), proto::EPERM);
    assert_eq!(raw.error_of(0, proto::CMD_TRIM, 0, 4096), proto::EPERM);
    assert_eq!(
        raw.error_of(0, proto::CMD_WRITE_ZEROES, 0, 4096),
        proto::EPERM
    );
    assert_eq!(raw.error_of(0, proto::CMD_FLUSH, 0, 0), 0);
    assert_eq!(raw.read(0, 4096), before[..4096]);
    assert!(img.contents() == before);
}

#[test]
fn disc_closes_cleanly_and_bad_request_magic_closes_hard() {
    let (img, server) = plain();
    let (mut raw, _, _) = Raw::transmission(&img.socket());
    raw.request(0, proto::CMD_DISC, 1, 0, 0);
    raw.expect_closed(); // no reply to DISC, then the end
    assert_eq!(server.stats().protocol_errors, 0);

    let (mut raw, _, _) = Raw::transmission(&img.socket());
    raw.send(&[0x55; proto::REQUEST_LEN]);
    raw.expect_closed();
    assert!(wait_until(Duration::from_secs(5), || server
        .stats()
        .protocol_errors
        == 1));
}

#[test]
fn the_handshake_times_out_but_transmission_may_idle() {
    let (img, _server) = served(
        |c| NbdServerConfig {
            handshake_timeout: Duration::from_millis(300),
            ..c
        },
        false,
    );
    let started = Instant::now();
    let mut idle = Raw::hello(&img.socket(), 1);
    idle.expect_closed();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let (mut raw, _, _) = Raw::transmission(&img.socket());
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(raw.read(0, 512), img.contents()[..512]);
}

#[test]
fn connections_over_the_limit_are_closed_at_accept() {
    let (img, server) = served(
        |c| NbdServerConfig {
            max_connections: 2,
            ..c
        },
        false,
    );
    let (first, _, _) = Raw::transmission(&img.socket());
    let (mut second, _, _) = Raw::transmission(&img.socket());
    let mut third = Raw::connect(&img.socket());
    third.expect_closed();
    assert_eq!(server.stats().connections_refused, 1);
    drop(first);
    assert!(wait_until(Duration::from_secs(5), || server
        .stats()
        .connections_active
        == 1));
    let (mut fourth, _, _) = Raw::transmission(&img.socket());
    assert_eq!(fourth.read(0, 512), second.read(0, 512));
}

#[test]
fn bad_configurations_are_refused_with_clear_errors() {
    let img = Image::new(1 << 20, None);
    let start = |config: NbdServerConfig| NbdServer::start(img.export(false), config).unwrap_err();

    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    assert!(matches!(
        start(NbdServerConfig::new(EXPORT).tcp(any)),
        NbdServerError::NotLoopback(_)
    ));
    let lan: SocketAddr = "192.168.1.1:10809".parse().unwrap();
    assert!(matches!(
        start(NbdServerConfig::new(EXPORT).tcp(lan)),
        NbdServerError::NotLoopback(_)
    ));
    assert!(matches!(
        start(NbdServerConfig::new(EXPORT)),
        NbdServerError::NoListener
    ));
    let unaligned_max = NbdServerConfig {
        max_request: 1000,
        ..NbdServerConfig::new(EXPORT).unix(img.socket())
    };
    assert!(matches!(start(unaligned_max), NbdServerError::Config(_)));
    let nul = NbdServerConfig::new("a\0b").unix(img.socket());
    assert!(matches!(start(nul), NbdServerError::Config(_)));
    let odd = Arc::new(
        FileExport::open(&img.path, false)
            .unwrap()
            .with_block_size(3),
    );
    let e = NbdServer::start(odd, NbdServerConfig::new(EXPORT).unix(img.socket())).unwrap_err();
    assert!(e.to_string().contains("minimum block size"), "{e}");

    // A regular file is never replaced; a live socket is never stolen; a stale one is.
    let file = img.file("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        start(NbdServerConfig::new(EXPORT).unix(&file)),
        NbdServerError::NotASocket(_)
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let live = img.file("live.sock");
    let _listener = UnixListener::bind(&live).unwrap();
    assert!(matches!(
        start(NbdServerConfig::new(EXPORT).unix(&live)),
        NbdServerError::SocketInUse(_)
    ));
    let stale = img.file("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server =
        NbdServer::start(img.export(false), NbdServerConfig::new(EXPORT).unix(&stale)).unwrap();
    let mut raw = Raw::hello(&stale, 3);
    assert_eq!(raw.go(EXPORT).0, 1 << 20);
    drop(raw);
    server.shutdown();
    assert!(!stale.exists());
}

#[test]
fn shutdown_answers_late_options_and_requests_then_closes() {
    let (img, server) = plain();
    let before = img.contents();
    let trigger = server.shutdown_trigger();

    // A client in the middle of an INFO option when the shutdown comes.
    let mut haggling = Raw::hello(&img.socket(), 3);
    let info = info_data(EXPORT, &[]);
    haggling.send(
        &OptionHeader {
            option: proto::OPT_INFO,
            length: info.len() as u32,
        }
        .encode(),
    );
    haggling.send(&info[..3]);
    // A client in the middle of a WRITE payload.
    let (mut writing, _, _) = Raw::transmission(&img.socket());
    writing.request(0, proto::CMD_WRITE, 1, 0, 4096);
    writing.send(&[0xff; 1000]);
    // An idle client.
    let (mut idle, _, _) = Raw::transmission(&img.socket());
    assert!(wait_until(Duration::from_secs(5), || server
        .stats()
        .requests
        == 1));

    trigger.trigger();
    assert!(trigger.is_triggered());
    idle.expect_closed();
    assert!(
        wait_until(Duration::from_secs(5), || !img.socket().exists()),
        "still listening"
    );
    assert!(UnixStream::connect(img.socket()).is_err());

    // The started messages complete within the grace period and are refused.
    let mut rest = info[3..].to_vec();
    rest.extend_from_slice(
        &OptionHeader {
            option: proto::OPT_ABORT,
            length: 0,
        }
        .encode(),
    );
    haggling.send(&rest);
    assert_eq!(haggling.option_reply().1, proto::REP_ERR_SHUTDOWN);
    assert_eq!(haggling.option_reply().1, proto::REP_ACK);
    haggling.expect_closed();

    // Requests behind the shutdown get ESHUTDOWN, and a late WRITE's payload is drained, not
    // written. The first WRITE is in flight if the server read its header before the trigger
    // (it then completes: `shutdown_waits_for_the_request_in_flight` pins that down with a
    // slow export); if the server was slower than the trigger, it is refused like the others.
    let mut rest = vec![0xff; 3096];
    let late_read = Request {
        flags: 0,
        command: proto::CMD_READ,
        handle: 2,
        offset: 0,
        length: 512,
    };
    rest.extend_from_slice(&late_read.encode());
    let late_write = Request {
        flags: 0,
        command: proto::CMD_WRITE,
        handle: 3,
        offset: 8192,
        length: 512,
    };
    rest.extend_from_slice(&late_write.encode());
    rest.extend_from_slice(&[0xaa; 512]);
    writing.send(&rest);
    // Requests are served concurrently: the first WRITE's reply may come after the refusals.
    let mut replies: Vec<(u64, u32)> = (0..3)
        .map(|_| writing.reply())
        .map(|r| (r.handle, r.error))
        .collect();
    replies.sort_unstable();
    assert_eq!(replies[1..], [(2, proto::ESHUTDOWN), (3, proto::ESHUTDOWN)]);
    writing.expect_closed();

    server.shutdown();
    let mut expected = before;
    match replies[0] {
        (1, 0) => expected[..4096].fill(0xff),
        (1, proto::ESHUTDOWN) => {}
        other => panic!("the first WRITE got {other:?}"),
    }
    assert!(
        img.contents() == expected,
        "the in-flight write is missing or a late one landed"
    );
}

#[test]
fn a_client_that_never_finishes_its_message_is_cut_off_after_the_grace_period() {
    let (img, server) = served(
        |c| NbdServerConfig {
            shutdown_grace: Duration::from_millis(200),
            ..c
        },
        false,
    );
    let (mut stuck, _, _) = Raw::transmission(&img.socket());
    stuck.request(0, proto::CMD_WRITE, 1, 0, 4096);
    stuck.send(&[0; 100]);
    // Make sure the server is inside the payload before shutting down.
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    server.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        started.elapsed()
    );
    stuck.expect_closed();
}

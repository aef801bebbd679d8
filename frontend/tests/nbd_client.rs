//! `NbdClient` against `NbdServer`, against an independent server (`qemu-nbd`), and against
//! scripted servers that exercise its fallbacks and its distrust.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod nbd_support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nbd_support::*;
use xenvirtio_frontend::nbd::proto::{self, BlockSizes, OptionReplyHeader, Request, SimpleReply};
use xenvirtio_frontend::nbd::{NbdAddress, NbdClient, NbdClientError, NbdServer, NbdServerConfig};

/// Exercises every operation and checks the image file afterwards; panics on the first
/// difference.
fn exercise(client: &mut NbdClient, image: &Path, seed: u64) {
    let size = client.size() as usize;
    let mut expected = std::fs::read(image).unwrap();
    assert_eq!(expected.len(), size);
    let mut rng = Rng::new(seed);

    // Writes of many sizes at many aligned offsets, one over the server's 1 MiB I/O chunk.
    for round in 0..40 {
        let len = if round == 0 {
            5 << 20
        } else {
            (1 + rng.below(256) as usize) * 512
        };
        let offset = rng.below(((size - len) / 512) as u64) as usize * 512;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        if round % 5 == 0 {
            client.write_at_fua(&data, offset as u64).unwrap();
        } else {
            client.write_at(&data, offset as u64).unwrap();
        }
        expected[offset..offset + len].copy_from_slice(&data);
    }
    client.flush().unwrap();
    client.write_zeroes(65536, 131072, true).unwrap();
    client.write_zeroes(1 << 20, 65536, false).unwrap();
    expected[65536..196608].fill(0);
    expected[1 << 20..(1 << 20) + 65536].fill(0);
    // Trim a range, then overwrite it: its contents are defined again.
    client.trim(2 << 20, 1 << 20).unwrap();
    client
        .write_at(&expected[2 << 20..3 << 20], 2 << 20)
        .unwrap();

    let mut all = vec![0u8; size];
    client.read_at(&mut all, 0).unwrap();
    assert!(
        all == expected,
        "the client read back other data than it wrote"
    );
    client.flush().unwrap();
    assert!(
        std::fs::read(image).unwrap() == expected,
        "the image file differs"
    );
}

#[test]
fn client_against_our_server_over_unix_and_tcp() {
    let img = Image::new(8 << 20, Some(21));
    let tcp: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = NbdServerConfig {
        description: Some("client test".into()),
        ..NbdServerConfig::new(EXPORT).unix(img.socket()).tcp(tcp)
    };
    let server = NbdServer::start(img.export(false), config).unwrap();

    let unix = NbdAddress::Unix(img.socket());
    let mut client = NbdClient::connect(&unix, EXPORT).unwrap();
    assert_eq!(client.size(), 8 << 20);
    assert_eq!(
        client.block_sizes(),
        BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 32 << 20
        }
    );
    assert!(client.can_flush() && client.can_trim() && client.can_write_zeroes());
    assert!(client.can_multi_conn() && !client.read_only());
    exercise(&mut client, &img.path, 1);

    // Requests that cannot be valid are refused before they are sent.
    let before = server.stats().requests;
    let mut buf = vec![0u8; 512];
    assert!(matches!(
        client.read_at(&mut buf, 100),
        Err(NbdClientError::InvalidRequest(_))
    ));
    assert!(matches!(
        client.read_at(&mut buf[..100], 0),
        Err(NbdClientError::InvalidRequest(_))
    ));
    assert!(matches!(
        client.write_at(&buf, 8 << 20),
        Err(NbdClientError::InvalidRequest(_))
    ));
    assert!(matches!(
        client.trim(u64::MAX - 511, 512),
        Err(NbdClientError::InvalidRequest(_))
    ));
    assert_eq!(server.stats().requests, before);
    // ... and the connection is still good.
    client.read_at(&mut buf, 0).unwrap();
    client.disconnect().unwrap();

    let port = server.tcp_addr().unwrap();
    let mut client = NbdClient::connect(&NbdAddress::Tcp(port), "").unwrap();
    assert_eq!(client.export_name(), "");
    exercise(&mut client, &img.path, 2);
    drop(client);

    assert_eq!(
        NbdClient::list_exports(&unix).unwrap(),
        [("xvda".to_owned(), "client test".to_owned())]
    );
    match NbdClient::connect(&unix, "nope") {
        Err(NbdClientError::UnknownExport { name, message }) => {
            assert_eq!(name, "nope");
            assert!(message.contains("xvda"), "{message}");
        }
        other => panic!("connected to an unknown export: {other:?}"),
    }
    assert_eq!(server.stats().request_errors, 0);
}

#[test]
fn client_splits_requests_at_the_servers_maximum() {
    let img = Image::new(2 << 20, Some(22));
    let config = NbdServerConfig {
        max_request: 64 * 1024,
        ..NbdServerConfig::new(EXPORT).unix(img.socket())
    };
    let server = NbdServer::start(img.export(false), config).unwrap();
    let mut client = NbdClient::connect_unix(img.socket(), EXPORT).unwrap();
    assert_eq!(client.block_sizes().maximum, 64 * 1024);
    let before = server.stats().requests;
    let mut all = vec![0u8; 1 << 20];
    client.read_at(&mut all, 0).unwrap();
    assert_eq!(server.stats().requests - before, 16);
    assert!(all[..] == img.contents()[..1 << 20]);
    client.write_zeroes(0, 1 << 20, false).unwrap();
    assert_eq!(server.stats().requests - before, 32);
    assert!(img.contents()[..1 << 20].iter().all(|&b| b == 0));
    assert_eq!(server.stats().request_errors, 0);
}

#[test]
fn client_on_a_read_only_export_refuses_writes() {
    let img = Image::new(1 << 20, Some(23));
    let _server = img.serve(true);
    let mut client = NbdClient::connect_unix(img.socket(), EXPORT).unwrap();
    assert!(client.read_only());
    assert!(matches!(
        client.write_at(&[0; 512], 0),
        Err(NbdClientError::InvalidRequest(_))
    ));
    assert!(matches!(
        client.write_zeroes(0, 512, false),
        Err(NbdClientError::InvalidRequest(_))
    ));
    assert!(matches!(
        client.write_at_fua(&[0; 512], 0),
        Err(NbdClientError::Unsupported(_))
    ));
    let mut buf = vec![0u8; 4096];
    client.read_at(&mut buf, 4096).unwrap();
    assert!(buf[..] == img.contents()[4096..8192]);
}

/// `qemu-nbd` serving a file; killed and reaped on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    fn start(image: &Path, socket: &Path, extra: &[&str]) -> QemuNbd {
        let mut args = vec!["--persistent"];
        args.extend_from_slice(&["-k", socket.to_str().unwrap(), "-f", "raw", "-x", EXPORT]);
        args.extend_from_slice(extra);
        args.push(image.to_str().unwrap());
        let child = Command::new(tool("qemu-nbd"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-nbd");
        let mut server = QemuNbd {
            child,
            socket: socket.to_owned(),
        };
        let up = wait_until(Duration::from_secs(10), || {
            UnixStream::connect(socket).is_ok()
        });
        if !up {
            let status = server.child.try_wait();
            panic!(
                "qemu-nbd did not come up on {}: {status:?}",
                socket.display()
            );
        }
        server
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[test]
fn client_against_qemu_nbd() {
    let img = Image::new(8 << 20, Some(31));
    let qemu = QemuNbd::start(
        &img.path,
        &img.socket(),
        &["--discard=unmap", "--cache=none"],
    );
    let address = NbdAddress::Unix(qemu.socket.clone());

    let mut client = NbdClient::connect(&address, EXPORT).unwrap();
    assert_eq!(client.size(), 8 << 20);
    assert!(client.can_flush() && client.can_trim() && client.can_write_zeroes());
    assert!(client.block_sizes().minimum.is_power_of_two());
    exercise(&mut client, &img.path, 3);
    client.disconnect().unwrap();

    // --persistent: successive clients, each seeing the previous one's writes.
    let expected = img.contents();
    for round in 0..5u8 {
        let mut client = NbdClient::connect(&address, EXPORT).unwrap();
        let mut buf = vec![0u8; 4096];
        client.read_at(&mut buf, u64::from(round) * 4096).unwrap();
        if round > 0 {
            assert_eq!(buf, vec![round - 1; 4096]);
        } else {
            assert!(buf[..] == expected[..4096]);
        }
        client
            .write_at(&[round; 4096], (u64::from(round) + 1) * 4096)
            .unwrap();
        client
            .read_at(&mut buf, (u64::from(round) + 1) * 4096)
            .unwrap();
        assert_eq!(buf, vec![round; 4096]);
    }

    let exports = NbdClient::list_exports(&address).unwrap();
    assert!(
        exports.iter().any(|(name, _)| name == EXPORT),
        "{exports:?}"
    );
    assert!(matches!(
        NbdClient::connect(&address, "nope"),
        Err(NbdClientError::UnknownExport { .. })
    ));
    drop(qemu);

    let qemu = QemuNbd::start(&img.path, &img.socket(), &["--read-only"]);
    let mut client = NbdClient::connect(&NbdAddress::Unix(qemu.socket.clone()), EXPORT).unwrap();
    assert!(client.read_only());
    let mut buf = vec![0u8; 8192];
    client.read_at(&mut buf, 0).unwrap();
    assert!(buf[..] == img.contents()[..8192]);
}

// ---- Scripted servers --------------------------------------------------------------------

/// Runs `script` as the server of one connection on a fresh unix socket; returns the socket
/// path and the server thread (which panics if the script's checks fail).
fn scripted(
    script: impl FnOnce(UnixStream) + Send + 'static,
) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let thread = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        script(s);
    });
    (dir, path, thread)
}

fn greet(s: &mut UnixStream, flags: u16) -> u32 {
    s.write_all(b"NBDMAGICIHAVEOPT").unwrap();
    s.write_all(&flags.to_be_bytes()).unwrap();
    let mut c = [0u8; 4];
    s.read_exact(&mut c).unwrap();
    u32::from_be_bytes(c)
}

fn read_option(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..8], b"IHAVEOPT");
    let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let mut data = vec![0u8; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
    s.read_exact(&mut data).unwrap();
    (option, data)
}

fn option_reply(s: &mut UnixStream, option: u32, reply: u32, data: &[u8]) {
    s.write_all(
        &OptionReplyHeader {
            option,
            reply,
            length: data.len() as u32,
        }
        .encode(),
    )
    .unwrap();
    s.write_all(data).unwrap();
}

fn read_request(s: &mut UnixStream) -> Request {
    let mut h = [0u8; proto::REQUEST_LEN];
    s.read_exact(&mut h).unwrap();
    Request::decode(&h).unwrap()
}

const FLAGS: u16 = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH;

#[test]
fn client_falls_back_to_export_name_when_go_is_unsupported() {
    let (_dir, path, server) = scripted(|mut s| {
        let client_flags = greet(&mut s, proto::FLAG_FIXED_NEWSTYLE);
        assert_eq!(
            client_flags,
            proto::FLAG_C_FIXED_NEWSTYLE,
            "NO_ZEROES was not offered"
        );
        let (option, _) = read_option(&mut s);
        assert_eq!(option, proto::OPT_GO);
        option_reply(&mut s, option, proto::REP_ERR_UNSUP, b"");
        let (option, name) = read_option(&mut s);
        assert_eq!(
            (option, name.as_slice()),
            (proto::OPT_EXPORT_NAME, b"disk".as_slice())
        );
        s.write_all(&(1u64 << 20).to_be_bytes()).unwrap();
        s.write_all(&FLAGS.to_be_bytes()).unwrap();
        s.write_all(&[0; 124]).unwrap(); // no NO_ZEROES agreed: the padding follows
        let r = read_request(&mut s);
        assert_eq!(
            (r.command, r.offset, r.length),
            (proto::CMD_READ, 4096, 512)
        );
        s.write_all(
            &SimpleReply {
                error: 0,
                handle: r.handle,
            }
            .encode(),
        )
        .unwrap();
        s.write_all(&[0x42; 512]).unwrap();
        assert_eq!(read_request(&mut s).command, proto::CMD_DISC);
    });
    let mut client = NbdClient::connect_unix(&path, "disk").unwrap();
    assert_eq!(client.size(), 1 << 20);
    assert_eq!(client.block_sizes(), BlockSizes::DEFAULT);
    assert!(!client.can_trim());
    assert!(matches!(
        client.trim(0, 512),
        Err(NbdClientError::Unsupported("TRIM"))
    ));
    let mut buf = [0u8; 512];
    client.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, [0x42; 512]);
    client.disconnect().unwrap();
    server.join().expect("the scripted server's checks failed");
}

#[test]
fn client_speaks_plain_newstyle_to_an_old_server() {
    let (_dir, path, server) = scripted(|mut s| {
        assert_eq!(
            greet(&mut s, 0),
            0,
            "the client sent flags an old server did not offer"
        );
        let (option, _) = read_option(&mut s);
        assert_eq!(option, proto::OPT_EXPORT_NAME);
        s.write_all(&(1u64 << 20).to_be_bytes()).unwrap();
        s.write_all(&FLAGS.to_be_bytes()).unwrap();
        s.write_all(&[0; 124]).unwrap();
        assert_eq!(read_request(&mut s).command, proto::CMD_DISC);
    });
    let client = NbdClient::connect_unix(&path, "").unwrap();
    assert_eq!(client.size(), 1 << 20);
    drop(client); // sends DISC
    server.join().expect("the scripted server's checks failed");
}

/// A server that completes GO with NO_ZEROES, then runs `transmission`.
fn go_then(
    transmission: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
    scripted(move |mut s| {
        greet(&mut s, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        let (option, _) = read_option(&mut s);
        assert_eq!(option, proto::OPT_GO);
        let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 20).to_be_bytes());
        info.extend_from_slice(&FLAGS.to_be_bytes());
        option_reply(&mut s, option, proto::REP_INFO, &info);
        option_reply(&mut s, option, proto::REP_INFO, &[0, 77, 1, 2, 3]); // unknown: ignored
        option_reply(&mut s, option, proto::REP_ACK, &[]);
        transmission(&mut s);
    })
}

#[test]
fn client_rejects_a_reply_for_the_wrong_handle() {
    let (_dir, path, server) = go_then(|s| {
        let r = read_request(s);
        s.write_all(
            &SimpleReply {
                error: 0,
                handle: r.handle + 1,
            }
            .encode(),
        )
        .unwrap();
    });
    let mut client = NbdClient::connect_unix(&path, "").unwrap();
    let mut buf = [0u8; 512];
    let e = client.read_at(&mut buf, 0).unwrap_err();
    assert!(
        matches!(e, NbdClientError::Protocol(ref m) if m.contains("handle")),
        "{e}"
    );
    assert!(matches!(
        client.read_at(&mut buf, 0),
        Err(NbdClientError::Closed)
    ));
    server.join().unwrap();
}

#[test]
fn client_rejects_an_unnegotiated_structured_reply() {
    let (_dir, path, server) = go_then(|s| {
        let r = read_request(s);
        let mut chunk = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        chunk.extend_from_slice(&[0, 1, 0, 0]);
        chunk.extend_from_slice(&r.handle.to_be_bytes());
        s.write_all(&chunk).unwrap();
    });
    let mut client = NbdClient::connect_unix(&path, "").unwrap();
    let mut buf = [0u8; 512];
    let e = client.read_at(&mut buf, 0).unwrap_err();
    assert!(
        matches!(e, NbdClientError::Protocol(ref m) if m.contains("structured")),
        "{e}"
    );
    server.join().unwrap();
}

#[test]
fn client_reports_server_errors_and_disconnects_on_eshutdown() {
    let (_dir, path, server) = go_then(|s| {
        let r = read_request(s);
        assert_eq!(r.command, proto::CMD_WRITE);
        let mut payload = vec![0u8; r.length as usize];
        s.read_exact(&mut payload).unwrap();
        s.write_all(
            &SimpleReply {
                error: proto::EIO,
                handle: r.handle,
            }
            .encode(),
        )
        .unwrap();
        let r = read_request(s);
        assert_eq!(r.command, proto::CMD_FLUSH);
        s.write_all(
            &SimpleReply {
                error: proto::ESHUTDOWN,
                handle: r.handle,
            }
            .encode(),
        )
        .unwrap();
        // "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft disconnect."
        assert_eq!(read_request(s).command, proto::CMD_DISC);
    });
    let mut client = NbdClient::connect_unix(&path, "").unwrap();
    let e = client.write_at(&[1; 1024], 512).unwrap_err();
    assert!(
        matches!(
            e,
            NbdClientError::Command {
                command: proto::CMD_WRITE,
                error: proto::EIO,
                offset: 512,
                length: 1024
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("EIO"), "{e}");
    assert!(matches!(client.flush(), Err(NbdClientError::ShutDown)));
    assert!(matches!(client.flush(), Err(NbdClientError::Closed)));
    server.join().expect("the scripted server's checks failed");
}

#[test]
fn client_refuses_servers_it_cannot_speak_to() {
    let (_dir, path, server) = scripted(|mut s| {
        s.write_all(b"NBDMAGIC").unwrap();
        s.write_all(&proto::OLDSTYLE_MAGIC.to_be_bytes()).unwrap();
    });
    let e = NbdClient::connect_unix(&path, "").unwrap_err();
    assert!(
        matches!(e, NbdClientError::Handshake(ref m) if m.contains("oldstyle")),
        "{e}"
    );
    server.join().unwrap();

    let (_dir, path, server) = scripted(|mut s| {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n").unwrap();
    });
    assert!(matches!(
        NbdClient::connect_unix(&path, ""),
        Err(NbdClientError::Handshake(_))
    ));
    server.join().unwrap();
}

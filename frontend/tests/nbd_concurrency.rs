//! `NbdServer` with concurrent and successive clients, misbehaving clients next to good ones,
//! and a graceful shutdown with a request in flight.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod nbd_support;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use nbd_support::*;
use xenvirtio_frontend::nbd::proto::{self, OptionHeader, Request};
use xenvirtio_frontend::nbd::{
    BlockExport, FileExport, NbdClient, NbdClientError, NbdServer, NbdServerConfig,
};

const BLOCK: usize = 64 * 1024;

fn block_data(block: usize, round: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK];
    Rng::new(block as u64 * 1000 + round).fill(&mut data);
    data
}

#[test]
fn concurrent_clients_interleave_writes_to_disjoint_ranges() {
    const CLIENTS: usize = 8;
    const BLOCKS: usize = 256;
    let img = Image::new(BLOCKS * BLOCK, None);
    let server = img.serve(false);
    let socket = img.socket();
    let connected = Arc::new(Barrier::new(CLIENTS + 1));
    let go = Arc::new(Barrier::new(CLIENTS + 1));

    let threads: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let (socket, connected, go) = (socket.clone(), connected.clone(), go.clone());
            std::thread::spawn(move || {
                let mut client = NbdClient::connect_unix(&socket, EXPORT).unwrap();
                assert!(client.can_multi_conn());
                connected.wait();
                go.wait();
                // This client's blocks, in a shuffled order, each written twice (the second
                // version wins) with reads of earlier blocks in between.
                let mut mine: Vec<usize> = (t..BLOCKS).step_by(CLIENTS).collect();
                let mut rng = Rng::new(t as u64);
                for i in (1..mine.len()).rev() {
                    mine.swap(i, rng.below(i as u64 + 1) as usize);
                }
                for round in 0..2 {
                    for (n, &block) in mine.iter().enumerate() {
                        client
                            .write_at(&block_data(block, round), (block * BLOCK) as u64)
                            .unwrap();
                        let earlier = mine[rng.below(n as u64 + 1) as usize];
                        let mut buf = vec![0u8; BLOCK];
                        client.read_at(&mut buf, (earlier * BLOCK) as u64).unwrap();
                        let expect_round = if mine[..=n].contains(&earlier) {
                            round
                        } else {
                            0
                        };
                        assert!(
                            buf == block_data(earlier, expect_round),
                            "client {t} block {earlier}"
                        );
                    }
                }
                client.flush().unwrap();
                client.disconnect().unwrap();
            })
        })
        .collect();
    connected.wait();
    // Every client holds its connection at once.
    assert_eq!(server.stats().connections_active, CLIENTS as u64);
    go.wait();
    for t in threads {
        t.join().expect("client thread");
    }

    let mut expected = Vec::with_capacity(BLOCKS * BLOCK);
    for block in 0..BLOCKS {
        expected.extend_from_slice(&block_data(block, 1));
    }
    assert!(
        img.contents() == expected,
        "the image differs from the clients' writes"
    );
    let mut check = NbdClient::connect_unix(&socket, "").unwrap();
    let mut all = vec![0u8; BLOCKS * BLOCK];
    check.read_at(&mut all, 0).unwrap();
    assert!(all == expected);
    let stats = server.stats();
    assert_eq!(stats.request_errors + stats.protocol_errors, 0, "{stats:?}");
    assert_eq!(stats.connections_accepted, CLIENTS as u64 + 1);
}

#[test]
fn successive_clients_see_each_others_writes() {
    let img = Image::new(1 << 20, None);
    let server = img.serve(false);
    for round in 0..40u64 {
        let mut client = NbdClient::connect_unix(img.socket(), EXPORT).unwrap();
        if round > 0 {
            let mut buf = vec![0u8; BLOCK];
            client
                .read_at(&mut buf, ((round - 1) % 16) * BLOCK as u64)
                .unwrap();
            assert!(buf == block_data(0, round - 1), "round {round}");
        }
        client
            .write_at(&block_data(0, round), (round % 16) * BLOCK as u64)
            .unwrap();
        // Alternate the ways a client may leave: DISC, or dropping (which sends DISC).
        if round % 2 == 0 {
            client.disconnect().unwrap();
        } else {
            drop(client);
        }
    }
    assert!(wait_until(Duration::from_secs(5), || server
        .stats()
        .connections_active
        == 0));
    assert_eq!(server.stats().connections_accepted, 40);
    assert_eq!(server.stats().protocol_errors, 0);
}

#[test]
fn parallel_qemu_io_processes_write_disjoint_patterns() {
    const PROCESSES: u64 = 4;
    const CHUNK: u64 = 128 * 1024;
    let img = Image::new(8 << 20, None);
    let _server = img.serve(false);
    let uri = unix_uri(&img.socket(), EXPORT);
    // Process p writes chunks p, p + 4, p + 8, ... with its own byte, all processes at once.
    let children: Vec<_> = (0..PROCESSES)
        .map(|p| {
            let mut args = vec!["-f".to_owned(), "raw".to_owned(), uri.clone()];
            for i in 0..(64 / PROCESSES) {
                let offset = (i * PROCESSES + p) * CHUNK;
                args.push("-c".into());
                args.push(format!("write -P {:#04x} {offset} {CHUNK}", 0x10 + p));
            }
            std::process::Command::new(tool("qemu-io"))
                .args(&args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let data = img.contents();
    for (i, chunk) in data.chunks(CHUNK as usize).enumerate() {
        let expected = 0x10 + (i as u64 % PROCESSES) as u8;
        assert!(
            chunk.iter().all(|&b| b == expected),
            "chunk {i} is not {expected:#x}"
        );
    }
}

/// Misbehaviours, each on its own connection.
fn misbehave(socket: &Path, kind: u64) -> io::Result<()> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut greeting = [0u8; 18];
    match kind % 7 {
        // Connect and vanish.
        0 => return Ok(()),
        // Garbage instead of client flags and options.
        1 => {
            s.write_all(b"\x00\x00\x00\x01GET / HTTP/1.1\r\n\r\n")?;
        }
        // Half a handshake.
        2 => {
            s.read_exact(&mut greeting)?;
            s.write_all(&[0, 0])?;
        }
        // An option announcing 16 MiB of data.
        3 => {
            s.read_exact(&mut greeting)?;
            s.write_all(&1u32.to_be_bytes())?;
            s.write_all(
                &OptionHeader {
                    option: proto::OPT_GO,
                    length: 16 << 20,
                }
                .encode(),
            )?;
        }
        // GO, then half a WRITE, then gone.
        4 | 5 => {
            s.read_exact(&mut greeting)?;
            s.write_all(&3u32.to_be_bytes())?;
            let mut go = OptionHeader {
                option: proto::OPT_GO,
                length: 6,
            }
            .encode()
            .to_vec();
            go.extend_from_slice(&[0; 6]);
            s.write_all(&go)?;
            // Skip the option replies (INFO export, INFO block size, ACK).
            let mut replies = vec![0u8; (20 + 12) + (20 + 14) + 20];
            s.read_exact(&mut replies)?;
            if kind % 7 == 4 {
                let write = Request {
                    flags: 0,
                    command: proto::CMD_WRITE,
                    handle: 1,
                    offset: 0,
                    length: 65536,
                };
                s.write_all(&write.encode())?;
                s.write_all(&[0xde; 1000])?;
            } else {
                s.write_all(&[0xad; 28])?; // bad request magic
            }
        }
        // A request header cut in half after the handshake came through EXPORT_NAME.
        _ => {
            s.read_exact(&mut greeting)?;
            s.write_all(&3u32.to_be_bytes())?;
            s.write_all(
                &OptionHeader {
                    option: proto::OPT_EXPORT_NAME,
                    length: 0,
                }
                .encode(),
            )?;
            let mut reply = [0u8; 10];
            s.read_exact(&mut reply)?;
            s.write_all(
                &Request {
                    flags: 0,
                    command: proto::CMD_READ,
                    handle: 1,
                    offset: 0,
                    length: 512,
                }
                .encode()[..13],
            )?;
        }
    }
    Ok(())
}

#[test]
fn garbage_and_abrupt_clients_do_not_disturb_good_ones() {
    let img = Image::new(4 << 20, None);
    let server = img.serve(false);
    let socket = img.socket();
    let stop = Arc::new(AtomicBool::new(false));

    let good: Vec<_> = (0..2usize)
        .map(|g| {
            let (socket, stop) = (socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut client = NbdClient::connect_unix(&socket, EXPORT).unwrap();
                let mut ops = 0u64;
                while !stop.load(Ordering::Relaxed) || ops < 100 {
                    let block = g * 16 + (ops % 16) as usize;
                    let data = block_data(block, ops);
                    client.write_at(&data, (block * BLOCK) as u64).unwrap();
                    let mut back = vec![0u8; BLOCK];
                    client.read_at(&mut back, (block * BLOCK) as u64).unwrap();
                    assert!(back == data, "good client {g} read other data at op {ops}");
                    ops += 1;
                }
                client.disconnect().unwrap();
                ops
            })
        })
        .collect();

    for kind in 0..70 {
        // A misbehaving client may be cut off before it is done; that is its own business.
        let _ = misbehave(&socket, kind);
    }
    stop.store(true, Ordering::Relaxed);
    for g in good {
        assert!(g.join().expect("good client") >= 100);
    }
    // Everyone is gone; nothing leaked; the server still serves.
    assert!(
        wait_until(Duration::from_secs(10), || server
            .stats()
            .connections_active
            == 0),
        "{:?}",
        server.stats()
    );
    let stats = server.stats();
    // Kinds 3 and 5 always break the protocol (20 connections); garbage sent before the
    // greeting may instead end in a write error when the client is gone first.
    assert!(stats.protocol_errors >= 20, "{stats:?}");
    assert_eq!(stats.connections_accepted, 2 + 70);
    let mut client = NbdClient::connect_unix(&socket, EXPORT).unwrap();
    let mut buf = vec![0u8; 512];
    client.read_at(&mut buf, 0).unwrap();
}

/// A `FileExport` whose writes take a while and announce that they started.
struct SlowExport {
    inner: FileExport,
    delay: Duration,
    started: std::sync::Mutex<Option<mpsc::Sender<()>>>,
}

impl BlockExport for SlowExport {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(tx) = self.started.lock().unwrap().take() {
            let _ = tx.send(());
        }
        std::thread::sleep(self.delay);
        self.inner.write_at(buf, offset)
    }
    fn can_flush(&self) -> bool {
        true
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn shutdown_waits_for_the_request_in_flight() {
    let img = Image::new(1 << 20, None);
    let (tx, rx) = mpsc::channel();
    let export = Arc::new(SlowExport {
        inner: FileExport::open(&img.path, false).unwrap(),
        delay: Duration::from_millis(600),
        started: std::sync::Mutex::new(Some(tx)),
    });
    let server = NbdServer::start(export, NbdServerConfig::new(EXPORT).unix(img.socket())).unwrap();
    let socket: PathBuf = img.socket();
    let writer = std::thread::spawn(move || {
        let mut client = NbdClient::connect_unix(&socket, EXPORT).unwrap();
        client.write_at(&[0x77; 4096], 8192).unwrap();
        // The connection is gone afterwards: the next request fails rather than hangs.
        let mut buf = [0u8; 512];
        client.read_at(&mut buf, 0).unwrap_err()
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the write never reached the export");
    let started = Instant::now();
    server.shutdown();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "shutdown did not wait for the write: {waited:?}"
    );
    let after = writer.join().expect("writer thread");
    assert!(
        matches!(after, NbdClientError::Io(_) | NbdClientError::ShutDown),
        "{after:?}"
    );
    assert!(
        img.contents()[8192..12288].iter().all(|&b| b == 0x77),
        "the in-flight write was lost"
    );
    assert!(!img.socket().exists());
}

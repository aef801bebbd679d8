//! Every device over every DMA strategy, against the daemon running in-process over the
//! loopback platform and the in-memory xenstore; blk data is checked against the image file.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use xenvirtio_backend::daemon::{DaemonConfig, DomainSelector};
use xenvirtio_backend::test_utils::{DriverRingError, TestDevice, TestError, TestStrategy};
use xenvirtio_virtio::blk::S_IOERR;
use xenvirtio_xenstore::TxId;
use xenvirtio_xenstore::xenbus::{self, XenbusState};

const F: u16 = 5;

fn direct_config() -> DaemonConfig {
    DaemonConfig {
        allow_direct: vec![DomainSelector::Id(F)],
        ..Default::default()
    }
}

#[test]
fn blk_serves_every_strategy_and_the_image_file_agrees() {
    let w = World::with_config(direct_config());
    for (devid, strategy) in TestStrategy::ALL.into_iter().enumerate() {
        let devid = devid as u32;
        let image = w.image(&format!("disk-{devid}.img"), 256);
        w.attach(F, devid, &for_strategy(TestDevice::blk(&image), strategy));
        // Odd devices go through indirect tables.
        let mut opts = options(strategy);
        if devid % 2 == 1 {
            opts = opts.indirect();
        }
        let mut fe = w.connect(F, devid, opts);

        // Reads match the file.
        let got = fe.blk_read(0, 0, 8192).unwrap();
        assert_eq!(got, read_file_range(&image, 0, 8192), "{strategy:?}: read");
        // Writes land in the file (three pages, unaligned to pages: sector 3).
        let data: Vec<u8> = (0..12288u32)
            .map(|i| (i % 251) as u8 ^ devid as u8)
            .collect();
        fe.blk_write(0, 3, &data).unwrap();
        assert_eq!(
            read_file_range(&image, 3 * 512, data.len()),
            data,
            "{strategy:?}: write"
        );
        assert_eq!(fe.blk_read(0, 3, data.len()).unwrap(), data);
        fe.blk_flush(0).unwrap();
        fe.blk_write_zeroes(0, 10, 4, false).unwrap();
        assert!(
            read_file_range(&image, 10 * 512, 2048)
                .iter()
                .all(|&b| b == 0)
        );
        fe.blk_discard(0, 40, 8).unwrap();
        assert_eq!(fe.blk_get_id(0).unwrap(), format!("disk-{devid}.img"));
        // Outside the image: an error status, not a protocol error.
        match fe.blk_read(0, 256, 512) {
            Err(TestError::BlkStatus(s)) => assert_eq!(s, S_IOERR),
            other => panic!("{strategy:?}: read past the end gave {other:?}"),
        }
        let st = w.stats_when(F, devid, |s| s.requests == 8 && s.errors == 1);
        assert_eq!(st.state, "Connected");
        assert_eq!(st.strategy, strategy.dma().name());
        assert_eq!(st.kind, "blk");
        assert!(st.bytes_read >= 8192 + 12288);
        assert_eq!(st.errors, 1, "the read past the end: {st:?}");
        assert_eq!(st.ports, 1);
        match strategy {
            TestStrategy::GrantPerRequest => {
                assert_eq!(st.resident_pages, 1, "only the ring stays mapped");
            }
            TestStrategy::GrantPersistent | TestStrategy::Bounce | TestStrategy::Direct => {
                assert!(
                    st.resident_pages > 1,
                    "{strategy:?} keeps buffers mapped: {st:?}"
                )
            }
        }
        fe.close().unwrap();
        // 8.2 step 4: ready for a reconnect.
        w.wait_backend_state(F, devid, XenbusState::InitWait);
    }
    assert_eq!(
        w.live_maps_of(F),
        0,
        "nothing of the frontend stays mapped after close"
    );
}

#[test]
fn persistent_grants_stop_mapping_after_warm_up() {
    let w = World::new();
    let image = w.image("p.img", 64);
    w.attach(F, 0, &TestDevice::blk(&image));
    let mut fe = w.connect(F, 0, options(TestStrategy::GrantPersistent));
    for _ in 0..4 {
        fe.blk_read(0, 0, 4096).unwrap();
    }
    let warm = w.stats_when(F, 0, |s| s.requests == 4).map_calls;
    for _ in 0..20 {
        fe.blk_read(0, 0, 4096).unwrap();
    }
    let st = w.stats_when(F, 0, |s| s.requests == 24);
    assert_eq!(st.map_calls, warm, "no map call in steady state");
    fe.close().unwrap();
}

#[test]
fn per_request_grants_are_unmapped_before_completion() {
    let w = World::new();
    let image = w.image("r.img", 64);
    w.attach(F, 0, &TestDevice::blk(&image));
    let mut fe = w.connect(F, 0, options(TestStrategy::GrantPerRequest));
    let before = w.stats_when(F, 0, |s| s.state == "Connected").map_calls;
    for _ in 0..10 {
        fe.blk_read(0, 0, 4096).unwrap();
        // Only the ring is mapped between requests: the buffers were unmapped before the
        // used entry was published.
        assert_eq!(w.live_maps_of(F), 1);
    }
    let after = w.stats_when(F, 0, |s| s.requests == 10).map_calls;
    assert_eq!(
        after - before,
        20,
        "two batched maps (read-only, read-write) per request"
    );
    fe.close().unwrap();
}

#[test]
fn multi_queue_blk_serves_every_queue() {
    let w = World::new();
    let image = w.image("mq.img", 512);
    w.attach(F, 0, &TestDevice::blk(&image).with_queues(4));
    let mut fe = w.connect(F, 0, options(TestStrategy::GrantPersistent));
    let cfg = xenvirtio_virtio::blk::BlkConfig::from_bytes(fe.config());
    assert_eq!(cfg.num_queues, 4);
    assert!(xenvirtio_virtio::features::has(
        fe.features(),
        xenvirtio_virtio::features::blk::MQ
    ));
    for q in 0..4u16 {
        let data = vec![q as u8 + 1; 1024];
        fe.blk_write(q, u64::from(q) * 8, &data).unwrap();
    }
    for q in 0..4u16 {
        let other = (q + 1) % 4;
        let got = fe.blk_read(other, u64::from(q) * 8, 1024).unwrap();
        assert_eq!(got, vec![q as u8 + 1; 1024]);
        assert_eq!(read_file_range(&image, u64::from(q) * 8 * 512, 1024), got);
    }
    assert_eq!(w.stats_when(F, 0, |s| s.requests == 8).ports, 4);
    fe.close().unwrap();
}

#[test]
fn rng_serves_every_strategy() {
    let w = World::with_config(direct_config());
    for (devid, strategy) in TestStrategy::ALL.into_iter().enumerate() {
        let devid = devid as u32;
        w.attach(F, devid, &for_strategy(TestDevice::rng(), strategy));
        let mut fe = w.connect(F, devid, options(strategy));
        let a = fe.rng_read(4096).unwrap();
        let b = fe.rng_read(4096).unwrap();
        assert_eq!(a.len(), 4096);
        assert_ne!(a, b, "{strategy:?}: two reads of entropy differ");
        assert!(a.iter().any(|&x| x != a[0]));
        w.stats_when(F, devid, |s| s.bytes_read == 8192);
        fe.close().unwrap();
    }
}

#[test]
fn console_on_a_pty_over_every_strategy() {
    let w = World::with_config(direct_config());
    for (devid, strategy) in TestStrategy::ALL.into_iter().enumerate() {
        let devid = devid as u32;
        w.attach(F, devid, &for_strategy(TestDevice::console(), strategy));
        let mut fe = w.connect(F, devid, options(strategy));
        let tty = w
            .dom0
            .read_string(TxId::NONE, &format!("{}/tty", fe.backend_dir()))
            .unwrap();
        let mut pty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tty)
            .unwrap();
        // Guest output reaches the pty unchanged.
        fe.console_write(b"hello from the guest\n").unwrap();
        let mut got = [0u8; 21];
        pty.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello from the guest\n", "{strategy:?}");
        // Input typed on the pty reaches the guest, in order, across several buffers.
        let typed: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        pty.write_all(&typed).unwrap();
        let input = fe
            .console_read(typed.len(), Duration::from_secs(10))
            .unwrap();
        assert_eq!(input, typed, "{strategy:?}");
        w.stats_when(F, devid, |s| (s.bytes_read, s.bytes_written) == (200, 21));
        fe.close().unwrap();
        w.wait_backend_state(F, devid, XenbusState::InitWait);
    }
}

#[test]
fn console_on_a_socket_relays_to_one_client() {
    let w = World::new();
    let path = w.dir.path().join("con.sock");
    w.attach(
        F,
        0,
        &TestDevice::console().with_console(&format!("socket:{}", path.display())),
    );
    let mut fe = w.connect(F, 0, options(TestStrategy::GrantPerRequest));
    // Output written before anyone connects is kept for the first client.
    fe.console_write(b"early ").unwrap();
    let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    fe.console_write(b"late").unwrap();
    let mut got = [0u8; 10];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"early late");
    client.write_all(b"ping").unwrap();
    assert_eq!(
        fe.console_read(4, Duration::from_secs(10)).unwrap(),
        b"ping"
    );
    fe.close().unwrap();
}

#[test]
fn the_control_socket_answers_stats_as_a_table_and_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/backend.sock");
    let w = World::with_config(DaemonConfig {
        control_socket: Some(socket.clone()),
        ..Default::default()
    });
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    w.attach(F, 3, &TestDevice::rng());
    let mut fe = w.connect(F, 3, options(TestStrategy::Bounce));
    fe.rng_read(100).unwrap();
    w.stats_when(F, 3, |s| s.bytes_read == 100);
    let json = xenvirtio_backend::daemon::query_stats(&socket, true).unwrap();
    assert!(
        json.starts_with("{\"devices\":[{\"domid\":5,\"devid\":3,\"type\":\"rng\",\"state\":\"Connected\",\"strategy\":\"bounce\""),
        "{json}"
    );
    assert!(json.contains("\"bytes_read\":100"), "{json}");
    assert!(
        json.contains("\"process\":{\"devices\":1,\"xen_mappings\":0,\"event_ports\":1}"),
        "{json}"
    );
    let table = xenvirtio_backend::daemon::query_stats(&socket, false).unwrap();
    assert!(table.lines().next().unwrap().contains("DOMID"));
    assert!(table.contains("rng") && table.contains("bounce"), "{table}");
    fe.close().unwrap();
    drop(w);
    assert!(
        !socket.exists(),
        "the socket is removed when the daemon stops"
    );
}

/// Fuzz finding (`daemon_blk`): the test frontend panicked building an empty indirect table for
/// a request without bytes; it now refuses it as an empty chain, and the device goes on.
#[test]
fn test_regression_empty_indirect_request_is_refused() {
    let w = World::new();
    let image = w.image("e.img", 16);
    w.attach(F, 0, &TestDevice::blk(&image));
    let mut fe = w.connect(F, 0, options(TestStrategy::GrantPersistent).indirect());
    assert!(matches!(
        fe.request(0, &[], &[]),
        Err(TestError::Ring(DriverRingError::Empty))
    ));
    assert!(matches!(
        fe.request(0, &[&[]], &[0]),
        Err(TestError::Ring(DriverRingError::Empty))
    ));
    assert_eq!(fe.blk_read(0, 1, 512).unwrap().len(), 512);
    fe.close().unwrap();
}

/// Issue 13, finding 6: every event-channel handle the daemon opens for a guest's connection
/// is restricted to that guest (`IOCTL_EVTCHN_RESTRICT_DOMID`), as its privcmd handle is, so a
/// daemon thread taken over through one guest's device cannot bind another domain's ports.
/// Measured through the loopback platform, which applies Linux's checks to restricted handles.
#[test]
fn hostile_guest_gets_an_event_channel_handle_restricted_to_it() {
    const G: u16 = 7;
    let w = World::with_config(DaemonConfig {
        allow_direct: vec![DomainSelector::Id(F), DomainSelector::Id(G)],
        ..Default::default()
    });
    let mut frontends = Vec::new();
    for (i, strategy) in TestStrategy::ALL.into_iter().enumerate() {
        let dom = if i % 2 == 0 { F } else { G };
        let image = w.image(&format!("r{i}.img"), 64);
        w.attach(
            dom,
            i as u32,
            &for_strategy(TestDevice::blk(&image), strategy),
        );
        let mut fe = w.connect(dom, i as u32, options(strategy));
        assert_eq!(
            fe.blk_read(0, 0, 512).unwrap(),
            read_file_range(&image, 0, 512)
        );
        frontends.push(fe);
    }
    let dom0 = w.hv.stats(0);
    assert_eq!(dom0.event_handles, 4, "one handle per connection: {dom0:?}");
    assert_eq!(
        dom0.restricted_event_handles, dom0.event_handles,
        "every handle of the daemon is restricted to its guest: {dom0:?}"
    );
    for fe in frontends {
        fe.close().unwrap();
    }
}

#[test]
fn one_image_has_one_writing_device_and_the_refusal_names_the_holder() {
    let w = World::new();
    let image = w.image("one.img", 64);
    let err_of = |f: u16| {
        let bdir = xenbus::backend_dir(0, f, 0);
        w.dom0
            .read_string(TxId::NONE, &format!("{bdir}/error"))
            .ok()
    };
    // Written straight into xenstore (attach would refuse it): a second writer on the image.
    w.attach(F, 0, &TestDevice::blk(&image));
    let mut fe = w.connect(F, 0, options(TestStrategy::GrantPersistent));
    w.attach(6, 0, &TestDevice::blk(&image).read_only());
    eventually("the second device's error node", || err_of(6).is_some());
    let e = err_of(6).unwrap();
    assert!(
        e.contains("is in use: domain 5 device 0 of this process has it read-write")
            && e.contains("cannot also be used read-only"),
        "{e}"
    );
    // The writer still works, and its image is its alone.
    fe.blk_write(0, 0, &[7u8; 512]).unwrap();
    assert_eq!(read_file_range(&image, 0, 512), vec![7u8; 512]);
    assert!(err_of(F).is_none());
    fe.close().unwrap();

    // Readers share an image.
    let shared = w.image("shared.img", 64);
    w.attach(7, 0, &TestDevice::blk(&shared).read_only());
    w.attach(8, 0, &TestDevice::blk(&shared).read_only());
    for f in [7, 8] {
        let mut fe = w.connect(f, 0, options(TestStrategy::Bounce));
        assert_eq!(
            fe.blk_read(0, 0, 512).unwrap(),
            read_file_range(&shared, 0, 512)
        );
        fe.close().unwrap();
    }
}

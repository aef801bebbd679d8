//! Debian's real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy) against `NbdServer` over a
//! `FileExport`, on a unix socket and on loopback TCP.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod nbd_support;

use std::net::SocketAddr;
use std::sync::Arc;

use nbd_support::*;
use xenvirtio_frontend::nbd::{FileExport, NbdServer, NbdServerConfig};

const SIZE: usize = 16 << 20;

/// Pattern writes: (offset, length, byte). Offsets cover the first sector, 512-aligned but not
/// 4096-aligned places, both sides of the server's 1 MiB I/O chunk, multi-chunk writes and the
/// last sector; later writes overlap earlier ones.
fn pattern_writes() -> Vec<(u64, u64, u8)> {
    let mut writes = vec![
        (0, 512, 0x11),
        (512, 3584, 0x22),
        (4096, 65536, 0x33),
        (1_048_576 - 4096, 8192, 0x44),
        (3 << 20, 2_621_440, 0x55),
        ((SIZE - 512) as u64, 512, 0x66),
        (8192 + 1536, 512, 0x77),
        ((SIZE - (1 << 20)) as u64, 1 << 19, 0x88),
    ];
    let mut rng = Rng::new(5);
    for i in 0..24u8 {
        let len = (1 + rng.below(64)) * 512;
        let offset = rng.below((SIZE as u64 - len) / 512) * 512;
        writes.push((offset, len, 0x90 + i));
    }
    writes
}

fn apply(expected: &mut [u8], writes: &[(u64, u64, u8)]) {
    for &(offset, len, byte) in writes {
        expected[offset as usize..(offset + len) as usize].fill(byte);
    }
}

/// The final byte of each written range, after all overlaps, as qemu-io read commands.
fn read_commands(expected: &[u8], writes: &[(u64, u64, u8)]) -> Vec<String> {
    let mut commands = Vec::new();
    for &(offset, len, _) in writes {
        // Split each range into runs of one byte value, so `read -P` can check every byte.
        let range = &expected[offset as usize..(offset + len) as usize];
        let mut start = 0;
        while start < range.len() {
            let byte = range[start];
            let run = range[start..].iter().take_while(|&&b| b == byte).count();
            commands.push(format!(
                "read -P {byte:#04x} {} {run}",
                offset as usize + start
            ));
            start += run;
        }
    }
    commands
}

fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    let out = run("qemu-io", &args);
    let text = stdout(&out);
    assert!(
        !text.contains("verification failed"),
        "qemu-io saw wrong data:\n{text}"
    );
    text
}

#[test]
fn qemu_io_writes_patterns_at_many_offsets_and_reads_them_back() {
    let img = Image::new(SIZE, None);
    let server = img.serve(false);
    let uri = unix_uri(&img.socket(), EXPORT);

    let writes = pattern_writes();
    let commands: Vec<String> = writes
        .iter()
        .map(|(o, l, b)| format!("write -P {b:#04x} {o} {l}"))
        .collect();
    let out = qemu_io(&uri, &commands);
    assert_eq!(out.matches("wrote ").count(), writes.len(), "{out}");

    let mut expected = vec![0u8; SIZE];
    apply(&mut expected, &writes);
    // A second connection reads everything back and checks every byte of every range.
    let reads = read_commands(&expected, &writes);
    let out = qemu_io(&uri, &reads);
    assert_eq!(out.matches("read ").count(), reads.len());

    // The same check must fail on wrong data, or it proves nothing.
    let wrong = run_status("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x12 0 512"]);
    assert!(!wrong.status.success(), "qemu-io accepted a wrong pattern");
    assert!(stdout(&wrong).contains("verification failed"));

    // qemu-img compare: the export and the file against an image built independently.
    let expected_path = img.file("expected.img");
    std::fs::write(&expected_path, &expected).unwrap();
    let expected_arg = expected_path.to_str().unwrap();
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", expected_arg, &uri],
    );
    assert!(
        img.contents() == expected,
        "the image file differs from the expected content"
    );

    // ... and a one-byte difference is caught.
    let mut off_by_one = expected.clone();
    off_by_one[SIZE / 2 + 7] ^= 1;
    let other = img.file("other.img");
    std::fs::write(&other, &off_by_one).unwrap();
    let differs = run_status(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            other.to_str().unwrap(),
            &uri,
        ],
    );
    assert_eq!(
        differs.status.code(),
        Some(1),
        "qemu-img compare missed a difference"
    );

    let stats = server.stats();
    assert_eq!(stats.request_errors, 0, "{stats:?}");
    assert!(
        stats.bytes_written >= writes.iter().map(|w| w.1).sum::<u64>(),
        "{stats:?}"
    );
    server.shutdown();
    assert!(
        !img.socket().exists(),
        "the socket file outlived the server"
    );
}

#[test]
fn qemu_io_sub_sector_writes_zeroes_discard_and_flush() {
    let img = Image::new(4 << 20, Some(9));
    let mut expected = img.contents();
    let server = img.serve(false);
    let uri = unix_uri(&img.socket(), EXPORT);

    // 50 bytes at 100: qemu must read-modify-write the 512-byte block the server advertises.
    // `write -z` is WRITE_ZEROES (with and without may-unmap), `discard` is TRIM.
    // `-f` asks for FUA.
    let commands: Vec<String> = [
        "write -P 0xab 100 50",
        "write -z 65536 131072",
        "write -z -u 262144 65536",
        "discard 524288 65536",
        "flush",
        "write -f -P 0xcd 1048576 4096",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    qemu_io(&uri, &commands);
    expected[100..150].fill(0xab);
    expected[65536..196608].fill(0);
    expected[262144..327680].fill(0);
    expected[1048576..1052672].fill(0xcd);

    let actual = img.contents();
    // The discarded range is unspecified by NBD; a FileExport punches a hole (zeroes). Check
    // everything else byte for byte.
    assert_eq!(actual[..524288], expected[..524288]);
    assert_eq!(actual[589824..], expected[589824..]);
    assert!(
        actual[524288..589824].iter().all(|&b| b == 0),
        "the punched hole reads back as data"
    );
    assert_eq!(server.stats().request_errors, 0);
}

#[test]
fn nbdinfo_lists_the_export_with_size_and_flags() {
    let img = Image::new(8 << 20, None);
    let config = NbdServerConfig {
        description: Some("xenvirtio test disk".to_owned()),
        ..NbdServerConfig::new(EXPORT).unix(img.socket())
    };
    let server = NbdServer::start(img.export(false), config).unwrap();

    let list = stdout(&run("nbdinfo", &["--list", &unix_uri(&img.socket(), "")]));
    assert!(list.contains("export=\"xvda\""), "{list}");
    assert!(list.contains("description: xenvirtio test disk"), "{list}");
    assert!(list.contains("export-size: 8388608"), "{list}");

    let json = stdout(&run(
        "nbdinfo",
        &["--json", &unix_uri(&img.socket(), EXPORT)],
    ));
    for field in [
        "\"export-size\": 8388608",
        "\"is_read_only\": false",
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"can_multi_conn\": true",
        "\"can_df\": false",
        "\"can_cache\": false",
        "\"block_size_minimum\": 512",
        "\"block_size_preferred\": 4096",
        "\"block_size_maximum\": 33554432",
    ] {
        assert!(
            json.contains(field),
            "nbdinfo --json lacks {field}:\n{json}"
        );
    }
    // The default export "" is the same export.
    let default = stdout(&run("nbdinfo", &["--size", &unix_uri(&img.socket(), "")]));
    assert_eq!(default.trim(), "8388608");
    // An unknown export is refused.
    let unknown = run_status("nbdinfo", &[&unix_uri(&img.socket(), "nope")]);
    assert!(!unknown.status.success());
    drop(server);

    // A read-only export says so and hides the write-side commands.
    let server = img.serve(true);
    let json = stdout(&run(
        "nbdinfo",
        &["--json", &unix_uri(&img.socket(), EXPORT)],
    ));
    for field in [
        "\"is_read_only\": true",
        "\"can_trim\": false",
        "\"can_zero\": false",
        "\"can_fua\": false",
    ] {
        assert!(
            json.contains(field),
            "read-only nbdinfo lacks {field}:\n{json}"
        );
    }
    let refused = run_status(
        "qemu-io",
        &[
            "-f",
            "raw",
            &unix_uri(&img.socket(), EXPORT),
            "-c",
            "write 0 512",
        ],
    );
    assert!(
        !refused.status.success(),
        "qemu-io opened a read-only export for writing"
    );
    assert!(!stdout(&refused).contains("wrote"));
    drop(server);
}

#[test]
fn qemu_img_convert_and_nbdcopy_copy_the_whole_export() {
    let img = Image::new(12 << 20, Some(77));
    let original = img.contents();
    let server = img.serve(false);
    let uri = unix_uri(&img.socket(), EXPORT);

    let converted = img.file("converted.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            converted.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&converted).unwrap() == original,
        "qemu-img convert copied wrong data"
    );

    let copied = img.file("copied.img");
    std::fs::write(&copied, []).unwrap();
    run("nbdcopy", &[&uri, copied.to_str().unwrap()]);
    assert!(
        std::fs::read(&copied).unwrap() == original,
        "nbdcopy copied wrong data"
    );

    // The other way: nbdcopy writes a new image into the export (several connections, since
    // the export advertises multi-conn), with holes turned into WRITE_ZEROES.
    let mut source = vec![0u8; original.len()];
    Rng::new(78).fill(&mut source[..4 << 20]);
    Rng::new(79).fill(&mut source[8 << 20..]);
    let source_path = img.file("source.img");
    std::fs::write(&source_path, &source).unwrap();
    run(
        "nbdcopy",
        &["--connections=4", source_path.to_str().unwrap(), &uri],
    );
    assert!(
        img.contents() == source,
        "nbdcopy into the export wrote wrong data"
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            source_path.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(
        server.stats().connections_accepted >= 4,
        "{:?}",
        server.stats()
    );
    assert_eq!(server.stats().request_errors, 0);
}

#[test]
fn loopback_tcp_serves_the_same_tools() {
    let img = Image::new(4 << 20, None);
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let export = Arc::new(FileExport::open(&img.path, false).unwrap());
    let server = NbdServer::start(export, NbdServerConfig::new(EXPORT).tcp(addr)).unwrap();
    let port = server.tcp_addr().unwrap().port();
    assert_ne!(port, 0);
    let uri = format!("nbd://127.0.0.1:{port}/{EXPORT}");

    qemu_io(
        &uri,
        &[
            "write -P 0x5a 8192 65536".to_owned(),
            "read -P 0x5a 8192 65536".to_owned(),
        ],
    );
    let json = stdout(&run("nbdinfo", &["--json", &uri]));
    assert!(json.contains("\"export-size\": 4194304"), "{json}");
    let copy = img.file("tcp-copy.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            copy.to_str().unwrap(),
        ],
    );
    let mut expected = vec![0u8; 4 << 20];
    expected[8192..8192 + 65536].fill(0x5a);
    assert!(std::fs::read(&copy).unwrap() == expected);
    assert!(img.contents() == expected);
}

//! Debian's NBD clients (qemu-io, qemu-img, nbdinfo) against the `xenvirtio-loopback` binary,
//! run as a process: data written over NBD passes through the frontend, the loopback
//! hypervisor and the backend daemon into the image file, for every DMA strategy (issue 5,
//! "Done when"). Also the binary's refusals, roles, TCP and read-only exports, `--help`, and a
//! short `bench`.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_xenvirtio-loopback");
const SIZE: usize = 16 << 20;
const EXPORT: &str = "xvda";

/// The absolute path of a client tool; a missing tool fails the test with the fix.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: these tests need Debian's qemu-utils and libnbd-bin \
                 (run scripts/install-deps.sh)"
            )
        })
}

fn run_tool(name: &str, args: &[&str]) -> Output {
    Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

fn run_ok(name: &str, args: &[&str]) -> String {
    let out = run_tool(name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// xorshift64*: expected images are built from the seed, independently of the pair.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Pattern writes (offset, length, byte): the first and last sectors, unaligned-to-4k places,
/// both sides of 1 MiB, a multi-megabyte write, overlaps, and random ones.
fn pattern_writes(seed: u64) -> Vec<(u64, u64, u8)> {
    let mut writes = vec![
        (0, 512, 0x11),
        (512, 3584, 0x22),
        (4096, 65536, 0x33),
        ((1 << 20) - 4096, 8192, 0x44),
        (3 << 20, 2_621_440, 0x55),
        ((SIZE - 512) as u64, 512, 0x66),
        (8192 + 1536, 512, 0x77),
    ];
    let mut rng = Rng::new(seed);
    for i in 0..32u8 {
        let len = (1 + rng.below(128)) * 512;
        let offset = rng.below((SIZE as u64 - len) / 512) * 512;
        writes.push((offset, len, 0x80 + i));
    }
    writes
}

/// `read -P` commands that check every byte each write range holds in the end.
fn read_commands(expected: &[u8], writes: &[(u64, u64, u8)]) -> Vec<String> {
    let mut commands = Vec::new();
    for &(offset, len, _) in writes {
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
    qemu_io_with(&[], uri, commands)
}

fn qemu_io_with(options: &[&str], uri: &str, commands: &[String]) -> String {
    let mut args = options.to_vec();
    args.extend(["-f", "raw", uri]);
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    let text = run_ok("qemu-io", &args);
    assert!(
        !text.contains("verification failed") && !text.contains("failed:"),
        "qemu-io saw an error or wrong data:\n{text}"
    );
    text
}

fn unix_uri(socket: &Path) -> String {
    format!("nbd+unix:///{EXPORT}?socket={}", socket.display())
}

/// A running `xenvirtio-loopback`, its stdout read line by line.
struct Loopback {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Loopback {
    /// Starts the binary and waits for its "ready" line (failing with its output if it exits
    /// first).
    fn start(args: &[&str]) -> Loopback {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lb = Loopback {
            child,
            lines: rx,
            seen: Vec::new(),
        };
        lb.wait_for_line("ready");
        lb
    }

    fn wait_for_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = self.child.kill();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        panic!(
            "xenvirtio-loopback never printed {prefix:?}\nstdout:\n{}\nstderr:\n{err}",
            self.seen.join("\n")
        );
    }

    /// The line that starts with `prefix`, printed so far.
    fn line(&self, prefix: &str) -> &str {
        self.seen
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{}", self.seen.join("\n")))
    }

    /// Sends `signal`, waits for the exit, and returns the status and the whole stdout.
    fn stop(mut self, signal: i32) -> (ExitStatus, String, String) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "xenvirtio-loopback did not stop within 30 s of signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status, self.seen.join("\n"), err)
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first number after `label` in `text` (`"7 grant maps"` with label `" grant maps"`
/// gives 7: the number right before the label).
fn count_before(text: &str, label: &str) -> u64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in:\n{text}"));
    let digits: String = text[..at]
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().unwrap()
}

fn seeded_image(dir: &Path, seed: u64) -> (PathBuf, Vec<u8>) {
    let path = dir.join("disk.img");
    let mut data = vec![0u8; SIZE];
    Rng::new(seed).fill(&mut data);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

#[test]
fn qemu_io_data_passes_through_the_pair_for_each_strategy_and_matches_the_image() {
    tool("qemu-io");
    tool("qemu-img");
    tool("nbdinfo");
    let cases: [(&[&str], &str, i32); 4] = [
        (
            &["--dma", "grant", "--no-persistent"],
            "frontend connected: dma grant (per-request grants)",
            libc::SIGTERM,
        ),
        (
            &["--dma", "grant", "--persistent"],
            "frontend connected: dma grant (persistent grants)",
            libc::SIGINT,
        ),
        (
            &["--dma", "bounce"],
            "frontend connected: dma bounce",
            libc::SIGTERM,
        ),
        (
            &["--dma", "direct"],
            "frontend connected: dma direct",
            libc::SIGINT,
        ),
    ];
    for (i, (dma_args, connected, signal)) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let (image, mut expected) = seeded_image(dir.path(), 100 + i as u64);
        let socket = dir.path().join("nbd.sock");
        let writes = pattern_writes(7 + i as u64);
        for &(offset, len, byte) in &writes {
            expected[offset as usize..(offset + len) as usize].fill(byte);
        }
        let expected_path = dir.path().join("expected.img");
        std::fs::write(&expected_path, &expected).unwrap();

        let mut args = vec![
            "--image",
            image.to_str().unwrap(),
            "--nbd",
            socket.to_str().unwrap(),
        ];
        args.extend_from_slice(dma_args);
        let lb = Loopback::start(&args);
        assert!(
            lb.line("frontend connected").starts_with(connected),
            "{dma_args:?}: {}",
            lb.line("frontend connected")
        );
        let uri = unix_uri(&socket);

        // nbdinfo lists the export and describes it.
        let list = run_ok(
            "nbdinfo",
            &[
                "--list",
                &format!("nbd+unix://?socket={}", socket.display()),
            ],
        );
        assert!(list.contains(&format!("export=\"{EXPORT}\"")), "{list}");
        assert!(list.contains("xenvirtio blk device"), "{list}");
        let info = run_ok("nbdinfo", &["--size", &uri]);
        assert_eq!(info.trim(), SIZE.to_string());

        // qemu-io writes the patterns, then reads every byte back through the pair.
        let write_cmds: Vec<String> = writes
            .iter()
            .map(|&(o, l, b)| format!("write -P {b:#04x} {o} {l}"))
            .collect();
        qemu_io(&uri, &write_cmds);
        qemu_io(&uri, &read_commands(&expected, &writes));
        // The export as a whole equals the expected image, while it runs.
        run_ok(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                expected_path.to_str().unwrap(),
                &uri,
            ],
        );

        // A clean stop through the protocol, with the counters and the leak check.
        let (status, out, err) = lb.stop(signal);
        assert!(
            status.success(),
            "{dma_args:?}: exit {status}\nstdout:\n{out}\nstderr:\n{err}"
        );
        assert!(out.contains("frontend closed device 0"), "{out}");
        assert!(
            out.contains("leak check: the backend holds nothing"),
            "{out}"
        );
        assert!(!socket.exists(), "the socket is removed at shutdown");
        // What the hypervisor recorded matches the strategy.
        let maps = count_before(&out, " grant maps (");
        let unmaps = count_before(&out, " grant unmaps");
        let foreign = count_before(&out, " foreign maps,");
        let requests = count_before(&out, " requests, ");
        let pages = count_before(&out, " pages), ");
        match dma_args {
            [_, "grant", "--no-persistent"] => {
                assert!(maps >= requests, "a map per request at least: {out}");
                assert_eq!(maps, unmaps, "each unmapped before completion: {out}");
                assert_eq!(foreign, 0);
            }
            [_, "grant", "--persistent"] => {
                // Each page of the arena (256) and the ring is mapped once, then kept.
                assert!(pages <= 257 && maps < requests / 2, "{out}");
                assert_eq!(maps, unmaps, "unmapped only at the close: {out}");
                assert_eq!(foreign, 0);
            }
            // Directory, pool and ring, whatever the I/O.
            [_, "bounce"] => assert_eq!((maps, unmaps, foreign), (3, 3, 0), "{out}"),
            _ => {
                assert_eq!(maps, 0, "{out}");
                assert!(foreign > 0, "{out}");
            }
        }

        // The backend's image file on disk equals the image built independently.
        run_ok(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                expected_path.to_str().unwrap(),
                image.to_str().unwrap(),
            ],
        );
    }
}

#[test]
fn tcp_and_read_only_exports() {
    tool("qemu-io");
    tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let (image, before) = seeded_image(dir.path(), 3);
    let socket = dir.path().join("nbd.sock");
    let lb = Loopback::start(&[
        "--image",
        image.to_str().unwrap(),
        "--nbd",
        socket.to_str().unwrap(),
        "--readonly",
        "--tcp",
        "0",
    ]);
    let line = lb.line("NBD export").to_owned();
    assert!(line.contains("read-only"), "{line}");
    let port = line
        .rsplit("127.0.0.1:")
        .next()
        .and_then(|p| p.trim().parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no tcp port in {line:?}"));
    let tcp_uri = format!("nbd://127.0.0.1:{port}/{EXPORT}");
    let info = run_ok("nbdinfo", &[&tcp_uri]);
    assert!(info.contains("is_read_only: true"), "{info}");
    // Every connection reaches the one device; a flush is the whole image's.
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains(&format!("export-size: {SIZE}")), "{info}");
    // Reads work over TCP and see the image; writing is refused.
    let first = before[0];
    qemu_io_with(&["-r"], &tcp_uri, &[format!("read -P {first:#04x} 0 1")]);
    let out = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &unix_uri(&socket),
            "-c",
            "write -P 0x5a 0 4096",
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io sees the read-only flag and will not even open the export for writing.
    assert!(!out.status.success(), "the write was not refused: {text}");
    assert!(text.contains("Permission denied"), "{text}");
    let (status, out, err) = lb.stop(libc::SIGTERM);
    assert!(status.success(), "{out}\n{err}");
    assert!(
        std::fs::read(&image).unwrap() == before,
        "a read-only image changed"
    );
}

#[test]
fn roles_choose_their_strategy_and_refusals_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = seeded_image(dir.path(), 4);
    let socket = dir.path().join("nbd.sock");
    let base = [
        "--image",
        image.to_str().unwrap(),
        "--nbd",
        socket.to_str().unwrap(),
    ];
    for (role, want) in [
        ("dom0", "frontend connected: dma bounce: Dom0"),
        (
            "x86-pv",
            "frontend connected: dma grant (persistent grants): x86 PV",
        ),
        (
            "x86-pvh",
            "frontend connected: dma grant (persistent grants): x86 PVH",
        ),
        ("arm-domu", "frontend connected: dma direct: Arm DomU"),
    ] {
        let mut args = base.to_vec();
        args.extend(["--role", role]);
        let lb = Loopback::start(&args);
        let line = lb.line("frontend connected").to_owned();
        assert!(line.starts_with(want), "{role}: {line}");
        let (status, out, err) = lb.stop(libc::SIGTERM);
        assert!(status.success(), "{role}: {out}\n{err}");
    }
    for (role, dma, why) in [
        ("x86-pv", "direct", "pseudo-physical"),
        ("dom0", "direct", "Dom0 must bounce"),
    ] {
        let mut args = base.to_vec();
        args.extend(["--role", role, "--dma", dma]);
        let out = Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{role}: {err}");
        assert!(
            err.contains(&format!("DMA strategy {dma} is refused")) && err.contains(why),
            "{role} --dma {dma}: {err}"
        );
        assert!(!socket.exists(), "no export was started");
    }
    // A missing image is refused before anything runs.
    let out = Command::new(BIN)
        .args([
            "--image",
            "/nonexistent/disk.img",
            "--nbd",
            socket.to_str().unwrap(),
        ])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn help_explains_every_option_and_that_no_xen_is_needed() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "without Xen",
        "--image",
        "--nbd",
        "--dma",
        "--persistent",
        "--no-persistent",
        "--queues",
        "--readonly",
        "--tcp",
        "--role",
        "x86-pv",
        "x86-pvh",
        "arm-domu",
        "dom0",
        "qemu-io",
        "SIGTERM",
        "bench",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
    let out = Command::new(BIN)
        .args(["bench", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--workload",
        "--strategies",
        "--seconds",
        "--rounds",
        "--depth",
        "--copy",
    ] {
        assert!(
            help.contains(needle),
            "bench --help lacks {needle:?}:\n{help}"
        );
    }
    // Without the required options, a usage error rather than a panic.
    let out = Command::new(BIN).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--image"));
}

#[test]
fn bulk_copies_in_and_out_over_two_queues() {
    tool("qemu-img");
    tool("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = seeded_image(dir.path(), 9);
    let mut source = vec![0u8; SIZE];
    Rng::new(77).fill(&mut source);
    let source_path = dir.path().join("source.img");
    std::fs::write(&source_path, &source).unwrap();
    let socket = dir.path().join("nbd.sock");
    for dma in ["grant", "bounce", "direct"] {
        let lb = Loopback::start(&[
            "--image",
            image.to_str().unwrap(),
            "--nbd",
            socket.to_str().unwrap(),
            "--dma",
            dma,
            "--queues",
            "2",
        ]);
        let uri = unix_uri(&socket);
        // Large requests in (qemu-img writes in chunks of up to the advertised maximum) ...
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                source_path.to_str().unwrap(),
                &uri,
            ],
        );
        // ... and out again with several requests in flight.
        let copy = dir.path().join(format!("copy-{dma}.img"));
        run_ok("nbdcopy", &[&uri, copy.to_str().unwrap()]);
        assert!(
            std::fs::read(&copy).unwrap() == source,
            "{dma}: the copy differs"
        );
        let (status, out, err) = lb.stop(libc::SIGTERM);
        assert!(status.success(), "{dma}: {out}\n{err}");
        assert!(out.contains("2 queue(s)"), "{out}");
        assert!(
            std::fs::read(&image).unwrap() == source,
            "{dma}: the image differs"
        );
    }
}

#[test]
fn a_served_image_has_one_writer_and_the_refusal_names_the_holder() {
    tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = seeded_image(dir.path(), 11);
    let img = image.to_str().unwrap();
    let sock = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let first = Loopback::start(&["--image", img, "--nbd", &sock("a.sock")]);
    // A second loopback on the same image, read-write or read-only.
    for extra in [&[][..], &["--readonly"][..]] {
        let b = sock("b.sock");
        let mut args = vec!["--image", img, "--nbd", &b];
        args.extend_from_slice(extra);
        let out = Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{extra:?}: a second user was accepted"
        );
        let holder = format!("process {} (xenvirtio-loopb)", first.child.id());
        assert!(
            err.contains("is in use") && err.contains(&holder) && err.contains("--force-share"),
            "{extra:?}: {err}"
        );
        assert!(!Path::new(&b).exists(), "no second export was started");
    }
    // The operator who means it.
    let forced = Loopback::start(&["--image", img, "--nbd", &sock("c.sock"), "--force-share"]);
    forced.line("frontend connected");
    let (status, out, err) = forced.stop(libc::SIGTERM);
    assert!(status.success(), "{out}\n{err}");
    // qemu-io on the file itself, as QEMU's own locks refuse it.
    let out = run_tool("qemu-io", &["-f", "raw", img, "-c", "read 0 512"]);
    assert!(!out.status.success(), "qemu-io opened a served image");
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock"));
    let (status, out, err) = first.stop(libc::SIGTERM);
    assert!(status.success(), "{out}\n{err}");
    // Once it is gone, the image is free again.
    run_ok("qemu-io", &["-f", "raw", img, "-c", "read 0 512"]);
}

//! `xenvirtio-loopback bench` run as a process: its report, and what SIGINT leaves (the
//! figures of the runs completed, no scratch image).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_xenvirtio-loopback");

#[test]
fn bench_prints_every_strategy_and_the_ratios() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "--seconds",
            "0.1",
            "--warmup",
            "50",
            "--rounds",
            "1",
            "--workload",
            "randread:4k",
            "--size",
            "8388608",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("randread:4k"), "{text}");
    assert!(text.contains("IOPS ratios"), "{text}");
    for name in ["grant ", "grant-persistent", "bounce", "direct"] {
        assert!(
            text.lines()
                .filter(|l| l.trim_start().starts_with(name))
                .count()
                >= 2,
            "{name}: a result row and a ratio row:\n{text}"
        );
    }
}

#[test]
fn sigint_prints_the_completed_runs_and_removes_the_scratch_image() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "bench",
            "--seconds",
            "1",
            "--warmup",
            "50",
            "--rounds",
            "5",
            "--workload",
            "randread:4k",
            "--size",
            "8388608",
        ])
        .env("RUST_LOG", "warn")
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first completed run (its progress line), then interrupt the next one.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "bench ended early: {seen}"
        );
        seen.push_str(&line);
        if line.contains("round 1 grant:") {
            break;
        }
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "the scratch directory exists while the bench runs"
    );
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "bench did not stop within 20 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    err.read_to_string(&mut seen).unwrap();
    assert_eq!(status.code(), Some(130), "{out}\n{seen}");
    assert!(seen.contains("SIGINT: stopping"), "{seen}");
    let done = out
        .lines()
        .find(|l| l.starts_with("interrupted: "))
        .unwrap_or_else(|| panic!("no interrupted line:\n{out}"));
    assert!(done.contains("of 20 runs completed"), "{done}");
    assert!(!done.starts_with("interrupted: 0 of"), "{done}");
    // The completed runs' table is printed.
    assert!(out.contains("randread:4k") && out.contains("IOPS"), "{out}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "the scratch image was left behind"
    );
}

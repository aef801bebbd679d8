//! What the admin tests share: a real xenstored set up like a Dom0 host, and the real
//! `xenvirtio-backend` binary pointed at it.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use xenvirtio_tests::xenstored::Xenstored;
use xenvirtio_xenstore::{DomId, Perm, TxId, XenStore, XsClient};

pub const N: TxId = TxId::NONE;

/// A host: Debian's xenstored with Dom0's home as `xen-init-dom0` writes it, and guests with
/// names as libxl writes them.
pub struct Host {
    pub xsd: Xenstored,
    pub dom0: XsClient,
    pub dir: tempfile::TempDir,
}

impl Host {
    /// Dom0 plus guests `guest1` (5), `guest2` (6) and the driver domain `storage` (7).
    pub fn start() -> Host {
        let xsd = Xenstored::start();
        let dom0 = xsd.client();
        dom0.write(N, "/local/domain/0/domid", b"0").unwrap();
        dom0.write(N, "/local/domain/0/name", b"Domain-0").unwrap();
        for (domid, name) in [(5, "guest1"), (6, "guest2"), (7, "storage")] {
            xsd.add_guest(domid);
            dom0.write(N, &format!("/local/domain/{domid}/name"), name.as_bytes())
                .unwrap();
            dom0.write(
                N,
                &format!("/local/domain/{domid}/domid"),
                domid.to_string().as_bytes(),
            )
            .unwrap();
        }
        Host {
            xsd,
            dom0,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A 1 MiB image file in the test's folder.
    pub fn image(&self, name: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        path
    }

    /// `xenvirtio-backend --xenstore <socket> ARGS...`
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_xenvirtio-backend"));
        c.arg("--xenstore").arg(self.xsd.socket());
        // The device book in the test's folder, not the host's /var/lib/xenvirtio.
        c.arg("--state-dir").arg(self.dir.path().join("state"));
        c.args(args);
        c.env_remove("RUST_LOG").env_remove("XENSTORED_PATH");
        c
    }

    /// Runs the binary to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().unwrap(), args)
    }

    /// Runs it and insists it succeeded.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert!(r.success, "{r}");
        r
    }

    /// Every child of `dir` with its value and permissions.
    pub fn tree(&self, dir: &str) -> BTreeMap<String, (String, Vec<Perm>)> {
        tree(&self.dom0, dir)
    }

    pub fn exists(&self, path: &str) -> bool {
        self.dom0.exists(N, path).unwrap()
    }

    pub fn read(&self, path: &str) -> String {
        String::from_utf8(self.dom0.read(N, path).unwrap()).unwrap()
    }
}

pub fn tree(store: &dyn XenStore, dir: &str) -> BTreeMap<String, (String, Vec<Perm>)> {
    let mut out = BTreeMap::new();
    for child in store.directory(N, dir).unwrap() {
        let path = format!("{dir}/{child}");
        let value = String::from_utf8(store.read(N, &path).unwrap()).unwrap();
        out.insert(child, (value, store.get_perms(N, &path).unwrap()));
    }
    out
}

/// A finished run of the binary.
pub struct Run {
    pub args: Vec<String>,
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output, args: &[&str]) -> Run {
        Run {
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            success: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }

    /// The `key: value` lines of stdout.
    pub fn field(&self, key: &str) -> String {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("no {key:?} in {self}"))
            .to_owned()
    }

    /// Insists on a failure with exit code 1 or 2 whose stderr names `needle`.
    pub fn refused_with(&self, needle: &str) {
        assert!(!self.success, "expected a refusal: {self}");
        // OPERATING.md's exit codes: 2 for a command that could not do what was asked.
        assert_eq!(self.code, Some(2), "exit code: {self}");
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self}"
        );
        assert!(self.stdout.is_empty(), "nothing on stdout: {self}");
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "xenvirtio-backend {:?} -> {:?}\n--- stdout\n{}--- stderr\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }
}

/// The permissions of PROTOCOL 2.1 for a directory owned by `owner` and read by `peer`.
pub fn perms(owner: DomId, peer: DomId) -> Vec<Perm> {
    if owner == peer {
        vec![Perm::owner(owner)]
    } else {
        vec![Perm::owner(owner), Perm::read(peer)]
    }
}

/// A path as a `&str`.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

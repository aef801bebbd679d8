//! MemStore must behave like the real daemon: one scenario (permissions, quotas, watches,
//! transactions, errors) runs against Debian's xenstored and against MemStore, through the
//! same `dyn XenStore` calls, and the two transcripts must be identical.
#![allow(clippy::unwrap_used)]

use std::fmt::Debug;

use xenvirtio_tests::xenstored::Xenstored;
use xenvirtio_xenstore::{MemStore, Perm, TxId, XenStore, XsError};

const N: TxId = TxId::NONE;

/// Four connections: two privileged, guests 5 and 7.
struct World<'a> {
    d0: &'a dyn XenStore,
    d0b: &'a dyn XenStore,
    g5: &'a dyn XenStore,
    g7: &'a dyn XenStore,
}

#[derive(Default)]
struct Transcript(Vec<String>);

trait Show {
    fn show(&self) -> String;
}
impl Show for () {
    fn show(&self) -> String {
        "()".into()
    }
}
impl Show for Vec<u8> {
    fn show(&self) -> String {
        if self.len() > 32 {
            format!("{} bytes", self.len())
        } else {
            format!("{:?}", String::from_utf8_lossy(self))
        }
    }
}
impl Show for Vec<String> {
    fn show(&self) -> String {
        format!("{self:?}")
    }
}
impl Show for Vec<Perm> {
    fn show(&self) -> String {
        self.iter()
            .map(Perm::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}
impl Show for bool {
    fn show(&self) -> String {
        self.to_string()
    }
}
impl Show for TxId {
    fn show(&self) -> String {
        "tx".into()
    }
}

impl Transcript {
    fn rec<T: Show + Debug>(&mut self, what: &str, r: Result<T, XsError>) -> Option<T> {
        let line = match &r {
            Ok(v) => format!("{what}: Ok({})", v.show()),
            Err(e) => match e.errno() {
                Some(errno) => format!("{what}: Err({})", errno.name()),
                None => format!("{what}: Err({e})"),
            },
        };
        self.0.push(line);
        r.ok()
    }

    /// Records the watch events a connection has received. A request on that connection
    /// first acts as a barrier: the daemon sends events before later replies on one stream.
    fn events(&mut self, name: &str, c: &dyn XenStore) {
        c.get_domain_path(0).unwrap();
        let q = c.watch_events();
        let mut got = Vec::new();
        while let Some(e) = q.try_next().unwrap() {
            got.push(format!("{}|{}", e.path, e.token));
        }
        self.0.push(format!("events {name}: {got:?}"));
    }

    fn all_events(&mut self, w: &World) {
        self.events("d0", w.d0);
        self.events("d0b", w.d0b);
        self.events("g5", w.g5);
        self.events("g7", w.g7);
    }
}

fn scenario(w: &World) -> Vec<String> {
    let mut t = Transcript::default();
    let (d0, d0b, g5, g7) = (w.d0, w.d0b, w.g5, w.g7);

    // Reads across domains.
    t.rec(
        "d0 write secret",
        d0.write(N, "/local/domain/0/secret", b"s"),
    );
    t.rec("g5 read secret", g5.read(N, "/local/domain/0/secret"));
    t.rec("g5 read dom0 absent", g5.read(N, "/local/domain/0/absent"));
    t.rec("g5 read own absent", g5.read(N, "/local/domain/5/absent"));
    t.rec(
        "g5 read own absent deep",
        g5.read(N, "/local/domain/5/a/b/c"),
    );
    t.rec("g5 write /foo", g5.write(N, "/foo/x", b"y"));
    t.rec("g5 mkdir in 7", g5.mkdir(N, "/local/domain/7/x"));
    t.rec("g5 rm absent in 7", g5.rm(N, "/local/domain/7/absent"));
    t.rec("g5 dir /", g5.directory(N, "/"));

    // Watches, with their initial events.
    t.rec("d0 watch home5", d0.watch("/local/domain/5", "d0-home5"));
    t.rec(
        "g7 watch 5/device",
        g7.watch("/local/domain/5/device", "g7-dev"),
    );
    t.rec("g5 watch rel", g5.watch("device", "g5-rel"));
    t.rec("g5 watch /tool", g5.watch("/tool", "g5-tool"));
    t.all_events(w);

    t.rec(
        "g5 write state",
        g5.write(N, "/local/domain/5/device/vif/0/state", b"1"),
    );
    t.rec("g5 read rel", g5.read(N, "device/vif/0/state"));
    t.rec("g5 perms rel", g5.get_perms(N, "device/vif/0"));
    t.all_events(w);

    // Grants.
    t.rec(
        "g5 grant r7",
        g5.set_perms(N, "device", &[Perm::owner(5), Perm::read(7)]),
    );
    t.all_events(w);
    t.rec("g7 read 5/device", g7.read(N, "/local/domain/5/device"));
    t.rec("g7 dir 5/device", g7.directory(N, "/local/domain/5/device"));
    t.rec(
        "g7 write 5/device",
        g7.write(N, "/local/domain/5/device", b"x"),
    );
    t.rec(
        "g7 read 5/device/vif",
        g7.read(N, "/local/domain/5/device/vif"),
    );
    t.rec(
        "g5 grant b7",
        g5.set_perms(N, "device", &[Perm::owner(5), Perm::both(7)]),
    );
    t.rec(
        "g7 write into 5",
        g7.write(N, "/local/domain/5/device/from7", b"hi"),
    );
    t.rec(
        "d0 perms from7",
        d0.get_perms(N, "/local/domain/5/device/from7"),
    );
    t.rec(
        "d0 write into 5",
        d0.write(N, "/local/domain/5/fromdom0", b"x"),
    );
    t.rec(
        "d0 perms fromdom0",
        d0.get_perms(N, "/local/domain/5/fromdom0"),
    );
    t.all_events(w);
    t.rec("g5 give away", g5.set_perms(N, "device", &[Perm::owner(7)]));
    t.rec(
        "g7 chmod 5's",
        g7.set_perms(N, "/local/domain/5/device", &[Perm::owner(5)]),
    );
    t.rec("g5 introduced?", g5.is_domain_introduced(5));
    t.rec("d0 introduced 5?", d0.is_domain_introduced(5));
    t.rec("d0 introduced 9?", d0.is_domain_introduced(9));

    // Permissions naming absent domains.
    t.rec("d0 write /p", d0.write(N, "/p", b""));
    t.rec("d0 owner 9", d0.set_perms(N, "/p", &[Perm::owner(9)]));
    t.rec(
        "d0 r9 r5",
        d0.set_perms(N, "/p", &[Perm::owner(0), Perm::read(9), Perm::read(5)]),
    );
    t.rec("d0 perms /p", d0.get_perms(N, "/p"));
    t.rec("g5 read /p", g5.read(N, "/p"));
    let six: Vec<Perm> = std::iter::once(Perm::owner(5))
        .chain((0..5).map(|_| Perm::read(7)))
        .collect();
    t.rec("g5 six perms", g5.set_perms(N, "device", &six));
    t.all_events(w);

    // Guest quota on node size.
    t.rec("g5 write 2015", g5.write(N, "v", &[b'x'; 2015]));
    t.rec("g5 write 2016", g5.write(N, "v", &[b'x'; 2016]));
    t.rec("g5 read v", g5.read(N, "v"));
    t.rec(
        "g5 two perms",
        g5.set_perms(N, "v", &[Perm::owner(5), Perm::read(7)]),
    );
    t.rec("g5 write 2008", g5.write(N, "v", &[b'x'; 2008]));
    t.rec("g5 write 2007", g5.write(N, "v", &[b'x'; 2007]));
    t.all_events(w);

    // Watch permissions: node or parent readable.
    t.rec("d0 write /tool/q", d0.write(N, "/tool/q", b"1"));
    t.all_events(w);
    t.rec(
        "d0 chmod /tool",
        d0.set_perms(N, "/tool", &[Perm::owner(0), Perm::read(5)]),
    );
    t.rec("d0 write /tool/q again", d0.write(N, "/tool/q", b"2"));
    t.all_events(w);

    // rm fires exact events below the removed node.
    t.rec("d0 write /r/a/b/c", d0.write(N, "/r/a/b/c", b""));
    t.rec("d0 watch /r", d0.watch("/r", "top"));
    t.rec("d0 watch /r/a/b/c", d0.watch("/r/a/b/c", "deep"));
    t.rec("d0 watch below", d0.watch("/r/a/b/c/none", "below"));
    t.rec("d0 watch /", d0.watch("/", "root"));
    t.all_events(w);
    t.rec("d0 rm /r", d0.rm(N, "/r"));
    t.all_events(w);
    t.rec("d0 unwatch /", d0.unwatch("/", "root"));

    // Errors.
    t.rec("d0 rm /", d0.rm(N, "/"));
    t.rec("d0 rm absent child", d0.rm(N, "/tool/absent"));
    t.rec("d0 rm absent parent", d0.rm(N, "/absent/child"));
    for bad in ["/a b", "/a/", "/a//b", "/x:y"] {
        t.rec(&format!("d0 write {bad:?}"), d0.write(N, bad, b""));
    }
    t.rec("d0 watch dup", d0.watch("/r", "top"));
    t.rec("d0 unwatch absent", d0.unwatch("/nowhere", "t"));
    t.rec("d0 unwatch /r", d0.unwatch("/r", "top"));
    t.rec("d0 mkdir existing", d0.mkdir(N, "/tool"));
    t.rec("d0 read bad tx", d0.read(TxId(4242), "/tool"));
    t.rec("d0 end no tx", d0.transaction_end(N, true));
    t.all_events(w);

    // Transactions.
    t.rec("d0 write /c/x", d0.write(N, "/c/x", b"0"));
    t.rec("d0 write /c/y", d0.write(N, "/c/y", b"0"));
    t.rec("d0b watch /c", d0b.watch("/c", "c"));
    t.all_events(w);

    let tx = t.rec("tx1 start", d0.transaction_start()).unwrap();
    t.rec("tx1 read x", d0.read(tx, "/c/x"));
    t.rec("d0b write x", d0b.write(N, "/c/x", b"1"));
    t.rec("tx1 write y", d0.write(tx, "/c/y", b"tx1"));
    t.rec("tx1 read y", d0.read(tx, "/c/y"));
    t.rec("d0b read y", d0b.read(N, "/c/y"));
    t.rec("tx1 commit", d0.transaction_end(tx, true));
    t.rec("d0b read y after", d0b.read(N, "/c/y"));
    t.all_events(w);

    let tx = t.rec("tx2 start", d0.transaction_start()).unwrap();
    t.rec("tx2 write deep", d0.write(tx, "/c/new/deep", b"1"));
    t.rec("d0b read new", d0b.read(N, "/c/new"));
    t.all_events(w);
    t.rec("tx2 commit", d0.transaction_end(tx, true));
    t.rec("d0b read deep", d0b.read(N, "/c/new/deep"));
    t.all_events(w);

    let tx = t.rec("tx3 start", d0.transaction_start()).unwrap();
    t.rec("tx3 read absent", d0.read(tx, "/c/later"));
    t.rec("d0b create it", d0b.write(N, "/c/later", b"1"));
    t.rec("tx3 commit", d0.transaction_end(tx, true));

    let tx = t.rec("tx4 start", d0.transaction_start()).unwrap();
    t.rec("tx4 read x", d0.read(tx, "/c/x"));
    t.rec("d0b write elsewhere", d0b.write(N, "/elsewhere", b"1"));
    t.rec("tx4 write y", d0.write(tx, "/c/y", b"tx4"));
    t.rec("tx4 commit", d0.transaction_end(tx, true));

    let tx = t.rec("tx5 start", d0.transaction_start()).unwrap();
    t.rec("d0b write x before access", d0b.write(N, "/c/x", b"2"));
    t.rec("tx5 read x", d0.read(tx, "/c/x"));
    t.rec("tx5 commit", d0.transaction_end(tx, true));

    let tx = t.rec("tx6 start", d0.transaction_start()).unwrap();
    t.rec("tx6 read y", d0.read(tx, "/c/y"));
    t.rec("d0b rm y", d0b.rm(N, "/c/y"));
    t.rec("tx6 commit", d0.transaction_end(tx, true));

    let tx = t.rec("tx7 start", d0.transaction_start()).unwrap();
    t.rec("tx7 create sibling", d0.write(tx, "/c/s1", b"1"));
    t.rec("d0b create sibling", d0b.write(N, "/c/s2", b"1"));
    t.rec("tx7 commit", d0.transaction_end(tx, true));

    let tx = t.rec("tx8 start", d0.transaction_start()).unwrap();
    t.rec("tx8 write", d0.write(tx, "/c/aborted", b"1"));
    t.rec("tx8 abort", d0.transaction_end(tx, false));
    t.rec("tx8 again", d0.transaction_end(tx, true));
    t.rec("d0 read aborted", d0.read(N, "/c/aborted"));

    let tx = t.rec("g5 tx start", g5.transaction_start()).unwrap();
    t.rec("g5 tx write", g5.write(tx, "device/t", b"1"));
    t.rec("g5 tx rm", g5.rm(tx, "v"));
    t.rec("g5 tx dir", g5.directory(tx, "/local/domain/5"));
    t.rec("g5 tx commit", g5.transaction_end(tx, true));
    t.rec("d0 dir 5", d0.directory(N, "/local/domain/5"));
    t.all_events(w);
    t.0
}

#[test]
fn memstore_matches_the_real_daemon() {
    let real = {
        let xsd = Xenstored::start();
        xsd.add_guest(5);
        xsd.add_guest(7);
        let (d0, d0b) = (xsd.client(), xsd.client());
        let (_b5, g5) = xsd.guest_client(5);
        let (_b7, g7) = xsd.guest_client(7);
        scenario(&World {
            d0: &d0,
            d0b: &d0b,
            g5: &g5,
            g7: &g7,
        })
    };
    let mem = {
        let store = MemStore::new();
        store.start_guest(5).unwrap();
        store.start_guest(7).unwrap();
        let (d0, d0b) = (store.connect(0).unwrap(), store.connect(0).unwrap());
        let (g5, g7) = (store.connect(5).unwrap(), store.connect(7).unwrap());
        scenario(&World {
            d0: &d0,
            d0b: &d0b,
            g5: &g5,
            g7: &g7,
        })
    };
    if std::env::var_os("XENVIRTIO_SHOW_TRANSCRIPT").is_some() {
        println!("{}", real.join("\n"));
    }
    let mut mismatches = Vec::new();
    for (i, (r, m)) in real.iter().zip(&mem).enumerate() {
        if r != m {
            mismatches.push(format!("line {i}:\n  real: {r}\n  mem:  {m}"));
        }
    }
    assert_eq!(real.len(), mem.len());
    assert!(
        mismatches.is_empty(),
        "MemStore differs from xenstored:\n{}\n\nfull real transcript:\n{}",
        mismatches.join("\n"),
        real.join("\n")
    );
}

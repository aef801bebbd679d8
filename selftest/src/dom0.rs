//! The `dom0` checks: the Xen devices and xenstore of one domain, with the domain as its own
//! peer (a domain may grant pages to itself and bind event channels to itself).
//!
//! - grants out and in: a batch of pages granted, mapped and checked with data both ways,
//!   grant copy both ways, the unmap notification's cleared byte;
//! - a read-only grant maps read-only, refuses a read-write mapping, and a store into it
//!   faults (through a [`WriteProbe`]);
//! - event channels: ping-pong between two handles through mio polls, and masking (a port
//!   stays masked until unmasked, and a notification sent meanwhile arrives at unmask);
//! - xenstore: read and write of arbitrary bytes, a watch through a mio poll, transactions.
//!
//! The checks are generic over [`Platform`] and [`XenStore`], so the same code runs on real
//! Xen and, in unit tests, on the loopback platform and the in-memory store. Every resource is
//! RAII and every wait is bounded; a failed check is reported and the next one runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use mio::{Events, Interest, Poll, Token};
use xenvirtio_xen::mem::{MemError, PAGE_SIZE, SharedMem};
use xenvirtio_xen::platform::{
    Access, BoundPort, EventChannels, GrantAllocator, GrantCopy, GrantMapper, GrantMapping,
    GrantedPages, MappedPages, Platform, UnmapNotify,
};
use xenvirtio_xen::{DomId, GrantRef};
use xenvirtio_xenstore::{Transaction, TxId, XenStore};

use crate::events::EventWaiter;
use crate::pattern;
use crate::probe::{ProbeOutcome, WriteProbe};
use crate::report::Report;

/// Round trips of the event-channel ping-pong.
const PING_PONGS: u32 = 50;
/// How long one notification may take to arrive (TCG is slow; a lost one is what is caught).
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a notification that must *not* arrive is waited for.
const QUIET_WAIT: Duration = Duration::from_millis(300);

/// Runs every `dom0` check of `platform` (as its own peer) and `store`, into `report`.
pub fn run<P: Platform>(
    platform: &P,
    store: &dyn XenStore,
    probe: &dyn WriteProbe,
    report: &mut Report,
) {
    if let Err(e) = grant_checks(platform, report) {
        report.fail("grant-setup", format!("{e:#}"));
    }
    if let Err(e) = read_only_checks(platform, probe, report) {
        report.fail("grant-read-only-setup", format!("{e:#}"));
    }
    let r = ping_pong(platform);
    report.result("evtchn-ping-pong", r, |s| s.clone());
    let r = masking(platform);
    report.result("evtchn-mask", r, |s| s.clone());
    xenstore_checks(store, platform.domid(), report);
}

/// Grants out and in, data both ways, grant copy, unmap notification.
fn grant_checks<P: Platform>(platform: &P, report: &mut Report) -> Result<()> {
    let me = platform.domid();
    let alloc = platform
        .grant_allocator()
        .context("opening the grant allocator")?;
    let mapper = platform
        .grant_mapper()
        .context("opening the grant mapper")?;
    let pages = 2;
    let granted = alloc
        .grant(me, pages, Access::ReadWrite)
        .with_context(|| format!("granting {pages} pages to domain {me} (itself)"))?;
    let refs = granted.refs().to_vec();
    let own = granted.mem();
    let len = pages * PAGE_SIZE;

    // Out and back: the granting side writes, the mapping side reads, then the other way.
    let roundtrip = || -> Result<String> {
        pattern::fill(&own, 0, len, 0x5a)?;
        let mapping = mapper
            .map(me, &refs, Access::ReadWrite)
            .with_context(|| format!("mapping refs {refs:?} read-write in one batch"))?;
        let seen = mapping.mem();
        ensure!(
            seen.len() == len,
            "the mapping has {} bytes, expected {len}",
            seen.len()
        );
        let m = pattern::first_mismatch(&seen, 0, len, 0x5a)?;
        ensure!(
            m.is_none(),
            "granted data seen through the mapping: {}",
            pattern::verdict(m)
        );
        pattern::fill(&seen, 0, len, 0xa5)?;
        let m = pattern::first_mismatch(&own, 0, len, 0xa5)?;
        ensure!(
            m.is_none(),
            "reply seen by the granting side: {}",
            pattern::verdict(m)
        );
        Ok(format!(
            "refs {refs:?} mapped in one batch; {len} bytes checked each way"
        ))
    };
    let r = roundtrip();
    report.result("grant-roundtrip", r, |s| s.clone());

    let r = grant_copy(&mapper, me, &refs, &own);
    report.result("grant-copy", r, |s| s.clone());

    let r = unmap_notify_clears_byte(&mapper, me, &refs, &own);
    report.result("grant-unmap-notify", r, |s| s.clone());
    Ok(())
}

/// Grant copy in both directions, checked on the granting side's own view.
fn grant_copy<M: GrantMapper>(
    mapper: &M,
    me: DomId,
    refs: &[GrantRef],
    own: &SharedMem<'_>,
) -> Result<String> {
    pattern::fill(own, 0, 2 * PAGE_SIZE, 0x3c)?;
    let mut from = vec![0u8; 200];
    let to = pattern::bytes(0xc3, 4000, 96);
    let mut segments = [
        GrantCopy::FromGrant {
            peer: me,
            gref: refs[0],
            offset: 100,
            dst: &mut from,
        },
        GrantCopy::ToGrant {
            peer: me,
            gref: refs[1],
            offset: 4000,
            src: &to,
        },
    ];
    let statuses = mapper.copy(&mut segments).context("the grant-copy call")?;
    for (i, s) in statuses.into_iter().enumerate() {
        s.with_context(|| format!("segment {i}"))?;
    }
    ensure!(
        from == pattern::bytes(0x3c, 100, 200),
        "200 bytes copied out of ref {} differ from the page",
        refs[0]
    );
    let mut landed = vec![0u8; 96];
    own.read(PAGE_SIZE + 4000, &mut landed)?;
    ensure!(
        landed == to,
        "96 bytes copied into ref {} did not land",
        refs[1]
    );
    let m = pattern::first_mismatch(own, PAGE_SIZE, 4000, 0x3c)?;
    ensure!(
        m.is_none(),
        "the copy touched bytes outside its segment: {}",
        pattern::verdict(m)
    );
    Ok("200 bytes out of a grant, 96 bytes into another, in one batch".into())
}

/// An unmap notification armed on a mapping clears its byte when the mapping goes away.
fn unmap_notify_clears_byte<M: GrantMapper>(
    mapper: &M,
    me: DomId,
    refs: &[GrantRef],
    own: &SharedMem<'_>,
) -> Result<String> {
    let at = PAGE_SIZE + 123;
    own.write(at, &[0x77])?;
    let mut mapping = mapper.map(me, refs, Access::ReadWrite)?;
    mapping
        .set_unmap_notify(UnmapNotify {
            clear_byte: Some(at),
            event: None,
        })
        .context("arming the unmap notification")?;
    let [before] = own.read_array::<1>(at)?;
    ensure!(before == 0x77, "the byte changed before the unmap");
    drop(mapping);
    let [after] = own.read_array::<1>(at)?;
    ensure!(
        after == 0,
        "byte {at} is {after:#04x} after the unmap, expected 0"
    );
    Ok(format!("byte {at} cleared when the mapping was dropped"))
}

/// A read-only grant: read-only mapping, refusal of a read-write one, the fault probe.
fn read_only_checks<P: Platform>(
    platform: &P,
    probe: &dyn WriteProbe,
    report: &mut Report,
) -> Result<()> {
    let me = platform.domid();
    let alloc = platform.grant_allocator()?;
    let mapper = platform.grant_mapper()?;
    let granted = alloc
        .grant(me, 1, Access::ReadOnly)
        .context("granting a page read-only to this domain")?;
    let gref = granted.refs()[0];
    let own = granted.mem();
    pattern::fill(&own, 0, PAGE_SIZE, 0x42)?;

    let mapping = match mapper.map(me, &[gref], Access::ReadOnly) {
        Ok(m) => m,
        Err(e) => {
            report.fail(
                "grant-read-only",
                format!("mapping ref {gref} read-only: {e:#}"),
            );
            return Ok(());
        }
    };
    let seen = mapping.mem();
    let m = pattern::first_mismatch(&seen, 0, PAGE_SIZE, 0x42)?;
    let refused = seen.write(0, b"x");
    report.check(
        "grant-read-only",
        m.is_none() && !seen.is_writable() && matches!(refused, Err(MemError::ReadOnly { .. })),
        format!(
            "ref {gref}: content {}, window writable={}, checked write: {:?}",
            pattern::verdict(m),
            seen.is_writable(),
            refused
        ),
    );

    match mapper.map(me, &[gref], Access::ReadWrite) {
        Err(e) => report.pass(
            "grant-read-only-refuses-rw",
            format!(
                "a read-write mapping of read-only ref {gref} fails: {:#}",
                anyhow::Error::from(e)
            ),
        ),
        Ok(_) => report.fail(
            "grant-read-only-refuses-rw",
            format!("read-only ref {gref} was mapped read-write"),
        ),
    }

    let offset = 1234;
    let outcome = probe.store_into_read_only(me, gref, offset, seen);
    let unchanged = pattern::first_mismatch(&own, 0, PAGE_SIZE, 0x42)?;
    match outcome {
        Ok(ProbeOutcome::Faulted { signal }) if unchanged.is_none() => report.pass(
            "grant-read-only-fault",
            format!(
                "a store into the read-only mapping of ref {gref} was killed by {}; page unchanged",
                signal_name(signal)
            ),
        ),
        Ok(ProbeOutcome::Faulted { signal }) => report.fail(
            "grant-read-only-fault",
            format!(
                "the store faulted ({}) but the page changed: {}",
                signal_name(signal),
                pattern::verdict(unchanged)
            ),
        ),
        Ok(ProbeOutcome::Wrote) => report.fail(
            "grant-read-only-fault",
            format!(
                "a store into the read-only mapping of ref {gref} went through; page {}",
                pattern::verdict(unchanged)
            ),
        ),
        Err(e) => report.fail("grant-read-only-fault", format!("{e:#}")),
    }
    drop(mapping);
    Ok(())
}

/// Two handles, one port each end, notifications both ways through mio polls.
fn ping_pong<P: Platform>(platform: &P) -> Result<String> {
    let me = platform.domid();
    let a = Arc::new(platform.event_channels().context("opening handle A")?);
    let b = Arc::new(platform.event_channels().context("opening handle B")?);
    let pa = BoundPort::bind_unbound(&a, me).context("binding an unbound port")?;
    let pb = BoundPort::bind_interdomain(&b, me, pa.port()).context("binding interdomain to it")?;
    let mut wa = EventWaiter::new(a.clone())?;
    let mut wb = EventWaiter::new(b.clone())?;
    // Xen leaves an event pending on a fresh interdomain binding; take it away first.
    let spurious = wb.wait_masked(Duration::from_millis(100))?;
    b.unmask(&spurious)?;
    wa.drain()?;

    let start = Instant::now();
    let mut worst = Duration::ZERO;
    for i in 0..PING_PONGS {
        pa.notify().context("notifying A -> B")?;
        let t = wb
            .wait_for(pb.port(), EVENT_TIMEOUT)?
            .ok_or_else(|| anyhow!("round {i}: B's port {} never fired", pb.port()))?;
        worst = worst.max(t);
        pb.notify().context("notifying B -> A")?;
        let t = wa
            .wait_for(pa.port(), EVENT_TIMEOUT)?
            .ok_or_else(|| anyhow!("round {i}: A's port {} never fired", pa.port()))?;
        worst = worst.max(t);
    }
    let per = start.elapsed() / PING_PONGS;
    Ok(format!(
        "ports {}<->{}: {PING_PONGS} round trips through mio polls, {per:?} each, slowest leg {worst:?}{}",
        pa.port(),
        pb.port(),
        if spurious.is_empty() {
            String::new()
        } else {
            format!("; the fresh binding had {spurious:?} pending")
        }
    ))
}

/// A delivered port stays masked: a second notification is held back until unmask, and then
/// delivered once.
fn masking<P: Platform>(platform: &P) -> Result<String> {
    let me = platform.domid();
    let a = Arc::new(platform.event_channels()?);
    let b = Arc::new(platform.event_channels()?);
    let pa = BoundPort::bind_unbound(&a, me)?;
    let pb = BoundPort::bind_interdomain(&b, me, pa.port())?;
    let mut wb = EventWaiter::new(b.clone())?;
    std::thread::sleep(Duration::from_millis(50));
    wb.drain()?;

    pa.notify()?;
    let first = wb.wait_masked(EVENT_TIMEOUT)?;
    ensure!(
        first == [pb.port()],
        "first notification: pending {first:?}, expected [{}]",
        pb.port()
    );
    // pb is masked now: a second notification must wait.
    pa.notify()?;
    let held = wb.wait_masked(QUIET_WAIT)?;
    ensure!(
        held.is_empty(),
        "port {} fired again while masked: {held:?}",
        pb.port()
    );
    b.unmask(&first)?;
    let again = wb.wait_masked(EVENT_TIMEOUT)?;
    ensure!(
        again == [pb.port()],
        "after unmask: pending {again:?}, expected the held notification on [{}]",
        pb.port()
    );
    b.unmask(&again)?;
    let quiet = wb.wait_masked(QUIET_WAIT)?;
    ensure!(
        quiet.is_empty(),
        "spurious delivery after the held one: {quiet:?}"
    );
    Ok(format!(
        "port {}: delivered masked, a second notification held for {QUIET_WAIT:?} and delivered once at unmask",
        pb.port()
    ))
}

/// Read, write, watch and transactions on `store`, below this domain's `data/`.
fn xenstore_checks(store: &dyn XenStore, me: DomId, report: &mut Report) {
    let base = format!(
        "/local/domain/{me}/data/xenvirtio-selftest-{}",
        std::process::id()
    );
    let r = read_write(store, &base);
    report.result("xenstore-read-write", r, |s| s.clone());
    let r = watch(store, &base);
    report.result("xenstore-watch", r, |s| s.clone());
    let r = transactions(store, &base);
    report.result("xenstore-transaction", r, |s| s.clone());
    if let Err(e) = store.rm(TxId::NONE, &base) {
        report.fail("xenstore-cleanup", format!("removing {base}: {e}"));
    }
}

fn read_write(store: &dyn XenStore, base: &str) -> Result<String> {
    let bytes: Vec<u8> = vec![0, 1, 0xff, b'x', 0x80, b'\n'];
    let cases: [(&str, &[u8]); 3] = [
        ("text", b"hello xenstore"),
        ("bytes", &bytes),
        ("empty", b""),
    ];
    for (key, value) in cases {
        let path = format!("{base}/{key}");
        store
            .write(TxId::NONE, &path, value)
            .with_context(|| format!("writing {path}"))?;
        let back = store
            .read(TxId::NONE, &path)
            .with_context(|| format!("reading {path}"))?;
        ensure!(back == value, "{path} reads back {back:?}, wrote {value:?}");
    }
    let mut children = store.directory(TxId::NONE, base)?;
    children.sort();
    ensure!(
        children == ["bytes", "empty", "text"],
        "{base} lists {children:?}"
    );
    let missing = store.read_optional(TxId::NONE, &format!("{base}/missing"))?;
    ensure!(missing.is_none(), "a missing node reads {missing:?}");
    Ok(format!(
        "{base}: text, binary and empty values read back; directory and ENOENT right"
    ))
}

fn watch(store: &dyn XenStore, base: &str) -> Result<String> {
    let token = "xenvirtio-selftest-watch";
    let watched = format!("{base}/watched");
    store.write(TxId::NONE, &watched, b"0")?;
    let mut events = store.watch_events_for(token)?;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut events, Token(1), Interest::READABLE)?;
    store.watch(&watched, token)?;
    let mut wait_for = |path: &str| -> Result<Duration> {
        let start = Instant::now();
        let deadline = start + EVENT_TIMEOUT;
        let mut mio_events = Events::with_capacity(4);
        loop {
            while let Some(ev) = events.try_next()? {
                if ev.path == path && ev.token == token {
                    return Ok(start.elapsed());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no watch event for {path} within {EVENT_TIMEOUT:?}");
            }
            poll.poll(&mut mio_events, Some(left))?;
        }
    };
    let first = wait_for(&watched).context("the event fired when the watch is set")?;
    let child = format!("{watched}/child");
    store.write(TxId::NONE, &child, b"1")?;
    let on_write = wait_for(&child).context("after writing a child")?;
    store.rm(TxId::NONE, &child)?;
    let on_rm = wait_for(&child).context("after removing the child")?;
    store.unwatch(&watched, token)?;
    Ok(format!(
        "{watched}: initial event {first:?}, write {on_write:?}, rm {on_rm:?}, through a mio poll"
    ))
}

fn transactions(store: &dyn XenStore, base: &str) -> Result<String> {
    let path = format!("{base}/tx");
    let tx = Transaction::start(store)?;
    store.write(tx.id(), &path, b"committed")?;
    ensure!(
        store.read_optional(TxId::NONE, &path)?.is_none(),
        "a write inside a transaction is visible outside it before the commit"
    );
    tx.commit()?;
    ensure!(
        store.read(TxId::NONE, &path)? == b"committed",
        "the commit did not land"
    );
    let tx = Transaction::start(store)?;
    store.write(tx.id(), &path, b"aborted")?;
    tx.abort()?;
    ensure!(
        store.read(TxId::NONE, &path)? == b"committed",
        "an aborted write landed"
    );
    Ok(format!("{path}: isolated until commit, abort discards"))
}

/// A signal's name, for the report.
pub fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGBUS => "SIGBUS".into(),
        other => format!("signal {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ForkProbe;
    use xenvirtio_xen::loopback::LoopbackXen;
    use xenvirtio_xenstore::MemStore;

    use crate::report::Sink;

    /// Every check passes on the loopback platform, which models Xen's rules, and everything
    /// is released afterwards.
    #[test]
    fn all_dom0_checks_pass_on_the_loopback_platform() {
        let hv = LoopbackXen::new();
        let dom0 = hv.domain(0);
        let daemon = MemStore::new();
        let store = daemon.connect(0).unwrap();
        let sink = Sink::default();
        let mut report = Report::to(Box::new(sink.clone()));
        run(&dom0, &store, &ForkProbe, &mut report);
        let text = sink.text();
        assert_eq!(report.failed(), 0, "{text}");
        for name in [
            "grant-roundtrip",
            "grant-copy",
            "grant-unmap-notify",
            "grant-read-only ",
            "grant-read-only-refuses-rw",
            "grant-read-only-fault",
            "evtchn-ping-pong",
            "evtchn-mask",
            "xenstore-read-write",
            "xenstore-watch",
            "xenstore-transaction",
        ] {
            assert!(
                text.contains(&format!("PASS {name}")),
                "{name} missing:\n{text}"
            );
        }
        assert!(
            hv.stats(0).is_idle(),
            "something is still held: {:?}",
            hv.stats(0)
        );
        assert!(
            store
                .directory(TxId::NONE, "/local/domain/0/data")
                .unwrap()
                .is_empty()
        );
    }

    /// A probe whose store goes through (a mapping that is not really read-only) fails the
    /// fault check: the check can fail.
    #[test]
    fn a_store_that_goes_through_fails_the_fault_check() {
        struct Writes;
        impl WriteProbe for Writes {
            fn store_into_read_only(
                &self,
                _: DomId,
                _: GrantRef,
                _: usize,
                _: SharedMem<'_>,
            ) -> Result<ProbeOutcome> {
                Ok(ProbeOutcome::Wrote)
            }
        }
        let hv = LoopbackXen::new();
        let sink = Sink::default();
        let mut report = Report::to(Box::new(sink.clone()));
        read_only_checks(&hv.domain(0), &Writes, &mut report).unwrap();
        let text = sink.text();
        assert!(text.contains("FAIL grant-read-only-fault"), "{text}");
        assert_eq!(report.failed(), 1, "{text}");
    }
}

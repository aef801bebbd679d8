//! The cross-domain checks: a DomU (`cross-domu`) and Dom0 (`cross-dom0`) share a granted page,
//! an event channel and, where Xen allows it, a foreign mapping of a pinned page.
//!
//! The exchange, step by step:
//! 1. The DomU grants one page to Dom0 with its pattern in the first half, binds an unbound
//!    port for Dom0, pins one page with a pattern and a known frame number, and publishes
//!    `gref`, `port`, `gfn` and then `ready` below its own `data/xenvirtio-selftest/`.
//! 2. Dom0 maps the grant, checks the pattern, writes its reply into the second half and the
//!    flag byte last, binds to the port, arms an unmap notification on its mapping (clear the
//!    flag, send an event), and notifies.
//! 3. The DomU sees the reply and notifies back.
//! 4. Dom0 foreign-maps the pinned frame with privcmd: on PVH and Arm it must read the pattern
//!    and writes a marker; on x86 PV it must fail, because a PV guest's frame numbers are not
//!    machine frames.
//! 5. Dom0 drops its mappings: the unmap notification clears the flag byte and signals the
//!    DomU, which checks the flag and the pinned page (marker, or untouched on PV), and exits.
//!
//! Both sides are generic over [`Platform`] and [`XenStore`], so a unit test runs the whole
//! exchange on the loopback platform and the in-memory store. Every wait is bounded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use xenvirtio_xen::mem::{PAGE_SIZE, SharedMem};
use xenvirtio_xen::platform::{
    Access, BoundPort, ForeignMapper, GrantAllocator, GrantMapper, GrantMapping, GrantedPages,
    MappedPages, PinnedAllocator, PinnedPages, Platform, UnmapNotify,
};
use xenvirtio_xen::{DomId, Gfn, GrantRef, Port};
use xenvirtio_xenstore::{TxId, XenStore, transaction};

use crate::events::EventWaiter;
use crate::pattern;
use crate::report::Report;

/// Where the DomU publishes, relative to its home `/local/domain/<domid>`.
pub const KEYS_DIR: &str = "data/xenvirtio-selftest";
/// The DomU's half of the granted page: `[0, REPLY_AT)`.
const REPLY_AT: usize = PAGE_SIZE / 2;
/// Dom0's flag byte, written after its reply and cleared by its unmap notification.
const FLAG_AT: usize = PAGE_SIZE - 1;
/// The flag's value while Dom0 holds its mapping.
const FLAG_SET: u8 = 0xa5;
/// What Dom0 writes through its foreign mapping of the pinned page.
const FOREIGN_MARK: &[u8] = b"xenvirtio-selftest: dom0 wrote this through privcmd";

/// The pattern seeds, mixed with the DomU's id so that no other domain's page can match.
fn seed_granted(domu: DomId) -> u8 {
    0x5a ^ domu as u8
}
fn seed_reply(domu: DomId) -> u8 {
    0xc6 ^ domu as u8
}
fn seed_pinned(domu: DomId) -> u8 {
    0x39 ^ domu as u8
}

/// What Dom0's foreign mapping of the pinned page must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ForeignExpect {
    /// It maps the very page (PVH and Arm guests: frame numbers are guest-physical).
    Works,
    /// It fails (x86 PV guests: their frame numbers are not machine frames).
    Refused,
}

/// How long each side waits for the other.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For the peer to show up (the DomU for Dom0's notification; Dom0 for the DomU's keys).
    pub peer: Duration,
    /// For each later step.
    pub step: Duration,
}

/// The keys a DomU published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Published {
    gref: GrantRef,
    port: Port,
    gfn: Gfn,
}

// ---------------------------------------------------------------------------------------------
// The DomU side.
// ---------------------------------------------------------------------------------------------

/// The DomU's side (`cross-domu`), as domain `platform.domid()`, with `store` its xenstore
/// connection (`/dev/xen/xenbus` on real Xen).
pub fn run_domu<P: Platform>(
    platform: &P,
    store: &dyn XenStore,
    expect: ForeignExpect,
    timeouts: Timeouts,
    report: &mut Report,
) {
    if let Err(e) = domu(platform, store, expect, timeouts, report) {
        report.fail("cross-domu", format!("{e:#}"));
    }
    if let Err(e) = store.rm(TxId::NONE, KEYS_DIR) {
        tracing::debug!(error = %e, "removing the published keys failed");
    }
}

fn domu<P: Platform>(
    platform: &P,
    store: &dyn XenStore,
    expect: ForeignExpect,
    timeouts: Timeouts,
    report: &mut Report,
) -> Result<()> {
    let me = platform.domid();
    let alloc = platform.grant_allocator()?;
    let granted = alloc
        .grant(0, 1, Access::ReadWrite)
        .context("granting a page to Dom0")?;
    let gref = granted.refs()[0];
    let page = granted.mem();
    pattern::fill(&page, 0, REPLY_AT, seed_granted(me))?;
    report.pass(
        "grant",
        format!("ref {gref} granted read-write to Dom0, pattern written"),
    );

    let events = Arc::new(platform.event_channels()?);
    let port = BoundPort::bind_unbound(&events, 0).context("binding an unbound port for Dom0")?;
    report.pass(
        "evtchn-unbound",
        format!("port {} offered to Dom0", port.port()),
    );
    let mut waiter = EventWaiter::new(events.clone())?;

    let pinned = platform
        .pinned_allocator()?
        .alloc_pinned(1)
        .context("allocating a pinned page")?;
    let gfn = pinned.gfns()[0];
    pattern::fill(&pinned.mem(), 0, PAGE_SIZE, seed_pinned(me))?;
    report.pass(
        "pinned",
        format!(
            "gfn {gfn:#x}{}{}",
            if pinned.may_migrate() {
                " (mlock'ed 4 KiB page: it may migrate)"
            } else {
                " (huge page: it cannot move)"
            },
            match expect {
                ForeignExpect::Works => "",
                ForeignExpect::Refused => "; a pseudo-physical frame here, not the machine frame",
            }
        ),
    );

    let keys = Published {
        gref,
        port: port.port(),
        gfn,
    };
    transaction(store, 8, |tx| {
        store.write_str(tx, &format!("{KEYS_DIR}/gref"), &keys.gref.to_string())?;
        store.write_str(tx, &format!("{KEYS_DIR}/port"), &keys.port.to_string())?;
        store.write_str(tx, &format!("{KEYS_DIR}/gfn"), &keys.gfn.to_string())?;
        store.write_str(tx, &format!("{KEYS_DIR}/ready"), "1")
    })
    .with_context(|| format!("publishing the keys below {KEYS_DIR}"))?;
    report.pass(
        "xenstore-publish",
        format!("{KEYS_DIR}/{{gref,port,gfn,ready}} written in one transaction"),
    );

    // Dom0's notification: wait until the flag says its reply is complete (a spurious event
    // before that is not the reply).
    let start = Instant::now();
    loop {
        let left = timeouts.peer.saturating_sub(start.elapsed());
        if waiter.wait_for(keys.port, left)?.is_none() {
            let [flag] = page.read_array::<1>(FLAG_AT)?;
            report.fail(
                "evtchn-from-dom0",
                format!(
                    "no notification on port {} within {:?} (flag byte {flag:#04x})",
                    keys.port, timeouts.peer
                ),
            );
            return Ok(());
        }
        let [flag] = page.read_array::<1>(FLAG_AT)?;
        if flag == FLAG_SET {
            break;
        }
    }
    report.pass(
        "evtchn-from-dom0",
        format!("port {} fired after {:?}", keys.port, start.elapsed()),
    );
    let reply = pattern::first_mismatch(&page, REPLY_AT, FLAG_AT - REPLY_AT, seed_reply(me))?;
    let mine = pattern::first_mismatch(&page, 0, REPLY_AT, seed_granted(me))?;
    report.check(
        "grant-reply",
        reply.is_none() && mine.is_none(),
        format!(
            "Dom0's reply in ref {gref}: {}; this domain's half: {}",
            pattern::verdict(reply),
            pattern::verdict(mine)
        ),
    );
    let r = port.notify().context("notifying Dom0 back");
    report.result("evtchn-notify-back", r, |_| format!("port {}", keys.port));

    // Dom0 drops its grant mapping last: its unmap notification clears the flag and signals.
    let done = waiter.wait_for(keys.port, timeouts.step)?;
    let [flag] = page.read_array::<1>(FLAG_AT)?;
    match done {
        Some(after) if flag == 0 => report.pass(
            "unmap-notify",
            format!(
                "Dom0's unmap cleared byte {FLAG_AT} and signalled port {} ({after:?})",
                keys.port
            ),
        ),
        Some(_) => report.fail(
            "unmap-notify",
            format!("signalled, but byte {FLAG_AT} is {flag:#04x}, expected 0"),
        ),
        None => report.fail(
            "unmap-notify",
            format!(
                "no event within {:?} (byte {FLAG_AT} is {flag:#04x})",
                timeouts.step
            ),
        ),
    }

    let pinned_mem = pinned.mem();
    match expect {
        ForeignExpect::Works => {
            let mut mark = vec![0u8; FOREIGN_MARK.len()];
            pinned_mem.read(0, &mut mark)?;
            let rest = pattern::first_mismatch(
                &pinned_mem,
                FOREIGN_MARK.len(),
                PAGE_SIZE - FOREIGN_MARK.len(),
                seed_pinned(me),
            )?;
            report.check(
                "foreign-write-seen",
                mark == FOREIGN_MARK && rest.is_none(),
                format!(
                    "gfn {gfn:#x}: Dom0's marker {}; rest of the page {}",
                    if mark == FOREIGN_MARK {
                        "present"
                    } else {
                        "missing"
                    },
                    pattern::verdict(rest)
                ),
            );
        }
        ForeignExpect::Refused => {
            let m = pattern::first_mismatch(&pinned_mem, 0, PAGE_SIZE, seed_pinned(me))?;
            report.check(
                "pinned-untouched",
                m.is_none(),
                format!(
                    "gfn {gfn:#x}: nothing reached the page by its frame number: {}",
                    pattern::verdict(m)
                ),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The Dom0 side.
// ---------------------------------------------------------------------------------------------

/// Dom0's side (`cross-dom0`) against DomU `domu`.
pub fn run_dom0<P: Platform>(
    platform: &P,
    store: &dyn XenStore,
    domu: DomId,
    expect: ForeignExpect,
    timeouts: Timeouts,
    report: &mut Report,
) {
    if let Err(e) = dom0(platform, store, domu, expect, timeouts, report) {
        report.fail("cross-dom0", format!("{e:#}"));
    }
}

fn dom0<P: Platform>(
    platform: &P,
    store: &dyn XenStore,
    domu: DomId,
    expect: ForeignExpect,
    timeouts: Timeouts,
    report: &mut Report,
) -> Result<()> {
    let dir = format!("/local/domain/{domu}/{KEYS_DIR}");
    let keys = match wait_for_keys(store, &dir, timeouts.peer) {
        Ok(k) => k,
        Err(e) => {
            report.fail("keys", format!("{e:#}"));
            return Ok(());
        }
    };
    let owner = store
        .get_perms(TxId::NONE, &format!("{dir}/gref"))
        .ok()
        .and_then(|p| p.first().map(|p| p.domid));
    report.check(
        "keys",
        owner == Some(domu),
        format!(
            "{dir}: gref {} port {} gfn {:#x}, owned by domain {}",
            keys.gref,
            keys.port,
            keys.gfn,
            owner.map_or_else(|| "?".into(), |o| o.to_string())
        ),
    );

    let mapper = platform.grant_mapper()?;
    let mut mapping = match mapper.map(domu, &[keys.gref], Access::ReadWrite) {
        Ok(m) => m,
        Err(e) => {
            report.fail(
                "grant-map",
                format!("ref {} of domain {domu}: {e:#}", keys.gref),
            );
            return Ok(());
        }
    };
    let page = mapping.mem();
    let m = pattern::first_mismatch(&page, 0, REPLY_AT, seed_granted(domu))?;
    report.check(
        "grant-map",
        m.is_none(),
        format!(
            "ref {} of domain {domu} mapped read-write; its pattern: {}",
            keys.gref,
            pattern::verdict(m)
        ),
    );
    pattern::fill(&page, REPLY_AT, FLAG_AT - REPLY_AT, seed_reply(domu))?;
    page.write(FLAG_AT, &[FLAG_SET])?;

    let events = Arc::new(platform.event_channels()?);
    let port = match BoundPort::bind_interdomain(&events, domu, keys.port) {
        Ok(p) => p,
        Err(e) => {
            report.fail(
                "evtchn-bind",
                format!("to port {} of domain {domu}: {e:#}", keys.port),
            );
            return Ok(());
        }
    };
    report.pass(
        "evtchn-bind",
        format!(
            "local port {} bound to port {} of domain {domu}",
            port.port(),
            keys.port
        ),
    );
    let mut waiter = EventWaiter::new(events.clone())?;
    // Xen leaves an event pending on a fresh interdomain binding.
    std::thread::sleep(Duration::from_millis(50));
    waiter.drain()?;
    let armed = mapping.set_unmap_notify(UnmapNotify {
        clear_byte: Some(FLAG_AT),
        event: Some(port.port()),
    });
    report.result(
        "unmap-notify-armed",
        armed.map_err(anyhow::Error::from),
        |_| {
            format!(
                "clear byte {FLAG_AT} and signal port {} when the mapping goes",
                port.port()
            )
        },
    );

    let sent = Instant::now();
    port.notify().context("notifying the DomU")?;
    match waiter.wait_for(port.port(), timeouts.step)? {
        Some(t) => report.pass(
            "evtchn-round-trip",
            format!(
                "notified port {}, the DomU saw the reply and answered in {t:?}",
                port.port()
            ),
        ),
        None => report.fail(
            "evtchn-round-trip",
            format!(
                "no answer on port {} within {:?} (sent {:?} ago)",
                port.port(),
                timeouts.step,
                sent.elapsed()
            ),
        ),
    }

    let foreign = platform.foreign_mapper()?;
    foreign_check(&foreign, domu, keys.gfn, expect, report);

    // Last: the unmap notification tells the DomU that Dom0 is done.
    drop(mapping);
    drop(port);
    Ok(())
}

/// Reads the DomU's keys once `ready` is 1, waiting on a watch up to `timeout`.
fn wait_for_keys(store: &dyn XenStore, dir: &str, timeout: Duration) -> Result<Published> {
    let token = "xenvirtio-selftest-keys";
    let events = store.watch_events_for(token)?;
    let ready = format!("{dir}/ready");
    store.watch(&ready, token)?;
    let start = Instant::now();
    let result = loop {
        if store.read_optional(TxId::NONE, &ready)?.as_deref() == Some(b"1") {
            break Ok(());
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            break Err(anyhow!("{ready} was not 1 within {timeout:?}"));
        }
        events.next_timeout(left)?;
    };
    let _ = store.unwatch(&ready, token);
    result?;
    let read = |key: &str| -> Result<String> {
        store
            .read_string(TxId::NONE, &format!("{dir}/{key}"))
            .with_context(|| format!("reading {dir}/{key}"))
    };
    let parse = |key: &str| -> Result<u64> {
        let v = read(key)?;
        v.trim()
            .parse()
            .with_context(|| format!("{dir}/{key} is {v:?}, not a number"))
    };
    let gref = GrantRef::try_from(parse("gref")?).context("gref out of range")?;
    let port = Port::try_from(parse("port")?).context("port out of range")?;
    let gfn = parse("gfn")?;
    Ok(Published { gref, port, gfn })
}

/// Foreign-maps `gfn` of `domu` and checks the outcome against `expect`.
fn foreign_check<F: ForeignMapper>(
    foreign: &F,
    domu: DomId,
    gfn: Gfn,
    expect: ForeignExpect,
    report: &mut Report,
) {
    let mapped = foreign.map(domu, &[gfn], Access::ReadWrite);
    match (expect, mapped) {
        (ForeignExpect::Works, Ok(m)) => {
            let r = check_foreign_page(m.mem(), domu);
            report.result("foreign-map", r, |s| format!("gfn {gfn:#x} of domain {domu}: {s}"));
        }
        (ForeignExpect::Works, Err(e)) => {
            report.fail("foreign-map", format!("gfn {gfn:#x} of domain {domu}: {:#}", anyhow::Error::from(e)));
        }
        (ForeignExpect::Refused, Err(e)) => report.pass(
            "foreign-map-refused",
            format!(
                "gfn {gfn:#x} of PV domain {domu} is a pseudo-physical frame; mapping it fails as documented: {:#}",
                anyhow::Error::from(e)
            ),
        ),
        (ForeignExpect::Refused, Ok(m)) => {
            let seen = pattern::first_mismatch(&m.mem(), 0, PAGE_SIZE, seed_pinned(domu));
            report.fail(
                "foreign-map-refused",
                format!(
                    "gfn {gfn:#x} of PV domain {domu} mapped, expected a refusal; the page's pattern: {}",
                    match seen {
                        Ok(v) => pattern::verdict(v),
                        Err(e) => e.to_string(),
                    }
                ),
            );
        }
    }
}

fn check_foreign_page(mem: SharedMem<'_>, domu: DomId) -> Result<String> {
    let m = pattern::first_mismatch(&mem, 0, PAGE_SIZE, seed_pinned(domu))?;
    if let Some(bad) = m {
        bail!("the pinned page's pattern: {}", pattern::verdict(Some(bad)));
    }
    mem.write(0, FOREIGN_MARK)?;
    Ok("the pinned page's pattern read through privcmd, a marker written back".into())
}

/// Checks a published value is sane before use (helper for tests of hostile values).
#[cfg(test)]
fn parse_keys(store: &dyn XenStore, dir: &str) -> Result<Published> {
    wait_for_keys(store, dir, Duration::from_millis(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenvirtio_xen::loopback::LoopbackXen;
    use xenvirtio_xenstore::MemStore;

    use crate::report::Sink;

    const T: Timeouts = Timeouts {
        peer: Duration::from_secs(20),
        step: Duration::from_secs(20),
    };

    /// Runs both sides in two threads over one loopback hypervisor and one store.
    fn exchange(
        expect_domu: ForeignExpect,
        expect_dom0: ForeignExpect,
    ) -> (Report, Sink, Report, Sink, LoopbackXen) {
        let hv = LoopbackXen::new();
        let daemon = MemStore::new();
        daemon.start_guest(7).unwrap();
        let guest = daemon.connect(7).unwrap();
        let dom0_store = daemon.connect(0).unwrap();
        let (du, d0) = (hv.domain(7), hv.domain(0));
        let (su, s0) = (Sink::default(), Sink::default());
        let (mut ru, mut r0) = (
            Report::to(Box::new(su.clone())),
            Report::to(Box::new(s0.clone())),
        );
        std::thread::scope(|s| {
            s.spawn(|| run_domu(&du, &guest, expect_domu, T, &mut ru));
            s.spawn(|| run_dom0(&d0, &dom0_store, 7, expect_dom0, T, &mut r0));
        });
        (ru, su, r0, s0, hv)
    }

    #[test]
    fn the_whole_exchange_passes_where_foreign_mapping_works() {
        let (ru, su, r0, s0, hv) = exchange(ForeignExpect::Works, ForeignExpect::Works);
        let (tu, t0) = (su.text(), s0.text());
        assert_eq!(ru.failed(), 0, "domU:\n{tu}");
        assert_eq!(r0.failed(), 0, "dom0:\n{t0}");
        for name in [
            "grant",
            "evtchn-unbound",
            "pinned",
            "xenstore-publish",
            "evtchn-from-dom0",
            "grant-reply",
            "evtchn-notify-back",
            "unmap-notify",
            "foreign-write-seen",
        ] {
            assert!(tu.contains(&format!("PASS {name} ")), "{name}:\n{tu}");
        }
        for name in [
            "keys",
            "grant-map",
            "evtchn-bind",
            "unmap-notify-armed",
            "evtchn-round-trip",
            "foreign-map",
        ] {
            assert!(t0.contains(&format!("PASS {name} ")), "{name}:\n{t0}");
        }
        assert!(hv.stats(0).is_idle(), "dom0 still holds {:?}", hv.stats(0));
        assert!(hv.stats(7).is_idle(), "domU still holds {:?}", hv.stats(7));
    }

    /// The loopback platform maps any frame of the guest's RAM, so "refused" cannot be shown
    /// there; but the checks must then fail on both sides, which proves they can.
    #[test]
    fn a_foreign_map_that_works_where_a_refusal_is_expected_fails() {
        let (ru, su, r0, s0, _hv) = exchange(ForeignExpect::Refused, ForeignExpect::Refused);
        assert!(
            s0.text().contains("FAIL foreign-map-refused"),
            "{}",
            s0.text()
        );
        assert_eq!(r0.failed(), 1, "{}", s0.text());
        // Dom0 did not write its marker, so the DomU's page is untouched.
        assert!(su.text().contains("PASS pinned-untouched"), "{}", su.text());
        assert_eq!(ru.failed(), 0, "{}", su.text());
    }

    #[test]
    fn dom0_reports_a_domu_that_never_publishes() {
        let hv = LoopbackXen::new();
        let daemon = MemStore::new();
        daemon.start_guest(7).unwrap();
        let store = daemon.connect(0).unwrap();
        let sink = Sink::default();
        let mut r = Report::to(Box::new(sink.clone()));
        let quick = Timeouts {
            peer: Duration::from_millis(200),
            step: Duration::from_millis(200),
        };
        run_dom0(
            &hv.domain(0),
            &store,
            7,
            ForeignExpect::Works,
            quick,
            &mut r,
        );
        assert!(sink.text().starts_with("FAIL keys "), "{}", sink.text());
    }

    #[test]
    fn hostile_keys_are_refused() {
        let daemon = MemStore::new();
        let store = daemon.connect(0).unwrap();
        let dir = "/local/domain/7/data/xenvirtio-selftest";
        for (key, value) in [
            ("gref", "12"),
            ("port", "99999999999"),
            ("gfn", "0x10"),
            ("ready", "1"),
        ] {
            store
                .write_str(TxId::NONE, &format!("{dir}/{key}"), value)
                .unwrap();
        }
        let e = parse_keys(&store, dir).unwrap_err();
        assert!(format!("{e:#}").contains("port out of range"), "{e:#}");
        store
            .write_str(TxId::NONE, &format!("{dir}/port"), "5")
            .unwrap();
        let e = parse_keys(&store, dir).unwrap_err();
        assert!(format!("{e:#}").contains("not a number"), "{e:#}");
        store
            .write_str(TxId::NONE, &format!("{dir}/gfn"), "16")
            .unwrap();
        assert_eq!(
            parse_keys(&store, dir).unwrap(),
            Published {
                gref: 12,
                port: 5,
                gfn: 16
            }
        );
    }
}

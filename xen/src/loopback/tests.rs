//! Tests of the loopback platform: Xen's permission checks, data visibility, event-channel
//! masking, foreign-map refusal, records and counters.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::*;
use crate::mem::PAGE_SIZE;
use crate::platform::{
    BoundPort, EventChannels, ForeignMapper, GrantAllocator, GrantCopy, GrantMapper, GrantMapping,
    GrantedPages, MappedPages, PinnedAllocator, PinnedPages, UnmapNotify,
};
use crate::{Port, Refusal, XenError};

const BACK: DomId = 0;
const FRONT: DomId = 5;
const OTHER: DomId = 6;

fn setup() -> (LoopbackXen, LoopbackDomain, LoopbackDomain) {
    let hv = LoopbackXen::new();
    let back = hv.domain(BACK);
    let front = hv.domain(FRONT);
    (hv, back, front)
}

fn refusal(e: XenError) -> Refusal {
    e.refusal()
        .unwrap_or_else(|| panic!("not a refusal: {e:?}"))
}

/// The permissions column of /proc/self/maps for the mapping that holds `addr`.
fn perms_at(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let (range, rest) = line.split_once(' ').unwrap();
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).unwrap(),
            usize::from_str_radix(hi, 16).unwrap(),
        );
        if (lo..hi).contains(&addr) {
            return rest.split_whitespace().next().unwrap().to_owned();
        }
    }
    panic!("{addr:#x} is not mapped");
}

fn readable(fd: &impl AsRawFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

#[test]
fn a_grant_mapping_sees_the_granters_writes_and_back() {
    let (_hv, back, front) = setup();
    let grant = front
        .grant_allocator()
        .unwrap()
        .grant(BACK, 2, Access::ReadWrite)
        .unwrap();
    assert_eq!(grant.pages(), 2);
    grant.mem().write(PAGE_SIZE + 10, b"from front").unwrap();
    let map = back
        .grant_mapper()
        .unwrap()
        .map(FRONT, grant.refs(), Access::ReadWrite)
        .unwrap();
    assert_eq!(map.pages(), 2);
    assert_eq!(
        &map.mem().read_array::<10>(PAGE_SIZE + 10).unwrap(),
        b"from front"
    );
    map.mem()
        .store_u32(0, 0xdead_beef, Ordering::Release)
        .unwrap();
    assert_eq!(
        grant.mem().load_u32(0, Ordering::Acquire).unwrap(),
        0xdead_beef
    );
    assert_eq!(perms_at(addr_of(&map)), "rw-s");
}

fn addr_of(m: &impl MappedPages) -> usize {
    m.mem().addr()
}

#[test]
fn refs_of_different_grants_map_contiguously_in_one_batch() {
    let (hv, back, front) = setup();
    let alloc = front.grant_allocator().unwrap();
    let a = alloc.grant(BACK, 1, Access::ReadWrite).unwrap();
    let b = alloc.grant(BACK, 2, Access::ReadWrite).unwrap();
    a.mem().write(0, b"A").unwrap();
    b.mem().write(0, b"B0").unwrap();
    b.mem().write(PAGE_SIZE, b"B1").unwrap();
    let refs = [b.refs()[1], a.refs()[0], b.refs()[0]];
    let map = back
        .grant_mapper()
        .unwrap()
        .map(FRONT, &refs, Access::ReadOnly)
        .unwrap();
    assert_eq!(&map.mem().read_array::<2>(0).unwrap(), b"B1");
    assert_eq!(&map.mem().read_array::<1>(PAGE_SIZE).unwrap(), b"A");
    assert_eq!(&map.mem().read_array::<2>(2 * PAGE_SIZE).unwrap(), b"B0");
    let rec = hv.records().pop().unwrap();
    assert_eq!(
        rec.kind,
        MapKind::Grant {
            refs: refs.to_vec()
        }
    );
    assert_eq!(rec.gfns, vec![b.gfns()[1], a.gfns()[0], b.gfns()[0]]);
    assert_eq!(
        (rec.mapper, rec.owner, rec.access, rec.live),
        (BACK, FRONT, Access::ReadOnly, true)
    );
}

#[test]
fn a_ref_granted_to_another_domain_cannot_be_mapped() {
    let (hv, back, front) = setup();
    let other = hv.domain(OTHER);
    let grant = front
        .grant_allocator()
        .unwrap()
        .grant(OTHER, 1, Access::ReadWrite)
        .unwrap();
    let err = back
        .grant_mapper()
        .unwrap()
        .map(FRONT, grant.refs(), Access::ReadOnly)
        .unwrap_err();
    assert_eq!(refusal(err), Refusal::NotGrantedTo { grantee: OTHER });
    // Naming the wrong granter fails too: the ref does not exist in that domain's table.
    let err = other
        .grant_mapper()
        .unwrap()
        .map(BACK, grant.refs(), Access::ReadOnly)
        .unwrap_err();
    assert!(matches!(
        refusal(err),
        Refusal::NoSuchGrant | Refusal::NoSuchDomain { .. }
    ));
    other
        .grant_mapper()
        .unwrap()
        .map(FRONT, grant.refs(), Access::ReadWrite)
        .unwrap();
    assert!(
        hv.reached(BACK, FRONT).is_empty(),
        "a refused map reaches nothing"
    );
}

#[test]
fn unknown_and_revoked_refs_cannot_be_mapped() {
    let (_hv, back, front) = setup();
    let mapper = back.grant_mapper().unwrap();
    let grant = front
        .grant_allocator()
        .unwrap()
        .grant(BACK, 1, Access::ReadWrite)
        .unwrap();
    let gref = grant.refs()[0];
    let err = mapper
        .map(FRONT, &[gref + 100], Access::ReadOnly)
        .unwrap_err();
    assert_eq!(refusal(err), Refusal::NoSuchGrant);
    let err = mapper.map(FRONT, &[0], Access::ReadOnly).unwrap_err();
    assert_eq!(
        refusal(err),
        Refusal::NoSuchGrant,
        "reserved refs are never granted"
    );
    drop(grant);
    let err = mapper.map(FRONT, &[gref], Access::ReadOnly).unwrap_err();
    assert_eq!(refusal(err), Refusal::Revoked);
    assert_eq!(err_errno(&mapper, gref), libc::EINVAL);
    // One bad ref fails the whole batch.
    let ok = front
        .grant_allocator()
        .unwrap()
        .grant(BACK, 1, Access::ReadWrite)
        .unwrap();
    let err = mapper
        .map(FRONT, &[ok.refs()[0], gref], Access::ReadOnly)
        .unwrap_err();
    assert!(matches!(err, XenError::GrantRefused { gref: g, .. } if g == gref));
}

fn err_errno(mapper: &LoopbackGrantMapper, gref: GrantRef) -> i32 {
    mapper
        .map(FRONT, &[gref], Access::ReadOnly)
        .unwrap_err()
        .errno()
        .unwrap()
}

#[test]
fn a_read_only_grant_maps_only_read_only_and_really_prot_read() {
    let (hv, back, front) = setup();
    let grant = front
        .grant_allocator()
        .unwrap()
        .grant(BACK, 1, Access::ReadOnly)
        .unwrap();
    grant.mem().write(0, b"ro").unwrap();
    let mapper = back.grant_mapper().unwrap();
    let err = mapper
        .map(FRONT, grant.refs(), Access::ReadWrite)
        .unwrap_err();
    assert_eq!(refusal(err), Refusal::ReadOnlyGrant);
    let map = mapper.map(FRONT, grant.refs(), Access::ReadOnly).unwrap();
    assert!(!map.mem().is_writable());
    assert!(map.mem().write(0, b"x").is_err());
    assert_eq!(&map.mem().read_array::<2>(0).unwrap(), b"ro");
    assert_eq!(
        perms_at(addr_of(&map)),
        "r--s",
        "the page itself is PROT_READ"
    );
    assert_eq!(hv.records().last().unwrap().access, Access::ReadOnly);
}

#[test]
fn grant_copy_moves_data_and_checks_each_segment() {
    let (hv, back, front) = setup();
    let alloc = front.grant_allocator().unwrap();
    let rw = alloc.grant(BACK, 1, Access::ReadWrite).unwrap();
    let ro = alloc.grant(BACK, 1, Access::ReadOnly).unwrap();
    let theirs = alloc.grant(OTHER, 1, Access::ReadWrite).unwrap();
    hv.domain(OTHER);
    ro.mem().write(100, b"readonly").unwrap();
    let mut got = [0u8; 8];
    let mut unused = [0u8; 4];
    let mut segs = [
        GrantCopy::ToGrant {
            peer: FRONT,
            gref: rw.refs()[0],
            offset: 4090,
            src: b"hello!",
        },
        GrantCopy::FromGrant {
            peer: FRONT,
            gref: ro.refs()[0],
            offset: 100,
            dst: &mut got,
        },
        GrantCopy::ToGrant {
            peer: FRONT,
            gref: ro.refs()[0],
            offset: 0,
            src: b"no",
        },
        GrantCopy::FromGrant {
            peer: FRONT,
            gref: theirs.refs()[0],
            offset: 0,
            dst: &mut unused,
        },
    ];
    let results = back.grant_mapper().unwrap().copy(&mut segs).unwrap();
    assert!(results[0].is_ok() && results[1].is_ok());
    assert_eq!(
        refusal(results[2].as_ref().err().map(clone_err).unwrap()),
        Refusal::ReadOnlyGrant
    );
    assert_eq!(
        refusal(results[3].as_ref().err().map(clone_err).unwrap()),
        Refusal::NotGrantedTo { grantee: OTHER }
    );
    assert_eq!(&got, b"readonly");
    assert_eq!(&rw.mem().read_array::<6>(4090).unwrap(), b"hello!");
    assert_eq!(&ro.mem().read_array::<2>(0).unwrap(), &[0, 0]);
    let copies: Vec<_> = hv.records().into_iter().filter(|r| !r.live).collect();
    assert_eq!(copies.len(), 2);
    assert_eq!(copies[0].kind, MapKind::Copy { gref: rw.refs()[0] });
    assert_eq!(copies[0].access, Access::ReadWrite);
    assert_eq!(copies[1].access, Access::ReadOnly);
}

fn clone_err(e: &XenError) -> XenError {
    match e {
        XenError::GrantRefused {
            mapper,
            peer,
            gref,
            reason,
        } => XenError::GrantRefused {
            mapper: *mapper,
            peer: *peer,
            gref: *gref,
            reason: *reason,
        },
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_copy_segment_crossing_its_page_fails_the_whole_call() {
    let (_hv, back, front) = setup();
    let rw = front
        .grant_allocator()
        .unwrap()
        .grant(BACK, 1, Access::ReadWrite)
        .unwrap();
    let mut segs = [
        GrantCopy::ToGrant {
            peer: FRONT,
            gref: rw.refs()[0],
            offset: 0,
            src: b"first",
        },
        GrantCopy::ToGrant {
            peer: FRONT,
            gref: rw.refs()[0],
            offset: 4095,
            src: b"xx",
        },
    ];
    let err = back.grant_mapper().unwrap().copy(&mut segs).unwrap_err();
    assert!(matches!(err, XenError::Invalid { .. }), "{err:?}");
    assert_eq!(
        &rw.mem().read_array::<5>(0).unwrap(),
        &[0; 5],
        "nothing was copied"
    );
}

/// Binds `front` unbound for `back` and `back` interdomain to it; drains the spurious event Xen
/// leaves on the binder's new port.
fn channel(back: &LoopbackEvents, front: &LoopbackEvents) -> (Port, Port) {
    let fport = front.bind_unbound(BACK).unwrap();
    let bport = back.bind_interdomain(FRONT, fport).unwrap();
    assert_eq!(
        back.pending().unwrap(),
        vec![bport],
        "Xen sets the new port pending"
    );
    back.unmask(&[bport]).unwrap();
    (bport, fport)
}

#[test]
fn event_channels_deliver_mask_and_coalesce_like_evtchn() {
    let (hv, back, front) = setup();
    let (bev, fev) = (
        back.event_channels().unwrap(),
        front.event_channels().unwrap(),
    );
    let (bport, fport) = channel(&bev, &fev);
    assert!(!readable(&fev));
    assert!(fev.pending().unwrap().is_empty());

    bev.notify(bport).unwrap();
    assert!(
        readable(&fev),
        "the eventfd is readable once a port is pending"
    );
    assert_eq!(fev.pending().unwrap(), vec![fport]);
    assert!(!readable(&fev));
    // Masked: more notifications are remembered once, not delivered.
    bev.notify(bport).unwrap();
    bev.notify(bport).unwrap();
    assert!(!readable(&fev));
    assert!(fev.pending().unwrap().is_empty());
    fev.unmask(&[fport]).unwrap();
    assert!(
        readable(&fev),
        "a notification while masked fires at unmask"
    );
    assert_eq!(fev.pending().unwrap(), vec![fport]);
    fev.unmask(&[fport]).unwrap();
    assert!(fev.pending().unwrap().is_empty(), "and only once");

    // The other direction.
    fev.notify(fport).unwrap();
    assert_eq!(bev.pending().unwrap(), vec![bport]);
    // Unmasking ports of another handle does nothing.
    fev.unmask(&[bport]).unwrap();
    fev.notify(fport).unwrap();
    assert!(bev.pending().unwrap().is_empty());
    assert_eq!(hv.stats(FRONT).bound_ports, 1);
    assert_eq!(hv.stats(BACK).bound_ports, 1);
}

#[test]
fn bind_interdomain_checks_that_the_port_was_offered_to_the_binder() {
    let (hv, back, front) = setup();
    let other = hv.domain(OTHER);
    let (bev, fev, oev) = (
        back.event_channels().unwrap(),
        front.event_channels().unwrap(),
        other.event_channels().unwrap(),
    );
    let for_other = fev.bind_unbound(OTHER).unwrap();
    let err = bev.bind_interdomain(FRONT, for_other).unwrap_err();
    assert_eq!(refusal(err), Refusal::PortNotOffered { port: for_other });
    let err = bev.bind_interdomain(FRONT, 999).unwrap_err();
    assert_eq!(refusal(err), Refusal::PortNotOffered { port: 999 });
    let err = bev.bind_interdomain(42, 1).unwrap_err();
    assert_eq!(refusal(err), Refusal::NoSuchDomain { domid: 42 });
    let err = fev.bind_unbound(43).unwrap_err();
    assert_eq!(refusal(err), Refusal::NoSuchDomain { domid: 43 });
    oev.bind_interdomain(FRONT, for_other).unwrap();
    // Once connected, it is no longer on offer.
    let err = oev.bind_interdomain(FRONT, for_other).unwrap_err();
    assert_eq!(refusal(err), Refusal::PortNotOffered { port: for_other });
    // Ports of another handle cannot be notified or unbound through this one.
    let err = bev.notify(for_other).unwrap_err();
    assert_eq!(refusal(err), Refusal::PortNotBound { port: for_other });
    assert_eq!(
        err_of(bev.unbind(for_other)),
        Refusal::PortNotBound { port: for_other }
    );
}

fn err_of(r: Result<(), XenError>) -> Refusal {
    refusal(r.unwrap_err())
}

#[test]
fn closing_one_end_leaves_the_other_unbound_and_drops_its_notifications() {
    let (hv, back, front) = setup();
    let (bev, fev) = (
        back.event_channels().unwrap(),
        front.event_channels().unwrap(),
    );
    let (bport, fport) = channel(&bev, &fev);
    bev.unbind(bport).unwrap();
    assert_eq!(hv.stats(BACK).bound_ports, 0);
    fev.notify(fport).unwrap();
    assert_eq!(hv.stats(FRONT).dropped_notifications, 1);
    // The front port is unbound again, offered to the back end: it can reconnect.
    let bport2 = bev.bind_interdomain(FRONT, fport).unwrap();
    bev.pending().unwrap();
    bev.unmask(&[bport2]).unwrap();
    fev.notify(fport).unwrap();
    assert_eq!(bev.pending().unwrap(), vec![bport2]);
    // Dropping a handle unbinds its ports.
    drop(fev);
    assert_eq!(hv.stats(FRONT).bound_ports, 0);
    assert_eq!(hv.stats(FRONT).event_handles, 0);
}

#[test]
fn the_event_fd_drives_a_mio_poll() {
    use mio::unix::SourceFd;
    use mio::{Events, Interest, Poll, Token};
    let (_hv, back, front) = setup();
    let (bev, fev) = (
        back.event_channels().unwrap(),
        front.event_channels().unwrap(),
    );
    let (bport, fport) = channel(&bev, &fev);
    let mut poll = Poll::new().unwrap();
    poll.registry()
        .register(
            &mut SourceFd(&fev.as_raw_fd()),
            Token(7),
            Interest::READABLE,
        )
        .unwrap();
    let mut events = Events::with_capacity(4);
    for _ in 0..3 {
        bev.notify(bport).unwrap();
        poll.poll(&mut events, Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            events.iter().map(|e| e.token()).collect::<Vec<_>>(),
            vec![Token(7)]
        );
        assert_eq!(fev.pending().unwrap(), vec![fport]);
        fev.unmask(&[fport]).unwrap();
    }
}

#[test]
fn bound_ports_unbind_on_drop() {
    let (hv, back, front) = setup();
    let fev = Arc::new(front.event_channels().unwrap());
    let bev = Arc::new(back.event_channels().unwrap());
    let fport = BoundPort::bind_unbound(&fev, BACK).unwrap();
    let bport = BoundPort::bind_interdomain(&bev, FRONT, fport.port()).unwrap();
    bport.notify().unwrap();
    assert!(fev.pending().unwrap().contains(&fport.port()));
    drop(bport);
    assert_eq!(hv.stats(BACK).bound_ports, 0);
    let kept = fport.into_port();
    assert_eq!(hv.stats(FRONT).bound_ports, 1);
    fev.unbind(kept).unwrap();
    assert_eq!(hv.stats(FRONT).bound_ports, 0);
}

#[test]
fn only_dom0_may_foreign_map_and_it_reaches_pinned_pages() {
    let (hv, back, front) = setup();
    let pinned = front.pinned_allocator().unwrap().alloc_pinned(3).unwrap();
    assert_eq!(pinned.gfns().len(), 3);
    assert_eq!(
        pinned.gfns()[0],
        hv.config().ram_base_gfn,
        "the first RAM frame"
    );
    assert_eq!(
        pinned.gfns()[2],
        pinned.gfns()[0] + 2,
        "contiguous when RAM allows"
    );
    pinned.mem().write(2 * PAGE_SIZE + 1, b"direct").unwrap();

    // A DomU may not map foreign memory, not even its own.
    let err = front
        .foreign_mapper()
        .unwrap()
        .map(FRONT, pinned.gfns(), Access::ReadOnly)
        .unwrap_err();
    assert_eq!(refusal(err), Refusal::NotPrivileged);
    let err =
        hv.domain(OTHER)
            .foreign_mapper()
            .unwrap()
            .map(FRONT, pinned.gfns(), Access::ReadOnly);
    assert_eq!(refusal(err.unwrap_err()), Refusal::NotPrivileged);

    let fm = back.foreign_mapper().unwrap();
    let map = fm
        .map(
            FRONT,
            &[pinned.gfns()[2], pinned.gfns()[0]],
            Access::ReadWrite,
        )
        .unwrap();
    assert_eq!(&map.mem().read_array::<6>(1).unwrap(), b"direct");
    map.mem().write(PAGE_SIZE, b"dom0").unwrap();
    assert_eq!(&pinned.mem().read_array::<4>(0).unwrap(), b"dom0");
    assert_eq!(hv.stats(BACK).foreign_maps, 1);
    assert_eq!(hv.stats(FRONT).pages_mapped_by_peers, 2);
    let reached = hv.reached(BACK, FRONT);
    assert_eq!(
        reached.into_iter().collect::<Vec<_>>(),
        vec![pinned.gfns()[0], pinned.gfns()[2]]
    );

    // Frames outside RAM, and domains that do not exist.
    let base = hv.config().ram_base_gfn;
    let err = fm.map(FRONT, &[base - 1], Access::ReadOnly).unwrap_err();
    assert_eq!(refusal(err), Refusal::NoSuchFrame);
    let err = fm.map(77, &[base], Access::ReadOnly).unwrap_err();
    assert_eq!(refusal(err), Refusal::NoSuchDomain { domid: 77 });

    // Read-only foreign maps are PROT_READ.
    let ro = fm
        .map(FRONT, &pinned.gfns()[..1], Access::ReadOnly)
        .unwrap();
    assert_eq!(perms_at(addr_of(&ro)), "r--s");

    // Restriction.
    hv.domain(OTHER);
    fm.restrict(FRONT).unwrap();
    fm.restrict(FRONT).unwrap();
    let err = fm.map(OTHER, &[base], Access::ReadOnly).unwrap_err();
    assert_eq!(refusal(err), Refusal::Restricted { to: FRONT });
    assert!(fm.restrict(OTHER).is_err());
    fm.map(FRONT, &[base], Access::ReadOnly).unwrap();
}

#[test]
fn everything_released_leaves_both_domains_idle() {
    let (hv, back, front) = setup();
    {
        let alloc = front.grant_allocator().unwrap();
        let g = alloc.grant(BACK, 4, Access::ReadWrite).unwrap();
        let pinned = front.pinned_allocator().unwrap().alloc_pinned(2).unwrap();
        let (bev, fev) = (
            back.event_channels().unwrap(),
            front.event_channels().unwrap(),
        );
        let _ch = channel(&bev, &fev);
        let m = back
            .grant_mapper()
            .unwrap()
            .map(FRONT, g.refs(), Access::ReadWrite)
            .unwrap();
        let f = back
            .foreign_mapper()
            .unwrap()
            .map(FRONT, pinned.gfns(), Access::ReadOnly)
            .unwrap();
        let s = hv.stats(FRONT);
        assert_eq!(
            (s.grants, s.pinned_pages, s.bound_ports, s.event_handles),
            (4, 2, 1, 1)
        );
        assert_eq!((s.ram_pages_in_use, s.pages_mapped_by_peers), (6, 6));
        let b = hv.stats(BACK);
        assert_eq!(
            (
                b.grant_maps,
                b.grant_mapped_pages,
                b.foreign_maps,
                b.foreign_mapped_pages
            ),
            (1, 4, 1, 2)
        );
        drop((m, f));
        assert_eq!(hv.stats(BACK).grant_maps, 0);
        assert!(hv.records().iter().all(|r| !r.live));
    }
    assert!(hv.stats(FRONT).is_idle(), "{:?}", hv.stats(FRONT));
    assert!(hv.stats(BACK).is_idle(), "{:?}", hv.stats(BACK));
    assert_eq!(hv.records().len(), 2);
}

#[test]
fn a_page_revoked_while_mapped_lives_until_the_unmap_then_comes_back_zeroed() {
    let (hv, back, front) = setup();
    let alloc = front.grant_allocator().unwrap();
    let g = alloc.grant(BACK, 1, Access::ReadWrite).unwrap();
    let gfn = g.gfns()[0];
    g.mem().write(0, b"kept").unwrap();
    let map = back
        .grant_mapper()
        .unwrap()
        .map(FRONT, g.refs(), Access::ReadOnly)
        .unwrap();
    drop(g);
    assert_eq!(hv.stats(FRONT).grants, 0);
    assert_eq!(
        hv.stats(FRONT).ram_pages_in_use,
        1,
        "the mapping keeps the page"
    );
    assert_eq!(&map.mem().read_array::<4>(0).unwrap(), b"kept");
    drop(map);
    assert_eq!(hv.stats(FRONT).ram_pages_in_use, 0);
    let again = alloc.grant(BACK, 1, Access::ReadWrite).unwrap();
    assert_eq!(again.gfns()[0], gfn, "the freed page is reused");
    assert_eq!(
        again.mem().read_array::<4>(0).unwrap(),
        [0; 4],
        "and zeroed"
    );
}

#[test]
fn a_destroyed_domain_cannot_be_mapped_and_its_notifications_are_dropped() {
    let (hv, back, front) = setup();
    let g = front
        .grant_allocator()
        .unwrap()
        .grant(BACK, 1, Access::ReadWrite)
        .unwrap();
    let (bev, fev) = (
        back.event_channels().unwrap(),
        front.event_channels().unwrap(),
    );
    let (bport, _fport) = channel(&bev, &fev);
    let live = back
        .grant_mapper()
        .unwrap()
        .map(FRONT, g.refs(), Access::ReadWrite)
        .unwrap();
    hv.destroy(FRONT);
    assert!(hv.stats(FRONT).destroyed);
    let err = back
        .grant_mapper()
        .unwrap()
        .map(FRONT, g.refs(), Access::ReadWrite)
        .unwrap_err();
    assert_eq!(refusal(err), Refusal::Destroyed { domid: FRONT });
    bev.notify(bport).unwrap();
    assert_eq!(hv.stats(BACK).dropped_notifications, 1);
    assert_eq!(hv.stats(FRONT).bound_ports, 0);
    // Its own operations fail; existing mappings stay readable.
    let err = front.grant_allocator().unwrap_err();
    assert_eq!(refusal(err), Refusal::Destroyed { domid: FRONT });
    assert!(fev.bind_unbound(BACK).is_err());
    live.mem().write(0, b"still").unwrap();
    drop(live);
    drop(g);
    assert_eq!(hv.stats(BACK).grant_maps, 0);
}

#[test]
fn unmap_notifications_fire_when_a_grant_or_a_mapping_goes() {
    let (_hv, back, front) = setup();
    let (bev, fev) = (
        back.event_channels().unwrap(),
        front.event_channels().unwrap(),
    );
    let (bport, fport) = channel(&bev, &fev);
    let mut g = front
        .grant_allocator()
        .unwrap()
        .grant(BACK, 2, Access::ReadWrite)
        .unwrap();
    let mut m = back
        .grant_mapper()
        .unwrap()
        .map(FRONT, g.refs(), Access::ReadWrite)
        .unwrap();
    g.mem().fill(0, 2 * PAGE_SIZE, 0xff).unwrap();

    // The mapping goes: the byte is cleared in the granter's page and the front is notified.
    m.set_unmap_notify(UnmapNotify {
        clear_byte: Some(PAGE_SIZE + 3),
        event: Some(bport),
    })
    .unwrap();
    assert!(
        m.set_unmap_notify(UnmapNotify {
            clear_byte: Some(2 * PAGE_SIZE),
            event: None
        })
        .is_err()
    );
    drop(m);
    assert_eq!(g.mem().read_array::<1>(PAGE_SIZE + 3).unwrap(), [0]);
    assert_eq!(g.mem().read_array::<1>(PAGE_SIZE + 2).unwrap(), [0xff]);
    assert_eq!(fev.pending().unwrap(), vec![fport]);
    fev.unmask(&[fport]).unwrap();

    // The grant goes (even after the front closed its event handle): the back's mapping sees
    // the byte cleared and the back is notified.
    let m2 = back
        .grant_mapper()
        .unwrap()
        .map(FRONT, g.refs(), Access::ReadOnly)
        .unwrap();
    g.set_unmap_notify(UnmapNotify {
        clear_byte: Some(7),
        event: Some(fport),
    })
    .unwrap();
    drop(fev);
    assert_eq!(
        _hv.stats(FRONT).bound_ports,
        1,
        "the notification holds the port"
    );
    drop(g);
    assert_eq!(m2.mem().read_array::<1>(7).unwrap(), [0]);
    assert_eq!(bev.pending().unwrap(), vec![bport]);
    assert_eq!(_hv.stats(FRONT).bound_ports, 0, "released once fired");

    // A read-only mapping cannot clear a byte; a port that is not bound cannot be armed.
    let g = front
        .grant_allocator()
        .unwrap()
        .grant(BACK, 1, Access::ReadOnly)
        .unwrap();
    let mut ro = back
        .grant_mapper()
        .unwrap()
        .map(FRONT, g.refs(), Access::ReadOnly)
        .unwrap();
    assert!(
        ro.set_unmap_notify(UnmapNotify {
            clear_byte: Some(0),
            event: None
        })
        .is_err()
    );
    let err = ro
        .set_unmap_notify(UnmapNotify {
            clear_byte: None,
            event: Some(4000),
        })
        .unwrap_err();
    assert_eq!(refusal(err), Refusal::PortNotBound { port: 4000 });
}

#[test]
fn grants_are_limited_like_gntalloc() {
    let hv = LoopbackXen::with_config(LoopbackConfig {
        max_grants: 4,
        ..Default::default()
    });
    let front = hv.domain(FRONT);
    let alloc = front.grant_allocator().unwrap();
    let a = alloc.grant(BACK, 3, Access::ReadWrite).unwrap();
    let err = alloc.grant(BACK, 2, Access::ReadWrite).unwrap_err();
    assert_eq!(refusal(err), Refusal::Exhausted);
    assert_eq!(
        hv.stats(FRONT).ram_pages_in_use,
        3,
        "a refused grant frees its pages"
    );
    drop(a);
    alloc.grant(BACK, 4, Access::ReadWrite).unwrap();
}

#[test]
fn guest_ram_runs_out_cleanly() {
    let hv = LoopbackXen::with_config(LoopbackConfig {
        ram_pages: 8,
        ..Default::default()
    });
    let front = hv.domain(FRONT);
    let _p = front.pinned_allocator().unwrap().alloc_pinned(6).unwrap();
    let err = front
        .grant_allocator()
        .unwrap()
        .grant(BACK, 3, Access::ReadWrite)
        .unwrap_err();
    assert_eq!(refusal(err), Refusal::OutOfMemory);
    assert!(front.pinned_allocator().unwrap().alloc_pinned(0).is_err());
}

#[test]
fn a_restricted_event_handle_binds_only_its_domain_as_linux_does() {
    let (hv, back, front) = setup();
    const OTHER: DomId = 9;
    let other = hv.domain(OTHER);
    let fe = front.event_channels().unwrap();
    let oe = other.event_channels().unwrap();
    let offered = fe.bind_unbound(BACK).unwrap();
    let offered_by_other = oe.bind_unbound(BACK).unwrap();
    let be = back.event_channels().unwrap();
    assert!(
        matches!(be.restrict(0), Err(XenError::Invalid { .. })),
        "Linux refuses a restriction to domain 0 (EINVAL)"
    );
    be.restrict(FRONT).unwrap();
    let err = be.restrict(FRONT).unwrap_err();
    assert_eq!(refusal(err), Refusal::PortRestricted { to: FRONT });
    let err = be.bind_interdomain(OTHER, offered_by_other).unwrap_err();
    assert_eq!(refusal(err), Refusal::PortRestricted { to: FRONT });
    let err = be.bind_unbound(FRONT).unwrap_err();
    assert_eq!(refusal(err), Refusal::PortRestricted { to: FRONT });
    assert_eq!(Refusal::PortRestricted { to: FRONT }.errno(), libc::EACCES);
    let port = be.bind_interdomain(FRONT, offered).unwrap();
    be.notify(port).unwrap();
    let s = hv.stats(BACK);
    assert_eq!((s.event_handles, s.restricted_event_handles), (1, 1));
}

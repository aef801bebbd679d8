//! Target `dma_map`: the backend's [`AddressSpace::map_chain`] (and `read`) over the loopback
//! platform, with chains of arbitrary addresses under each DMA strategy.
//!
//! The frontend (domain 3) grants pages (read-only or read-write, to the backend or to another
//! domain), builds a bounce pool and its directory (possibly lying in it), and pins pages for
//! `direct`. The backend (domain 0) then maps chains whose addresses the input builds: mostly
//! near-valid ones (a real ref with an offset, a pool offset, a pinned frame) and raw ones.
//! Checked after every step:
//! - nothing panics;
//! - every window shows exactly the frontend's bytes at the address the descriptor names (and a
//!   write through a device-writable window lands there), so no window reaches anything else;
//! - device-readable windows are read-only, device-writable ones writable, and their lengths
//!   add up to the descriptors';
//! - every frame the backend ever mapped (the loopback's records) was granted to it (`grant`,
//!   `bounce`) or lies in the frontend's RAM (`direct`), and nothing was mapped read-write that
//!   was granted read-only;
//! - what section 4 of PROTOCOL.md forbids is refused (wrong tag, outside the page or the pool,
//!   a ref not granted to the backend, a writable buffer on a read-only grant), and what it
//!   allows is mapped (except under persistent grants, whose arena promise is the frontend's);
//! - when no chain is held, the backend holds only the space's resident pages, and nothing once
//!   the space is dropped.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use xenvirtio_backend::dma::{AddressSpace, MapCounters, MappedChain};
use xenvirtio_virtio::device_queue::{Chain, ChainDescriptor};
use xenvirtio_virtio::dma::{DmaAddr, DmaStrategy};
use xenvirtio_virtio::protocol::{directory_pages, encode_directory_page};
use xenvirtio_xen::loopback::{
    LoopbackConfig, LoopbackForeignMapper, LoopbackGrant, LoopbackGrantMapper, LoopbackPinned,
    LoopbackXen, MapKind,
};
use xenvirtio_xen::mem::SharedMem;
use xenvirtio_xen::platform::{
    Access, GrantAllocator, GrantedPages, PinnedAllocator, PinnedPages, Platform,
};
use xenvirtio_xen::{DomId, Gfn, GrantRef};

use crate::input::{Reader, Structured, Writer};

type Space = AddressSpace<LoopbackGrantMapper, LoopbackForeignMapper>;

const BACK: DomId = 0;
const FRONT: DomId = 3;
const OTHER: DomId = 7;
/// Frontend RAM: 8 MiB, four 2 MiB chunks of the `direct` cache.
const RAM_PAGES: u64 = 2048;
const PAGE: u64 = 4096;

/// A grant the frontend makes before the backend maps anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSpec {
    /// Pages: `1 + pages % 4`.
    pub pages: u8,
    /// Granted read-only.
    pub read_only: bool,
    /// Granted to another domain than the backend.
    pub to_other: bool,
}

/// How one descriptor address is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescSpec {
    /// 0: a grant ref of the input's grants; 1: a bounce-pool offset; 2: a pinned frame;
    /// 3: any frame of the frontend's RAM; 4: `raw` as is.
    pub kind: u8,
    /// Which ref, pool page or frame.
    pub index: u16,
    /// Offset from there.
    pub offset: u16,
    /// Length (kind 4: `raw_len`).
    pub len: u16,
    /// Device-writable.
    pub writable: bool,
    /// Raw address for kind 4.
    pub raw: u64,
    /// Raw length for kind 4.
    pub raw_len: u32,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmaOp {
    /// `map_chain`; the mapping is held until released (at most 4 at once).
    Map(Vec<DescSpec>),
    /// `read` of one buffer (how indirect tables are fetched).
    Read(DescSpec),
    /// Drops held mapping `n % held`.
    Release(u8),
    /// The frontend revokes grant `n % grants` (ends its grant; the backend may still map it).
    Revoke(u8),
}

/// One fuzz input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaInput {
    /// `strategy % 3`: grant, bounce, direct.
    pub strategy: u8,
    /// Grant: the frontend asked for persistent grants.
    pub persistent: bool,
    /// Grant: cap of the persistent cache (`% 8`). Direct: cached chunks (`1 + n % 4`).
    pub cache: u8,
    /// The frontend's grants.
    pub grants: Vec<GrantSpec>,
    /// Bounce: pool pages announced (`% 5`, so 0 is possible).
    pub pool_pages: u8,
    /// Bounce: directory entries overwritten (entry, value) — a lying frontend.
    pub dir_lies: Vec<(u16, u32)>,
    /// Bounce: directory refs announced, relative to the right count (`-1`, `0`, `+1`).
    pub dir_count_delta: u8,
    /// Direct: pinned pages (`1 + n % 4`).
    pub pinned_pages: u8,
    /// The script.
    pub ops: Vec<DmaOp>,
}

fn read_desc(r: &mut Reader<'_>) -> DescSpec {
    DescSpec {
        kind: r.u8(),
        index: r.u16(),
        offset: r.u16(),
        len: r.u16(),
        writable: r.bool(),
        raw: r.u64(),
        raw_len: r.u32(),
    }
}

fn write_desc(w: &mut Writer, d: &DescSpec) {
    w.u8(d.kind);
    w.u16(d.index);
    w.u16(d.offset);
    w.u16(d.len);
    w.bool(d.writable);
    w.u64(d.raw);
    w.u32(d.raw_len);
}

impl Structured for DmaInput {
    fn read(r: &mut Reader<'_>) -> Self {
        Self {
            strategy: r.u8(),
            persistent: r.bool(),
            cache: r.u8(),
            grants: r.list(4, |r| GrantSpec {
                pages: r.u8(),
                read_only: r.bool(),
                to_other: r.bool(),
            }),
            pool_pages: r.u8(),
            dir_lies: r.list(3, |r| (r.u16(), r.u32())),
            dir_count_delta: r.u8(),
            pinned_pages: r.u8(),
            ops: r.list(24, |r| match r.choice(4) {
                0 => DmaOp::Map(r.list(8, read_desc)),
                1 => DmaOp::Read(read_desc(r)),
                2 => DmaOp::Release(r.u8()),
                _ => DmaOp::Revoke(r.u8()),
            }),
        }
    }

    fn write(&self, w: &mut Writer) {
        w.u8(self.strategy);
        w.bool(self.persistent);
        w.u8(self.cache);
        w.list(&self.grants, 4, |w, g| {
            w.u8(g.pages);
            w.bool(g.read_only);
            w.bool(g.to_other);
        });
        w.u8(self.pool_pages);
        w.list(&self.dir_lies, 3, |w, (e, v)| {
            w.u16(*e);
            w.u32(*v);
        });
        w.u8(self.dir_count_delta);
        w.u8(self.pinned_pages);
        w.list(&self.ops, 24, |w, op| match op {
            DmaOp::Map(descs) => {
                w.choice(0, 4);
                w.list(descs, 8, write_desc);
            }
            DmaOp::Read(d) => {
                w.choice(1, 4);
                write_desc(w, d);
            }
            DmaOp::Release(n) => {
                w.choice(2, 4);
                w.u8(*n);
            }
            DmaOp::Revoke(n) => {
                w.choice(3, 4);
                w.u8(*n);
            }
        });
    }
}

crate::structured_input!(DmaInput);

/// Where a byte of a descriptor lives in the frontend: a frame and an offset in it.
type Piece = (Gfn, usize, usize);

/// Which of the frontend's allocations holds a frame.
#[derive(Debug, Clone, Copy)]
enum Holder {
    Grant(usize),
    Pool,
    Pinned,
}

/// The frontend's side: its allocations, its grants by ref, and where each frame lives.
struct Front {
    strategy: DmaStrategy,
    ram_base: Gfn,
    grants: Vec<Option<LoopbackGrant>>,
    pool: Option<LoopbackGrant>,
    pinned_pages: Option<LoopbackPinned>,
    /// ref -> (gfn, read-only, granted to the backend).
    refs: HashMap<GrantRef, (Gfn, bool, bool)>,
    revoked: BTreeSet<GrantRef>,
    /// Live frames the frontend can read: which allocation, which page of it.
    frames: HashMap<Gfn, (Holder, usize)>,
    /// Frames whose content is unknown (revoked grants, freed and maybe reused).
    unknown: BTreeSet<Gfn>,
    /// Pool page i -> the ref the (possibly lying) directory lists.
    pool_refs: Vec<GrantRef>,
    pool_len: u64,
    pinned: Vec<Gfn>,
    all_refs: Vec<GrantRef>,
}

impl Front {
    /// The frontend's frames a descriptor names, if PROTOCOL.md section 4 allows it at all
    /// (ignoring whether the grant is alive, which `refusal` checks).
    fn pieces(&self, d: &ChainDescriptor) -> Option<Vec<Piece>> {
        let a = DmaAddr::decode_range(self.strategy, d.addr, d.len, self.pool_len).ok()?;
        let len = d.len as u64;
        let split = |start: u64, frame_of: &dyn Fn(u64) -> Option<Gfn>| -> Option<Vec<Piece>> {
            let mut out = Vec::new();
            let mut at = start;
            while at < start + len {
                let n = (PAGE - at % PAGE).min(start + len - at);
                out.push((frame_of(at / PAGE)?, (at % PAGE) as usize, n as usize));
                at += n;
            }
            Some(out)
        };
        match a {
            DmaAddr::Grant { gref, offset } => {
                let (gfn, ..) = self.refs.get(&gref)?;
                Some(vec![(*gfn, usize::from(offset), d.len as usize)])
            }
            DmaAddr::Bounce { offset } => split(offset, &|page| {
                let gref = self.pool_refs.get(page as usize)?;
                self.refs.get(gref).map(|r| r.0)
            }),
            DmaAddr::Direct { gpa } => split(gpa, &|frame| {
                (self.ram_base..self.ram_base + RAM_PAGES)
                    .contains(&frame)
                    .then_some(frame)
            }),
        }
    }

    /// Why the backend must refuse the chain under `grant`, if it must.
    fn grant_refusal(&self, chain: &Chain) -> Option<String> {
        for d in &chain.descriptors {
            let Ok(DmaAddr::Grant { gref, .. }) =
                DmaAddr::decode_range(DmaStrategy::Grant, d.addr, d.len, 0)
            else {
                return Some(format!("{d:?} breaks the grant encoding"));
            };
            match self.refs.get(&gref) {
                None => return Some(format!("ref {gref} was never granted")),
                Some((_, _, false)) => return Some(format!("ref {gref} is another domain's")),
                Some((_, true, _)) if d.writable => {
                    return Some(format!("writable buffer on read-only ref {gref}"));
                }
                _ => {}
            }
        }
        None
    }

    /// The frontend's own view of frame `gfn`, if it holds it.
    fn page(&self, gfn: Gfn) -> Option<SharedMem<'_>> {
        let (holder, i) = *self.frames.get(&gfn)?;
        let mem = match holder {
            Holder::Grant(g) => self.grants[g].as_ref()?.mem(),
            Holder::Pool => self.pool.as_ref()?.mem(),
            Holder::Pinned => self.pinned_pages.as_ref()?.mem(),
        };
        Some(mem.slice(i * 4096, 4096).expect("a page of the allocation"))
    }

    /// Bytes the frontend sees at `pieces`, or `None` where that is unknown.
    fn bytes(&self, pieces: &[Piece]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for &(gfn, off, n) in pieces {
            if self.unknown.contains(&gfn) {
                return None;
            }
            match self.page(gfn) {
                Some(p) => {
                    let mut b = vec![0u8; n];
                    p.read(off, &mut b).expect("inside the page");
                    out.extend_from_slice(&b);
                }
                // RAM nobody allocated reads as zeros.
                None => out.extend(std::iter::repeat_n(0u8, n)),
            }
        }
        Some(out)
    }
}

fn build_addr(front: &Front, d: &DescSpec) -> ChainDescriptor {
    let len = u32::from(d.len);
    let (addr, len) = match d.kind % 5 {
        0 if !front.all_refs.is_empty() => {
            let gref = front.all_refs[usize::from(d.index) % front.all_refs.len()];
            let offset = d.offset & 0xfff;
            (DmaAddr::Grant { gref, offset }.encode(), len)
        }
        1 => {
            let offset = u64::from(d.index % 8) * PAGE + u64::from(d.offset);
            (DmaAddr::Bounce { offset }.encode(), len)
        }
        2 if !front.pinned.is_empty() => {
            let gfn = front.pinned[usize::from(d.index) % front.pinned.len()];
            let gpa = gfn * PAGE + u64::from(d.offset);
            (DmaAddr::Direct { gpa }.encode(), len)
        }
        3 => {
            let gfn = front.ram_base + u64::from(d.index) % (RAM_PAGES + 8);
            let gpa = gfn * PAGE + u64::from(d.offset);
            (DmaAddr::Direct { gpa }.encode(), len)
        }
        _ => (d.raw, d.raw_len),
    };
    ChainDescriptor {
        addr,
        len,
        writable: d.writable,
    }
}

/// Checks one mapped chain against the frontend's view of the same addresses.
fn check_mapping(front: &Front, chain: &Chain, mapped: &MappedChain) {
    for writable in [false, true] {
        let windows = if writable {
            mapped.writable()
        } else {
            mapped.readable()
        };
        let descs: Vec<&ChainDescriptor> = chain
            .descriptors
            .iter()
            .filter(|d| d.writable == writable)
            .collect();
        let want_len: usize = descs.iter().map(|d| d.len as usize).sum();
        let got_len: usize = windows.iter().map(SharedMem::len).sum();
        assert_eq!(got_len, want_len, "window bytes (writable: {writable})");
        for w in &windows {
            assert_eq!(w.is_writable(), writable, "window access");
        }
        // Where each byte of the side's stream lives in the frontend.
        let mut pieces: Vec<Piece> = Vec::new();
        for d in &descs {
            pieces.extend(front.pieces(d).expect("a mapped buffer is a valid address"));
        }
        let mut got = Vec::with_capacity(got_len);
        for w in &windows {
            let mut b = vec![0u8; w.len()];
            w.read(0, &mut b).expect("a window is readable");
            got.extend_from_slice(&b);
        }
        if let Some(want) = front.bytes(&pieces) {
            assert!(
                got == want,
                "a window shows other bytes than the frontend's at its address"
            );
        }
        if !writable {
            continue;
        }
        // A write through each window lands where the descriptor says.
        let mut pos = 0usize;
        for w in &windows {
            if !w.is_empty() {
                let (gfn, off) = locate(&pieces, pos);
                if let (Some(page), false) = (front.page(gfn), front.unknown.contains(&gfn)) {
                    let old = w.read_array::<1>(0).expect("readable")[0];
                    w.write(0, &[!old]).expect("writable");
                    let seen = page.read_array::<1>(off).expect("inside")[0];
                    w.write(0, &[old]).expect("writable");
                    assert_eq!(
                        seen, !old,
                        "a write through the window missed frame {gfn:#x}+{off}"
                    );
                }
            }
            pos += w.len();
        }
    }
}

fn locate(pieces: &[Piece], mut pos: usize) -> (Gfn, usize) {
    for &(gfn, off, n) in pieces {
        if pos < n {
            return (gfn, off + pos);
        }
        pos -= n;
    }
    unreachable!("a position inside the stream");
}

/// Runs one input.
pub fn run(input: &DmaInput) {
    let hv = LoopbackXen::with_config(LoopbackConfig {
        ram_pages: RAM_PAGES,
        ..LoopbackConfig::default()
    });
    let ram_base = hv.config().ram_base_gfn;
    let back = hv.domain(BACK);
    let front_dom = hv.domain(FRONT);
    let alloc = front_dom.grant_allocator().expect("a live domain");
    let strategy = DmaStrategy::ALL[usize::from(input.strategy % 3)];

    let mut grants: Vec<Option<LoopbackGrant>> = Vec::new();
    let mut refs = HashMap::new();
    for g in &input.grants {
        let access = if g.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let peer = if g.to_other { OTHER } else { BACK };
        let grant = alloc
            .grant(peer, 1 + usize::from(g.pages % 4), access)
            .expect("a few grants fit");
        for (r, gfn) in grant.refs().iter().zip(grant.gfns()) {
            refs.insert(*r, (*gfn, g.read_only, !g.to_other));
        }
        grants.push(Some(grant));
    }
    let mut all_refs: Vec<GrantRef> = refs.keys().copied().collect();
    all_refs.sort_unstable();

    // Bounce: a pool and its directory, both granted to the backend.
    let pool_pages = u32::from(input.pool_pages % 5);
    let (pool, dir) = if strategy == DmaStrategy::Bounce && pool_pages > 0 {
        let pool = alloc
            .grant(BACK, pool_pages as usize, Access::ReadWrite)
            .expect("pool");
        let dir = alloc
            .grant(BACK, directory_pages(pool_pages as usize), Access::ReadOnly)
            .expect("directory");
        for (r, gfn) in pool.refs().iter().zip(pool.gfns()) {
            refs.insert(*r, (*gfn, false, true));
        }
        for (r, gfn) in dir.refs().iter().zip(dir.gfns()) {
            refs.insert(*r, (*gfn, true, true));
        }
        (Some(pool), Some(dir))
    } else {
        (None, None)
    };
    let pinned = if strategy == DmaStrategy::Direct {
        Some(
            front_dom
                .pinned_allocator()
                .expect("a live domain")
                .alloc_pinned(1 + usize::from(input.pinned_pages % 4))
                .expect("pinned pages"),
        )
    } else {
        None
    };

    // Every page the frontend owns gets a pattern unique to each byte.
    let mut frames: HashMap<Gfn, (Holder, usize)> = HashMap::new();
    let mut fill = |holder: Holder, mem: SharedMem<'_>, gfns: &[Gfn]| {
        for (i, gfn) in gfns.iter().enumerate() {
            let pattern: Vec<u8> = (0..4096u64)
                .map(|k| ((gfn.wrapping_mul(0x9e37_79b9) ^ k.wrapping_mul(0x85eb_ca6b)) >> 3) as u8)
                .collect();
            mem.write(i * 4096, &pattern)
                .expect("the owner writes its page");
            frames.insert(*gfn, (holder, i));
        }
    };
    for (i, g) in grants.iter().enumerate() {
        let g = g.as_ref().expect("not revoked yet");
        fill(Holder::Grant(i), g.mem(), g.gfns());
    }
    if let Some(p) = &pool {
        fill(Holder::Pool, p.mem(), p.gfns());
    }
    if let Some(p) = &pinned {
        fill(Holder::Pinned, p.mem(), p.gfns());
    }

    // The directory: right, then the input's lies.
    let mut pool_refs: Vec<GrantRef> = pool.as_ref().map_or(Vec::new(), |p| p.refs().to_vec());
    if let Some(dir) = &dir {
        for (entry, value) in &input.dir_lies {
            let i = usize::from(*entry) % pool_refs.len();
            // Half the lies name a real ref of the frontend's, so they map.
            pool_refs[i] = if value & 1 == 0 && !all_refs.is_empty() {
                all_refs[*value as usize / 2 % all_refs.len()]
            } else {
                *value
            };
        }
        for i in 0..dir.refs().len() {
            dir.mem()
                .write(i * 4096, &encode_directory_page(&pool_refs, i))
                .expect("the directory page");
        }
    }

    let mut front = Front {
        strategy,
        ram_base,
        grants,
        pool_len: u64::from(pool_pages) * PAGE,
        pinned: pinned.as_ref().map_or(Vec::new(), |p| p.gfns().to_vec()),
        pool,
        pinned_pages: pinned,
        refs,
        revoked: BTreeSet::new(),
        frames,
        unknown: BTreeSet::new(),
        pool_refs,
        all_refs,
    };

    let mut counters = MapCounters::default();
    let space: Option<Space> = match strategy {
        DmaStrategy::Grant => Some(AddressSpace::grant(
            Arc::new(back.grant_mapper().expect("mapper")),
            FRONT,
            input.persistent,
            usize::from(input.cache % 8),
        )),
        DmaStrategy::Bounce => {
            let mut dir_refs = dir.as_ref().map_or(Vec::new(), |d| d.refs().to_vec());
            match input.dir_count_delta % 3 {
                1 => {
                    dir_refs.pop();
                }
                2 => dir_refs.push(*front.all_refs.first().unwrap_or(&1)),
                _ => {}
            }
            let mapper = back.grant_mapper().expect("mapper");
            let right = input.dir_count_delta.is_multiple_of(3)
                || dir_refs.len() == directory_pages(pool_pages as usize);
            let lies_map = front.pool_refs.iter().all(|r| {
                front
                    .refs
                    .get(r)
                    .is_some_and(|(_, ro, to_back)| *to_back && !ro)
            });
            let space = AddressSpace::bounce(&mapper, &mut counters, FRONT, pool_pages, &dir_refs);
            if right && lies_map && pool_pages > 0 {
                assert!(space.is_ok(), "a consistent pool was refused: {space:?}");
            }
            if !right {
                assert!(space.is_err(), "a directory of the wrong size was accepted");
            }
            space.ok()
        }
        DmaStrategy::Direct => Some(AddressSpace::direct(
            Arc::new(back.foreign_mapper().expect("mapper")),
            FRONT,
            1 + usize::from(input.cache % 4),
        )),
    };
    // The directory is the backend's only at connect.
    drop(dir);

    if let Some(mut space) = space {
        let mut held: Vec<(Chain, MappedChain)> = Vec::new();
        for op in &input.ops {
            match op {
                DmaOp::Map(descs) => {
                    let chain = Chain {
                        head: 0,
                        descriptors: descs.iter().map(|d| build_addr(&front, d)).collect(),
                    };
                    let result = space.map_chain(&chain, &mut counters);
                    check_result(&front, input, &chain, &result);
                    if let Ok(m) = result {
                        check_mapping(&front, &chain, &m);
                        held.push((chain, m));
                        if held.len() > 4 {
                            held.remove(0);
                        }
                    }
                }
                DmaOp::Read(d) => {
                    let desc = build_addr(
                        &front,
                        &DescSpec {
                            writable: false,
                            ..d.clone()
                        },
                    );
                    let chain = Chain {
                        head: 0,
                        descriptors: vec![desc],
                    };
                    // `read` allocates the length it is asked for: the queue asks for at most
                    // 16 * 1024 bytes, so longer reads are not the queue's to make.
                    if desc.len > 16 * 1024 {
                        continue;
                    }
                    let result = space.read(desc.addr, desc.len, &mut counters);
                    if let Ok(bytes) = &result {
                        let pieces = front.pieces(&desc).expect("a read buffer is valid");
                        if let Some(want) = front.bytes(&pieces) {
                            assert!(*bytes == want, "read returned other bytes");
                        }
                    } else if strategy != DmaStrategy::Grant || !input.persistent {
                        let ok_by_model = match strategy {
                            DmaStrategy::Grant => front.grant_refusal(&chain).is_none(),
                            _ => front.pieces(&desc).is_some(),
                        };
                        let revoked = front.revoked.iter().any(|r| {
                            DmaAddr::decode(DmaStrategy::Grant, desc.addr)
                                == Ok(DmaAddr::Grant {
                                    gref: *r,
                                    offset: (desc.addr & 0xfff) as u16,
                                })
                        });
                        assert!(
                            !ok_by_model || revoked,
                            "a valid read was refused: {result:?}"
                        );
                    }
                }
                DmaOp::Release(n) => {
                    if !held.is_empty() {
                        let i = usize::from(*n) % held.len();
                        held.remove(i);
                    }
                }
                DmaOp::Revoke(n) => {
                    if !front.grants.is_empty() {
                        let i = usize::from(*n) % front.grants.len();
                        if let Some(g) = front.grants[i].take() {
                            for (r, gfn) in g.refs().iter().zip(g.gfns()) {
                                front.revoked.insert(*r);
                                front.frames.remove(gfn);
                                front.unknown.insert(*gfn);
                            }
                            drop(g);
                        }
                    }
                }
            }
            check_records(&hv, &front, strategy);
        }
        // With no chain held, the backend keeps only the space's resident pages.
        for (chain, m) in &held {
            check_mapping(&front, chain, m);
        }
        held.clear();
        let stats = hv.stats(BACK);
        let mapped = match strategy {
            DmaStrategy::Direct => stats.foreign_mapped_pages,
            _ => stats.grant_mapped_pages,
        };
        assert_eq!(
            mapped,
            space.resident_pages(),
            "pages mapped with no chain in flight: {stats:?}"
        );
        drop(space);
    }
    let stats = hv.stats(BACK);
    assert_eq!(
        (stats.grant_maps, stats.foreign_maps),
        (0, 0),
        "the backend still maps something after the space is gone: {stats:?}"
    );
    check_records(&hv, &front, strategy);
}

fn check_result<E: std::fmt::Debug>(
    front: &Front,
    input: &DmaInput,
    chain: &Chain,
    result: &Result<MappedChain, E>,
) {
    let uses_revoked = |c: &Chain| {
        c.descriptors.iter().any(|d| {
            matches!(DmaAddr::decode(DmaStrategy::Grant, d.addr),
                Ok(DmaAddr::Grant { gref, .. }) if front.revoked.contains(&gref))
        })
    };
    match front.strategy {
        DmaStrategy::Grant => {
            if let Some(why) = front.grant_refusal(chain) {
                // A ref revoked while the persistent cache holds it is still served: the
                // frontend broke its promise (section 6), and the backend sees the same page.
                if !uses_revoked(chain) {
                    assert!(result.is_err(), "accepted: {why}");
                }
            } else if !input.persistent && !uses_revoked(chain) {
                assert!(
                    result.is_ok(),
                    "a valid grant chain was refused: {result:?}"
                );
            }
        }
        DmaStrategy::Bounce | DmaStrategy::Direct => {
            let valid = chain.descriptors.iter().all(|d| front.pieces(d).is_some());
            if !valid {
                assert!(
                    result.is_err(),
                    "an invalid {} chain was accepted",
                    front.strategy
                );
            } else {
                // The pool is mapped at connect and direct frames are frontend RAM: a valid
                // address always maps.
                assert!(
                    result.is_ok(),
                    "a valid {} chain was refused: {result:?}",
                    front.strategy
                );
            }
        }
    }
}

/// Every frame the backend reached was the frontend's to give it.
/// Checks the mappings recorded since the last call, then forgets them: the verdict depends
/// only on what the frontend granted at setup, so each record needs checking once (re-reading
/// all of them after every op made a run quadratic in its ops).
fn check_records(hv: &LoopbackXen, front: &Front, strategy: DmaStrategy) {
    let records = hv.records();
    hv.clear_records();
    for r in records {
        if r.mapper != BACK {
            continue;
        }
        assert_eq!(
            r.owner, FRONT,
            "the backend mapped domain {}'s memory",
            r.owner
        );
        match (&r.kind, strategy) {
            (MapKind::Grant { refs }, DmaStrategy::Grant | DmaStrategy::Bounce) => {
                for gref in refs {
                    let Some(&(gfn, read_only, to_back)) = front.refs.get(gref) else {
                        panic!("the backend mapped ref {gref}, which the frontend never granted");
                    };
                    assert!(
                        to_back,
                        "the backend mapped ref {gref} granted to another domain"
                    );
                    assert!(
                        !(read_only && r.access == Access::ReadWrite),
                        "read-only ref {gref} mapped read-write"
                    );
                    assert!(r.gfns.contains(&gfn), "ref {gref} reached other frames");
                }
            }
            (MapKind::Foreign, DmaStrategy::Direct) => {
                for gfn in &r.gfns {
                    assert!(
                        (front.ram_base..front.ram_base + RAM_PAGES).contains(gfn),
                        "frame {gfn:#x} outside the frontend's RAM"
                    );
                }
            }
            (kind, s) => panic!("a {kind:?} mapping under {s}"),
        }
    }
}

/// Seeds: the cases of the unit tests in `backend/src/dma.rs`.
pub fn seeds() -> Vec<(&'static str, DmaInput)> {
    let grant = |pages, read_only, to_other| GrantSpec {
        pages,
        read_only,
        to_other,
    };
    let desc = |kind, index, offset, len, writable| DescSpec {
        kind,
        index,
        offset,
        len,
        writable,
        raw: 0,
        raw_len: 0,
    };
    let base = |strategy| DmaInput {
        strategy,
        persistent: false,
        cache: 0,
        grants: vec![],
        pool_pages: 0,
        dir_lies: vec![],
        dir_count_delta: 0,
        pinned_pages: 0,
        ops: vec![],
    };
    let mut per_request = base(0);
    per_request.grants = vec![grant(1, false, false)];
    per_request.ops = vec![DmaOp::Map(vec![
        desc(0, 0, 100, 7, false),
        desc(0, 1, 0, 16, true),
        desc(0, 1, 16, 1, true),
    ])];

    let mut bad_grants = base(0);
    bad_grants.grants = vec![
        grant(0, false, false),
        grant(0, true, false),
        grant(0, false, true),
    ];
    bad_grants.ops = vec![
        DmaOp::Map(vec![desc(0, 0, 0, 4096, true)]),
        DmaOp::Map(vec![desc(0, 0, 1, 4096, true)]),
        DmaOp::Map(vec![desc(1, 0, 0, 1, false)]),
        DmaOp::Map(vec![desc(0, 1, 0, 8, false)]),
        DmaOp::Map(vec![desc(0, 1, 0, 8, true)]),
        DmaOp::Map(vec![desc(0, 2, 0, 8, false)]),
    ];

    let mut persistent = base(0);
    persistent.persistent = true;
    persistent.cache = 3;
    persistent.grants = vec![grant(3, false, false)];
    let two = |a, b| DmaOp::Map(vec![desc(0, a, 0, 16, false), desc(0, b, 0, 512, true)]);
    persistent.ops = vec![
        two(0, 1),
        DmaOp::Release(0),
        two(0, 1),
        DmaOp::Release(0),
        two(2, 3),
        DmaOp::Revoke(0),
        two(0, 1),
    ];

    let mut bounce = base(1);
    bounce.pool_pages = 3;
    bounce.ops = vec![
        DmaOp::Map(vec![desc(1, 2, 10, 6, false), desc(1, 0, 4000, 200, true)]),
        DmaOp::Map(vec![desc(1, 2, 4092, 5, false)]),
        DmaOp::Read(desc(1, 2, 10, 6, false)),
    ];
    let mut bounce_wrong_dir = bounce.clone();
    bounce_wrong_dir.dir_count_delta = 2;
    let mut bounce_lies = bounce.clone();
    bounce_lies.grants = vec![grant(0, true, false), grant(0, false, true)];
    bounce_lies.dir_lies = vec![(1, 0), (2, 2)];

    let mut direct = base(2);
    direct.pinned_pages = 3;
    direct.cache = 1;
    direct.ops = vec![
        DmaOp::Map(vec![desc(2, 1, 5, 6, false)]),
        DmaOp::Release(0),
        DmaOp::Map(vec![desc(2, 1, 5, 6, true)]),
        DmaOp::Map(vec![desc(3, 511, 4000, 8192, false)]),
        DmaOp::Map(vec![desc(3, 2047, 0, 8192, false)]),
        DmaOp::Map(vec![desc(0, 0, 0, 6, false)]),
    ];
    vec![
        ("per_request_grants", per_request),
        ("bad_grant_addresses", bad_grants),
        ("persistent_grants", persistent),
        ("bounce_pool", bounce),
        ("bounce_wrong_directory", bounce_wrong_dir),
        ("bounce_lying_directory", bounce_lies),
        ("direct_chunks", direct),
    ]
}

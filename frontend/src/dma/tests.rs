use super::*;
use xenvirtio_virtio::dma::DmaAddr;
use xenvirtio_xen::Refusal;
use xenvirtio_xen::loopback::LoopbackXen;
use xenvirtio_xen::platform::{GrantMapper, MappedPages};

const GUEST: DomId = 5;
const BACKEND: DomId = 0;

fn decode(strategy: DmaStrategy, segs: &[Segment]) -> Vec<(DmaAddr, u32)> {
    segs.iter()
        .map(|s| (DmaAddr::decode(strategy, s.addr).unwrap(), s.len))
        .collect()
}

#[test]
fn grant_arena_pages_are_granted_to_the_backend_only() {
    let xen = LoopbackXen::new();
    let dma = DmaMemory::new(&xen.domain(GUEST), DmaStrategy::Grant, BACKEND, 8, true).unwrap();
    assert_eq!(xen.stats(GUEST).grants, 8);
    let buf = dma.alloc(3 * PAGE_SIZE - 100).unwrap();
    buf.write(0, b"hello").unwrap();
    // One descriptor per page, never crossing a page.
    let segs = decode(DmaStrategy::Grant, &buf.segments());
    assert_eq!(segs.len(), 3);
    assert_eq!(segs.iter().map(|s| s.1).sum::<u32>(), 3 * 4096 - 100);
    let DmaAddr::Grant { gref, offset: 0 } = segs[0].0 else {
        panic!("{segs:?}")
    };
    // The backend maps it and sees the bytes; another domain is refused.
    let m = xen
        .domain(BACKEND)
        .grant_mapper()
        .unwrap()
        .map(GUEST, &[gref], Access::ReadWrite)
        .unwrap();
    assert_eq!(&m.mem().read_array::<5>(0).unwrap(), b"hello");
    let e = xen
        .domain(7)
        .grant_mapper()
        .unwrap()
        .map(GUEST, &[gref], Access::ReadOnly)
        .unwrap_err();
    assert_eq!(
        e.refusal(),
        Some(Refusal::NotGrantedTo { grantee: BACKEND })
    );
    drop(m);
    // Buffers are freed and reused; the arena runs out, and says so.
    let all = dma.alloc(5 * PAGE_SIZE).unwrap();
    assert!(matches!(dma.alloc(1), Err(DmaError::Exhausted { .. })));
    drop(all);
    drop(buf);
    assert_eq!(dma.stats().free_pages, 8);
    assert!(matches!(dma.alloc(0), Err(DmaError::BadSize { .. })));
    assert!(matches!(
        dma.alloc(9 * PAGE_SIZE),
        Err(DmaError::BadSize { .. })
    ));
    // A ring area is granted separately, zeroed.
    let ring = dma.alloc_ring(2).unwrap();
    let RingAddress::Refs(refs) = ring.address() else {
        panic!("grant rings have refs")
    };
    assert_eq!(refs.len(), 2);
    assert_eq!(dma.stats().grants_held, 10);
    drop(ring);
    assert_eq!(dma.stats().grants_held, 8);
    dma.release_after_backend_closed();
    assert_eq!(xen.stats(GUEST).grants, 0);
}

#[test]
fn bounce_pool_has_a_read_only_directory_of_its_refs() {
    let xen = LoopbackXen::with_config(xenvirtio_xen::loopback::LoopbackConfig {
        max_grants: 4096,
        ..Default::default()
    });
    let dma = DmaMemory::new(
        &xen.domain(GUEST),
        DmaStrategy::Bounce,
        BACKEND,
        1500,
        false,
    )
    .unwrap();
    let dir = dma.bounce_directory().unwrap().to_vec();
    assert_eq!(dir.len(), 2, "1500 refs need two directory pages");
    let mapper = xen.domain(BACKEND).grant_mapper().unwrap();
    let e = mapper.map(GUEST, &dir, Access::ReadWrite).unwrap_err();
    assert_eq!(e.refusal(), Some(Refusal::ReadOnlyGrant));
    let d = mapper.map(GUEST, &dir, Access::ReadOnly).unwrap();
    let page1: [u8; PAGE_SIZE] = d.mem().read_array(PAGE_SIZE).unwrap();
    let refs = xenvirtio_virtio::protocol::decode_directory_page(&page1, 1500 - 1024);
    assert_eq!(refs.len(), 476);
    // Pool offsets span pages: a buffer is one descriptor.
    let buf = dma.alloc(3 * PAGE_SIZE).unwrap();
    let segs = decode(DmaStrategy::Bounce, &buf.segments());
    assert_eq!(segs.len(), 1);
    assert!(matches!(segs[0], (DmaAddr::Bounce { .. }, 12288)));
    assert!(matches!(
        DmaMemory::new(&xen.domain(6), DmaStrategy::Bounce, BACKEND, 20000, false),
        Err(DmaError::PoolSize { .. })
    ));
}

#[test]
fn direct_memory_is_named_by_frame_numbers() {
    let xen = LoopbackXen::new();
    let dma = DmaMemory::new(&xen.domain(GUEST), DmaStrategy::Direct, BACKEND, 10, false).unwrap();
    assert_eq!(dma.pages(), 512, "rounded up to a 2 MiB huge page");
    assert_eq!(xen.stats(GUEST).grants, 0);
    assert!(!dma.may_migrate());
    let buf = dma.alloc(2 * PAGE_SIZE).unwrap();
    let segs = decode(DmaStrategy::Direct, &buf.segments());
    // The loopback's pinned pages are contiguous frames: one descriptor.
    assert_eq!(segs.len(), 1);
    let DmaAddr::Direct { gpa } = segs[0].0 else {
        panic!()
    };
    assert_eq!(gpa >> 12, buf.gfns().unwrap()[0]);
    // Split at the largest piece asked for.
    let mut out = Vec::new();
    buf.encode(100, 5000, 4096, &mut out);
    assert_eq!(
        out.iter().map(|s| s.len).collect::<Vec<_>>(),
        vec![4096, 904]
    );
    let ring = dma.alloc_ring(1).unwrap();
    assert!(matches!(ring.address(), RingAddress::Gfns(g) if g.len() == 1));
}

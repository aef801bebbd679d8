//! Pinned memory with known guest frame numbers, for the `direct` DMA strategy.
//!
//! The frontend hands the backend raw guest-physical addresses, so the frames behind them must
//! not change while the device may use them. This module allocates such memory and reads its
//! frame numbers from `/proc/self/pagemap`:
//!
//! 1. **2 MiB hugetlb pages**, first with `MAP_HUGETLB | MAP_HUGE_2MB`, then from a file on
//!    hugetlbfs if one is mounted at `/dev/hugepages`. Hugetlb pages are never swapped, and
//!    compaction does not move them; each 2 MiB page is also 512 contiguous, aligned frames.
//!    They must have been reserved (`/proc/sys/vm/nr_hugepages`). Each allocation is rounded up
//!    to whole 2 MiB pages, so allocate one arena rather than many small pieces.
//! 2. **Otherwise, 4 KiB pages locked with `mlock`**, with a loud warning: `mlock` keeps pages
//!    resident but does **not** stop the kernel from migrating them (compaction, NUMA balancing,
//!    memory hot-unplug), so their frame numbers may change under the backend, which would then
//!    read or write whatever page now sits at the old frame. Transparent huge pages are turned
//!    off for the range (khugepaged would otherwise copy it into a huge page), and so is
//!    inheritance across `fork` (a copy-on-write break would move the parent's pages).
//!
//! `/proc/self/pagemap` shows frame numbers only to processes with `CAP_SYS_ADMIN`; without it
//! every frame reads as 0, which is detected and reported. On x86 PV guests the numbers are
//! pseudo-physical frames, not the machine frames a foreign mapping of a PV guest needs, which
//! is one reason the role policy never uses `direct` there.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::XenError;
use crate::mem::{PAGE_SIZE, SharedMem};
use crate::mmap::MmapRegion;
use crate::platform::{Gfn, PinnedAllocator, PinnedPages};

/// The huge page size used: 2 MiB (x86_64, and arm64 with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;
/// Where a hugetlbfs is looked for.
const HUGETLBFS_DIR: &str = "/dev/hugepages";
/// pagemap: bit 63 says the page is present, bits 0-54 hold the frame number.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_PFN_MASK: u64 = (1 << 55) - 1;

/// What backs a [`LinuxPinned`] allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinnedBacking {
    /// Anonymous 2 MiB hugetlb pages (`MAP_HUGETLB`).
    HugeTlb,
    /// 2 MiB pages of a file on hugetlbfs.
    HugeTlbFs,
    /// 4 KiB pages held by `mlock`: resident, but the kernel may still migrate them.
    Locked4K,
}

/// Allocates pinned memory of this process (see the module documentation for the order of
/// attempts and what each one guarantees).
#[derive(Debug, Clone)]
pub struct LinuxPinnedAllocator {
    hugetlbfs_dir: PathBuf,
}

impl Default for LinuxPinnedAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl LinuxPinnedAllocator {
    /// Tries hugetlb, then hugetlbfs at `/dev/hugepages`, then locked 4 KiB pages.
    pub fn new() -> Self {
        Self {
            hugetlbfs_dir: PathBuf::from(HUGETLBFS_DIR),
        }
    }

    /// The same, with hugetlbfs looked for at `dir`.
    pub fn with_hugetlbfs_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            hugetlbfs_dir: dir.into(),
        }
    }

    fn huge(&self, len: usize) -> Option<(MmapRegion, PinnedBacking)> {
        let huge_len = len.checked_next_multiple_of(HUGE_PAGE)?;
        match MmapRegion::anonymous(huge_len, libc::MAP_HUGETLB | libc::MAP_HUGE_2MB) {
            Ok(region) => return Some((region, PinnedBacking::HugeTlb)),
            Err(e) => tracing::debug!(error = %e, bytes = huge_len, "no MAP_HUGETLB pages"),
        }
        if !hugetlbfs_mounted_at(&self.hugetlbfs_dir) {
            return None;
        }
        match map_hugetlbfs_file(&self.hugetlbfs_dir, huge_len) {
            Ok(region) => Some((region, PinnedBacking::HugeTlbFs)),
            Err(e) => {
                let dir = self.hugetlbfs_dir.display();
                tracing::debug!(error = %e, %dir, "no hugetlbfs pages");
                None
            }
        }
    }
}

/// Whether `/proc/self/mounts` shows a hugetlbfs of 2 MiB pages mounted at `dir`.
fn hugetlbfs_mounted_at(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts_have_hugetlbfs(&mounts, dir)
}

fn mounts_have_hugetlbfs(mounts: &str, dir: &Path) -> bool {
    mounts.lines().any(|line| {
        let mut f = line.split_whitespace();
        let (_src, Some(at), Some(fstype), opts) = (f.next(), f.next(), f.next(), f.next()) else {
            return false;
        };
        let opts = opts.unwrap_or("");
        Path::new(at) == dir
            && fstype == "hugetlbfs"
            && (opts.contains("pagesize=2M") || !opts.contains("pagesize="))
    })
}

/// Maps `len` bytes of a fresh, already unlinked file in the hugetlbfs at `dir`.
fn map_hugetlbfs_file(dir: &Path, len: usize) -> io::Result<MmapRegion> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "xenvirtio-pinned-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    file.set_len(len as u64)?;
    // The mapping keeps the file alive after `file` is closed.
    MmapRegion::map_shared(file.as_fd(), len, 0, true)
}

/// What is wrong with the pagemap entries of an allocation.
#[derive(Debug, PartialEq, Eq)]
enum PagemapProblem {
    /// Every frame reads as 0: the process lacks CAP_SYS_ADMIN.
    Hidden,
    /// Page `index` is not present (or shows frame 0).
    NotPresent { index: usize },
}

/// Frame numbers from raw pagemap entries.
fn frames_from_pagemap(entries: &[u64]) -> Result<Vec<Gfn>, PagemapProblem> {
    let frames: Vec<Gfn> = entries.iter().map(|e| e & PAGEMAP_PFN_MASK).collect();
    if let Some(index) = entries.iter().position(|e| e & PAGEMAP_PRESENT == 0) {
        return Err(PagemapProblem::NotPresent { index });
    }
    if frames.iter().all(|&f| f == 0) {
        return Err(PagemapProblem::Hidden);
    }
    if let Some(index) = frames.iter().position(|&f| f == 0) {
        return Err(PagemapProblem::NotPresent { index });
    }
    Ok(frames)
}

/// Reads the pagemap entries of `pages` pages starting at `addr`.
fn read_pagemap(addr: usize, pages: usize) -> io::Result<Vec<u64>> {
    let file = std::fs::File::open("/proc/self/pagemap")?;
    let mut raw = vec![0u8; pages * 8];
    file.read_exact_at(&mut raw, (addr / PAGE_SIZE * 8) as u64)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

/// Pinned memory of this process and the frame number of each of its pages. Dropping it unmaps
/// (and so unlocks) the memory.
#[derive(Debug)]
pub struct LinuxPinned {
    region: MmapRegion,
    len: usize,
    gfns: Vec<Gfn>,
    backing: PinnedBacking,
}

impl LinuxPinned {
    /// What backs the memory, which says how stable its frames are.
    pub fn backing(&self) -> PinnedBacking {
        self.backing
    }
}

impl PinnedPages for LinuxPinned {
    fn mem(&self) -> SharedMem<'_> {
        // The region was rounded up from `len` to whole huge pages; only `len` is handed out.
        self.region.mem_prefix(self.len)
    }

    fn gfns(&self) -> &[Gfn] {
        &self.gfns
    }

    fn may_migrate(&self) -> bool {
        self.backing == PinnedBacking::Locked4K
    }
}

impl PinnedAllocator for LinuxPinnedAllocator {
    type Pinned = LinuxPinned;

    fn alloc_pinned(&self, pages: usize) -> Result<LinuxPinned, XenError> {
        let fail = |why: &str, source: Option<io::Error>| XenError::Pinned {
            pages,
            why: why.to_owned(),
            source,
        };
        if pages == 0 {
            return Err(fail("zero pages requested", None));
        }
        let len = pages
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| fail("the size does not fit the address space", None))?;
        let (region, backing) = match self.huge(len) {
            Some(found) => found,
            None => {
                let region = MmapRegion::anonymous(len, 0)
                    .map_err(|e| fail("mmap of anonymous memory failed", Some(e)))?;
                if let Err(e) = region.madvise(libc::MADV_NOHUGEPAGE) {
                    tracing::debug!(error = %e, "MADV_NOHUGEPAGE refused (no THP in this kernel?)");
                }
                tracing::warn!(
                    pages,
                    "no 2 MiB huge pages available (reserve some in /proc/sys/vm/nr_hugepages): \
                     falling back to mlock'ed 4 KiB pages, which the kernel may still migrate or \
                     compact, so their guest frame numbers may change under the backend"
                );
                (region, PinnedBacking::Locked4K)
            }
        };
        region
            .madvise(libc::MADV_DONTFORK)
            .map_err(|e| fail("MADV_DONTFORK failed", Some(e)))?;
        // Fault every page in (write faults, so no page is the shared zero page), then lock.
        region
            .mem()
            .fill(0, region.len(), 0)
            .map_err(|e| fail(&format!("zeroing failed: {e}"), None))?;
        match (region.mlock(), backing) {
            (Ok(()), _) => {}
            (Err(e), PinnedBacking::Locked4K) => {
                return Err(fail("mlock failed (raise RLIMIT_MEMLOCK?)", Some(e)));
            }
            // Hugetlb pages are neither swapped nor compacted; the lock is only belt and braces.
            (Err(e), _) => tracing::debug!(error = %e, "mlock of hugetlb pages failed"),
        }
        let entries = read_pagemap(region.as_ptr() as usize, pages)
            .map_err(|e| fail("reading /proc/self/pagemap failed", Some(e)))?;
        let gfns = frames_from_pagemap(&entries).map_err(|p| match p {
            PagemapProblem::Hidden => fail(
                "/proc/self/pagemap shows no frame numbers; it needs CAP_SYS_ADMIN (run as root)",
                None,
            ),
            PagemapProblem::NotPresent { index } => {
                fail(&format!("page {index} is not present after mlock"), None)
            }
        })?;
        tracing::debug!(
            pages,
            ?backing,
            first_gfn = gfns[0],
            "pinned memory allocated"
        );
        Ok(LinuxPinned {
            region,
            len,
            gfns,
            backing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_entries_are_decoded_and_checked() {
        let p = PAGEMAP_PRESENT;
        assert_eq!(
            frames_from_pagemap(&[p | 0x1234, p | (1 << 61) | 0x1235]),
            Ok(vec![0x1234, 0x1235])
        );
        assert_eq!(frames_from_pagemap(&[p, p]), Err(PagemapProblem::Hidden));
        assert_eq!(
            frames_from_pagemap(&[p | 5, 7]),
            Err(PagemapProblem::NotPresent { index: 1 })
        );
        assert_eq!(
            frames_from_pagemap(&[p | 5, p]),
            Err(PagemapProblem::NotPresent { index: 1 })
        );
    }

    #[test]
    fn hugetlbfs_is_found_in_mounts() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n";
        assert!(mounts_have_hugetlbfs(mounts, Path::new("/dev/hugepages")));
        assert!(!mounts_have_hugetlbfs(mounts, Path::new("/mnt/huge")));
        let gig = "none /dev/hugepages hugetlbfs rw,pagesize=1024M 0 0\n";
        assert!(!mounts_have_hugetlbfs(gig, Path::new("/dev/hugepages")));
        let plain = "none /dev/hugepages hugetlbfs rw 0 0\n";
        assert!(mounts_have_hugetlbfs(plain, Path::new("/dev/hugepages")));
        assert!(!mounts_have_hugetlbfs(
            "tmpfs /dev/hugepages tmpfs rw 0 0",
            Path::new("/dev/hugepages")
        ));
    }

    /// Runs for real on this host: either the frames are visible (root) and the memory works, or
    /// the error says why not.
    #[test]
    fn pinned_memory_reports_frames_or_a_clear_error() {
        let alloc = LinuxPinnedAllocator::with_hugetlbfs_dir("/nonexistent");
        match alloc.alloc_pinned(3) {
            Ok(p) => {
                assert_eq!(p.gfns().len(), 3);
                assert!(p.gfns().iter().all(|&g| g != 0));
                assert_eq!(p.mem().len(), 3 * PAGE_SIZE);
                p.mem().write(3 * PAGE_SIZE - 1, b"z").unwrap();
                if p.backing() != PinnedBacking::Locked4K {
                    // Hugetlb: 3 pages of one 2 MiB page are contiguous frames.
                    assert_eq!(p.gfns()[2], p.gfns()[0] + 2);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("CAP_SYS_ADMIN") || msg.contains("mlock"),
                    "{msg}"
                );
            }
        }
        assert!(alloc.alloc_pinned(0).is_err());
    }
}

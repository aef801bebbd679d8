//! Foreign mapping through `/dev/xen/privcmd` (Dom0 only).
//!
//! The recipe is the kernel's: `mmap` the privcmd device to get a virgin `VM_PFNMAP` range, then
//! `IOCTL_PRIVCMD_MMAPBATCH_V2` fills it with the frames `arr[]` of domain `dom`, writing one
//! error per page into `err[]`. The ioctl may return 0 while some `err[]` entries are non-zero
//! (measured on Xen 4.17 for PV guests: `-EBUSY`), so `err[]` is always read. A page that is
//! paged out yields `-ENOENT` (and the ioctl fails with `ENOENT`); such pages are retried, in
//! runs, over the still-empty parts of the range, a bounded number of times with a growing
//! pause, as libxenforeignmemory does. Any page still failing after that undoes the whole
//! mapping and the error names its index, frame and errno.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use std::{io, thread};

use crate::XenError;
use crate::error::os_error;
use crate::linux::{PRIVCMD_PATH, PRIVCMD_XENFS_PATH, ioctl, open_device};
use crate::mem::{PAGE_SIZE, SharedMem};
use crate::mmap::MmapRegion;
use crate::platform::{Access, DomId, ForeignMapper, Gfn, MappedPages};
use crate::sys::{self, PrivcmdMmapBatchV2};

/// Retries of pages reported paged out (`-ENOENT`).
const ENOENT_RETRIES: u32 = 40;
/// First pause before a retry; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_micros(100);
/// Longest pause between retries (about 0.5 s in all over the 40 retries).
const MAX_BACKOFF: Duration = Duration::from_millis(20);

/// An open privcmd device.
#[derive(Debug)]
pub struct LinuxForeignMapper {
    dev: Arc<OwnedFd>,
}

impl LinuxForeignMapper {
    pub(crate) fn open() -> Result<Self, XenError> {
        let fd = match open_device(PRIVCMD_PATH, "xen-privcmd", 0) {
            Ok(fd) => fd,
            Err(XenError::Open { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOENT | libc::ENXIO | libc::ENODEV)
                ) =>
            {
                // Older setups expose privcmd only through xenfs.
                open_device(PRIVCMD_XENFS_PATH, "xen-privcmd", 0).map_err(|_| XenError::Open {
                    path: PRIVCMD_PATH,
                    module: "xen-privcmd",
                    source,
                })?
            }
            Err(e) => return Err(e),
        };
        Ok(Self { dev: Arc::new(fd) })
    }

    /// The open privcmd device, for the other privcmd ioctls of this module's siblings.
    pub(crate) fn device(&self) -> &OwnedFd {
        &self.dev
    }
}

/// `IOCTL_PRIVCMD_MMAPBATCH_V2` of `gfns` at `addr`, errors into `err`.
///
/// # Safety
/// `[addr, addr + gfns.len() * PAGE_SIZE)` must lie inside a privcmd mapping of `dev` owned by
/// the caller, with none of those pages mapped yet, and nothing borrowed in it.
unsafe fn mmapbatch_v2(
    dev: &OwnedFd,
    dom: DomId,
    addr: u64,
    gfns: &[Gfn],
    err: &mut [i32],
) -> io::Result<()> {
    if gfns.len() != err.len() {
        return Err(os_error(libc::EINVAL));
    }
    let num = u32::try_from(gfns.len()).map_err(|_| os_error(libc::E2BIG))?;
    let mut arg = PrivcmdMmapBatchV2 {
        num,
        dom,
        addr,
        arr: gfns.as_ptr(),
        err: err.as_mut_ptr(),
    };
    // SAFETY: arg is a privcmd_mmapbatch_v2 whose arr and err point at `num` readable frames
    // and `num` writable ints; the range at addr is ours and empty (this function's contract).
    unsafe {
        ioctl(
            dev.as_fd(),
            sys::IOCTL_PRIVCMD_MMAPBATCH_V2,
            (&raw mut arg).cast(),
        )
    }?;
    Ok(())
}

/// `IOCTL_PRIVCMD_RESTRICT`.
fn restrict(dev: &OwnedFd, dom: DomId) -> io::Result<()> {
    let mut arg: u16 = dom;
    // SAFETY: the argument is a domid_t (u16), which the kernel only reads.
    unsafe {
        ioctl(
            dev.as_fd(),
            sys::IOCTL_PRIVCMD_RESTRICT,
            (&raw mut arg).cast(),
        )
    }?;
    Ok(())
}

/// How a batch mapping failed.
#[derive(Debug)]
pub(crate) enum BatchFailure {
    /// The ioctl failed as a whole.
    Ioctl(io::Error),
    /// Page `index` kept failing with `errno`.
    Page { index: usize, errno: i32 },
}

/// Maps `gfns` with `call(first, gfns[first..], err[first..])` (one MMAPBATCH_V2 at page
/// `first` of the range), then retries the runs of pages whose `err[]` is `-ENOENT` up to
/// `retries` times, pausing with `sleep` in between, and finally checks every `err[]`.
pub(crate) fn map_with_retry(
    gfns: &[Gfn],
    retries: u32,
    mut call: impl FnMut(usize, &[Gfn], &mut [i32]) -> io::Result<()>,
    mut sleep: impl FnMut(Duration),
) -> Result<(), BatchFailure> {
    let mut err = vec![0i32; gfns.len()];
    let tolerate_enoent = |r: io::Result<()>| match r {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(BatchFailure::Ioctl(e)),
        _ => Ok(()),
    };
    tolerate_enoent(call(0, gfns, &mut err))?;
    let mut backoff = FIRST_BACKOFF;
    for _ in 0..retries {
        if !err.contains(&-libc::ENOENT) {
            break;
        }
        sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
        let mut i = 0;
        while i < err.len() {
            if err[i] != -libc::ENOENT {
                i += 1;
                continue;
            }
            let start = i;
            while i < err.len() && err[i] == -libc::ENOENT {
                i += 1;
            }
            tolerate_enoent(call(start, &gfns[start..i], &mut err[start..i]))?;
        }
    }
    match err.iter().position(|&e| e != 0) {
        None => Ok(()),
        Some(index) => Err(BatchFailure::Page {
            index,
            errno: err[index].saturating_abs(),
        }),
    }
}

/// A peer's frames mapped through privcmd; unmapped on drop (which also releases the frames).
#[derive(Debug)]
pub struct LinuxForeignMapping {
    region: MmapRegion,
    dom: DomId,
}

impl LinuxForeignMapping {
    /// The domain whose memory this is.
    pub fn dom(&self) -> DomId {
        self.dom
    }
}

impl MappedPages for LinuxForeignMapping {
    fn mem(&self) -> SharedMem<'_> {
        self.region.mem()
    }
}

impl ForeignMapper for LinuxForeignMapper {
    type Mapping = LinuxForeignMapping;

    fn map(
        &self,
        dom: DomId,
        gfns: &[Gfn],
        access: Access,
    ) -> Result<LinuxForeignMapping, XenError> {
        let Some(&first_gfn) = gfns.first() else {
            return Err(XenError::Invalid {
                what: "foreign map".into(),
                why: "no frames".into(),
            });
        };
        let count = gfns.len();
        let len = count
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| XenError::Invalid {
                what: "foreign map".into(),
                why: format!("{count} pages do not fit the address space"),
            })?;
        let region = MmapRegion::map_shared(self.dev.as_fd(), len, 0, access.writable()).map_err(
            |source| XenError::Mmap {
                device: PRIVCMD_PATH,
                pages: count,
                source,
            },
        )?;
        let base = region.as_ptr() as u64;
        let result = map_with_retry(
            gfns,
            ENOENT_RETRIES,
            |first, gfns, err| {
                // SAFETY: page `first` onwards lies inside `region`, a fresh privcmd mapping
                // owned here; retries only target pages whose err[] says they are not mapped.
                unsafe {
                    mmapbatch_v2(&self.dev, dom, base + (first * PAGE_SIZE) as u64, gfns, err)
                }
            },
            thread::sleep,
        );
        match result {
            Ok(()) => Ok(LinuxForeignMapping { region, dom }),
            // Returning drops `region`, which unmaps whatever was mapped.
            Err(BatchFailure::Ioctl(source)) => Err(XenError::ForeignMapBatch {
                dom,
                count,
                first_gfn,
                source,
            }),
            Err(BatchFailure::Page { index, errno }) => Err(XenError::ForeignMap {
                dom,
                index,
                gfn: gfns[index],
                count,
                source: os_error(errno),
            }),
        }
    }

    fn restrict(&self, dom: DomId) -> Result<(), XenError> {
        restrict(&self.dev, dom).map_err(|source| XenError::Ioctl {
            device: PRIVCMD_PATH,
            ioctl: "IOCTL_PRIVCMD_RESTRICT",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake hypervisor: page i is paged out for `paged[i]` calls, then maps, unless it is in
    /// `broken`, which fails with EBUSY (with the ioctl still returning 0).
    struct Fake {
        paged: Vec<u32>,
        broken: Vec<usize>,
        calls: Vec<(usize, usize)>,
    }

    impl Fake {
        fn call(&mut self, first: usize, gfns: &[Gfn], err: &mut [i32]) -> io::Result<()> {
            self.calls.push((first, gfns.len()));
            let mut any_enoent = false;
            for (k, e) in err.iter_mut().enumerate() {
                let i = first + k;
                assert_eq!(gfns[k], 0x1000 + i as u64, "frames follow their pages");
                *e = if self.broken.contains(&i) {
                    -libc::EBUSY
                } else if self.paged[i] > 0 {
                    self.paged[i] -= 1;
                    any_enoent = true;
                    -libc::ENOENT
                } else {
                    0
                };
            }
            if any_enoent {
                Err(os_error(libc::ENOENT))
            } else {
                Ok(())
            }
        }
    }

    fn gfns(n: usize) -> Vec<Gfn> {
        (0..n as u64).map(|i| 0x1000 + i).collect()
    }

    #[test]
    fn paged_out_runs_are_retried_until_mapped() {
        let mut fake = Fake {
            paged: vec![0, 2, 2, 0, 1, 0],
            broken: vec![],
            calls: vec![],
        };
        let mut sleeps = 0;
        map_with_retry(&gfns(6), 5, |f, g, e| fake.call(f, g, e), |_| sleeps += 1).unwrap();
        // First the whole range, then runs [1,3) and [4,5), then [1,3) again.
        assert_eq!(fake.calls, vec![(0, 6), (1, 2), (4, 1), (1, 2)]);
        assert_eq!(sleeps, 2);
    }

    #[test]
    fn errors_in_err_are_seen_even_when_the_ioctl_succeeds() {
        let mut fake = Fake {
            paged: vec![0; 4],
            broken: vec![2],
            calls: vec![],
        };
        let r = map_with_retry(&gfns(4), 5, |f, g, e| fake.call(f, g, e), |_| ());
        assert!(
            matches!(
                r,
                Err(BatchFailure::Page {
                    index: 2,
                    errno: libc::EBUSY
                })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn retries_are_bounded() {
        let mut fake = Fake {
            paged: vec![0, 100],
            broken: vec![],
            calls: vec![],
        };
        let mut sleeps = 0;
        let r = map_with_retry(&gfns(2), 3, |f, g, e| fake.call(f, g, e), |_| sleeps += 1);
        assert!(
            matches!(
                r,
                Err(BatchFailure::Page {
                    index: 1,
                    errno: libc::ENOENT
                })
            ),
            "{r:?}"
        );
        assert_eq!(sleeps, 3);
        assert_eq!(fake.calls.len(), 4);
    }

    #[test]
    fn other_ioctl_errors_fail_at_once() {
        let mut calls = 0;
        let r = map_with_retry(
            &gfns(3),
            5,
            |_, _, _| {
                calls += 1;
                Err(os_error(libc::EPERM))
            },
            |_| (),
        );
        assert!(
            matches!(r, Err(BatchFailure::Ioctl(ref e)) if e.raw_os_error() == Some(libc::EPERM))
        );
        assert_eq!(calls, 1);
    }
}

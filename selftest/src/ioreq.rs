//! The IOREQ-server probe (`xenvirtio-selftest ioreq`): does this hypervisor give a device model
//! an IOREQ server for a guest? Measured, not read from a config file: Xen is asked to create
//! one for the domain and it is destroyed again. The usual virtio-on-Xen path (virtio-mmio or
//! virtio-pci trapped by Xen, a device model in Dom0) cannot work without it; this project does
//! not need it. The result is one check line, `ioreq-server`, which passes when Xen's answer is
//! the one expected (`--expect`).

use clap::ValueEnum;
use xenvirtio_xen::DomId;
use xenvirtio_xen::linux::{IoreqProbe, probe_ioreq_server};

use crate::report::Report;

/// What Xen should answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoreqExpect {
    /// Xen creates the server (x86 builds of Debian's Xen: `CONFIG_IOREQ_SERVER=y`).
    Available,
    /// Xen refuses it (Debian's arm64 builds have no IOREQ servers).
    Unavailable,
}

/// Probes `dom` and reports whether the answer is `expect`.
pub fn run(dom: DomId, expect: IoreqExpect, report: &mut Report) {
    match probe_ioreq_server(dom) {
        Err(e) => report.fail("ioreq-server", format!("cannot ask Xen: {e}")),
        Ok(IoreqProbe::Created { id, destroyed }) => {
            let cleanup = match &destroyed {
                Ok(()) => "destroyed again".to_string(),
                Err(e) => format!("destroying it failed: {e}"),
            };
            report.check(
                "ioreq-server",
                expect == IoreqExpect::Available && destroyed.is_ok(),
                format!(
                    "available: Xen created IOREQ server {id} for domain {dom} ({cleanup}); expected {}",
                    describe(expect)
                ),
            );
        }
        Ok(IoreqProbe::Refused(e)) => {
            let errno = e.raw_os_error().unwrap_or(0);
            // EOPNOTSUPP / ENOSYS: built without IOREQ servers. Anything else (a domain that
            // cannot have one, no privilege) says nothing about the hypervisor's build.
            let unsupported = matches!(errno, libc::EOPNOTSUPP | libc::ENOSYS);
            report.check(
                "ioreq-server",
                expect == IoreqExpect::Unavailable && unsupported,
                format!(
                    "{}: XEN_DMOP_create_ioreq_server for domain {dom} failed: {e}; expected {}",
                    if unsupported {
                        "unavailable (hypervisor built without IOREQ servers)"
                    } else {
                        "refused for this domain"
                    },
                    describe(expect)
                ),
            );
        }
    }
}

fn describe(expect: IoreqExpect) -> &'static str {
    match expect {
        IoreqExpect::Available => "available",
        IoreqExpect::Unavailable => "unavailable",
    }
}

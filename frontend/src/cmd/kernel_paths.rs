//! `kernel-paths`: which ways this domain's kernel can take a disk from the frontend.

use anyhow::Result;
use xenvirtio_frontend::knbd;
use xenvirtio_frontend::vduse::{self, VdusePaths};

pub(crate) fn kernel_paths(probe: bool) -> Result<i32> {
    match knbd::available() {
        Ok(true) => println!("nbd:   available (netlink family \"nbd\": serve --kernel-nbd)"),
        Ok(false) => println!("nbd:   not available: no netlink family \"nbd\" (modprobe nbd)"),
        Err(e) => println!("nbd:   not available: cannot ask the kernel: {e}"),
    }
    let name = format!("xenvirtio-probe-{}", std::process::id());
    let paths = vduse::probe(probe.then_some(name.as_str()));
    println!("{}", describe(&paths));
    Ok(0)
}

fn describe(p: &VdusePaths) -> String {
    let mut why = Vec::new();
    match &p.control {
        Ok(v) => why.push(format!("/dev/vduse/control, API version {v}")),
        Err(e) => return format!("vduse: not available: {e}"),
    }
    match &p.vdpa {
        Ok(()) => why.push("vdpa netlink family".to_string()),
        Err(e) => return format!("vduse: not available: {e}"),
    }
    if !p.virtio_vdpa {
        return "vduse: not available: virtio_vdpa is not loaded, so a device on the vDPA bus \
                would not become a virtio device (modprobe virtio_vdpa)"
            .to_string();
    }
    why.push("virtio_vdpa loaded".to_string());
    match &p.created {
        None => {}
        Some(Ok(())) => why.push("a virtio-blk device was created and destroyed".to_string()),
        Some(Err(e)) => {
            return format!(
                "vduse: not available: the kernel refused a virtio-blk device: {e} ({})",
                why.join("; ")
            );
        }
    }
    format!("vduse: available ({})", why.join("; "))
}

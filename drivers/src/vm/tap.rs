//! Opening a VM's taps for its VMM or QEMU: only taps the VM driver made.
//!
//! `TUNSETIFF` by name attaches to a tap, but creates one when the name is free. A VMM or
//! QEMU restarted after apply's undo (or an operator) deleted its tap would then make a tap
//! without stead's alias, which every later apply refuses as not stead's. So the
//! supervisors (and the qemu engine's NIC hot-plug) open each tap here and hand QEMU or the
//! VMM the descriptor: the link must exist, be a tap and carry the VM's owner alias before
//! the open, be persistent after it (a tap the open made is dropped with its descriptor),
//! and be the same link.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;

use crate::net::attach::{tun_is_persistent, tun_set_iff};
use crate::net::nl::Netlink;

/// The index of tap `name` in the current network namespace, checked to be a tap that
/// carries alias `owner`.
fn owned_index(nl: &mut Netlink, name: &str, owner: &str) -> Result<u32, String> {
    match nl.link_by_name(name).map_err(|e| e.to_string())? {
        Some(l) if l.alias.as_deref() == Some(owner) && l.kind.as_deref() == Some("tun") => {
            Ok(l.index)
        }
        Some(l) => Err(format!(
            "tap {name} is not this VM's (alias {:?}, kind {:?}): not attaching",
            l.alias, l.kind
        )),
        None => Err(format!("tap {name} does not exist (apply makes it)")),
    }
}

/// Opens a queue of the persistent tap `name` (in the calling thread's network
/// namespace) that carries alias `owner`, with `IFF_VNET_HDR` when `vnet_hdr` (QEMU's
/// virtio-net offloads); never creates a tap (see the module docs).
pub(crate) fn open_owned(name: &str, owner: &str, vnet_hdr: bool) -> Result<OwnedFd, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("bad tap name {name:?}"));
    }
    let mut nl = Netlink::open(None).map_err(|e| e.to_string())?;
    let before = owned_index(&mut nl, name, owner)?;
    // std opens with O_CLOEXEC.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("open /dev/net/tun: {e}"))?;
    tun_set_iff(&f, name, vnet_hdr).map_err(|e| format!("TUNSETIFF {name}: {e}"))?;
    let persistent = tun_is_persistent(&f).map_err(|e| format!("TUNGETIFF {name}: {e}"))?;
    // Deleted after the check: the open made a fresh tap, which goes away with `f`.
    if !persistent || owned_index(&mut nl, name, owner)? != before {
        return Err(format!(
            "tap {name} was deleted or replaced while it was opened"
        ));
    }
    Ok(OwnedFd::from(f))
}

/// Opens each of `taps` with [`open_owned`], in order.
pub(crate) fn open_all_owned(
    taps: &[&str],
    owner: &str,
    vnet_hdr: bool,
) -> Result<Vec<OwnedFd>, String> {
    taps.iter()
        .map(|t| open_owned(t, owner, vnet_hdr))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAP: &str = "tvtest0";
    const OWNER: &str = "stead:VirtualMachine/t";

    fn exists(name: &str) -> bool {
        let c = std::ffi::CString::new(name).expect("name");
        // SAFETY: if_nametoindex reads the NUL-terminated string, which outlives the call.
        unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
    }

    /// A persistent tap without alias, the way something else than stead would make it.
    fn foreign_persistent_tap(name: &str) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("tun");
        tun_set_iff(&f, name, false).expect("TUNSETIFF");
        crate::net::attach::tun_persist(&f, name).expect("TUNSETPERSIST");
    }

    #[test]
    fn only_an_existing_tap_with_the_vms_alias_is_opened_and_none_is_made() {
        if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/dev/net/tun").exists() {
            println!(
                "SKIP only_an_existing_tap_with_the_vms_alias_is_opened_and_none_is_made: needs root and /dev/net/tun"
            );
            return;
        }
        std::thread::spawn(|| {
            // Only this thread enters the new network namespace; it ends with the test.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let e = open_owned(TAP, OWNER, false).expect_err("missing");
            assert!(e.contains("does not exist"), "{e}");
            assert!(!exists(TAP), "a tap was made");

            foreign_persistent_tap(TAP);
            let e = open_owned(TAP, OWNER, true).expect_err("no alias");
            assert!(e.contains("not this VM's"), "{e}");

            // `ip` runs in this thread's namespace (a child inherits it).
            let st = std::process::Command::new("ip")
                .args(["link", "set", TAP, "alias", OWNER])
                .status()
                .expect("ip");
            assert!(st.success());
            let fds = open_all_owned(&[TAP], OWNER, true).expect("owned tap");
            assert_eq!(fds.len(), 1);
            // Attached: a second queue without multi-queue is refused by the kernel.
            assert!(open_owned(TAP, OWNER, false).is_err());
        })
        .join()
        .expect("test thread");
    }
}

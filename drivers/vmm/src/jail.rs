//! The VMM's privilege drop, once the VM is set up ([`crate::VmConfig::jail`]).
//!
//! Everything the VMM needs from the host is open by then: `/dev/kvm` and the VM fds,
//! the disk files, the taps, the serial log, the control and console listeners and the
//! state file. [`enter`] then:
//! 1. checks that the process is single-threaded (a root change must hold for every
//!    thread; the VMM threads are spawned afterwards);
//! 2. unshares the mount namespace, makes every mount private, bind-mounts an empty
//!    directory (`<run_dir>/jail`, 0700) onto itself, `pivot_root`s into it, detaches
//!    the old root and remounts the new one read-only: no host path is reachable;
//! 3. empties the capability bounding set, drops supplementary groups and sets the
//!    real, effective and saved uid and gid to [`vmm_id`] of the process (a per-VMM
//!    id, [`VMM_ID_BASE`] + pid, so two VMMs never share an id), which clears the
//!    permitted, effective and ambient capabilities, and marks the process
//!    non-dumpable;
//! 4. sets the parent-death signal again (the uid change clears it).
//!
//! Seccomp comes on top, per thread, when the VMM threads start.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Uid, chdir, pivot_root, setgroups, setresgid, setresuid};

use crate::VmmError;

/// First uid/gid of the VMM range: a jailed VMM runs as `VMM_ID_BASE + pid`. Far above
/// the ids of users, containers' user-namespace ranges and `nobody`.
pub const VMM_ID_BASE: u32 = 0xF000_0000;

/// The uid and gid a jailed VMM process with `pid` runs as.
pub fn vmm_id(pid: u32) -> Result<u32, VmmError> {
    VMM_ID_BASE
        .checked_add(pid)
        .filter(|id| *id != u32::MAX)
        .ok_or_else(|| VmmError::Config(format!("pid {pid} leaves no VMM id")))
}

fn jail_err(what: &'static str) -> impl Fn(nix::Error) -> VmmError {
    move |e| VmmError::io(what)(std::io::Error::from(e))
}

/// Confines the calling (single-threaded) process: empty root in its own mount
/// namespace under `run_dir/jail`, no capabilities, its own uid/gid. Returns the id.
pub(crate) fn enter(run_dir: &Path) -> Result<u32, VmmError> {
    let tasks = stead_host::ProcFs::host().self_tasks();
    let threads = std::fs::read_dir(&tasks)
        .map_err(VmmError::io(format!("list {}", tasks.display())))?
        .count();
    if threads != 1 {
        return Err(VmmError::Config(format!(
            "the VMM jail needs a single-threaded process ({threads} threads)"
        )));
    }
    let id = vmm_id(std::process::id())?;
    let parent = nix::unistd::getppid();
    let death_signal = nix::sys::prctl::get_pdeathsig().map_err(jail_err("PR_GET_PDEATHSIG"))?;
    empty_root(&run_dir.join("jail"))?;
    drop_privileges(id)?;
    // A credential change clears the parent-death signal: set it again, then make sure
    // the parent did not die in between.
    if let Some(sig) = death_signal {
        nix::sys::prctl::set_pdeathsig(sig).map_err(jail_err("PR_SET_PDEATHSIG"))?;
        if nix::unistd::getppid() != parent {
            return Err(VmmError::Config("the supervisor died during setup".into()));
        }
    }
    Ok(id)
}

/// A fresh mount namespace whose root is the empty directory `root` (read-only).
fn empty_root(root: &Path) -> Result<(), VmmError> {
    match std::fs::remove_dir(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(VmmError::io(format!("remove {}", root.display()))(e)),
    }
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(root)
        .map_err(VmmError::io(format!("create {}", root.display())))?;
    unshare(CloneFlags::CLONE_NEWNS).map_err(jail_err("unshare mount namespace"))?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(jail_err("make mounts private"))?;
    mount(Some(root), root, none, MsFlags::MS_BIND, none).map_err(jail_err("bind jail root"))?;
    chdir(root).map_err(jail_err("chdir jail root"))?;
    pivot_root(".", ".").map_err(jail_err("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(jail_err("detach old root"))?;
    chdir("/").map_err(jail_err("chdir /"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        none,
    )
    .map_err(jail_err("remount jail root read-only"))?;
    Ok(())
}

/// No bounding set, no groups, uid = gid = `id` everywhere, non-dumpable.
fn drop_privileges(id: u32) -> Result<(), VmmError> {
    let cap_err = |e: caps::errors::CapsError| VmmError::Config(format!("capabilities: {e}"));
    for cap in caps::all() {
        caps::drop(None, caps::CapSet::Bounding, cap).map_err(cap_err)?;
    }
    setgroups(&[]).map_err(jail_err("setgroups"))?;
    let (gid, uid) = (Gid::from_raw(id), Uid::from_raw(id));
    setresgid(gid, gid, gid).map_err(jail_err("setresgid"))?;
    setresuid(uid, uid, uid).map_err(jail_err("setresuid"))?;
    caps::clear(None, caps::CapSet::Ambient).map_err(cap_err)?;
    caps::clear(None, caps::CapSet::Inheritable).map_err(cap_err)?;
    if !caps::read(None, caps::CapSet::Permitted)
        .map_err(cap_err)?
        .is_empty()
    {
        return Err(VmmError::Config(
            "capabilities survived the uid change".into(),
        ));
    }
    nix::sys::prctl::set_dumpable(false).map_err(jail_err("PR_SET_DUMPABLE"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_ids_are_per_pid_and_never_minus_one() {
        assert_eq!(vmm_id(1).ok(), Some(VMM_ID_BASE + 1));
        assert_ne!(vmm_id(2).ok(), vmm_id(3).ok());
        // pid_max is at most 2^22: every pid has an id.
        assert!(vmm_id(1 << 22).is_ok());
        assert!(
            vmm_id(u32::MAX - VMM_ID_BASE).is_err(),
            "(uid_t)-1 is not an id"
        );
        assert!(vmm_id(u32::MAX).is_err());
    }
}

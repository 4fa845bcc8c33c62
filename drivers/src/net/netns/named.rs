//! Named network namespaces (`/run/netns/NAME`, compatible with `ip netns`), created
//! and removed through syscalls: used by `stead env` to give each environment its own
//! network stack.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use rtnetlink::LinkUnspec;
use rtnetlink::packet_route::RouteNetlinkMessage;
use stead_host::{NetnsDir, ProcFs};
use stead_reconciler::driver::DriverError;

use crate::net::nl::Netlink;

/// The path of the named namespace `name`.
pub fn path_of(name: &str) -> PathBuf {
    NetnsDir::host().path_of(name)
}

fn is_mounted(path: &Path) -> bool {
    use crate::storage::mounts::{mount_at, read_mounts};
    mount_at(&read_mounts(), path).is_some()
}

/// Whether the named namespace exists (its file is a namespace mount).
pub fn exists(name: &str) -> bool {
    is_mounted(&path_of(name))
}

/// Creates the named namespace (idempotent) with loopback up; returns its path.
pub fn create_named(name: &str) -> Result<PathBuf, DriverError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(DriverError::Refused(format!(
            "invalid network namespace name {name:?}"
        )));
    }
    let path = path_of(name);
    if is_mounted(&path) {
        return Ok(path);
    }
    let dir = NetnsDir::host();
    std::fs::create_dir_all(dir.root())
        .map_err(|e| DriverError::io(format!("create {}", dir.root().display()), e))?;
    std::fs::File::create(&path)
        .map_err(|e| DriverError::io(format!("create {}", path.display()), e))?;
    let target = path.clone();
    let own_ns = ProcFs::host().thread_self_ns("net");
    // unshare(CLONE_NEWNET) changes only the calling thread: do it on a thread that ends
    // right after, once the namespace is pinned by the bind mount.
    let res = std::thread::spawn(move || -> Result<(), DriverError> {
        unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|e| DriverError::io("unshare(CLONE_NEWNET)", e.into()))?;
        mount(
            Some(own_ns.as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            DriverError::io(
                format!("bind-mount the new namespace on {}", target.display()),
                e.into(),
            )
        })?;
        let mut nl = Netlink::open(None)?;
        if let Some(lo) = nl.link_by_name("lo")? {
            nl.ack(
                RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(lo.index).up().build()),
                0,
            )
            .map_err(|e| DriverError::io("set lo up", e))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| DriverError::Other("namespace thread panicked".into()))?;
    if let Err(e) = res {
        let _ = umount2(&path, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Removes the named namespace (idempotent). Links inside it go with it once no process
/// holds it.
pub fn delete_named(name: &str) -> Result<(), DriverError> {
    let path = path_of(name);
    if is_mounted(&path) {
        umount2(&path, MntFlags::MNT_DETACH)
            .map_err(|e| DriverError::io(format!("unmount {}", path.display()), e.into()))?;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DriverError::io(format!("remove {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_and_delete_named_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP create_and_delete_named_namespace: needs root");
            return;
        }
        let name = format!("stead-t-netns-{}", std::process::id());
        let p = create_named(&name).expect("create");
        assert!(exists(&name));
        assert_eq!(create_named(&name).expect("idempotent"), p);
        // Loopback is up inside.
        let out = std::process::Command::new("ip")
            .args(["-n", &name, "-o", "link", "show", "lo"])
            .output()
            .expect("ip");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("UP") || text.contains("state UNKNOWN"),
            "{text}"
        );
        delete_named(&name).expect("delete");
        assert!(!exists(&name));
        assert!(!p.exists());
        delete_named(&name).expect("delete is idempotent");
    }
}

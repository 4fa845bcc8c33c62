//! `/proc/self/mountinfo` parsing, and NFS mounting via mount(2).

use std::net::ToSocketAddrs;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};
use stead_reconciler::driver::DriverError;
use stead_schema::NfsSpec;

use super::fsutil::nix_err;

pub use stead_host::mounts::{MountEntry, MountTable};

/// Reads the current mount table (empty if unreadable).
pub fn read_mounts() -> Vec<MountEntry> {
    MountTable::read()
        .map(|t| t.entries().to_vec())
        .unwrap_or_default()
}

/// The topmost mount at `path`, compared canonically (`a/../b`, symlinks, a trailing `/`
/// find the same mount).
pub fn mount_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let p = stead_host::mounts::canonical(path);
    mounts.iter().rev().find(|m| m.mount_point == p)
}

/// The NFS source string `server:/export`.
pub fn nfs_source(nfs: &NfsSpec) -> String {
    format!("{}:{}", nfs.server, nfs.export)
}

/// Splits an observed NFS source into server and export.
pub fn split_nfs_source(source: &str) -> Option<(String, String)> {
    let (server, export) = source.rsplit_once(":/")?;
    let server = server.trim_start_matches('[').trim_end_matches(']');
    Some((server.to_string(), format!("/{export}")))
}

/// The mount(2) option string for an NFS export: user options, a default `vers=4.2`,
/// and the server address (`addr=`), which the kernel needs since it does not resolve
/// names itself.
pub fn nfs_mount_data(nfs: &NfsSpec, addr: &str) -> String {
    let mut opts: Vec<String> = nfs
        .options
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(str::to_string)
        .collect();
    if !opts
        .iter()
        .any(|o| o.starts_with("vers=") || o.starts_with("nfsvers="))
    {
        opts.push("vers=4.2".into());
    }
    opts.retain(|o| !o.starts_with("addr="));
    opts.push(format!("addr={addr}"));
    opts.join(",")
}

/// Whether the running kernel has an NFS client.
pub fn kernel_has_nfs() -> bool {
    stead_host::ProcFs::host().has_filesystem("nfs")
}

/// Refuses NFS fields that a mount tool would read as options (a leading `-`). stead
/// mounts with mount(2), so this is defence in depth.
pub fn check_nfs_spec(nfs: &NfsSpec) -> Result<(), DriverError> {
    super::check_not_option("nfs server", &nfs.server)?;
    super::check_not_option("nfs export", &nfs.export)?;
    if let Some(o) = &nfs.options {
        super::check_not_option("nfs options", o.trim())?;
    }
    Ok(())
}

/// Mounts `nfs` at `path` with mount(2).
pub fn mount_nfs(nfs: &NfsSpec, path: &Path) -> Result<(), DriverError> {
    check_nfs_spec(nfs)?;
    if !kernel_has_nfs() {
        return Err(DriverError::Unsupported(format!(
            "kernel lacks an NFS client (no nfs in {})",
            stead_host::ProcFs::host().filesystems().display()
        )));
    }
    let addr = (nfs.server.as_str(), 2049u16)
        .to_socket_addrs()
        .map_err(|e| DriverError::io(format!("resolve NFS server {}", nfs.server), e))?
        .next()
        .ok_or_else(|| DriverError::NotReady(format!("NFS server {} has no address", nfs.server)))?
        .ip()
        .to_string();
    let data = nfs_mount_data(nfs, &addr);
    let source = nfs_source(nfs);
    tracing::info!(%source, path = %path.display(), options = %data, "mounting NFS export");
    nix::mount::mount(
        Some(source.as_str()),
        path,
        Some("nfs"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| nix_err(format!("mount {source} at {}", path.display()), e))
}

/// Unmounts `path` (not lazily: a busy mount is a retryable error).
pub fn unmount(path: &Path) -> Result<(), DriverError> {
    nix::mount::umount2(path, MntFlags::empty())
        .map_err(|e| nix_err(format!("umount {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use stead_host::mounts::parse_mountinfo;

    #[test]
    fn parses_mountinfo() {
        let t = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                 40 36 0:50 / /srv/pool rw shared:2 - nfs4 fs1:/export/x rw,vers=4.2\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[1].fstype, "nfs4");
        assert_eq!(
            split_nfs_source(&m[1].source),
            Some(("fs1".to_string(), "/export/x".to_string()))
        );
        assert!(mount_at(&m, Path::new("/srv/pool")).is_some());
        assert!(mount_at(&m, Path::new("/srv/x/../pool/")).is_some());
    }

    #[test]
    fn nfs_fields_that_look_like_options_are_refused_before_mounting() {
        let ok = NfsSpec {
            server: "fs1".into(),
            export: "/x".into(),
            options: Some("soft".into()),
        };
        assert!(check_nfs_spec(&ok).is_ok());
        let cases = [
            (
                NfsSpec {
                    server: "-oremount".into(),
                    ..ok.clone()
                },
                "nfs server \"-oremount\" starts with '-' and would be read as an option",
            ),
            (
                NfsSpec {
                    export: "-x".into(),
                    ..ok.clone()
                },
                "nfs export \"-x\" starts with '-' and would be read as an option",
            ),
            (
                NfsSpec {
                    options: Some(" -t nfs".into()),
                    ..ok.clone()
                },
                "nfs options \"-t nfs\" starts with '-' and would be read as an option",
            ),
        ];
        for (spec, want) in cases {
            match mount_nfs(&spec, Path::new("/nonexistent-stead-mnt")) {
                Err(DriverError::Refused(m)) => assert_eq!(m, want),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn nfs_options() {
        let nfs = NfsSpec {
            server: "fs1".into(),
            export: "/x".into(),
            options: Some("soft, timeo=50".into()),
        };
        assert_eq!(
            nfs_mount_data(&nfs, "10.0.0.2"),
            "soft,timeo=50,vers=4.2,addr=10.0.0.2"
        );
        let nfs3 = NfsSpec {
            options: Some("vers=3".into()),
            ..nfs
        };
        assert_eq!(nfs_mount_data(&nfs3, "10.0.0.2"), "vers=3,addr=10.0.0.2");
    }
}

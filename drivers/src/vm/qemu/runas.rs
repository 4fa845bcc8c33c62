//! Which user QEMU runs as.
//!
//! QEMU parses guest-controlled devices; a QEMU escape should land in an unprivileged
//! account, not root. The supervisor (root) starts QEMU with the uid, gid and supplementary
//! groups of a dedicated user (default [`DEFAULT_USER`], in group `kvm` for `/dev/kvm`),
//! setting them itself before `exec` (QEMU's own `-runas` would need the set*id system calls
//! that `-sandbox elevateprivileges=deny` forbids). Taps, the serial port and the
//! supervisor's QMP channel are inherited descriptors; the files QEMU opens by path (disks,
//! cdroms, the cloud-init seed, the UEFI NVRAM) are handed to that user ([`prepare_files`])
//! and the sockets it listens on live in a directory it owns ([`prepare_socket_dir`]).
//! Files QEMU opens later (backup targets) are passed as descriptors over QMP.
//!
//! The setting comes from `STEAD_QEMU_USER` ([`USER_ENV`]):
//! - unset or `auto`: [`DEFAULT_USER`] when it exists and can reach every file QEMU
//!   opens by path; otherwise root, with the reason as the VM's warning (apply and
//!   `stead get` show it);
//! - a user name: that user, and an error when it is absent or cannot reach a file;
//! - `root`: root, on purpose, without a warning.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The user QEMU runs as unless `STEAD_QEMU_USER` says otherwise.
pub const DEFAULT_USER: &str = "stead-qemu";
/// The environment variable naming QEMU's user (`auto`, `root` or a user name).
pub const USER_ENV: &str = "STEAD_QEMU_USER";
/// The group that may open `/dev/kvm`.
const KVM_GROUP: &str = "kvm";

/// The credentials QEMU runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunAs {
    /// User name (for messages).
    pub user: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the `kvm` group when the host has one).
    #[serde(default)]
    pub groups: Vec<u32>,
}

/// What the host asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// [`DEFAULT_USER`] when it can work, else root with a warning.
    Auto,
    /// Root, on purpose.
    Root,
    /// This user, or an error.
    User(String),
}

impl Setting {
    /// Parses the value of [`USER_ENV`].
    pub fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            None | Some("") | Some("auto") => Setting::Auto,
            Some("root") => Setting::Root,
            Some(user) => Setting::User(user.to_string()),
        }
    }

    /// The setting of this process's environment.
    pub fn from_env() -> Self {
        Self::parse(std::env::var(USER_ENV).ok().as_deref())
    }
}

/// The decision: the credentials (none: root) and a warning when `auto` fell back to root.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// Credentials QEMU runs with; `None` runs it as root.
    pub run_as: Option<RunAs>,
    /// Why QEMU runs as root although an unprivileged user was wanted.
    pub warning: Option<String>,
}

/// Decides the credentials for `setting`. `lookup` finds a user's credentials; `blocker`
/// tells which directory keeps those credentials from reaching a path (see [`blocker`]);
/// `files` are the paths QEMU opens by name and the directory its sockets go in.
pub fn decide(
    setting: &Setting,
    lookup: impl Fn(&str) -> Option<RunAs>,
    blocker: impl Fn(&Path, &RunAs) -> Option<PathBuf>,
    files: &[PathBuf],
) -> Result<Decision, String> {
    let (user, required) = match setting {
        Setting::Root => return Ok(Decision::default()),
        Setting::Auto => (DEFAULT_USER, false),
        Setting::User(u) => (u.as_str(), true),
    };
    let fallback = |why: String| {
        if required {
            Err(format!("QEMU cannot run as {user}: {why}"))
        } else {
            Ok(Decision {
                run_as: None,
                warning: Some(format!(
                    "QEMU runs as root: {why} (set {USER_ENV}=root to accept this)"
                )),
            })
        }
    };
    let Some(creds) = lookup(user) else {
        return fallback(format!(
            "user {user} does not exist (create it: useradd --system --no-create-home \
             --shell /usr/sbin/nologin --groups {KVM_GROUP} {user})"
        ));
    };
    if creds.uid == 0 {
        return Ok(Decision::default());
    }
    for f in files {
        if let Some(dir) = blocker(f, &creds) {
            return fallback(format!(
                "user {user} cannot reach {}: directory {} is closed to it (chmod o+x, or \
                 keep VM files under directories it can traverse)",
                f.display(),
                dir.display()
            ));
        }
    }
    Ok(Decision {
        run_as: Some(creds),
        warning: None,
    })
}

/// The credentials of `user` on this host (its primary group, plus `kvm` when present).
pub fn lookup(user: &str) -> Option<RunAs> {
    let u = nix::unistd::User::from_name(user).ok().flatten()?;
    let mut groups = Vec::new();
    if let Ok(Some(kvm)) = nix::unistd::Group::from_name(KVM_GROUP) {
        groups.push(kvm.gid.as_raw());
    }
    Some(RunAs {
        user: user.to_string(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        groups,
    })
}

/// Whether a directory with `mode`, owned by `uid`:`gid`, lets `creds` search it.
fn may_search(mode: u32, uid: u32, gid: u32, creds: &RunAs) -> bool {
    if uid == creds.uid {
        mode & 0o100 != 0
    } else if gid == creds.gid || creds.groups.contains(&gid) {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// The first directory above `path` that `creds` may not search, if any (a directory that
/// does not exist yet is not a blocker: it is made later, by root, with open modes).
pub fn blocker(path: &Path, creds: &RunAs) -> Option<PathBuf> {
    path.ancestors().skip(1).find_map(|dir| {
        let m = std::fs::metadata(dir).ok()?;
        (!may_search(m.mode(), m.uid(), m.gid(), creds)).then(|| dir.to_path_buf())
    })
}

/// Lets group and others search (not list) each of stead's own directories in `dirs` that
/// exists: the run and state directories' VM subtrees, which the umask made 0700, lie
/// between QEMU's user and its files.
pub fn open_for_search<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> Result<(), String> {
    for d in dirs {
        let Ok(m) = std::fs::metadata(d) else {
            continue;
        };
        let mode = m.mode() & 0o7777;
        if m.is_dir() && mode & 0o011 != 0o011 {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011))
                .map_err(|e| format!("chmod {}: {e}", d.display()))?;
        }
    }
    Ok(())
}

/// Hands the files QEMU opens by path to `creds` (owner, and read/write for it).
pub fn prepare_files<'a>(
    files: impl IntoIterator<Item = &'a Path>,
    creds: &RunAs,
) -> Result<(), String> {
    for f in files {
        std::os::unix::fs::chown(f, Some(creds.uid), Some(creds.gid))
            .map_err(|e| format!("hand {} to {}: {e}", f.display(), creds.user))?;
    }
    Ok(())
}

/// Makes `dir` (QEMU's socket directory); with `creds`, owned by that user, mode 0700.
pub fn prepare_socket_dir(dir: &Path, creds: Option<&RunAs>) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let Some(c) = creds else {
        return Ok(());
    };
    std::os::unix::fs::chown(dir, Some(c.uid), Some(c.gid))
        .map_err(|e| format!("chown {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))
}

/// Drops to `creds` in a forked child before `exec`: supplementary groups, then group,
/// then user. Only async-signal-safe calls.
///
/// # Safety
/// Call only in the child between `fork` and `exec`.
pub(crate) unsafe fn drop_to(creds: &RunAs) -> std::io::Result<()> {
    let groups: &[libc::gid_t] = &creds.groups;
    // SAFETY: setgroups reads `groups.len()` ids from a live slice.
    if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain system calls on integers.
    if unsafe { libc::setgid(creds.gid) } != 0 || unsafe { libc::setuid(creds.uid) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> RunAs {
        RunAs {
            user: "q".into(),
            uid: 990,
            gid: 990,
            groups: vec![110],
        }
    }

    fn found(_: &str) -> Option<RunAs> {
        Some(creds())
    }

    fn open(_: &Path, _: &RunAs) -> Option<PathBuf> {
        None
    }

    #[test]
    fn the_setting_parses() {
        assert_eq!(Setting::parse(None), Setting::Auto);
        assert_eq!(Setting::parse(Some(" auto ")), Setting::Auto);
        assert_eq!(Setting::parse(Some("root")), Setting::Root);
        assert_eq!(Setting::parse(Some("qemu")), Setting::User("qemu".into()));
    }

    #[test]
    fn auto_runs_as_the_user_when_it_can() {
        let d = decide(&Setting::Auto, found, open, &["/a/b".into()]).expect("decide");
        assert_eq!(d.run_as, Some(creds()));
        assert_eq!(d.warning, None);
    }

    #[test]
    fn auto_falls_back_to_root_with_a_warning() {
        let d = decide(&Setting::Auto, |_| None, open, &[]).expect("decide");
        assert_eq!(d.run_as, None);
        let w = d.warning.expect("warning");
        assert!(w.contains("does not exist") && w.contains("useradd"), "{w}");
        let closed = |_: &Path, _: &RunAs| Some(PathBuf::from("/secret"));
        let d = decide(&Setting::Auto, found, closed, &["/secret/d.qcow2".into()]).expect("d");
        assert_eq!(d.run_as, None);
        assert!(d.warning.expect("warning").contains("/secret is closed"));
    }

    #[test]
    fn a_named_user_is_required() {
        let e = decide(&Setting::User("x".into()), |_| None, open, &[]).expect_err("absent");
        assert!(e.contains("cannot run as x"), "{e}");
        let closed = |_: &Path, _: &RunAs| Some(PathBuf::from("/s"));
        let e = decide(&Setting::User("x".into()), found, closed, &["/s/f".into()])
            .expect_err("closed");
        assert!(e.contains("/s is closed"), "{e}");
    }

    #[test]
    fn root_is_root_without_a_warning() {
        let d = decide(&Setting::Root, found, open, &[]).expect("decide");
        assert_eq!(d, Decision::default());
        let root = |_: &str| Some(RunAs { uid: 0, ..creds() });
        assert_eq!(
            decide(&Setting::Auto, root, open, &[]).expect("d"),
            Decision::default()
        );
    }

    #[test]
    fn search_permission_follows_owner_group_other() {
        let c = creds();
        assert!(may_search(0o700, 990, 0, &c));
        assert!(!may_search(0o070, 990, 990, &c), "owner bits win");
        assert!(may_search(0o710, 0, 110, &c), "a supplementary group");
        assert!(!may_search(0o770, 0, 5, &c));
        assert!(may_search(0o711, 0, 0, &c));
        assert!(!may_search(0o700, 0, 0, &c));
    }

    #[test]
    fn a_closed_directory_on_a_real_path_is_found() {
        let t = tempfile::tempdir().expect("tempdir");
        let inner = t.path().join("a/b");
        std::fs::create_dir_all(&inner).expect("mkdir");
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let c = creds();
        let file = inner.join("disk.raw");
        // The temp dir is root's and closed (unless the test runs as uid 990).
        if nix::unistd::getuid().as_raw() != c.uid {
            assert_eq!(blocker(&file, &c), Some(t.path().to_path_buf()));
        }
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
        for d in [t.path().join("a"), inner.clone()] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        // Nothing below the temp dir blocks now (above it, whatever the host has).
        assert_eq!(blocker(&file, &c), blocker(&t.path().join("x"), &c));
    }
}

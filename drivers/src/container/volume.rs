//! Volume mounts backed by disk images (raw files or block devices).
//!
//! The shim (host root, host mount namespace) attaches an image file to a loop device
//! (`LOOP_CONFIGURE` with autoclear), mounts it on a staging directory
//! `<run_dir>/containers/<name>/volumes/<i>`, and the container's init bind-mounts the
//! staging directory at the wanted path — the same way for privileged and unprivileged
//! containers (a user namespace may bind-mount but not mount a block device).
//!
//! A blank volume (no ext4/xfs/btrfs signature and an all-zero first MiB) is formatted as
//! ext4 once, with its root directory owned by the container's root (`root_owner`), as
//! Proxmox VE does for container mount points. Anything else unknown is refused, never
//! formatted. The shim unmounts on exit; a staging mount left by a crashed shim is reused
//! by the next one and removed by [`unmount_all`] on delete. Loop devices detach by
//! themselves when their mount goes (autoclear).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use stead_reconciler::driver::DriverError;

use super::config::{IdMap, MountConfig};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopConfig {
    /// All fields zero (what the kernel reads as "not set").
    const ZERO: LoopConfig = LoopConfig {
        fd: 0,
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
}

/// File-system type found on an image.
fn detect_fs(dev: &Path) -> Result<Option<&'static str>, DriverError> {
    let mut f =
        File::open(dev).map_err(|e| DriverError::io(format!("open {}", dev.display()), e))?;
    let mut head = vec![0u8; 1 << 20];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(DriverError::io(format!("read {}", dev.display()), e)),
        }
    }
    head.truncate(n);
    if head.len() >= 1082 && head[1080..1082] == [0x53, 0xEF] {
        return Ok(Some("ext4"));
    }
    if head.starts_with(b"XFSB") {
        return Ok(Some("xfs"));
    }
    let mut btrfs = [0u8; 8];
    if f.seek(SeekFrom::Start(65600)).is_ok()
        && f.read_exact(&mut btrfs).is_ok()
        && &btrfs == b"_BHRfS_M"
    {
        return Ok(Some("btrfs"));
    }
    if head.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    Err(DriverError::Refused(format!(
        "{} holds data with an unknown file system; refusing to format it",
        dev.display()
    )))
}

fn mkfs_ext4(dev: &Path, idmap: Option<IdMap>) -> Result<(), DriverError> {
    let owner = idmap.map_or(0, |m| m.base);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E"])
        .arg(format!("root_owner={owner}:{owner}"))
        .arg(dev)
        .output()
        .map_err(|e| DriverError::io("run mkfs.ext4 (apt e2fsprogs)", e))?;
    if !out.status.success() {
        return Err(DriverError::Command {
            command: format!("mkfs.ext4 {}", dev.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Attaches `image` to a free loop device (autoclear); returns the open device.
fn loop_attach(image: &Path, read_only: bool) -> Result<(File, PathBuf), DriverError> {
    let backing = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(image)
        .map_err(|e| DriverError::io(format!("open {}", image.display()), e))?;
    let ctl = File::open("/dev/loop-control")
        .map_err(|e| DriverError::io("open /dev/loop-control", e))?;
    for _ in 0..10 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number; `ctl`
        // is open. Neither nix nor rustix wraps the loop-control ioctls.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(DriverError::io(
                "LOOP_CTL_GET_FREE",
                std::io::Error::last_os_error(),
            ));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| DriverError::io(format!("open {}", path.display()), e))?;
        let mut cfg = LoopConfig::ZERO;
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 };
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` (same `repr(C)` layout) that
        // lives for the call; `dev` and the backing fd are open. No safe wrapper exists.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok((dev, path));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(DriverError::io(
                format!("LOOP_CONFIGURE {}", path.display()),
                e,
            ));
        }
        // Raced with another user of the same free device: try the next.
    }
    Err(DriverError::Other("no free loop device".into()))
}

/// Whether `p` is a mount point (mountinfo parsed once, escapes such as `\040` decoded).
fn is_mountpoint(p: &Path) -> bool {
    use crate::storage::mounts::{mount_at, read_mounts};
    mount_at(&read_mounts(), p).is_some()
}

/// Staging directory of image mount `idx` of a container.
pub fn staging(dir: &Path, idx: usize) -> PathBuf {
    dir.join("volumes").join(idx.to_string())
}

/// Mounts the image-backed volumes of `mounts` on their staging directories under `dir`
/// (idempotent: an existing staging mount is reused). Returns the mounts with `source`
/// replaced by the staging directory.
pub(crate) fn mount_images(
    dir: &Path,
    mounts: &[MountConfig],
    idmap: Option<IdMap>,
) -> Result<Vec<MountConfig>, DriverError> {
    let mut out = Vec::with_capacity(mounts.len());
    for (i, m) in mounts.iter().enumerate() {
        if m.source.is_dir() {
            out.push(m.clone());
            continue;
        }
        let st = staging(dir, i);
        mount_image(&m.source, &st, m.read_only, idmap, true)?;
        out.push(MountConfig {
            source: st,
            target: m.target.clone(),
            read_only: m.read_only,
        });
    }
    Ok(out)
}

/// Mounts disk image `source` on `staging` (idempotent: an existing mount is reused).
/// A blank image is formatted ext4 when `format_blank`, refused otherwise.
pub(crate) fn mount_image(
    source: &Path,
    staging: &Path,
    read_only: bool,
    idmap: Option<IdMap>,
    format_blank: bool,
) -> Result<(), DriverError> {
    fs::create_dir_all(staging)
        .map_err(|e| DriverError::io(format!("mkdir {}", staging.display()), e))?;
    if is_mountpoint(staging) {
        return Ok(());
    }
    let fstype = match detect_fs(source)? {
        Some(t) => t,
        None if read_only || !format_blank => {
            return Err(DriverError::Refused(format!(
                "{} is blank: no file system to mount",
                source.display()
            )));
        }
        None => {
            tracing::info!(volume = %source.display(), "blank volume: mkfs.ext4");
            mkfs_ext4(source, idmap)?;
            "ext4"
        }
    };
    let (dev, path) = loop_attach(source, read_only)?;
    let flags = if read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    } | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    mount(Some(&path), staging, Some(fstype), flags, None::<&str>).map_err(|e| {
        DriverError::io(
            format!("mount {} on {}", path.display(), staging.display()),
            e.into(),
        )
    })?;
    // The mount holds the loop device now; closing our fd lets autoclear work.
    drop(dev);
    Ok(())
}

/// How many mounts stacked on one staging directory [`unmount_all`] removes at most.
const MAX_STACKED: usize = 64;

/// Unmounts every staging mount of the container directory `dir` (idempotent), each
/// mount stacked on a staging directory too: a second mount on the same directory (two
/// starts racing, or a mount left by a killed supervisor under the new one) would
/// otherwise stay, holding its loop device and the volume's file system.
pub fn unmount_all(dir: &Path) -> Result<(), DriverError> {
    let vols = dir.join("volumes");
    let Ok(rd) = fs::read_dir(&vols) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let p = e.path();
        let mut removed = 0;
        while is_mountpoint(&p) {
            if removed == MAX_STACKED {
                return Err(DriverError::Other(format!(
                    "{}: still a mount point after {MAX_STACKED} unmounts",
                    p.display()
                )));
            }
            umount2(&p, MntFlags::MNT_DETACH)
                .map_err(|e| DriverError::io(format!("umount {}", p.display()), e.into()))?;
            removed += 1;
        }
        if removed > 1 {
            tracing::warn!(staging = %p.display(), mounts = removed, "unmounted stacked volume mounts");
        }
        let _ = fs::remove_dir(&p);
    }
    let _ = fs::remove_dir(&vols);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two mounts stacked on a staging directory are both removed, and the directories
    /// with them.
    #[test]
    fn unmount_all_removes_stacked_mounts() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP unmount_all_removes_stacked_mounts: needs root");
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let st = staging(tmp.path(), 0);
        fs::create_dir_all(&st).expect("mkdir");
        for size in ["size=1m", "size=2m"] {
            mount(
                Some("tmpfs"),
                &st,
                Some("tmpfs"),
                MsFlags::empty(),
                Some(size),
            )
            .expect("mount");
        }
        assert!(is_mountpoint(&st));
        let r = unmount_all(tmp.path());
        let left = is_mountpoint(&st);
        // Clean up whatever a failure left before asserting.
        while is_mountpoint(&st) {
            let _ = umount2(&st, MntFlags::MNT_DETACH);
        }
        r.expect("unmount_all");
        assert!(!left, "a stacked mount is left on {}", st.display());
        assert!(!tmp.path().join("volumes").exists(), "staging dirs removed");
    }
}

//! The Debian guest disk image for QEMU-engine tests, built once by
//! `scripts/guest-image.sh` and cached outside the clone, and per-test copy-on-write
//! overlays of it so that no test ever writes the cached image.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::skip_unless;

/// Environment variable naming a guest image to use instead of the cached one.
pub const GUEST_IMAGE_ENV: &str = "STEAD_GUEST_IMAGE";

/// `scripts/guest-image.sh` in this checkout.
pub fn guest_image_script() -> PathBuf {
    Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("..")
    .join("scripts")
    .join("guest-image.sh")
}

/// Where the cached image for this checkout's script is (built or not): `$STEAD_GUEST_IMAGE`,
/// else what `scripts/guest-image.sh --print-path` says (it hashes the script and its
/// inputs; `STEAD_ASSETS` moves the cache). `None` when the script can't be run.
pub fn guest_image_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(GUEST_IMAGE_ENV) {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("bash")
        .arg(guest_image_script())
        .arg("--print-path")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// The cached guest image (qcow2) when `scripts/guest-image.sh` has built it; otherwise
/// prints `SKIP <test>: guest image not built (scripts/guest-image.sh)` and returns `None`.
pub fn guest_image(test: &str) -> Option<PathBuf> {
    let path = guest_image_path().filter(|p| p.is_file());
    if skip_unless(
        path.is_some(),
        test,
        "guest image not built (scripts/guest-image.sh)",
    ) {
        return None;
    }
    path
}

/// Whether `qemu-system-x86_64` and `qemu-img` can be run; prints the SKIP line when not.
pub fn qemu_ok(test: &str) -> bool {
    let runs = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    !(skip_unless(
        runs("qemu-system-x86_64"),
        test,
        "qemu-system-x86 not installed",
    ) || skip_unless(runs("qemu-img"), test, "qemu-utils not installed"))
}

/// Creates `dir/name` as a qcow2 overlay backed by `image` (`qemu-img create -f qcow2 -b
/// IMAGE -F qcow2`): writes land in the overlay, the image stays as it is.
pub fn create_overlay(image: &Path, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(image)
        .arg(&path)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "qemu-img create {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(path)
}

/// A per-test overlay of the guest image in its own temp dir, removed on drop.
pub struct GuestDisk {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl GuestDisk {
    /// An overlay of `image` in a new temp dir.
    pub fn overlay(image: &Path) -> std::io::Result<GuestDisk> {
        let dir = tempfile::Builder::new().prefix("stead-guest-").tempdir()?;
        let path = create_overlay(image, dir.path(), "disk.qcow2")?;
        Ok(GuestDisk { dir, path })
    }

    /// For test `test`: an overlay of the cached guest image, or `None` after a SKIP line
    /// when the image or QEMU's tools are missing.
    pub fn for_test(test: &str) -> Option<GuestDisk> {
        if !qemu_ok(test) {
            return None;
        }
        let image = guest_image(test)?;
        Some(GuestDisk::overlay(&image).expect("qemu-img create overlay"))
    }

    /// The overlay (qcow2).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temp dir holding the overlay, for a test's other files (seed ISO, sockets).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_path_points_into_the_checkout() {
        assert!(guest_image_script().is_file());
    }
}

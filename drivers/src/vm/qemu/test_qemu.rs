//! Test support: a real QEMU process with a QMP socket in a temp dir, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::qmp::Qmp;

/// The QEMU binary the tests run.
pub(crate) const QEMU: &str = "qemu-system-x86_64";

/// A QEMU process killed (and reaped) when dropped, with its temp dir.
pub(crate) struct TestQemu {
    child: Child,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl TestQemu {
    /// Starts QEMU (no display, no default devices, TCG) with a QMP socket and `args`
    /// (which pick the machine); `None`, after printing SKIP, when QEMU is not installed.
    pub(crate) fn start(test: &str, args: &[&str]) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(test, dir, args)
    }

    /// Like [`TestQemu::start`] in a given temp dir.
    pub(crate) fn start_in(test: &str, dir: tempfile::TempDir, args: &[&str]) -> Option<Self> {
        let sock = dir.path().join("qmp.sock");
        let spawned = Command::new(QEMU)
            .args(["-nodefaults", "-display", "none", "-accel", "tcg"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        match spawned {
            Ok(child) => Some(TestQemu { child, sock, dir }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("SKIP {test}: {QEMU} is not installed");
                None
            }
            Err(e) => panic!("spawn {QEMU}: {e}"),
        }
    }

    /// A QMP connection (waiting for the socket to appear).
    pub(crate) fn qmp(&self) -> Qmp {
        Qmp::connect_retry(&self.sock, Duration::from_secs(10)).expect("QMP connect")
    }

    /// A path in the temp dir.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for QEMU to exit on its own.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "QEMU did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestQemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs `qemu-img` and returns its stdout; panics on failure.
pub(crate) fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates a qcow2 image.
pub(crate) fn make_qcow2(path: &Path, size: &str) {
    qemu_img(&["create", "-q", "-f", "qcow2", &path.to_string_lossy(), size]);
}

/// The cached Debian guest image of `scripts/guest-image.sh` (or `$STEAD_GUEST_IMAGE`);
/// `None`, after printing SKIP, when it has not been built (tests never build it).
pub(crate) fn guest_image(test: &str) -> Option<PathBuf> {
    let path = match std::env::var_os("STEAD_GUEST_IMAGE") {
        Some(p) => PathBuf::from(p),
        None => {
            let script = Path::new(
                &std::env::var_os("CARGO_MANIFEST_DIR")
                    .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
            )
            .join("../scripts/guest-image.sh");
            let out = Command::new("bash")
                .arg(&script)
                .arg("--print-path")
                .output()
                .expect("run guest-image.sh --print-path");
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    if path.is_file() {
        Some(path)
    } else {
        println!(
            "SKIP {test}: no guest image at {} (build it with scripts/guest-image.sh)",
            path.display()
        );
        None
    }
}

/// A qcow2 overlay over `base` (the cached image is never written).
pub(crate) fn make_overlay(base: &Path, path: &Path) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        &base.to_string_lossy(),
        &path.to_string_lossy(),
    ]);
}

/// The last `n` bytes of a file, for failure messages.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&data[data.len().saturating_sub(n)..]).into_owned()
}

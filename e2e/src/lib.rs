//! Helpers for black-box tests of the `stead` binary: a sandbox with its own state
//! dir, run dir, cgroup parent and (optionally) network namespace, removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod browser;
pub mod cluster;
pub mod guest;
pub use guest::{GuestDisk, guest_image, qemu_ok};

/// Path of the `stead` binary under test: `$STEAD_BIN`, or `target/<profile>/stead`
/// next to this test executable. Build it first (`cargo build --bin stead`).
pub fn stead_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("STEAD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test>-hash -> target/debug/stead
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("stead");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bin stead` first (or set STEAD_BIN)",
        bin.display()
    );
    bin
}

/// Whether we run as root (the privileged tests need it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Sends `sig` to process `pid`; whether it was delivered. A pid that is not a process id
/// (zero or negative: a group or every process) is refused, not signalled.
pub fn signal(pid: i32, sig: rustix::process::Signal) -> bool {
    if pid <= 0 {
        return false;
    }
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|p| rustix::process::kill_process(p, sig).is_ok())
}

/// Prints a SKIP line and returns true when `cond` is false.
pub fn skip_unless(cond: bool, test: &str, reason: &str) -> bool {
    if !cond {
        eprintln!("SKIP {test}: {reason}");
        println!("SKIP {test}: {reason}");
    }
    !cond
}

/// Whether a test needing KVM can run: root and a `/dev/kvm` open for read and write;
/// prints the SKIP line when not.
pub fn kvm_ok(test: &str) -> bool {
    if skip_unless(is_root(), test, "needs root") {
        return false;
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    !skip_unless(kvm, test, "/dev/kvm absent")
}

/// Whether a test running a busybox container can run: root and `/bin/busybox` (Debian
/// package busybox-static); prints the SKIP line when not.
pub fn busybox_ok(test: &str) -> bool {
    !(skip_unless(is_root(), test, "needs root")
        || skip_unless(
            Path::new("/bin/busybox").exists(),
            test,
            "busybox-static not installed",
        ))
}

/// A busybox root file system at `root` (owned by root) with the `sh` and `sleep` applets,
/// from the host's `/bin/busybox` (see [`busybox_ok`]); returns `root`.
pub fn busybox_rootfs_at(root: &Path) -> PathBuf {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy /bin/busybox");
    for a in ["sh", "sleep"] {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(a));
    }
    root.to_path_buf()
}

/// A tmpfs mounted on a path for a test, lazily unmounted on drop (even on failure).
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`), mode 0700, on `path` (created if
    /// missing); `None` when that fails.
    pub fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).ok()?;
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(path.to_path_buf()))
    }

    /// Remounts it with another `size`; must succeed.
    pub fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("mount");
        assert!(st.success(), "remount {} to {size}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A private sandbox for one test.
pub struct Sandbox {
    /// Temp dir holding state, run and data dirs.
    pub dir: tempfile::TempDir,
    /// Cgroup parent name unique to this sandbox.
    pub cgroup_parent: String,
    /// Network namespace name, when created.
    pub netns: Option<String>,
}

impl Sandbox {
    /// A sandbox without a network namespace.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("stead-e2e-")
            .tempdir()
            .expect("tempdir");
        // Searchable, not listable, by others: QEMU runs as an unprivileged user and opens
        // the VM's files below (docs/security.md, "QEMU's user").
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod the sandbox");
        let n = dir
            .path()
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("x")
            .trim_start_matches("stead-e2e-")
            .to_lowercase();
        Sandbox {
            cgroup_parent: format!("stead-e2e-{}-{n}", std::process::id()),
            dir,
            netns: None,
        }
    }

    /// A sandbox with its own network namespace (`ip netns add`), deleted on drop.
    pub fn with_netns() -> Self {
        let mut s = Sandbox::new();
        let name = format!(
            "stead-e2e-{}-{}",
            std::process::id(),
            s.cgroup_parent.rsplit('-').next().unwrap_or("x")
        );
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {name} failed");
        let _ = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status();
        s.netns = Some(name);
        s
    }

    /// `ip -n <netns> -o link show`: one line per link in the sandbox's network namespace
    /// (empty without one, or when `ip` fails).
    pub fn links(&self) -> String {
        let Some(ns) = self.netns.as_deref() else {
            return String::new();
        };
        Command::new("ip")
            .args(["-n", ns, "-o", "link", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// A path inside the sandbox.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A busybox root file system at `<sandbox>/ct-root` (owned by root) with the `sh`
    /// and `sleep` applets, from the host's `/bin/busybox` (see [`busybox_ok`]).
    pub fn busybox_rootfs(&self) -> PathBuf {
        busybox_rootfs_at(&self.path("ct-root"))
    }

    /// Writes a file inside the sandbox and returns its path.
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write");
        p
    }

    /// A `stead` command with the sandbox's global options set.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(stead_bin());
        c.arg("--state-dir").arg(self.path("state"));
        c.arg("--run-dir").arg(self.path("run"));
        c.arg("--cgroup-parent").arg(&self.cgroup_parent);
        c.arg("--color").arg("never");
        if let Some(ns) = &self.netns {
            c.arg("--netns").arg(ns);
        }
        c.env_remove("STEAD_TEST_PAUSE_AFTER_STEPS");
        c
    }

    /// Runs `stead <args>` and returns its output.
    pub fn run(&self, args: &[&str]) -> Run {
        let out = self.cmd().args(args).output().expect("spawn stead");
        Run(out)
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for ctrl in [
            "unified", "memory", "cpu", "cpuacct", "pids", "cpuset", "freezer", "devices", "blkio",
            "systemd", "",
        ] {
            let p = Path::new("/sys/fs/cgroup")
                .join(ctrl)
                .join(&self.cgroup_parent);
            if p.exists() {
                let _ = std::fs::remove_dir(&p);
            }
        }
    }
}

/// A finished `stead` run.
pub struct Run(pub Output);

impl Run {
    /// Exit code (-1 if killed).
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    /// Stdout as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    /// Stderr as text.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    /// Asserts the exit code, printing both streams on mismatch.
    pub fn expect_code(self, code: i32) -> Self {
        assert_eq!(
            self.code(),
            code,
            "unexpected exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}

/// A btrfs file system on a loop device, unmounted and detached on drop.
pub struct LoopBtrfs {
    /// Mount point.
    pub mnt: std::path::PathBuf,
    /// Loop device.
    pub dev: String,
}

impl LoopBtrfs {
    /// Makes a 256 MiB btrfs image in the sandbox, attaches and mounts it at `mnt`;
    /// `None` when that is not possible here.
    pub fn new(sb: &Sandbox) -> Option<Self> {
        Self::sized(sb, 256 << 20)
    }

    /// [`LoopBtrfs::new`] of `bytes` (a sparse image).
    pub fn sized(sb: &Sandbox, bytes: u64) -> Option<Self> {
        let img = sb.path("btrfs.img");
        let f = std::fs::File::create(&img).ok()?;
        f.set_len(bytes).ok()?;
        let ok = Command::new("mkfs.btrfs")
            .args(["-q", "-f"])
            .arg(&img)
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dev.is_empty() {
            return None;
        }
        let mnt = sb.path("mnt");
        std::fs::create_dir_all(&mnt).ok()?;
        let me = LoopBtrfs { mnt, dev };
        let ok = Command::new("mount")
            .args(["-t", "btrfs", &me.dev])
            .arg(&me.mnt)
            .status()
            .ok()?
            .success();
        ok.then_some(me)
    }
}

impl LoopBtrfs {
    /// For test `test`: `None` after printing a SKIP line when there is no root or no
    /// btrfs in the kernel (the module is loaded if needed); otherwise a loop btrfs, or a
    /// panic if one cannot be made (btrfs-progs and losetup are test dependencies).
    pub fn for_test(sb: &Sandbox, test: &str) -> Option<LoopBtrfs> {
        if skip_unless(is_root(), test, "needs root for loop devices and mounts") {
            return None;
        }
        let has_btrfs = std::fs::read_to_string("/proc/filesystems")
            .is_ok_and(|f| f.contains("btrfs"))
            || Command::new("modprobe")
                .arg("btrfs")
                .status()
                .is_ok_and(|s| s.success());
        if skip_unless(has_btrfs, test, "kernel lacks btrfs") {
            return None;
        }
        match LoopBtrfs::new(sb) {
            Some(fs) => Some(fs),
            None => {
                panic!("could not make a loop-mounted btrfs (mkfs.btrfs from btrfs-progs, losetup)")
            }
        }
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

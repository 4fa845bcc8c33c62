//! Paths into procfs, and the few small files stead reads from it.
//!
//! [`ProcFs`] names every procfs path the rest of stead uses; its root is injected
//! ([`ProcFs::host`] for the real `/proc`, [`ProcFs::at`] for a test's temp dir), so code
//! that reads procfs can be tested against a fake tree.

use std::fs;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// Where procfs is mounted on the host (and, after `pivot_root`, inside a container).
pub const HOST_ROOT: &str = "/proc";

/// A procfs tree rooted at some directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcFs {
    root: PathBuf,
}

impl ProcFs {
    /// The host's procfs (`/proc`).
    pub fn host() -> Self {
        Self::at(HOST_ROOT)
    }

    /// A procfs tree at `root` (a test's temp dir).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<pid>/<name>` (`uid_map`, `gid_map`, `stat`, …).
    pub fn pid_file(&self, pid: impl std::fmt::Display, name: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(name)
    }

    /// `<root>/<pid>/ns/<kind>`: the namespace `kind` (`net`, `mnt`, …) of process `pid`.
    pub fn pid_ns(&self, pid: impl std::fmt::Display, kind: &str) -> PathBuf {
        self.root.join(pid.to_string()).join("ns").join(kind)
    }

    /// `<root>/thread-self/ns/<kind>`: the namespace `kind` of the calling thread.
    pub fn thread_self_ns(&self, kind: &str) -> PathBuf {
        self.root.join("thread-self/ns").join(kind)
    }

    /// `<root>/self/fd`: the calling process's open descriptors.
    pub fn self_fd_dir(&self) -> PathBuf {
        self.root.join("self/fd")
    }

    /// `<root>/self/fd/<fd>`: the magic link to the object `fd` refers to.
    pub fn self_fd(&self, fd: RawFd) -> PathBuf {
        self.self_fd_dir().join(fd.to_string())
    }

    /// `<root>/self/task`: one entry per thread of the calling process.
    pub fn self_tasks(&self) -> PathBuf {
        self.root.join("self/task")
    }

    /// `<root>/sys/<key>`, the sysctl `key` written with `/` (`net/ipv4/ip_forward`) or
    /// `.` (`net.ipv4.ip_forward`) separators.
    pub fn sysctl(&self, key: &str) -> PathBuf {
        self.root.join("sys").join(key.replace('.', "/"))
    }

    /// `<root>/filesystems`: the file-system types the kernel knows.
    pub fn filesystems(&self) -> PathBuf {
        self.root.join("filesystems")
    }

    /// `<root>/misc`: the registered misc devices.
    pub fn misc(&self) -> PathBuf {
        self.root.join("misc")
    }

    /// `<root>/cpuinfo`.
    pub fn cpuinfo(&self) -> PathBuf {
        self.root.join("cpuinfo")
    }

    /// Whether the kernel knows the file-system type `fstype` (`nfs`, `overlay`, …).
    /// False when the list cannot be read.
    pub fn has_filesystem(&self, fstype: &str) -> bool {
        fs::read_to_string(self.filesystems()).is_ok_and(|t| lists_filesystem(&t, fstype))
    }

    /// Whether the misc-device list names `device` (`device-mapper`). False when the
    /// list cannot be read.
    pub fn has_misc_device(&self, device: &str) -> bool {
        fs::read_to_string(self.misc()).is_ok_and(|t| t.contains(device))
    }

    /// Whether the CPU advertises one of `flags` (`vmx`, `svm`) in cpuinfo. False when
    /// cpuinfo cannot be read.
    pub fn cpu_has_any_flag(&self, flags: &[&str]) -> bool {
        fs::read_to_string(self.cpuinfo()).is_ok_and(|t| cpuinfo_has_any_flag(&t, flags))
    }

    /// The signal dispositions of process `pid`, from `<root>/<pid>/status`.
    pub fn signal_masks(&self, pid: impl std::fmt::Display) -> std::io::Result<SignalMasks> {
        let text = fs::read_to_string(self.pid_file(pid, "status"))?;
        SignalMasks::parse(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "status has no SigIgn/SigCgt lines",
            )
        })
    }
}

/// A process's signal dispositions: bit `n - 1` stands for signal `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SignalMasks {
    /// Signals with a handler (`SigCgt`).
    pub caught: u64,
    /// Signals set to `SIG_IGN` (`SigIgn`).
    pub ignored: u64,
    /// Signals blocked by the main thread (`SigBlk`).
    pub blocked: u64,
}

impl SignalMasks {
    /// Reads the `SigBlk`, `SigIgn` and `SigCgt` lines of a `status` text; `None` when
    /// `SigIgn` or `SigCgt` is missing or not hex.
    pub fn parse(status: &str) -> Option<Self> {
        let mask = |key: &str| {
            status.lines().find_map(|l| {
                let v = l.strip_prefix(key)?.strip_prefix(':')?;
                u64::from_str_radix(v.trim(), 16).ok()
            })
        };
        Some(SignalMasks {
            caught: mask("SigCgt")?,
            ignored: mask("SigIgn")?,
            blocked: mask("SigBlk").unwrap_or(0),
        })
    }

    /// Whether signal `signo` (1..=64) has a handler.
    pub fn catches(&self, signo: i32) -> bool {
        bit(self.caught, signo)
    }

    /// Whether signal `signo` (1..=64) is set to `SIG_IGN`.
    pub fn ignores(&self, signo: i32) -> bool {
        bit(self.ignored, signo)
    }
}

fn bit(mask: u64, signo: i32) -> bool {
    (1..=64).contains(&signo) && mask & (1u64 << (signo - 1)) != 0
}

/// Whether a `filesystems` listing (`nodev\tproc`, `\text4`) names `fstype`.
fn lists_filesystem(text: &str, fstype: &str) -> bool {
    text.lines()
        .any(|l| l.split_whitespace().last() == Some(fstype))
}

/// Whether a `flags` line of a cpuinfo text names one of `flags`.
fn cpuinfo_has_any_flag(text: &str, flags: &[&str]) -> bool {
    text.lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| flags.contains(&f)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_are_the_usual_ones() {
        let p = ProcFs::host();
        assert_eq!(p.pid_ns(42, "net"), Path::new("/proc/42/ns/net"));
        assert_eq!(p.pid_file(7u32, "uid_map"), Path::new("/proc/7/uid_map"));
        assert_eq!(
            p.thread_self_ns("net"),
            Path::new("/proc/thread-self/ns/net")
        );
        assert_eq!(p.self_fd(5), Path::new("/proc/self/fd/5"));
        assert_eq!(p.self_fd_dir(), Path::new("/proc/self/fd"));
        assert_eq!(p.self_tasks(), Path::new("/proc/self/task"));
        assert_eq!(p.filesystems(), Path::new("/proc/filesystems"));
        assert_eq!(
            p.sysctl("net/ipv4/ip_forward"),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            p.sysctl("net.ipv6.conf.all.forwarding"),
            Path::new("/proc/sys/net/ipv6/conf/all/forwarding")
        );
    }

    #[test]
    fn filesystems_listing_is_matched_by_whole_name() {
        let t = "nodev\tsysfs\nnodev\toverlay\n\text4\nnodev\tnfs4\n";
        assert!(lists_filesystem(t, "overlay"));
        assert!(lists_filesystem(t, "ext4"));
        assert!(!lists_filesystem(t, "nfs"));
        assert!(!lists_filesystem(t, "lay"));
        assert!(!lists_filesystem("", "ext4"));
    }

    #[test]
    fn cpu_flags_are_read_from_flags_lines_only() {
        let t = "model name\t: vmx-like cpu\nflags\t\t: fpu sse svm\n";
        assert!(cpuinfo_has_any_flag(t, &["vmx", "svm"]));
        assert!(!cpuinfo_has_any_flag(t, &["vmx"]));
    }

    #[test]
    fn signal_masks_are_read_from_the_status_lines() {
        // `sh -c 'trap "exit 0" TERM; ...'`: SIGINT (2) ignored, SIGTERM (15) and
        // SIGCHLD (17) caught.
        let t = "Name:\tsh\nSigQ:\t0/7823\nSigPnd:\t0000000000000000\n\
                 SigBlk:\t0000000000000000\nSigIgn:\t0000000000000002\n\
                 SigCgt:\t0000000000014000\nCapInh:\t0000000000000000\n";
        let m = SignalMasks::parse(t).expect("masks");
        assert!(m.catches(15));
        assert!(m.catches(17));
        assert!(!m.catches(1));
        assert!(m.ignores(2));
        assert!(!m.ignores(15));
        assert_eq!(m.blocked, 0);
        // `sleep` as PID 1: nothing caught.
        let sleep = "SigIgn:\t0000000000000000\nSigCgt:\t0000000000000000\n";
        assert!(!SignalMasks::parse(sleep).expect("masks").catches(15));
        // Signal 64 is the top bit; numbers outside 1..=64 are never set.
        let all = SignalMasks::parse("SigIgn:\t0\nSigCgt:\tffffffffffffffff\n").expect("m");
        assert!(all.catches(64) && all.catches(1));
        assert!(!all.catches(0) && !all.catches(65));
        assert_eq!(SignalMasks::parse("SigCgt:\tzz\nSigIgn:\t0\n"), None);
        assert_eq!(SignalMasks::parse("Name:\tx\n"), None);
    }

    #[test]
    fn reads_go_through_the_injected_root() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = ProcFs::at(d.path());
        assert!(!p.has_filesystem("nfs"));
        assert!(!p.has_misc_device("device-mapper"));
        assert!(!p.cpu_has_any_flag(&["vmx"]));
        fs::write(d.path().join("filesystems"), "nodev\tnfs\n").expect("write");
        fs::write(d.path().join("misc"), "236 device-mapper\n").expect("write");
        fs::write(d.path().join("cpuinfo"), "flags\t: vmx\n").expect("write");
        assert!(p.has_filesystem("nfs"));
        assert!(p.has_misc_device("device-mapper"));
        assert!(p.cpu_has_any_flag(&["vmx", "svm"]));
    }
}

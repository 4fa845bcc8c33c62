//! Processes as the kernel shows them: `/proc/<pid>/…` reads (start time, status fields)
//! and pidfds. The proc root is injected ([`Proc::at`] for tests, [`Proc::host`] for
//! `/proc`), so parsing is tested against a temp root.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Errors of process queries.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A `/proc` file could not be read (`NotFound` when the process is gone).
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A `/proc` file did not have the expected shape.
    #[error("parse {path}: {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// A pidfd operation failed.
    #[error("{op} {pid}: {source}")]
    Pidfd {
        /// `pidfd_open` or `pidfd_send_signal`.
        op: &'static str,
        /// The process.
        pid: i32,
        /// The cause.
        source: io::Error,
    },
}

impl ProcessError {
    /// Whether the error says the process does not exist (any more).
    pub fn is_gone(&self) -> bool {
        match self {
            ProcessError::Read { source, .. } => source.kind() == io::ErrorKind::NotFound,
            ProcessError::Pidfd { source, .. } => source.raw_os_error() == Some(libc_esrch()),
            ProcessError::Parse { .. } => false,
        }
    }
}

fn libc_esrch() -> i32 {
    rustix::io::Errno::SRCH.raw_os_error()
}

/// The processes under a proc root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    root: PathBuf,
}

impl Proc {
    /// The host's processes (`/proc`).
    pub fn host() -> Self {
        Proc::at("/proc")
    }

    /// The processes under `root` (a temp dir in tests).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Proc { root: root.into() }
    }

    /// The proc root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<pid>/<file>`.
    pub fn path(&self, pid: i32, file: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(file)
    }

    /// Reads `<root>/<pid>/<file>` as text.
    pub fn read(&self, pid: i32, file: &str) -> Result<String, ProcessError> {
        let path = self.path(pid, file);
        fs::read_to_string(&path).map_err(|source| ProcessError::Read { path, source })
    }

    /// Whether process `pid` exists.
    pub fn exists(&self, pid: i32) -> bool {
        self.root.join(pid.to_string()).exists()
    }

    /// The start time of `pid` in clock ticks since boot (field 22 of `stat`): with the
    /// pid, it names one process even after the pid is reused.
    pub fn start_time(&self, pid: i32) -> Result<u64, ProcessError> {
        let text = self.read(pid, "stat")?;
        parse_start_time(&text).ok_or_else(|| ProcessError::Parse {
            path: self.path(pid, "stat"),
            what: "no start time (field 22)".into(),
        })
    }

    /// A `kB` field of `status` (e.g. `VmHWM`, `VmRSS`), in KiB.
    pub fn status_kib(&self, pid: i32, key: &str) -> Result<u64, ProcessError> {
        let text = self.read(pid, "status")?;
        parse_status_kib(&text, key).ok_or_else(|| ProcessError::Parse {
            path: self.path(pid, "status"),
            what: format!("no {key} in kB"),
        })
    }
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may contain spaces and `)`, so fields are counted after the last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow the command: field 22 is the 20th of them.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The value of `key:` in a `/proc/<pid>/status` text, when given in kB.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// Opens a pidfd for `pid`: a handle that keeps naming that process even after its pid
/// is reused (signals through it never reach a stranger).
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, ProcessError> {
    let p = rustix::process::Pid::from_raw(pid).ok_or_else(|| ProcessError::Pidfd {
        op: "pidfd_open",
        pid,
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).map_err(|e| {
        ProcessError::Pidfd {
            op: "pidfd_open",
            pid,
            source: e.into(),
        }
    })
}

/// Sends `signal` (a signal number) to the process behind `pidfd`.
pub fn pidfd_kill(pidfd: impl AsFd, pid: i32, signal: i32) -> Result<(), ProcessError> {
    let err = |source: io::Error| ProcessError::Pidfd {
        op: "pidfd_send_signal",
        pid,
        source,
    };
    let sig = rustix::process::Signal::from_named_raw(signal)
        .ok_or_else(|| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    rustix::process::pidfd_send_signal(pidfd, sig).map_err(|e| err(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str =
        "4242 (we ird) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";

    #[test]
    fn start_time_counts_fields_after_the_command() {
        assert_eq!(parse_start_time(STAT), Some(987654));
        assert_eq!(parse_start_time("1 (x) S 1"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn status_fields_in_kib() {
        let s = "Name:\tx\nVmHWM:\t  1234 kB\nVmRSS:\t 99 kB\nThreads:\t1\n";
        assert_eq!(parse_status_kib(s, "VmHWM"), Some(1234));
        assert_eq!(parse_status_kib(s, "VmRSS"), Some(99));
        assert_eq!(parse_status_kib(s, "Threads"), None, "not in kB");
        assert_eq!(parse_status_kib(s, "Vm"), None, "whole keys only");
    }

    #[test]
    fn reads_go_under_the_injected_root() {
        let dir = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(dir.path().join("4242")).expect("mkdir");
        fs::write(dir.path().join("4242/stat"), STAT).expect("stat");
        fs::write(dir.path().join("4242/status"), "VmHWM:\t 7 kB\n").expect("status");
        let p = Proc::at(dir.path());
        assert!(p.exists(4242) && !p.exists(4243));
        assert_eq!(p.start_time(4242).expect("start"), 987654);
        assert_eq!(p.status_kib(4242, "VmHWM").expect("hwm"), 7);
        let gone = p.start_time(4243).expect_err("no such process");
        assert!(gone.is_gone(), "{gone}");
        let bad = p.status_kib(4242, "VmRSS").expect_err("missing");
        assert!(!bad.is_gone(), "{bad}");
    }

    #[test]
    fn this_process_on_the_host() {
        let me = std::process::id() as i32;
        let p = Proc::host();
        assert!(p.start_time(me).expect("start") > 0);
        assert!(p.status_kib(me, "VmHWM").expect("hwm") > 0);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        let fd = pidfd_open(pid).expect("pidfd");
        pidfd_kill(&fd, pid, 9).expect("SIGKILL");
        let st = child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
        let e = pidfd_kill(&fd, pid, 9).expect_err("reaped");
        assert!(e.is_gone(), "{e}");
    }
}

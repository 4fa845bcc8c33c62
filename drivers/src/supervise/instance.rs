//! One supervised instance (a container, a VM) and the chores every per-instance
//! supervisor does on its files: the run directory `<run_dir>/<kind>/<name>/` with its
//! config, state file, lock, control socket and logs; the exclusive lock that makes the
//! supervisor unique; the stdio redirect of the detached supervisor.
//!
//! File names differ per workload kind (the names are part of the on-disk format, which
//! supervisors started by an older binary still use), so each kind describes its files
//! once in a [`Layout`].

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use stead_host::process;
use stead_reconciler::driver::DriverError;

/// How long a starting supervisor retries its exclusive lock: a concurrent
/// [`Instance::lock_held`] probe holds a shared lock for an instant.
const LOCK_RETRY: Duration = Duration::from_secs(2);

/// The file names of one workload kind's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The directory under the run dir holding one directory per instance.
    pub kind_dir: &'static str,
    /// The state file the supervisor writes on every change.
    pub state: &'static str,
    /// The file the live supervisor holds an exclusive `flock` on.
    pub lock: &'static str,
    /// The control socket.
    pub socket: &'static str,
    /// The supervisor's own stdout/stderr.
    pub log: &'static str,
    /// The workload's size-capped console output.
    pub console_log: &'static str,
}

/// The files of one instance under the run dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    dir: PathBuf,
    layout: &'static Layout,
}

impl Instance {
    /// Instance `name` of the kind described by `layout`, under `run_dir`.
    pub fn new(run_dir: &Path, name: &str, layout: &'static Layout) -> Self {
        Instance::in_dir(run_dir.join(layout.kind_dir).join(name), layout)
    }

    /// The instance whose run directory is `dir`.
    pub fn in_dir(dir: PathBuf, layout: &'static Layout) -> Self {
        Instance { dir, layout }
    }

    /// The instance's run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration the driver hands to the supervisor.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The supervisor's state file.
    pub fn state(&self) -> PathBuf {
        self.dir.join(self.layout.state)
    }

    /// The lock file.
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(self.layout.lock)
    }

    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(self.layout.socket)
    }

    /// The supervisor's own log.
    pub fn log(&self) -> PathBuf {
        self.dir.join(self.layout.log)
    }

    /// The console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join(self.layout.console_log)
    }

    /// Takes the instance's exclusive lock for this supervisor (held while the returned
    /// file is open). Fails when another live supervisor holds it.
    pub fn lock(&self) -> Result<File, String> {
        let p = self.lock_path();
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| format!("open {}: {e}", p.display()))?;
        let deadline = Instant::now() + LOCK_RETRY;
        loop {
            match f.try_lock() {
                Ok(()) => return Ok(f),
                Err(TryLockError::WouldBlock) if Instant::now() <= deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(format!("another supervisor holds {}", p.display()));
                }
                Err(TryLockError::Error(e)) => return Err(format!("lock {}: {e}", p.display())),
            }
        }
    }

    /// Whether a live supervisor holds the instance's lock (observe's liveness test).
    pub fn lock_held(&self) -> bool {
        let Ok(f) = File::open(self.lock_path()) else {
            return false;
        };
        // A shared probe: probes never conflict with each other, only with the
        // supervisor's exclusive lock, which retries briefly. Closing `f` releases a lock
        // taken here; an error to take it counts as held.
        f.try_lock_shared().is_err()
    }

    /// Sends signal number `signal` to the supervisor `pid` (as its state file names it),
    /// only while a supervisor holds the instance's lock. The pid is pinned by a pidfd
    /// before the lock is checked, so a supervisor that has exited is never confused with
    /// a process that reused its pid. Returns whether the signal was sent.
    pub fn signal_supervisor(&self, pid: i32, signal: i32) -> Result<bool, DriverError> {
        let fd = match process::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) if e.is_gone() => return Ok(false),
            Err(e) => return Err(DriverError::Other(e.to_string())),
        };
        if !self.lock_held() {
            return Ok(false);
        }
        match process::pidfd_kill(&fd, pid, signal) {
            Ok(()) => Ok(true),
            Err(e) if e.is_gone() => Ok(false),
            Err(e) => Err(DriverError::Other(e.to_string())),
        }
    }

    /// Reads the state file; `Ok(None)` when there is none.
    pub fn read_state<T: DeserializeOwned>(&self) -> Result<Option<T>, DriverError> {
        crate::container::config::read_json(&self.state())
    }

    /// Writes the state file atomically, not durably: it describes a live supervisor
    /// and counts only while the supervisor's lock is held, which no host crash leaves.
    pub fn write_state<T: Serialize>(&self, state: &T) -> Result<(), DriverError> {
        let path = self.state();
        let data = serde_json::to_vec_pretty(state)
            .map_err(|e| DriverError::Other(format!("serialize {}: {e}", path.display())))?;
        stead_host::fs::write_atomic_volatile(&path, &data)
            .map_err(crate::storage::fsutil::host_err)
    }

    /// Points this process's stdin at `/dev/null` and stdout/stderr at the supervisor's
    /// log (appending): what a detached supervisor does first.
    pub fn redirect_stdio(&self) -> Result<(), String> {
        let log = self.log();
        let null = File::open("/dev/null").map_err(|e| format!("open /dev/null: {e}"))?;
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        nix::unistd::dup2_stdin(&null).map_err(|e| format!("dup2 stdin: {e}"))?;
        nix::unistd::dup2_stdout(&f).map_err(|e| format!("dup2 stdout: {e}"))?;
        nix::unistd::dup2_stderr(&f).map_err(|e| format!("dup2 stderr: {e}"))?;
        Ok(())
    }
}

/// The current time as supervisors write it in state files and logs (RFC 3339, ms, `Z`).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    static LAYOUT: Layout = Layout {
        kind_dir: "things",
        state: "state.json",
        lock: "thing.lock",
        socket: "control.sock",
        log: "thing.log",
        console_log: "console.log",
    };

    #[test]
    fn files_live_under_the_kind_dir() {
        let i = Instance::new(Path::new("/r"), "a", &LAYOUT);
        assert_eq!(i.dir(), Path::new("/r/things/a"));
        assert_eq!(i.config(), Path::new("/r/things/a/config.json"));
        assert_eq!(i.state(), Path::new("/r/things/a/state.json"));
        assert_eq!(i.lock_path(), Path::new("/r/things/a/thing.lock"));
        assert_eq!(i.socket(), Path::new("/r/things/a/control.sock"));
        assert_eq!(i.log(), Path::new("/r/things/a/thing.log"));
        assert_eq!(i.console_log(), Path::new("/r/things/a/console.log"));
    }

    #[test]
    fn one_supervisor_lock_per_instance() {
        let dir = tempfile::tempdir().expect("tmp");
        let i = Instance::new(dir.path(), "a", &LAYOUT);
        std::fs::create_dir_all(i.dir()).expect("mkdir");
        assert!(!i.lock_held(), "no lock file yet");
        let held = i.lock().expect("first lock");
        assert!(i.lock_held(), "a probe sees the held lock");
        let second = i.lock().expect_err("a second supervisor is refused");
        assert!(second.contains("another supervisor holds"), "{second}");
        drop(held);
        assert!(!i.lock_held(), "released on close");
        // A probe's shared lock is gone once the probe returns.
        let again = i.lock().expect("lock after the probe");
        drop(again);
    }

    #[test]
    fn only_a_supervisor_holding_the_lock_is_signalled() {
        let dir = tempfile::tempdir().expect("tmp");
        let i = Instance::new(dir.path(), "a", &LAYOUT);
        std::fs::create_dir_all(i.dir()).expect("mkdir");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        assert!(
            !i.signal_supervisor(pid, 15).expect("no lock"),
            "nobody holds the lock: not signalled"
        );
        let held = i.lock().expect("lock");
        assert!(i.signal_supervisor(pid, 15).expect("signal"));
        let st = child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(15));
        assert!(!i.signal_supervisor(pid, 15).expect("gone"), "reaped: gone");
        drop(held);
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().expect("tmp");
        let i = Instance::new(dir.path(), "a", &LAYOUT);
        std::fs::create_dir_all(i.dir()).expect("mkdir");
        assert_eq!(i.read_state::<Vec<u32>>().expect("read"), None);
        i.write_state(&vec![1u32, 2]).expect("write");
        assert_eq!(i.read_state::<Vec<u32>>().expect("read"), Some(vec![1, 2]));
    }

    #[test]
    fn timestamps_are_utc_millis() {
        let t = now_rfc3339();
        assert!(
            t.ends_with('Z') && t.len() == "2026-01-01T00:00:00.000Z".len(),
            "{t}"
        );
    }
}

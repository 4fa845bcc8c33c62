//! Detaching a per-instance supervisor (`stead shim`, `stead vmm`) from the CLI that
//! started it: double fork into a new session, then wait for the supervisor's readiness
//! message on a pipe, so the launcher's exit code says whether the workload started.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;
use nix::sys::wait::waitpid;

/// Runs `supervisor` double-forked in its own session and returns the launcher's exit
/// code: 0 once the supervisor wrote `ok` to the readiness pipe (the `OwnedFd` it gets),
/// else 1 with its message (or `early_exit` if it wrote nothing) on stderr prefixed by
/// `what`. The supervisor's own return value becomes its process exit code.
///
/// Must be called from a single-threaded process (it forks without exec).
pub fn detach(what: &str, early_exit: &str, supervisor: impl FnOnce(OwnedFd) -> i32) -> i32 {
    let (ready_r, ready_w) = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{what}: pipe: {e}");
            return 1;
        }
    };
    // SAFETY: the caller guarantees a single-threaded process (documented above), so the
    // child can run arbitrary code after fork.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            eprintln!("{what}: fork: {e}");
            1
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(ready_w);
            let _ = waitpid(child, None);
            let mut msg = String::new();
            let _ = File::from(ready_r).read_to_string(&mut msg);
            if msg == "ok" {
                0
            } else {
                if msg.is_empty() {
                    msg = early_exit.to_string();
                }
                eprintln!("{what}: {msg}");
                1
            }
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(ready_r);
            let _ = nix::unistd::setsid();
            // SAFETY: still single-threaded.
            match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Child) => std::process::exit(supervisor(ready_w)),
                // The middle process exits at once: the supervisor is orphaned to init
                // (or the nearest subreaper) and no longer a child of the CLI.
                _ => std::process::exit(0),
            }
        }
    }
}

/// Loads a supervisor's config (JSON written by its driver), checks that it is for
/// `name`, and creates the instance's run dir `dir`. On failure the reason is printed
/// prefixed by `what` and `None` is returned (the launcher then exits 1).
pub fn load_config<T: serde::de::DeserializeOwned>(
    what: &str,
    config: &std::path::Path,
    name: &str,
    name_of: fn(&T) -> &str,
    dir: &std::path::Path,
) -> Option<T> {
    let cfg: T = match crate::container::config::read_json(config) {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("{what}: config {} not found", config.display());
            return None;
        }
        Err(e) => {
            eprintln!("{what}: {e}");
            return None;
        }
    };
    if name_of(&cfg) != name {
        eprintln!("{what}: config is for {:?}, not {name:?}", name_of(&cfg));
        return None;
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("{what}: mkdir {}: {e}", dir.display());
        return None;
    }
    Some(cfg)
}

/// Observes supervised instances (containers, VMs) whose state lives in `dir/<name>/`:
/// one readdir, then `one` for each target that has a directory; the rest are absent.
pub fn observe_instances(
    dir: &std::path::Path,
    targets: &[&stead_schema::Resource],
    mut one: impl FnMut(
        &stead_schema::Resource,
    ) -> Result<
        stead_reconciler::driver::Observed,
        stead_reconciler::driver::DriverError,
    >,
) -> Result<
    std::collections::BTreeMap<stead_schema::ResourceId, stead_reconciler::driver::Observed>,
    stead_reconciler::driver::DriverError,
> {
    let present: std::collections::BTreeSet<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => {
            return Err(stead_reconciler::driver::DriverError::io(
                format!("read {}", dir.display()),
                e,
            ));
        }
    };
    let mut out = std::collections::BTreeMap::new();
    for r in targets {
        let o = if present.contains(&r.id.name) {
            one(r)?
        } else {
            stead_reconciler::driver::Observed::absent()
        };
        out.insert(r.id.clone(), o);
    }
    Ok(out)
}

/// Copies a supervisor's console log (`path`, opened with `open`) to `out`; with
/// `follow`, keeps copying new output every 200 ms while `alive()` holds. The supervisor
/// trims the log in place: when it shrank, copying starts over from its beginning.
pub fn copy_log(
    path: &std::path::Path,
    open: impl Fn() -> Result<File, stead_reconciler::driver::DriverError>,
    follow: bool,
    alive: impl Fn() -> bool,
    out: &mut dyn std::io::Write,
) -> Result<(), stead_reconciler::driver::DriverError> {
    use stead_reconciler::driver::DriverError;
    let mut f = open()?;
    let mut pos = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            f = open()?;
            pos = 0;
        }
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| DriverError::io("read log", e))?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            out.write_all(&buf[..n])
                .map_err(|e| DriverError::io("write log", e))?;
        }
        out.flush().map_err(|e| DriverError::io("flush", e))?;
        if !follow || !alive() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The impact of a change at JSON pointer `path` of a supervised workload: `hot` when its
/// top-level field is one of `hot` (applied to the running instance), else `restart`.
pub fn hot_or_restart(path: &str, hot: &[&str]) -> stead_reconciler::driver::Impact {
    let top = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if hot.contains(&top) {
        stead_reconciler::driver::Impact::Hot
    } else {
        stead_reconciler::driver::Impact::Restart
    }
}

/// Backup holds: while a backup has a workload stopped (`mode: stop`) or paused/frozen
/// (`mode: snapshot`), the file `<run_dir>/holds/<Kind>-<name>` is held open by the backup
/// with an exclusive `flock` and holds its pid (for messages). `apply` of that workload
/// (the controller's drift repair included) waits (a retryable error) instead of starting
/// or resuming it under the backup's feet. Liveness is the lock, not the pid: a hold whose
/// lock nobody holds (its backup was killed) is stale, even if its pid was reused.
pub mod hold {
    use std::fs::{self, File, OpenOptions};
    use std::io::{Read, Write};
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use stead_reconciler::driver::DriverError;

    fn path(run_dir: &Path, kind: &str, name: &str) -> PathBuf {
        run_dir.join("holds").join(format!("{kind}-{name}"))
    }

    /// A hold placed by this process: the hold file, open with an exclusive lock. Dropping
    /// it removes the file and releases the lock.
    #[derive(Debug)]
    pub struct Guard {
        file: File,
        path: PathBuf,
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            // Remove the path only while it is still this hold's file.
            let ours = match (self.file.metadata(), fs::symlink_metadata(&self.path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if ours {
                let _ = fs::remove_file(&self.path);
            }
        }
    }

    /// Places the hold for this process; it lasts until the [`Guard`] is dropped. Fails
    /// (retryably) while another live process holds it.
    pub fn take(run_dir: &Path, kind: &str, name: &str) -> Result<Guard, DriverError> {
        let p = path(run_dir, kind, name);
        if let Some(d) = p.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| DriverError::io(format!("mkdir {}", d.display()), e))?;
        }
        // A checker may have found the previous file stale and be removing it: retry
        // briefly on a lock conflict, and re-open when the path was unlinked meanwhile.
        for _ in 0..100 {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&p)
                .map_err(|e| DriverError::io(format!("open {}", p.display()), e))?;
            if file.try_lock().is_err() {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let same = match (file.metadata(), fs::symlink_metadata(&p)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            file.set_len(0)
                .and_then(|()| file.write_all(std::process::id().to_string().as_bytes()))
                .map_err(|e| DriverError::io(format!("write {}", p.display()), e))?;
            return Ok(Guard { file, path: p });
        }
        Err(DriverError::NotReady(format!(
            "{kind}/{name} is held by another running backup"
        )))
    }

    /// The pid of a live process holding `kind/name`, if any (0 when the hold names none);
    /// a hold whose lock nobody holds (a killed backup) is removed.
    pub fn holder(run_dir: &Path, kind: &str, name: &str) -> Option<i32> {
        let p = path(run_dir, kind, name);
        let mut f = File::open(&p).ok()?;
        let mut text = String::new();
        let _ = f.read_to_string(&mut text);
        let pid: i32 = text.trim().parse().unwrap_or(0);
        if pid > 0 && pid as u32 == std::process::id() {
            // This process placed it and is now resuming or starting the workload again.
            return None;
        }
        match f.try_lock_shared() {
            Ok(()) => {
                // Nobody holds it: stale, whatever process now has that pid.
                let _ = fs::remove_file(&p);
                None
            }
            Err(_) => Some(pid),
        }
    }

    /// `Err(NotReady)` while a backup holds `kind/name`.
    pub fn check(run_dir: &Path, kind: &str, name: &str) -> Result<(), DriverError> {
        match holder(run_dir, kind, name) {
            Some(pid) => Err(DriverError::NotReady(format!(
                "{kind}/{name} is held by a running backup (pid {pid}) that stopped, paused or froze it; it is started or resumed again when the backup ends"
            ))),
            None => Ok(()),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Waits until `check` reports the hold as held (the child took its lock); up to
        /// 30 s, since a loaded CI machine can take seconds to start `sh` and `flock`.
        fn wait_held(run: &Path) -> DriverError {
            for _ in 0..1500 {
                if let Err(e) = check(run, "Container", "web") {
                    return e;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("the child never held the lock");
        }

        #[test]
        fn a_live_holder_blocks_apply_and_a_dead_one_is_cleared() {
            let tmp = tempfile::tempdir().expect("tmp");
            let run = tmp.path();
            assert!(check(run, "Container", "web").is_ok(), "no hold");
            // Our own hold does not block us (the backup starts the workload again).
            let g = take(run, "Container", "web").expect("take");
            assert!(check(run, "Container", "web").is_ok());
            drop(g);
            assert!(!path(run, "Container", "web").exists(), "released");
            // Another live process holding the lock blocks, retryably.
            let p = path(run, "Container", "web");
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            // The shell locks a temp file on fd 9, renames it into place (the lock goes
            // with the inode, so `check` never sees the hold unlocked and removes it, as
            // it would a stale one) and becomes `sleep`, which keeps the lock.
            let mut child = std::process::Command::new("sh")
                .arg("-c")
                .arg(r#"exec 9>>"$0.tmp" && flock -x 9 && mv "$0.tmp" "$0" && exec sleep 30"#)
                .arg(&p)
                .spawn()
                .expect("sh");
            let e = wait_held(run);
            assert!(e.retryable(), "{e}");
            assert!(e.to_string().contains("running backup"), "{e}");
            assert!(take(run, "Container", "web").is_err(), "held by the child");
            let _ = child.kill();
            let _ = child.wait();
            // The lock goes with the last process holding the file: a short-lived child of
            // the shell (`mv`) may still be exiting, so allow it a moment.
            let gone = (0..500).any(|_| {
                let ok = check(run, "Container", "web").is_ok();
                if !ok {
                    std::thread::sleep(Duration::from_millis(20));
                }
                ok
            });
            assert!(gone, "holder gone");
            assert!(!p.exists(), "stale hold removed");
            let g = take(run, "VirtualMachine", "vm1").expect("take");
            drop(g);
            assert!(!path(run, "VirtualMachine", "vm1").exists());
        }

        #[test]
        fn a_hold_whose_pid_was_reused_by_a_live_process_is_stale() {
            let tmp = tempfile::tempdir().expect("tmp");
            let run = tmp.path();
            // A killed backup left its hold; its pid now belongs to an unrelated process.
            let mut unrelated = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("sleep");
            let p = path(run, "Container", "web");
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(&p, unrelated.id().to_string()).expect("write");
            let r = check(run, "Container", "web");
            let _ = unrelated.kill();
            let _ = unrelated.wait();
            assert!(r.is_ok(), "a reused pid is not a live hold: {r:?}");
            assert!(!p.exists(), "stale hold removed");
        }
    }
}

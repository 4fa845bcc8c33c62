//! Backup holds: while a backup has a workload stopped (`mode: stop`) or paused/frozen
//! (`mode: snapshot`), the file `<run_dir>/holds/<Kind>-<name>` is held open by the backup
//! with an exclusive `flock` and holds its pid (for messages). `apply` of that workload
//! (the controller's drift repair included) waits (a retryable error) instead of starting
//! or resuming it under the backup's feet. Liveness is the lock, not the pid: a hold whose
//! lock nobody holds (its backup was killed) is stale, even if its pid was reused.

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

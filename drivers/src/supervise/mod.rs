//! The supervisor framework shared by the per-instance supervisors (`stead shim` for a
//! container, `stead vmm` for a VM):
//! - [`instance`]: one instance's files under the run dir (config, state, lock, socket,
//!   logs), its exclusive lock and liveness probe, the detached supervisor's stdio;
//! - [`console`]: the size-capped console log, the fan-out to attached clients, and the
//!   CLI ends (`stead console`, `stead logs`);
//! - [`workload`]: the [`Workload`] trait a supervised engine implements, and the
//!   supervisor process around it ([`serve`]: lock, signals, first start, event loop);
//! - [`hold`]: backup holds that keep `apply` from restarting a workload a backup stopped;
//! - here: a supervisor's arguments ([`SupervisorArgs`]) and entry point ([`run`]):
//!   loading its config, then detaching it from the CLI that started it (double fork into
//!   a new session, then wait for the supervisor's readiness message on a pipe, so the
//!   launcher's exit code says whether the workload started); and the driver-side helpers
//!   every supervised kind shares ([`launch`], [`observe_instances`], [`hot_or_restart`]).

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;

pub mod console;
pub mod hold;
pub mod instance;
pub mod workload;

pub use console::copy_log;
pub use instance::{Instance, Layout, now_rfc3339};
pub use workload::{Workload, serve};

use nix::fcntl::OFlag;
use nix::sys::wait::waitpid;

/// Arguments of a supervisor subcommand (`stead shim`, `stead vmm`):
/// `--run-dir D --name N --config F`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorArgs {
    /// Run dir (`--run-dir`).
    pub run_dir: std::path::PathBuf,
    /// Instance name (`--name`).
    pub name: String,
    /// Config file (`--config`), written by the driver.
    pub config: std::path::PathBuf,
}

impl SupervisorArgs {
    /// Parses `--run-dir D --name N --config F` (for binaries without clap).
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Self, String> {
        let mut run_dir = None;
        let mut name = None;
        let mut config = None;
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
            match a.as_str() {
                "--run-dir" => run_dir = Some(std::path::PathBuf::from(v)),
                "--name" => name = Some(v),
                "--config" => config = Some(std::path::PathBuf::from(v)),
                _ => return Err(format!("unknown argument {a}")),
            }
        }
        Ok(SupervisorArgs {
            run_dir: run_dir.ok_or("--run-dir is required")?,
            name: name.ok_or("--name is required")?,
            config: config.ok_or("--config is required")?,
        })
    }

    /// The command-line arguments (after the subcommand) that [`SupervisorArgs::parse`]
    /// reads back.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--run-dir".into(),
            self.run_dir.display().to_string(),
            "--name".into(),
            self.name.clone(),
            "--config".into(),
            self.config.display().to_string(),
        ]
    }
}

/// The small supervisor binary next to `self_exe` (`stead-supervise`, built with `stead`),
/// when it is there; else `self_exe` itself, whose hidden subcommands run the same code.
pub fn supervisor_exe(self_exe: &std::path::Path) -> std::path::PathBuf {
    let small = self_exe.with_file_name(SUPERVISOR_BINARY);
    if self_exe.file_name() != small.file_name() && small.is_file() {
        small
    } else {
        self_exe.to_path_buf()
    }
}

/// File name of the small supervisor binary.
pub const SUPERVISOR_BINARY: &str = "stead-supervise";

/// Runs `self_exe <subcommand> <args>` (a supervisor launcher, see [`detach`]) and waits
/// for it: `Ok` once the supervisor reported ready, else its stderr in a
/// [`stead_reconciler::driver::DriverError::Command`].
pub fn launch(
    self_exe: &std::path::Path,
    subcommand: &str,
    args: &SupervisorArgs,
) -> Result<(), stead_reconciler::driver::DriverError> {
    use std::process::{Command, Stdio};
    use stead_reconciler::driver::DriverError;
    let out = Command::new(self_exe)
        .arg(subcommand)
        .args(args.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| DriverError::io(format!("spawn {} {subcommand}", self_exe.display()), e))?;
    if !out.status.success() {
        return Err(DriverError::Command {
            command: format!("{} {subcommand} --name {}", self_exe.display(), args.name),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

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

/// The entry point of a supervisor subcommand (`stead shim`, `stead vmm`): loads the
/// config named by `args` ([`load_config`], instance dir `dir`), then runs
/// `supervisor(config, readiness pipe)` detached ([`detach`]). Returns the launcher's exit
/// code; `what` prefixes its messages.
///
/// Must be called from a single-threaded process (it forks without exec).
pub fn run<T: serde::de::DeserializeOwned>(
    what: &str,
    early_exit: &str,
    args: &SupervisorArgs,
    dir: &std::path::Path,
    name_of: fn(&T) -> &str,
    supervisor: impl FnOnce(T, OwnedFd) -> i32,
) -> i32 {
    let Some(cfg) = load_config(what, &args.config, &args.name, name_of, dir) else {
        return 1;
    };
    detach(what, early_exit, |ready_w| supervisor(cfg, ready_w))
}

/// Refuses to start an HA workload whose fence deadline file says the node is fenced (a
/// retryable [`stead_reconciler::driver::DriverError::NotReady`]).
pub fn refuse_fenced(
    fence_file: Option<&std::path::Path>,
) -> Result<(), stead_reconciler::driver::DriverError> {
    match fence_file {
        Some(f) if stead_host::fence::FenceFile::new(f).expired() => {
            Err(stead_reconciler::driver::DriverError::NotReady(format!(
                "the node is fenced (deadline in {} passed): HA workloads start once its agent holds a live lease again",
                f.display()
            )))
        }
        _ => Ok(()),
    }
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

/// Creates the cgroup `<parent>/<name>` of a supervised workload (killing what a dead
/// predecessor left there), sets `limits` and moves the calling supervisor into it, so
/// the workload's processes are born there.
pub fn join_cgroup(
    parent: &str,
    name: &str,
    limits: &stead_host::cgroup::Limits,
) -> Result<stead_host::cgroup::Cgroup, String> {
    let hier = stead_host::cgroup::Hierarchy::detect().map_err(|e| format!("cgroups: {e}"))?;
    let cg = hier.cgroup(parent, name);
    cg.kill_all()
        .map_err(|e| format!("clean cgroup of a dead predecessor: {e}"))?;
    cg.create().map_err(|e| format!("create cgroup: {e}"))?;
    cg.set_limits(limits)
        .map_err(|e| format!("cgroup limits: {e}"))?;
    cg.add_self().map_err(|e| format!("join cgroup: {e}"))?;
    Ok(cg)
}

/// Gives the heap that start-up freed (the launcher's argument parsing, the config, the
/// first boot's replies) back to the kernel: a supervisor lives as long as its workload,
/// and its resident memory is the engine's overhead per VM or container.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Enters the network namespace at `ns`, if any (where a VM's taps live).
pub fn enter_netns(ns: Option<&std::path::Path>) -> Result<(), String> {
    if let Some(ns) = ns {
        let f = File::open(ns).map_err(|e| format!("open netns {}: {e}", ns.display()))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns {}: {e}", ns.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_small_supervisor_binary_is_preferred_when_it_sits_next_to_stead() {
        let d = tempfile::tempdir().expect("tempdir");
        let stead = d.path().join("stead");
        std::fs::write(&stead, b"").expect("stead");
        assert_eq!(supervisor_exe(&stead), stead, "alone: stead runs it");
        let small = d.path().join(SUPERVISOR_BINARY);
        std::fs::write(&small, b"").expect("small");
        assert_eq!(supervisor_exe(&stead), small);
        assert_eq!(supervisor_exe(&small), small);
    }

    #[test]
    fn supervisor_args_round_trip() {
        let a = SupervisorArgs {
            run_dir: "/r/stead".into(),
            name: "vm1".into(),
            config: "/r/stead/vms/vm1/config.json".into(),
        };
        assert_eq!(
            a.to_args(),
            vec![
                "--run-dir",
                "/r/stead",
                "--name",
                "vm1",
                "--config",
                "/r/stead/vms/vm1/config.json"
            ]
        );
        assert_eq!(SupervisorArgs::parse(a.to_args()).expect("parse"), a);
        assert!(SupervisorArgs::parse(vec!["--name".to_string()]).is_err());
        assert!(SupervisorArgs::parse(vec!["--x".to_string(), "y".to_string()]).is_err());
    }
}

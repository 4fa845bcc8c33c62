//! Network-namespace plumbing: run a closure on a short-lived thread that first
//! entered a network namespace.
//!
//! `setns(CLONE_NEWNET)` only changes the calling thread, and sockets (netlink, the
//! `/dev/net/tun` file) bind to the namespace of the thread that creates them. So the
//! driver creates its netlink socket on such a thread and then uses it from anywhere.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use stead_reconciler::driver::DriverError;

mod named;

pub use named::{create_named, delete_named, exists, path_of};

/// A network namespace, named the ways callers hold one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsRef {
    /// A namespace file: `/run/netns/NAME` or `/proc/PID/ns/net`.
    Path(PathBuf),
    /// The network namespace of a process.
    Pid(u32),
    /// An open namespace file descriptor (borrowed: it must stay open during the call).
    Fd(RawFd),
}

impl NetnsRef {
    /// Opens the namespace file (for `Fd`, duplicates the descriptor).
    pub(crate) fn open(&self) -> Result<File, DriverError> {
        match self {
            NetnsRef::Path(p) => {
                File::open(p).map_err(|e| DriverError::io(format!("open netns {}", p.display()), e))
            }
            NetnsRef::Pid(pid) => {
                let p = stead_host::ProcFs::host().pid_ns(pid, "net");
                File::open(&p)
                    .map_err(|e| DriverError::io(format!("open netns {}", p.display()), e))
            }
            NetnsRef::Fd(fd) => {
                // SAFETY: the caller promises `fd` is open for the duration of the call;
                // we only borrow it long enough to duplicate it. `NetnsRef::Fd` holds a raw
                // fd (so the enum carries no lifetime); no safe borrow of it exists.
                let b = unsafe { BorrowedFd::borrow_raw(*fd) };
                b.try_clone_to_owned()
                    .map(File::from)
                    .map_err(|e| DriverError::io(format!("dup netns fd {fd}"), e))
            }
        }
    }
}

impl std::fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetnsRef::Path(p) => write!(f, "{}", p.display()),
            NetnsRef::Pid(p) => write!(f, "pid {p}"),
            NetnsRef::Fd(fd) => write!(f, "fd {fd}"),
        }
    }
}

impl From<&Path> for NetnsRef {
    fn from(p: &Path) -> Self {
        NetnsRef::Path(p.to_path_buf())
    }
}

/// Runs `f` on the current thread when `ns` is `None`, else on a fresh thread that
/// entered `ns` first. The thread ends with `f`, so no other code runs in `ns`.
pub(crate) fn run_in<T, F>(ns: Option<&NetnsRef>, f: F) -> Result<T, DriverError>
where
    T: Send,
    F: FnOnce() -> Result<T, DriverError> + Send,
{
    let Some(ns) = ns else { return f() };
    let file = ns.open()?;
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                DriverError::io(
                    format!("setns(CLONE_NEWNET) into {ns} (fd {})", file.as_raw_fd()),
                    e.into(),
                )
            })?;
            f()
        });
        h.join()
            .map_err(|_| DriverError::Other(format!("netns worker thread for {ns} panicked")))?
    })
}

//! Container confinement: capabilities, `no_new_privs`, seccomp, masked paths.
//!
//! **Capabilities.** Init and `exec`'d processes keep only [`KEPT_CAPS`] in their bounding
//! set (the Docker default set plus `NET_ADMIN` — the container owns its network namespace
//! — and `SYS_BOOT`, which in a child pid namespace only lets init halt/reboot its own
//! container, as LXC allows). Everything else (`SYS_ADMIN`, `SYS_MODULE`, `SYS_TIME`,
//! `SYS_RAWIO`, `SYS_PTRACE`, `MAC_*`, `BPF`, `PERFMON`, …) is dropped. A root process that
//! execs gets exactly its bounding set as permitted and effective sets. The inheritable and
//! ambient sets are cleared (a shim started with inheritable capabilities, e.g. from
//! systemd's `AmbientCapabilities=`, would otherwise pass them to init through `execve`),
//! through the `caps` crate, every step checked: a failure fails the start.
//!
//! **Seccomp.** An allow list modelled on Docker's default profile: the syscalls in
//! [`allowed_syscalls`] run, everything else fails with `EPERM` (so a syscall added to a
//! later kernel, or an x32 number, is refused rather than allowed). Not allowed: the
//! calls Docker grants only with `CAP_SYS_ADMIN` and other capabilities stead does not
//! keep (`mount`, `umount2`, `pivot_root`, `setns`, `sethostname`, the new mount API,
//! `bpf`, `perf_event_open`, modules, kexec, `open_by_handle_at`, `kcmp`, swap, clock
//! setting, `syslog`, `quotactl`, `iopl`/`ioperm`, the NUMA policy calls), the keyring,
//! `userfaultfd`, and `io_uring_*` (Docker dropped them too). `clone` and `unshare` run
//! only without namespace flags ([`NAMESPACE_FLAGS`]): no new user namespace either, which
//! needs no capability. `clone3` fails with `ENOSYS`, so libc falls back to `clone`.
//! `personality` takes Docker's values only; `socket` any family but `AF_VSOCK`.
//! `reboot` (`SYS_BOOT`) and `chroot` (`SYS_CHROOT`) are allowed: stead keeps those
//! capabilities.
//!
//! **Paths.** [`MASKED_FILES`] get `/dev/null` bind-mounted over them, [`MASKED_DIRS`] an
//! empty read-only tmpfs, [`READONLY_PATHS`] a read-only bind mount of themselves.

use std::collections::BTreeMap;

use caps::{CapSet, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use stead_reconciler::driver::DriverError;

/// Capabilities kept in the bounding set (numbers from `linux/capability.h`).
pub const KEPT_CAPS: [(u32, &str); 16] = [
    (0, "CHOWN"),
    (1, "DAC_OVERRIDE"),
    (3, "FOWNER"),
    (4, "FSETID"),
    (5, "KILL"),
    (6, "SETGID"),
    (7, "SETUID"),
    (8, "SETPCAP"),
    (10, "NET_BIND_SERVICE"),
    (12, "NET_ADMIN"),
    (13, "NET_RAW"),
    (18, "SYS_CHROOT"),
    (22, "SYS_BOOT"),
    (27, "MKNOD"),
    (29, "AUDIT_WRITE"),
    (31, "SETFCAP"),
];

const CAP_MKNOD: u32 = 27;

// Files hidden behind `/dev/null`, directories behind an empty read-only tmpfs, paths
// made read-only: the lists live in the host layer, with every other procfs/sysfs path.
pub use stead_host::confine::{MASKED_DIRS, MASKED_FILES, READONLY_PATHS};

/// Syscalls allowed to every container, on every architecture (Docker's default profile,
/// less `io_uring_*`, plus the calls of the capabilities stead keeps: `reboot` for
/// `SYS_BOOT`, `chroot` for `SYS_CHROOT`). `clone`, `unshare`, `personality` and `socket`
/// are allowed with argument checks, see [`conditional_rules`].
macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        vec![$((libc::$name, &stringify!($name)[4..])),*]
    };
}

/// The unconditionally allowed syscalls: `(number, name)`.
pub fn allowed_syscalls() -> Vec<(i64, &'static str)> {
    let mut v = syscalls![
        SYS_accept,
        SYS_accept4,
        SYS_adjtimex,
        SYS_bind,
        SYS_brk,
        SYS_capget,
        SYS_capset,
        SYS_chdir,
        SYS_chroot,
        SYS_clock_adjtime,
        SYS_clock_getres,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_close,
        SYS_close_range,
        SYS_connect,
        SYS_copy_file_range,
        SYS_dup,
        SYS_dup3,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_epoll_pwait2,
        SYS_eventfd2,
        SYS_execve,
        SYS_execveat,
        SYS_exit,
        SYS_exit_group,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_fadvise64,
        SYS_fallocate,
        SYS_fanotify_mark,
        SYS_fchdir,
        SYS_fchmod,
        SYS_fchmodat,
        SYS_fchown,
        SYS_fchownat,
        SYS_fcntl,
        SYS_fdatasync,
        SYS_fgetxattr,
        SYS_flistxattr,
        SYS_flock,
        SYS_fremovexattr,
        SYS_fsetxattr,
        SYS_fstat,
        SYS_fstatfs,
        SYS_fsync,
        SYS_ftruncate,
        SYS_futex,
        SYS_futex_waitv,
        SYS_getcpu,
        SYS_getcwd,
        SYS_getdents64,
        SYS_getegid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getgroups,
        SYS_getitimer,
        SYS_getpeername,
        SYS_getpgid,
        SYS_getpid,
        SYS_getppid,
        SYS_getpriority,
        SYS_getrandom,
        SYS_getresgid,
        SYS_getresuid,
        SYS_getrlimit,
        SYS_get_robust_list,
        SYS_getrusage,
        SYS_getsid,
        SYS_getsockname,
        SYS_getsockopt,
        SYS_gettid,
        SYS_gettimeofday,
        SYS_getuid,
        SYS_getxattr,
        SYS_inotify_add_watch,
        SYS_inotify_init1,
        SYS_inotify_rm_watch,
        SYS_io_cancel,
        SYS_ioctl,
        SYS_io_destroy,
        SYS_io_getevents,
        SYS_ioprio_get,
        SYS_ioprio_set,
        SYS_io_setup,
        SYS_io_submit,
        SYS_kill,
        SYS_landlock_add_rule,
        SYS_landlock_create_ruleset,
        SYS_landlock_restrict_self,
        SYS_lgetxattr,
        SYS_linkat,
        SYS_listen,
        SYS_listxattr,
        SYS_llistxattr,
        SYS_lremovexattr,
        SYS_lseek,
        SYS_lsetxattr,
        SYS_madvise,
        SYS_membarrier,
        SYS_memfd_create,
        SYS_memfd_secret,
        SYS_mincore,
        SYS_mkdirat,
        SYS_mknodat,
        SYS_mlock,
        SYS_mlock2,
        SYS_mlockall,
        SYS_mmap,
        SYS_mprotect,
        SYS_mq_getsetattr,
        SYS_mq_notify,
        SYS_mq_open,
        SYS_mq_timedreceive,
        SYS_mq_timedsend,
        SYS_mq_unlink,
        SYS_mremap,
        SYS_msgctl,
        SYS_msgget,
        SYS_msgrcv,
        SYS_msgsnd,
        SYS_msync,
        SYS_munlock,
        SYS_munlockall,
        SYS_munmap,
        SYS_name_to_handle_at,
        SYS_nanosleep,
        SYS_newfstatat,
        SYS_openat,
        SYS_openat2,
        SYS_pidfd_open,
        SYS_pidfd_send_signal,
        SYS_pipe2,
        SYS_pkey_alloc,
        SYS_pkey_free,
        SYS_pkey_mprotect,
        SYS_ppoll,
        SYS_prctl,
        SYS_pread64,
        SYS_preadv,
        SYS_preadv2,
        SYS_prlimit64,
        SYS_process_mrelease,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_pselect6,
        SYS_ptrace,
        SYS_pwrite64,
        SYS_pwritev,
        SYS_pwritev2,
        SYS_read,
        SYS_readahead,
        SYS_readlinkat,
        SYS_readv,
        SYS_reboot,
        SYS_recvfrom,
        SYS_recvmmsg,
        SYS_recvmsg,
        SYS_remap_file_pages,
        SYS_removexattr,
        SYS_renameat,
        SYS_renameat2,
        SYS_restart_syscall,
        SYS_rseq,
        SYS_rt_sigaction,
        SYS_rt_sigpending,
        SYS_rt_sigprocmask,
        SYS_rt_sigqueueinfo,
        SYS_rt_sigreturn,
        SYS_rt_sigsuspend,
        SYS_rt_sigtimedwait,
        SYS_rt_tgsigqueueinfo,
        SYS_sched_getaffinity,
        SYS_sched_getattr,
        SYS_sched_getparam,
        SYS_sched_get_priority_max,
        SYS_sched_get_priority_min,
        SYS_sched_getscheduler,
        SYS_sched_rr_get_interval,
        SYS_sched_setaffinity,
        SYS_sched_setattr,
        SYS_sched_setparam,
        SYS_sched_setscheduler,
        SYS_sched_yield,
        SYS_seccomp,
        SYS_semctl,
        SYS_semget,
        SYS_semop,
        SYS_semtimedop,
        SYS_sendfile,
        SYS_sendmmsg,
        SYS_sendmsg,
        SYS_sendto,
        SYS_setfsgid,
        SYS_setfsuid,
        SYS_setgid,
        SYS_setgroups,
        SYS_setitimer,
        SYS_setpgid,
        SYS_setpriority,
        SYS_setregid,
        SYS_setresgid,
        SYS_setresuid,
        SYS_setreuid,
        SYS_setrlimit,
        SYS_set_robust_list,
        SYS_setsid,
        SYS_setsockopt,
        SYS_set_tid_address,
        SYS_setuid,
        SYS_setxattr,
        SYS_shmat,
        SYS_shmctl,
        SYS_shmdt,
        SYS_shmget,
        SYS_shutdown,
        SYS_sigaltstack,
        SYS_signalfd4,
        SYS_socketpair,
        SYS_splice,
        SYS_statfs,
        SYS_statx,
        SYS_symlinkat,
        SYS_sync,
        SYS_sync_file_range,
        SYS_syncfs,
        SYS_sysinfo,
        SYS_tee,
        SYS_tgkill,
        SYS_timer_create,
        SYS_timer_delete,
        SYS_timer_getoverrun,
        SYS_timer_gettime,
        SYS_timer_settime,
        SYS_timerfd_create,
        SYS_timerfd_gettime,
        SYS_timerfd_settime,
        SYS_times,
        SYS_tkill,
        SYS_truncate,
        SYS_umask,
        SYS_uname,
        SYS_unlinkat,
        SYS_utimensat,
        SYS_vmsplice,
        SYS_wait4,
        SYS_waitid,
        SYS_write,
        SYS_writev,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend(syscalls![
        SYS_access,
        SYS_alarm,
        SYS_arch_prctl,
        SYS_chmod,
        SYS_chown,
        SYS_creat,
        SYS_dup2,
        SYS_epoll_create,
        SYS_epoll_wait,
        SYS_eventfd,
        SYS_fork,
        SYS_futimesat,
        SYS_getdents,
        SYS_getpgrp,
        SYS_inotify_init,
        SYS_lchown,
        SYS_link,
        SYS_lstat,
        SYS_mkdir,
        SYS_mknod,
        SYS_modify_ldt,
        SYS_open,
        SYS_pause,
        SYS_pipe,
        SYS_poll,
        SYS_readlink,
        SYS_rename,
        SYS_rmdir,
        SYS_select,
        SYS_signalfd,
        SYS_stat,
        SYS_symlink,
        SYS_time,
        SYS_unlink,
        SYS_utime,
        SYS_utimes,
        SYS_vfork,
    ]);
    v
}

/// `clone`/`unshare` flags that create namespaces: `NEWNS`, `NEWCGROUP`, `NEWUTS`,
/// `NEWIPC`, `NEWUSER`, `NEWPID`, `NEWNET` (Docker's mask 0x7E020000).
pub const NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// `personality(2)` values allowed (Docker's list): `PER_LINUX`, `PER_LINUX32`,
/// `UNAME26`, `PER_LINUX32|UNAME26` and the query `0xffffffff`.
pub(crate) const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// `AF_VSOCK`: a socket to the host's hypervisor transport, refused.
const AF_VSOCK: u64 = 40;

pub(crate) fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompRule, DriverError> {
    let c = SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| DriverError::Other(format!("seccomp condition: {e}")))?;
    SeccompRule::new(vec![c]).map_err(|e| DriverError::Other(format!("seccomp rule: {e}")))
}

/// Syscalls allowed only with certain arguments: `clone` and `unshare` without
/// namespace flags (`clone`'s flags are its first argument on x86_64 and aarch64),
/// `personality` with [`PERSONALITIES`], `socket` of any family but `AF_VSOCK`.
fn conditional_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, DriverError> {
    let no_ns = || cond(0, SeccompCmpOp::MaskedEq(NAMESPACE_FLAGS), 0);
    let personality = PERSONALITIES
        .iter()
        .map(|p| cond(0, SeccompCmpOp::Eq, *p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(vec![
        (libc::SYS_clone, vec![no_ns()?]),
        (libc::SYS_unshare, vec![no_ns()?]),
        (libc::SYS_personality, personality),
        (libc::SYS_socket, vec![cond(0, SeccompCmpOp::Ne, AF_VSOCK)?]),
    ])
}

/// The allow list's rules: [`allowed_syscalls`] with any arguments, and the
/// argument-checked calls.
pub(crate) fn main_filter_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, DriverError> {
    let mut allow: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls()
        .into_iter()
        .map(|(nr, _)| (nr, Vec::new()))
        .collect();
    allow.extend(conditional_rules()?);
    Ok(allow)
}

fn target_arch() -> Result<TargetArch, DriverError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| {
        DriverError::Unsupported(format!("seccomp on {}: {e}", std::env::consts::ARCH))
    })
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, DriverError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, target_arch()?)
        .map_err(|e| DriverError::Other(format!("seccomp filter: {e}")))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| DriverError::Other(format!("seccomp compile: {e}")))
}

/// The container's seccomp filters, loaded in this order:
/// 1. the allow list ([`allowed_syscalls`] and the argument-checked calls); anything
///    else fails with `EPERM`;
/// 2. `clone3` fails with `ENOSYS` instead (its flags are in memory a filter cannot
///    read; libc then falls back to `clone`, whose flags are checked). Of two filters
///    returning an errno the one loaded last decides, so this one wins for `clone3` and
///    allows everything else (the first still applies).
///
/// The allow list is compiled as a binary search over syscall numbers
/// ([`super::seccomp_tree`]): a few dozen instructions per syscall instead of a linear scan
/// of the whole list.
pub fn seccomp_programs() -> Result<Vec<BpfProgram>, DriverError> {
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let main = super::seccomp_tree::compile(main_filter_rules()?, eperm, SeccompAction::Allow)?;
    let clone3 = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let enosys = SeccompAction::Errno(libc::ENOSYS as u32);
    let clone3 = compile(clone3, SeccompAction::Allow, enosys)?;
    Ok(vec![main, clone3])
}

/// The capabilities a container keeps: [`KEPT_CAPS`], without `MKNOD` for a privileged
/// container (no user namespace).
pub fn kept_caps(userns: bool) -> CapsHashSet {
    KEPT_CAPS
        .iter()
        .filter(|(c, _)| userns || *c != CAP_MKNOD)
        .filter_map(|(c, _)| caps::all().into_iter().find(|k| u32::from(k.index()) == *c))
        .collect()
}

fn caps_err(what: &str) -> impl FnOnce(caps::errors::CapsError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Sets the capability sets of the calling thread for a container process: inheritable
/// and ambient cleared (whatever the shim was started with), the bounding set reduced to
/// `keep`, permitted and effective set to `keep` (what root gets back on `execve`). Every
/// step is checked.
pub fn set_caps(keep: &CapsHashSet) -> Result<(), String> {
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clear ambient capabilities"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("clear inheritable capabilities"))?;
    // The kernel's own list: dropping a capability it does not know fails.
    for cap in caps::runtime::thread_all_supported() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| format!("drop {cap} from the bounding set: {e}"))?;
        }
    }
    caps::set(None, CapSet::Effective, keep).map_err(caps_err("set effective capabilities"))?;
    caps::set(None, CapSet::Permitted, keep).map_err(caps_err("set permitted capabilities"))?;
    Ok(())
}

/// Confines the calling thread: capabilities ([`set_caps`]), `no_new_privs`, the seccomp
/// filter. The last step before `execve`.
///
/// A privileged container (no user namespace) also loses `CAP_MKNOD`: without a devices
/// cgroup filter it could otherwise create a node for a host disk.
pub fn restrict(seccomp: &[BpfProgram], userns: bool) -> Result<(), String> {
    set_caps(&kept_caps(userns))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    for p in seccomp {
        seccompiler::apply_filter(p).map_err(|e| format!("seccomp: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_set_has_every_listed_capability() {
        assert_eq!(kept_caps(true).len(), KEPT_CAPS.len());
        let privileged = kept_caps(false);
        assert_eq!(privileged.len(), KEPT_CAPS.len() - 1);
        assert!(!privileged.contains(&caps::Capability::CAP_MKNOD));
        assert!(!privileged.contains(&caps::Capability::CAP_SYS_ADMIN));
    }

    /// Runs `probe` in a forked child under the container filters; returns its exit code.
    fn under_filters(probe: fn() -> i32) -> i32 {
        let progs = seccomp_programs().expect("compile");
        // SAFETY: the child only makes raw syscalls (prctl, seccomp, the probe's) and
        // leaves with _exit; it takes no lock another test thread could hold.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let code = if nix::sys::prctl::set_no_new_privs().is_ok()
                    && progs.iter().all(|p| seccompiler::apply_filter(p).is_ok())
                {
                    probe()
                } else {
                    100
                };
                // SAFETY: ends the forked child without running the harness's handlers;
                // _exit has no preconditions (neither nix nor rustix wraps it safely).
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                match nix::sys::wait::waitpid(child, None).expect("wait") {
                    nix::sys::wait::WaitStatus::Exited(_, c) => c,
                    other => panic!("probe ended with {other:?}"),
                }
            }
        }
    }

    /// errno of a raw syscall with integer arguments (0 when it succeeded).
    fn errno_of(nr: i64, a: u64, b: u64) -> i32 {
        // SAFETY: the probed syscalls take integers or a NULL pointer; a success of
        // unshare only changes the already-forked probe child.
        let r = unsafe { libc::syscall(nr, a, b) };
        if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }

    #[test]
    fn filters_refuse_namespaces_and_keep_ordinary_calls() {
        assert_eq!(
            under_filters(|| errno_of(libc::SYS_unshare, libc::CLONE_NEWUSER as u64, 0)),
            libc::EPERM,
            "unshare(CLONE_NEWUSER)"
        );
        // clone3 (flags in memory): ENOSYS, so libc falls back to clone.
        assert_eq!(
            under_filters(|| errno_of(libc::SYS_clone3, 0, 0)),
            libc::ENOSYS
        );
        // Not in the list: refused.
        assert_eq!(
            under_filters(|| errno_of(libc::SYS_keyctl, 0, 0)),
            libc::EPERM
        );
        assert_eq!(
            under_filters(|| errno_of(libc::SYS_socket, AF_VSOCK, libc::SOCK_STREAM as u64)),
            libc::EPERM
        );
        // Ordinary calls run; unshare without namespace flags too.
        assert_eq!(under_filters(|| errno_of(libc::SYS_getpid, 0, 0)), 0);
        assert_eq!(
            under_filters(|| errno_of(libc::SYS_unshare, libc::CLONE_FILES as u64, 0)),
            0
        );
    }

    #[test]
    fn filter_compiles() {
        let p = seccomp_programs().expect("compile");
        assert_eq!(p.len(), 2);
        // The allow list as a search tree: shorter than one instruction per syscall.
        assert!(
            p[0].len() > 20 && p[0].len() < allowed_syscalls().len(),
            "{}",
            p[0].len()
        );
    }
}

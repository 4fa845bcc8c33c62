//! Seccomp filter for the VMM threads, installed once setup is done.
//!
//! One allow-list serves every VMM thread (vCPU, device, control and, for
//! [`crate::run_vmm_process`], the main thread); anything else kills the process
//! with SIGSYS. `apply` also sets `no_new_privs`. `ioctl` is limited to KVM_RUN,
//! FIONBIO and FIOCLEX; other arguments are not filtered.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::VmmError;

/// Syscalls the VMM threads use after setup.
const ALLOWED: &[libc::c_long] = &[
    // vCPU loop, devices, event fds, epoll (ioctl: see IOCTLS)
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_ftruncate, // the state file, rewritten in place once jailed
    libc::SYS_fdatasync,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // threads, locks, timers, signals
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sched_getaffinity,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_getrandom,
    // memory (allocator, thread stacks)
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    // control socket and state file
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
];

/// The only ioctl requests allowed after setup.
const IOCTLS: &[u64] = &[
    0xae80, // KVM_RUN
    0x5421, // FIONBIO (std's set_nonblocking on the control socket)
    0x5451, // FIOCLEX
];

/// Builds the BPF program.
pub(crate) fn filter() -> Result<BpfProgram, VmmError> {
    let serr = |e: seccompiler::BackendError| VmmError::Seccomp(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|s| (*s, Vec::new())).collect();
    let mut ioctl_rules = Vec::new();
    for req in IOCTLS {
        let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *req)
            .map_err(serr)?;
        ioctl_rules.push(SeccompRule::new(vec![cond]).map_err(serr)?);
    }
    rules.insert(libc::SYS_ioctl, ioctl_rules);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| VmmError::Seccomp(e.to_string()))?;
    BpfProgram::try_from(f).map_err(|e| VmmError::Seccomp(e.to_string()))
}

/// Installs `prog` on the calling thread (sets `no_new_privs` first).
pub(crate) fn apply(prog: &BpfProgram) -> Result<(), VmmError> {
    seccompiler::apply_filter(prog).map_err(|e| VmmError::Seccomp(e.to_string()))
}

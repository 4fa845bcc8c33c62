//! Container confinement: capabilities, `no_new_privs`, seccomp, masked paths.
//!
//! **Capabilities.** Init and `exec`'d processes keep only [`KEPT_CAPS`] in their bounding
//! set (the Docker default set plus `NET_ADMIN` — the container owns its network namespace
//! — and `SYS_BOOT`, which in a child pid namespace only lets init halt/reboot its own
//! container, as LXC allows). Everything else (`SYS_ADMIN`, `SYS_MODULE`, `SYS_TIME`,
//! `SYS_RAWIO`, `SYS_PTRACE`, `MAC_*`, `BPF`, `PERFMON`, …) is dropped. A root process that
//! execs gets exactly its bounding set as permitted and effective sets.
//!
//! **Seccomp.** A deny-list filter (like Docker's profile, inverted): the listed syscalls
//! fail with `EPERM`, everything else is allowed. It covers kernel modules, kexec,
//! `open_by_handle_at`, `bpf`, `perf_event_open`, `userfaultfd`, the keyring, the new mount
//! API (`fsopen`, `fsmount`, `fsconfig`, `fspick`, `move_mount`, `open_tree`,
//! `mount_setattr`), swap, accounting, clock setting, `syslog`, `quotactl`, `iopl`/`ioperm`.
//!
//! **Paths.** [`MASKED_FILES`] get `/dev/null` bind-mounted over them, [`MASKED_DIRS`] an
//! empty read-only tmpfs, [`READONLY_PATHS`] a read-only bind mount of themselves.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use stead_schema::DriverError;

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

/// Files hidden behind `/dev/null`.
pub const MASKED_FILES: [&str; 7] = [
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/latency_stats",
    "/proc/timer_stats",
    "/proc/kallsyms",
];

/// Directories hidden behind an empty read-only tmpfs.
pub const MASKED_DIRS: [&str; 4] = ["/proc/acpi", "/proc/scsi", "/sys/firmware", "/proc/asound"];

/// Paths made read-only.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/irq",
    "/proc/bus",
    "/proc/fs",
];

/// Syscalls the default filter refuses with `EPERM`: the list common to all
/// architectures plus the x86-only legacy calls.
pub fn denied_syscalls() -> Vec<(i64, &'static str)> {
    let mut v = vec![
        (libc::SYS_kexec_load, "kexec_load"),
        (libc::SYS_kexec_file_load, "kexec_file_load"),
        (libc::SYS_init_module, "init_module"),
        (libc::SYS_finit_module, "finit_module"),
        (libc::SYS_delete_module, "delete_module"),
        (libc::SYS_open_by_handle_at, "open_by_handle_at"),
        (libc::SYS_bpf, "bpf"),
        (libc::SYS_perf_event_open, "perf_event_open"),
        (libc::SYS_userfaultfd, "userfaultfd"),
        (libc::SYS_keyctl, "keyctl"),
        (libc::SYS_add_key, "add_key"),
        (libc::SYS_request_key, "request_key"),
        (libc::SYS_fsopen, "fsopen"),
        (libc::SYS_fsconfig, "fsconfig"),
        (libc::SYS_fsmount, "fsmount"),
        (libc::SYS_fspick, "fspick"),
        (libc::SYS_move_mount, "move_mount"),
        (libc::SYS_open_tree, "open_tree"),
        (libc::SYS_mount_setattr, "mount_setattr"),
        (libc::SYS_swapon, "swapon"),
        (libc::SYS_swapoff, "swapoff"),
        (libc::SYS_acct, "acct"),
        (libc::SYS_settimeofday, "settimeofday"),
        (libc::SYS_clock_settime, "clock_settime"),
        (libc::SYS_clock_adjtime, "clock_adjtime"),
        (libc::SYS_adjtimex, "adjtimex"),
        (libc::SYS_syslog, "syslog"),
        (libc::SYS_quotactl, "quotactl"),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        (libc::SYS_iopl, "iopl"),
        (libc::SYS_ioperm, "ioperm"),
        (libc::SYS_lookup_dcookie, "lookup_dcookie"),
        (libc::SYS_uselib, "uselib"),
        (libc::SYS_nfsservctl, "nfsservctl"),
        (libc::SYS__sysctl, "_sysctl"),
    ]);
    v
}

fn target_arch() -> Result<TargetArch, DriverError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| {
        DriverError::Unsupported(format!("seccomp on {}: {e}", std::env::consts::ARCH))
    })
}

/// Compiles the default deny-list filter.
pub fn seccomp_program() -> Result<BpfProgram, DriverError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = denied_syscalls()
        .into_iter()
        .map(|(nr, _)| (nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target_arch()?,
    )
    .map_err(|e| DriverError::Other(format!("seccomp filter: {e}")))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| DriverError::Other(format!("seccomp compile: {e}")))
}

/// Highest capability number the kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops capabilities from the bounding and ambient sets, sets `no_new_privs` and loads
/// the seccomp filter. The last step before `execve`.
///
/// A privileged container (no user namespace) also loses `CAP_MKNOD`: without a devices
/// cgroup filter it could otherwise create a node for a host disk.
pub fn restrict(last_cap: u32, seccomp: &BpfProgram, userns: bool) -> Result<(), String> {
    for cap in 0..=last_cap {
        if KEPT_CAPS.iter().any(|(c, _)| *c == cap) && (userns || cap != CAP_MKNOD) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(format!("drop capability {cap}: {e}"));
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    seccompiler::apply_filter(seccomp).map_err(|e| format!("seccomp: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles() {
        let p = seccomp_program().expect("compile");
        assert!(p.len() > denied_syscalls().len());
    }
}

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
//! **Seccomp.** A deny-list filter (like Docker's profile, inverted): the listed syscalls
//! fail with `EPERM`, everything else is allowed. It covers kernel modules, kexec,
//! `open_by_handle_at`, `bpf`, `perf_event_open`, `userfaultfd`, the keyring, the new mount
//! API (`fsopen`, `fsmount`, `fsconfig`, `fspick`, `move_mount`, `open_tree`,
//! `mount_setattr`), swap, accounting, clock setting, `syslog`, `quotactl`, `iopl`/`ioperm`.
//!
//! **Paths.** [`MASKED_FILES`] get `/dev/null` bind-mounted over them, [`MASKED_DIRS`] an
//! empty read-only tmpfs, [`READONLY_PATHS`] a read-only bind mount of themselves.

use std::collections::BTreeMap;

use caps::{CapSet, CapsHashSet};
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
pub fn restrict(seccomp: &BpfProgram, userns: bool) -> Result<(), String> {
    set_caps(&kept_caps(userns))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    seccompiler::apply_filter(seccomp).map_err(|e| format!("seccomp: {e}"))
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

    #[test]
    fn filter_compiles() {
        let p = seccomp_program().expect("compile");
        assert!(p.len() > denied_syscalls().len());
    }
}

//! The parts of procfs and sysfs a confined workload must not see or change, and the
//! `/dev` links into procfs it expects. Paths are as seen inside the workload's own mount
//! namespace (after `pivot_root`, its own `/proc` and `/sys`).

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

/// The symlinks of a fresh `/dev` into procfs: `(name in /dev, target)`.
pub const DEV_PROC_LINKS: [(&str, &str); 4] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

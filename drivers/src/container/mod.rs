//! System containers (like Proxmox VE's LXC containers, without LXC): namespaces, cgroups
//! v1/v2, rootfs templates, veth networking, and a per-container supervisor (`stead shim`).
//!
//! # Pieces
//! - cgroups: [`stead_host::cgroup`], one interface over cgroup v1 (split or combined
//!   controller mounts, found in mountinfo) and v2 (detected when the cgroupfs root has
//!   `cgroup.controllers`); the v2 device filter program is built here (`devices_bpf`).
//! - [`shim`]: the supervisor. [`shim::main`] is what `stead shim` runs (`src/cmd_shim.rs`).
//!   Test and benchmark binaries (`drivers/tests/container_e2e.rs`,
//!   `drivers/examples/container_bench.rs`) call it themselves when started as
//!   `<binary> shim ...`, so the driver can point `HostEnv::self_exe` at them: the e2e test
//!   target has `harness = false` for that reason (a libtest binary is multi-threaded
//!   before `main` runs; the shim must fork from a single-threaded process).
//! - `process` (private): the clone path — see its docs for the exact start sequence.
//! - `inroot` (private): mount targets resolved with `openat2(RESOLVE_IN_ROOT)` and
//!   created beneath the rootfs through fds, so a link in a rootfs cannot redirect a mount
//!   to the host.
//! - [`security`]: the default capability set, seccomp allow list and masked paths.
//! - [`network`]: veth pairs through [`crate::net::attach`].
//! - [`rootfs`]: `path` in place; `template` (.tar/.tar.zst) unpacked once, shared via
//!   overlayfs for privileged containers, copied with shifted ownership for unprivileged
//!   ones; subordinate id ranges (65536 ids each from the `stead` user's `/etc/subuid`
//!   range, `state_dir/containers/idmap.json`).
//! - [`control`]: the control-socket protocol and the CLI helpers [`exec`], [`logs`],
//!   [`console`].
//! - [`ContainerDriver`]: the `Driver` for kind `Container`.
//!
//! # Behaviour decisions
//! - **Stop:** SIGPWR to init when the command is `/sbin/init` (busybox init halts on it,
//!   LXC's default halt signal), SIGTERM otherwise; SIGKILL to everything in the cgroup
//!   after 10 s ([`ContainerDriver::stop_timeout_secs`]). The cgroup is then removed and
//!   the veth pair disappears with the network namespace.
//! - **Failed start:** whatever the supervisor made before the failure (cgroups in every
//!   hierarchy, veths, volume mounts) is removed before it reports the error; the run dir
//!   keeps `config.json` and `state.json` (the last error), so observe reports the container
//!   `stopped` and delete removes the rest.
//! - **Restart policy:** applied by the shim with backoff (100 ms doubling to 10 s). When
//!   the policy says no restart, the shim exits with phase `exited`; observe then reports
//!   `state: stopped`, so the next `apply` of a `running` container starts it again (as
//!   `docker compose up` would). A reboot from inside always restarts.
//! - **Dead supervisor:** observe reports `state: orphaned` (processes left in the cgroup)
//!   or `stopped`, health `Degraded`; apply kills the leftovers and starts a new shim.
//!   The container's processes are not tied to the shim's life (no `PDEATHSIG`), so a
//!   supervisor crash alone does not stop the workload until the next apply.
//! - **Unprivileged + `rootfs.path`:** used in place without ownership shifting, so files
//!   owned by host root appear as `nobody` inside; use a template for unprivileged
//!   containers (or prepare the directory with shifted ownership).
//! - **Volume mounts:** directories are bind-mounted; disk images (raw files, block
//!   devices) go through a loop device, see [`volume`] (a blank volume is formatted ext4
//!   once). `rootfs.volume` mounts the Volume's image the same way (a blank one is
//!   refused: it has no root file system; for unprivileged containers its files must
//!   already be owned by the container's id range).
//!   Interface `vlan` needs bridge VLAN filtering, which this kernel lacks (refused in
//!   `check`). No cgroupfs is mounted inside the container.
//! - **Devices:** everything is denied but the nodes of the container's /dev, the console
//!   and ptys ([`CONTAINER_DEVICES`]), so a device node that is in a rootfs or a
//!   volume cannot be opened: on cgroup v1 through the `devices` controller, on v2
//!   through an eBPF device program stead assembles (`devices_bpf`). A container is never
//!   started unfiltered: a host with neither (v1 without the `devices` controller, v2
//!   without cgroup BPF) or a filter the cgroup refuses fails the start. Under that, only the
//!   bind-mounted nodes exist, privileged containers lose `CAP_MKNOD`, and `CAP_MKNOD`
//!   inside a user namespace cannot create usable devices.

pub mod config;
pub mod control;
mod devices_bpf;
mod driver;
mod inroot;
pub mod network;
mod process;
pub mod rootfs;
mod seccomp_tree;
pub mod security;
pub mod shim;
pub mod volume;

pub use control::{console, exec, exec_with, logs};
pub use devices_bpf::BpfDeviceProgram;
pub use driver::ContainerDriver;

/// The devices a container may use (v1 `devices.allow` lines): the nodes stead binds into
/// its /dev (null, zero, full, random, urandom, tty), `/dev/console`, `/dev/ptmx` and the
/// ptys. Everything else is denied, as LXC and runc do by default.
pub const CONTAINER_DEVICES: [&str; 9] = [
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
];

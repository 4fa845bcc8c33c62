//! Guests that another manager runs: the QEMU or LXC processes stead did not start for
//! a VM or container it is asked to adopt. Adopting such a guest would start a second
//! copy on the same disks, so the plan refuses it until the other manager stops it.

use std::path::{Path, PathBuf};

use stead_host::process::Proc;
use stead_schema::{Resource, ResourceId};

/// The label an importer puts on a guest with the numeric id another manager gave it
/// (Proxmox VE's VMID): QEMU's `-id` and LXC's container name there.
pub const VMID_LABEL: &str = "pve-vmid";

/// Which kind of runner to look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// A QEMU process (`qemu-system-*`, `kvm`).
    Qemu,
    /// An LXC container (`lxc-start`, its `[lxc monitor]`).
    Lxc,
}

/// A process of another manager running a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignGuest {
    /// Its pid.
    pub pid: i32,
    /// Its command line, space-joined (shortened).
    pub command: String,
}

/// What identifies a guest on another manager's command lines: its names (the
/// resource's, the [`VMID_LABEL`]) and its disk images.
#[derive(Debug, Clone, Default)]
pub struct GuestIdentity {
    /// Names and ids to match `-name`, `-id`, `-n` against.
    pub names: Vec<String>,
    /// Disk image paths to find in QEMU's arguments.
    pub disks: Vec<PathBuf>,
}

impl GuestIdentity {
    /// The names of `r` (its name and its [`VMID_LABEL`]) and the given disks.
    pub fn of(r: &Resource, disks: Vec<PathBuf>) -> Self {
        let mut names = vec![r.id.name.clone()];
        names.extend(r.metadata.labels.get(VMID_LABEL).cloned());
        GuestIdentity { names, disks }
    }

    fn named(&self, s: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(s))
    }
}

/// The first process on the host (in `proc`) of kind `runner` that runs the guest `who`
/// and that stead's own supervisor did not start (its command line does not name
/// `own_run_dir`).
pub fn find(
    proc: &Proc,
    runner: Runner,
    who: &GuestIdentity,
    own_run_dir: &Path,
) -> Option<ForeignGuest> {
    let entries = std::fs::read_dir(proc.root()).ok()?;
    let own = own_run_dir.to_string_lossy();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let raw = proc.read(pid, "cmdline").ok()?;
            let argv: Vec<&str> = raw.split('\0').filter(|a| !a.is_empty()).collect();
            let ours = !own.is_empty() && argv.iter().any(|a| a.contains(own.as_ref()));
            (!ours && runs(runner, &argv, who)).then(|| ForeignGuest {
                pid,
                command: shorten(&argv.join(" ")),
            })
        })
        .min_by_key(|g| g.pid)
}

/// The adoption check of guest `id` (see `Driver::adopt_check`): refused while a
/// `runner` process that stead did not start runs it, saying how to hand it over.
pub fn refuse_if_running(
    runner: Runner,
    who: &GuestIdentity,
    own_run_dir: &Path,
    id: &ResourceId,
) -> Result<(), String> {
    let Some(g) = find(&Proc::host(), runner, who, own_run_dir) else {
        return Ok(());
    };
    let (what, stop) = match runner {
        Runner::Qemu => ("a QEMU", "qm stop VMID"),
        Runner::Lxc => ("an LXC", "pct stop VMID"),
    };
    Err(format!(
        "{what} process that stead did not start runs {id} (pid {}: {}): stop it under its manager first (on Proxmox VE `{stop}`), then apply again and stead starts it itself",
        g.pid, g.command
    ))
}

/// Whether the command line `argv` is a `runner` process running `who`.
pub fn runs(runner: Runner, argv: &[&str], who: &GuestIdentity) -> bool {
    let Some(exe) = argv.first() else {
        return false;
    };
    let base = exe.rsplit('/').next().unwrap_or(exe);
    match runner {
        Runner::Qemu if base.starts_with("qemu-system") || base == "kvm" => {
            qemu_names(argv, who) || qemu_disks(argv, who)
        }
        Runner::Lxc if base.starts_with("lxc-start") => option_value(argv, "-n", "--name")
            .into_iter()
            .any(|n| who.named(n)),
        Runner::Lxc if exe.starts_with("[lxc monitor]") => {
            argv.last().is_some_and(|n| who.named(n))
        }
        _ => false,
    }
}

/// `-name NAME[,…]` (or `guest=NAME`) or `-id ID` naming `who`.
fn qemu_names(argv: &[&str], who: &GuestIdentity) -> bool {
    argv.windows(2).any(|w| match w[0] {
        "-name" => {
            let first = w[1].split(',').next().unwrap_or("");
            who.named(first.trim_start_matches("guest="))
        }
        "-id" => who.named(w[1]),
        _ => false,
    })
}

/// An argument naming one of `who`'s disk images (`file=PATH,…`, a bare path).
fn qemu_disks(argv: &[&str], who: &GuestIdentity) -> bool {
    who.disks.iter().any(|d| {
        let d = d.to_string_lossy();
        argv.iter().skip(1).any(|a| {
            a.split(',')
                .any(|part| part.trim_start_matches("file=") == d.as_ref())
        })
    })
}

/// The values of `short VALUE`, `long VALUE` and `long=VALUE` options.
fn option_value<'a>(argv: &[&'a str], short: &str, long: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    for (i, a) in argv.iter().enumerate() {
        if (*a == short || *a == long)
            && let Some(v) = argv.get(i + 1)
        {
            out.push(*v);
        } else if let Some(v) = a.strip_prefix(long).and_then(|r| r.strip_prefix('=')) {
            out.push(v);
        }
    }
    out
}

fn shorten(s: &str) -> String {
    const MAX: usize = 120;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(names: &[&str], disks: &[&str]) -> GuestIdentity {
        GuestIdentity {
            names: names.iter().map(|s| s.to_string()).collect(),
            disks: disks.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn a_proxmox_qemu_is_found_by_name_id_or_disk() {
        let argv = [
            "/usr/bin/kvm",
            "-id",
            "100",
            "-name",
            "DB-Primary,debug-threads=on",
            "-drive",
            "file=/var/lib/vz/images/100/vm-100-disk-0.raw,if=none,id=drive-scsi0",
        ];
        assert!(runs(Runner::Qemu, &argv, &who(&["db-primary"], &[])));
        assert!(runs(Runner::Qemu, &argv, &who(&["x", "100"], &[])));
        let disk = "/var/lib/vz/images/100/vm-100-disk-0.raw";
        assert!(runs(Runner::Qemu, &argv, &who(&["x"], &[disk])));
        assert!(!runs(Runner::Qemu, &argv, &who(&["db"], &["/other.raw"])));
        assert!(!runs(Runner::Lxc, &argv, &who(&["100"], &[])));
        let libvirt = [
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "guest=web,debug-threads=on",
        ];
        assert!(runs(Runner::Qemu, &libvirt, &who(&["web"], &[])));
    }

    #[test]
    fn an_lxc_container_is_found_by_its_name() {
        let start = ["/usr/bin/lxc-start", "-F", "-n", "101"];
        assert!(runs(Runner::Lxc, &start, &who(&["mail", "101"], &[])));
        let long = ["lxc-start", "--name=mail"];
        assert!(runs(Runner::Lxc, &long, &who(&["mail"], &[])));
        let monitor = ["[lxc monitor] /var/lib/lxc 101"];
        let split: Vec<&str> = monitor[0].split(' ').collect();
        assert!(
            !runs(Runner::Lxc, &split, &who(&["101"], &[])),
            "argv[0] alone"
        );
        let monitor = ["[lxc monitor]", "/var/lib/lxc", "101"];
        assert!(runs(Runner::Lxc, &monitor, &who(&["101"], &[])));
        assert!(!runs(Runner::Lxc, &start, &who(&["mail"], &[])));
        assert!(!runs(Runner::Qemu, &start, &who(&["101"], &[])));
    }

    #[test]
    fn nothing_runs_in_an_empty_proc_and_stead_s_own_processes_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let proc = Proc::at(dir.path());
        let w = who(&["web"], &[]);
        assert_eq!(find(&proc, Runner::Qemu, &w, Path::new("/x")), None);
        std::fs::create_dir_all(dir.path().join("42")).unwrap();
        std::fs::write(
            dir.path().join("42/cmdline"),
            "qemu-system-x86_64\0-name\0web\0-pidfile\0/srv/stead-rundir/vm/web/pid\0",
        )
        .unwrap();
        let found = find(&proc, Runner::Qemu, &w, Path::new("/x")).unwrap();
        assert_eq!(found.pid, 42);
        assert!(found.command.starts_with("qemu-system-x86_64 -name web"));
        assert_eq!(
            find(&proc, Runner::Qemu, &w, Path::new("/srv/stead-rundir")),
            None
        );
    }
}

//! Live migration of a QEMU VM between two lab nodes: each QEMU runs as the unprivileged
//! `stead-qemu` user in its node's network namespace, the disk sits in one directory both
//! open (a shared pool), and the migration stream crosses the lab bridge to the address the
//! target's node picked. A killed target leaves the guest running on the source; a
//! completed migration leaves the same boot running on the target, with its agent, and no
//! QEMU on the source. Both QEMUs run the driver's command line (`argv` of a `QemuConfig`),
//! not one written here.
//!
//! The second test has no shared pool: each node has its own copy of the disk (the target's
//! a stale replica), and the migration copies the disk over NBD while the guest runs
//! (`stead_drivers::vm::qemu::mirror`).

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stead_drivers::vm::qemu::accel::Accel;
use stead_drivers::vm::qemu::argv::argv;
use stead_drivers::vm::qemu::config::{
    DiskFormat, FirmwareRun, Machine, QemuConfig, QemuDisk, Sockets,
};
use stead_drivers::vm::qemu::migrate::{
    MigrateError, MigrateOptions, MigrationStatus, listen_incoming, migrate_out, migrate_out_disks,
    resume_incoming, wait_incoming,
};
use stead_drivers::vm::qemu::mirror::{self, NbdTarget};
use stead_drivers::vm::qemu::qga::Qga;
use stead_drivers::vm::qemu::qmp::{Qmp, Quit, RunState};
use stead_e2e::cluster::ClusterLab;
use stead_e2e::{GuestDisk, is_root, skip_unless};
use stead_host::process::Proc;
use stead_schema::{DiskBus, DiskCache, RestartPolicy, VmAccel};

/// The unprivileged user QEMU runs as.
const QEMU_USER: &str = "stead-qemu";

/// Whether `cmd --version`-like probing of a program works.
fn runs(prog: &str, args: &[&str]) -> bool {
    Command::new(prog)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One VM's files on a node: QMP, agent socket and serial log in a dir of its own.
struct Side {
    dir: PathBuf,
}

impl Side {
    fn new(shared: &Path, name: &str) -> Side {
        let dir = shared.join(name);
        std::fs::create_dir(&dir).expect("side dir");
        chown_qemu(&dir);
        Side { dir }
    }

    fn qmp_sock(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    fn qga_sock(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }

    fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// The VM's configuration as the driver resolves it (the same machine and devices on
    /// every node, only the sockets differ); `incoming` waits for a migration.
    fn config(&self, disk: &Path, incoming: bool) -> QemuConfig {
        QemuConfig {
            engine: "qemu".into(),
            name: "livemig".into(),
            binary: "qemu-system-x86_64".into(),
            cpus: 1,
            memory: 512 << 20,
            requested_accel: VmAccel::Tcg,
            accel: Accel::Tcg,
            accel_warning: None,
            run_as: None,
            user_warning: None,
            incoming,
            machine: Machine::Pc,
            firmware: FirmwareRun::Bios,
            disks: vec![QemuDisk {
                id: "disk0".into(),
                volume: "root".into(),
                path: disk.to_path_buf(),
                format: DiskFormat::Qcow2,
                bus: DiskBus::Virtio,
                cache: DiskCache::None,
                discard: false,
                read_only: false,
                boot: Some(1),
            }],
            cdroms: vec![],
            nics: vec![],
            agent: true,
            cloud_init: None,
            sockets: Sockets {
                qmp: self.qmp_sock(),
                qga: self.qga_sock(),
                vnc: self.dir.join("vnc.sock"),
            },
            sandbox: true,
            restart_policy: RestartPolicy::Never,
            running: true,
            cgroup_parent: String::new(),
            netns: None,
            shutdown_timeout_secs: 5,
            fence_file: None,
        }
    }
}

fn chown_qemu(p: &Path) {
    let ok = Command::new("chown")
        .arg(format!("{QEMU_USER}:{QEMU_USER}"))
        .arg(p)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "chown {}", p.display());
}

/// Starts QEMU as `stead-qemu` in node `i`'s namespace with the driver's command line
/// ([`argv`]); its index in the lab's processes. The serial port and the supervisor's QMP
/// channel are the descriptors the driver's supervisor would pass (3 and 4): here stream
/// sockets whose other ends the test keeps, the serial one copied to `serial.log`.
fn start_qemu(
    lab: &mut ClusterLab,
    i: usize,
    side: &Side,
    disk: &Path,
    incoming: bool,
    keep: &mut Vec<UnixStream>,
) -> usize {
    let (serial, serial_child) = UnixStream::pair().expect("serial socket pair");
    let (monitor, monitor_child) = UnixStream::pair().expect("monitor socket pair");
    let log = side.serial();
    let mut reader = serial;
    std::thread::spawn(move || {
        if let Ok(mut f) = std::fs::File::create(&log) {
            let _ = std::io::copy(&mut reader, &mut f);
        }
    });
    keep.push(monitor);
    let mut cmd = lab.in_netns(i, Path::new("sh"));
    // Descriptors 0 and 1 become 3 (serial) and 4 (monitor), then /dev/null.
    cmd.args([
        "-c",
        "exec 3<&0 4<&1 </dev/null >/dev/null; exec \"$@\"",
        "sh",
        "setpriv",
        &format!("--reuid={QEMU_USER}"),
        &format!("--regid={QEMU_USER}"),
        "--clear-groups",
        "--",
    ]);
    cmd.args(argv(&side.config(disk, incoming)));
    cmd.stdin(Stdio::from(OwnedFd::from(serial_child)))
        .stdout(Stdio::from(OwnedFd::from(monitor_child)));
    let name = &lab.nodes[i].name;
    lab.spawn(i, &format!("qemu on {name}"), cmd)
}

/// The guest's boot id, read by its agent.
fn boot_id(qga: &mut Qga) -> String {
    let out = qga
        .exec(
            "/usr/bin/systemd-id128",
            &["boot-id"],
            None,
            Duration::from_secs(60),
        )
        .expect("systemd-id128 boot-id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// [`boot_id`] of the guest on a target, whose serial log is shown when its agent fails.
fn boot_id_on(qga: &mut Qga, serial: &Path) -> String {
    match qga.exec(
        "/usr/bin/systemd-id128",
        &["boot-id"],
        None,
        Duration::from_secs(60),
    ) {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Err(e) => panic!(
            "systemd-id128 boot-id: {e}; serial log ends with:\n{}",
            tail(serial)
        ),
    }
}

/// The guest kernel's taint mask (it changes on an oops, a BUG or a WARN).
fn tainted(qga: &mut Qga) -> String {
    let t = qga
        .read_file("/proc/sys/kernel/tainted", 64)
        .expect("read /proc/sys/kernel/tainted");
    String::from_utf8_lossy(&t).trim().to_string()
}

/// After a move: the guest on the target keeps running sound for `watch` (a corrupted
/// guest memory showed as a kernel BUG some 10 s after the switch-over): its agent keeps
/// answering with the same boot, its kernel taint stays `taint_before` and its serial log
/// shows no oops.
fn stays_sound(qga: &mut Qga, serial: &Path, before: &str, taint_before: &str, watch: Duration) {
    let until = Instant::now() + watch;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            boot_id_on(qga, serial),
            before,
            "the same boot keeps running"
        );
    }
    let log = String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default()).into_owned();
    for bad in [
        "Kernel panic",
        "BUG:",
        "Oops",
        "list_del corruption",
        "general protection",
    ] {
        assert!(
            !log.contains(bad),
            "the guest's serial log on the target shows {bad:?}:\n{}",
            tail(serial)
        );
    }
    assert_eq!(tainted(qga), taint_before, "the guest kernel got tainted");
}

fn tail(p: &Path) -> String {
    let data = std::fs::read(p).unwrap_or_default();
    String::from_utf8_lossy(&data[data.len().saturating_sub(3000)..]).into_owned()
}

fn qmp(side: &Side) -> Qmp {
    Qmp::connect_retry(&side.qmp_sock(), Duration::from_secs(20)).expect("QMP")
}

fn pid_alive(pid: i32) -> bool {
    Proc::host().exists(pid)
}

/// The guest disk both lab tests move, readable by `stead-qemu`; `None` (after a SKIP line)
/// when the host lacks root, that user, `setpriv`, `nsenter` or the guest image.
fn lab_guest_disk(test: &str) -> Option<GuestDisk> {
    if skip_unless(is_root(), test, "needs root for network namespaces")
        || skip_unless(runs("id", &[QEMU_USER]), test, "no user stead-qemu")
        || skip_unless(runs("setpriv", &["--version"]), test, "setpriv missing")
        || skip_unless(runs("nsenter", &["--version"]), test, "nsenter missing")
    {
        return None;
    }
    let disk = GuestDisk::for_test(test)?;
    std::fs::set_permissions(disk.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    chown_qemu(disk.path());
    Some(disk)
}

/// The guest agent on n2 after a move (its serial log in the panic when it does not answer
/// within 120 s), having checked the guest runs the boot `before` it ran on n1.
fn same_boot_on_n2(side: &Side, qd: &mut Qmp, before: &str) -> Qga {
    let mut agent = Qga::connect(&side.qga_sock(), Duration::from_secs(120)).unwrap_or_else(|e| {
        panic!(
            "agent on n2: {e}; n2 QEMU {:?}; serial on n2 ends with:\n{}",
            qd.query_status(),
            tail(&side.serial())
        )
    });
    agent.set_timeout(Duration::from_secs(30));
    assert_eq!(
        boot_id_on(&mut agent, &side.serial()),
        before,
        "the same boot runs on n2"
    );
    agent
}

#[test]
fn qemu_vm_live_migrates_between_lab_nodes_and_a_killed_target_leaves_it_on_the_source() {
    let test = "qemu_vm_live_migrates_between_lab_nodes";
    let Some(disk) = lab_guest_disk(test) else {
        return;
    };
    let mut lab = ClusterLab::network(2);
    let (src, dst1, dst2) = (
        Side::new(disk.dir(), "n1"),
        Side::new(disk.dir(), "n2-killed"),
        Side::new(disk.dir(), "n2"),
    );
    let target_ip = lab.nodes[1].ip.to_string();

    let mut keep = Vec::new();
    let p_src = start_qemu(&mut lab, 0, &src, disk.path(), false, &mut keep);
    let mut qs = qmp(&src);
    let booted = Instant::now();
    let mut agent = Qga::connect(&src.qga_sock(), Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}; serial log ends with:\n{}", tail(&src.serial())));
    agent.set_timeout(Duration::from_secs(30));
    println!("{test}: agent on n1 answered after {:?}", booted.elapsed());
    let before = boot_id(&mut agent);
    assert_eq!(before.len(), 32, "{before:?}");
    let taint_before = tainted(&mut agent);
    drop(agent);

    // A migration whose target dies half-way: the guest stays on n1 and keeps running.
    let p_dst1 = start_qemu(&mut lab, 1, &dst1, disk.path(), true, &mut keep);
    let uri = listen_incoming(&mut qmp(&dst1), &target_ip, 0).expect("listen on n2");
    assert!(uri.starts_with(&format!("tcp:{target_ip}:")), "{uri}");
    let slow = MigrateOptions {
        max_bandwidth: 16 << 20,
        ..MigrateOptions::default()
    };
    let mut killed = false;
    let e = migrate_out(&mut qs, &uri, &slow, |p| {
        if !killed && p.status == MigrationStatus::Active && p.ram_percent() >= 10 {
            lab.kill_proc(p_dst1);
            killed = true;
        }
    })
    .expect_err("the target was killed");
    assert!(
        killed,
        "the migration ended before the target could be killed: {e}"
    );
    assert!(matches!(e, MigrateError::Failed(_)), "{e}");
    assert_eq!(qs.query_status().expect("status").status, RunState::Running);
    let mut agent = Qga::connect(&src.qga_sock(), Duration::from_secs(30)).expect("agent on n1");
    agent.set_timeout(Duration::from_secs(30));
    assert_eq!(boot_id(&mut agent), before, "still the same boot on n1");
    drop(agent);
    println!("{test}: killed target: {e}; the guest runs on n1");

    // The real one, over the lab bridge.
    let p_dst2 = start_qemu(&mut lab, 1, &dst2, disk.path(), true, &mut keep);
    let mut qd = qmp(&dst2);
    let uri = listen_incoming(&mut qd, &target_ip, 0).expect("listen on n2");
    let started = Instant::now();
    let mut lines = Vec::new();
    let done = migrate_out(&mut qs, &uri, &MigrateOptions::default(), |p| {
        lines.push(format!(
            "{:>5.1}s  {:?} RAM {}% ({} MiB sent, {} MiB left)",
            p.elapsed.as_secs_f64(),
            p.status,
            p.ram_percent(),
            p.transferred >> 20,
            p.remaining >> 20
        ))
    })
    .expect("migrate n1 -> n2");
    wait_incoming(&mut qd, Duration::from_secs(30)).expect("the guest arrived on n2");
    // The driver starts a target with -S: it runs the guest only when told to.
    assert_eq!(qd.query_status().expect("status").status, RunState::Paused);
    resume_incoming(&mut qd).expect("n2 runs the guest");
    let wall = started.elapsed();
    assert_eq!(
        qs.query_status().expect("status").status,
        RunState::Postmigrate,
        "n1 no longer runs the guest"
    );
    qs.execute(&Quit).expect("quit on n1");
    let src_pid = lab.procs[p_src].pid();
    let quit_at = Instant::now();
    let exited = loop {
        // A QEMU that quit stays a zombie until the lab reaps it.
        let stat = Proc::host().read(src_pid, "stat").unwrap_or_default();
        if !pid_alive(src_pid) || stat.contains(") Z") {
            break true;
        }
        if quit_at.elapsed() > Duration::from_secs(10) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    lab.kill_proc(p_src);
    assert!(exited, "the QEMU on n1 did not exit on quit");
    assert!(!pid_alive(src_pid), "the QEMU on n1 is gone");

    for l in &lines {
        println!("{test}: {l}");
    }
    println!(
        "{test}: n1 -> n2 over the lab bridge: total {} ms (QEMU), {:?} until n2 ran it, \
         downtime {} ms, {} MiB sent",
        done.total_time_ms,
        wall,
        done.downtime_ms,
        done.transferred >> 20
    );
    let mut agent = same_boot_on_n2(&dst2, &mut qd, &before);
    stays_sound(
        &mut agent,
        &dst2.serial(),
        &before,
        &taint_before,
        Duration::from_secs(15),
    );
    lab.kill_proc(p_dst2);
}

/// The NBD port of the disk copy in n2's namespace (a namespace of its own: nothing else
/// listens there; QEMU's migration port is an ephemeral one).
const NBD_PORT: u16 = 10809;

/// 64 KiB the guest cannot have by chance: a counter mixed with the boot id.
fn marker_bytes(seed: &str) -> Vec<u8> {
    let mut x: u64 = seed.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (0..64 << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Whether `file` holds the first 4 KiB of `marker` at a sector-aligned offset (where a
/// guest file's first block lands in a qcow2 image: clusters and ext4 blocks are aligned).
fn file_holds(file: &Path, marker: &[u8]) -> bool {
    use std::io::Read;
    let head = &marker[..4096];
    let mut f = std::fs::File::open(file).expect("open disk file");
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).expect("read disk file");
        if n == 0 {
            return false;
        }
        // Reads of a regular file fill the buffer but for the last one.
        let found = buf[..n]
            .chunks(512)
            .enumerate()
            .any(|(i, c)| c == &head[..512] && buf[i * 512..n].starts_with(head));
        if found {
            return true;
        }
    }
}

#[test]
fn qemu_vm_with_a_disk_on_each_node_live_migrates_with_its_disk_copied() {
    let test = "qemu_vm_with_a_disk_on_each_node_live_migrates";
    let Some(disk) = lab_guest_disk(test) else {
        return;
    };
    let mut lab = ClusterLab::network(2);
    let (src, dst) = (Side::new(disk.dir(), "n1"), Side::new(disk.dir(), "n2"));
    // n2's copy of the volume: the replica as it was before the guest booted.
    let replica = dst.dir.join("root.qcow2");
    std::fs::copy(disk.path(), &replica).expect("copy the replica");
    chown_qemu(&replica);
    let target_ip = lab.nodes[1].ip.to_string();

    let mut keep = Vec::new();
    let _p_src = start_qemu(&mut lab, 0, &src, disk.path(), false, &mut keep);
    let mut qs = qmp(&src);
    let mut agent = Qga::connect(&src.qga_sock(), Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}; serial log ends with:\n{}", tail(&src.serial())));
    agent.set_timeout(Duration::from_secs(30));
    let before = boot_id(&mut agent);
    assert_eq!(before.len(), 32, "{before:?}");
    let marker = marker_bytes(&before);
    let taint_before = tainted(&mut agent);
    agent
        .write_file("/var/tmp/livedisk-marker", &marker)
        .expect("write the marker");
    agent
        .exec("/usr/bin/sync", &[], None, Duration::from_secs(60))
        .expect("sync");
    drop(agent);
    assert!(!file_holds(&replica, &marker), "the replica is stale");

    let p_dst = start_qemu(&mut lab, 1, &dst, &replica, true, &mut keep);
    let mut qd = qmp(&dst);
    let uri = listen_incoming(&mut qd, &target_ip, 0).expect("listen on n2");
    let target = NbdTarget {
        host: target_ip.clone(),
        port: NBD_PORT,
    };
    let nodes = vec!["disk0".to_string()];
    mirror::export_disks(&mut qd, &target, &nodes).expect("export the disk on n2");
    let started = Instant::now();
    let mut lines = Vec::new();
    let mut disk_done = None;
    let done = migrate_out_disks(
        &mut qs,
        &uri,
        &target,
        &nodes,
        &MigrateOptions::default(),
        |p| {
            let line = match p.disk {
                Some(d) => {
                    if d.all_ready() {
                        disk_done = Some((p.elapsed, d.total));
                    }
                    format!(
                        "disk {}% ({} of {} MiB)",
                        d.percent(),
                        d.copied >> 20,
                        d.total >> 20
                    )
                }
                None => format!(
                    "{:?} RAM {}% ({} MiB sent, {} MiB left)",
                    p.status,
                    p.ram_percent(),
                    p.transferred >> 20,
                    p.remaining >> 20
                ),
            };
            lines.push(format!("{:>5.1}s  {line}", p.elapsed.as_secs_f64()));
            true
        },
    )
    .expect("migrate n1 -> n2 with the disk");
    wait_incoming(&mut qd, Duration::from_secs(30)).expect("the guest arrived on n2");
    // Paused (-S) while n2's export still holds the disk writable; the export goes, then
    // the guest runs.
    assert_eq!(qd.query_status().expect("status").status, RunState::Paused);
    resume_incoming(&mut qd).expect("n2 runs the guest");
    let wall = started.elapsed();
    assert_eq!(
        qs.query_status().expect("status").status,
        RunState::Postmigrate,
        "n1 no longer runs the guest"
    );
    qs.execute(&Quit).expect("quit on n1");
    for l in &lines {
        println!("{test}: {l}");
    }
    let (disk_at, disk_bytes) = disk_done.expect("the disk copy reported ready");
    println!(
        "{test}: n1 -> n2, disk {} MiB in {:.1} s ({:.1} MiB/s), total {:?} until n2 ran it, \
         RAM {} ms, downtime {} ms, {} MiB RAM sent",
        disk_bytes >> 20,
        disk_at.as_secs_f64(),
        (disk_bytes >> 20) as f64 / disk_at.as_secs_f64().max(0.001),
        wall,
        done.total_time_ms,
        done.downtime_ms,
        done.transferred >> 20
    );

    let mut agent = same_boot_on_n2(&dst, &mut qd, &before);
    assert_eq!(
        agent
            .read_file("/var/tmp/livedisk-marker", 1 << 20)
            .expect("read the marker on n2"),
        marker
    );
    stays_sound(
        &mut agent,
        &dst.serial(),
        &before,
        &taint_before,
        Duration::from_secs(15),
    );
    drop(agent);
    // The guest goes down on n2: its disk there (n2's own file) holds the marker.
    qd.powerdown_then_quit(Duration::from_secs(120))
        .expect("shut the guest down on n2");
    lab.kill_proc(p_dst);
    assert!(
        file_holds(&replica, &marker),
        "n2's disk file holds the marker written on n1"
    );
}

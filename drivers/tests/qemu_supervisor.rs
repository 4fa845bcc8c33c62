//! The QEMU supervisor (`stead qemu`) with a real `qemu-system-x86_64` under TCG and no
//! guest image (SeaBIOS finds nothing to boot and idles): start, QMP status, restart after
//! a kill per the restart policy, the graceful stop falling back to `quit` when the guest
//! ignores the ACPI button, cgroup placement, and nothing left behind.
//!
//! `harness = false`: `main` first checks whether it was started as
//! `<this-binary> qemu ...` (the supervisor launcher re-executes this binary) and then
//! runs `stead_drivers::vm::qemu::supervisor::main` in a fresh single-threaded process,
//! exactly as `stead qemu` does.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "container_util/mod.rs"]
mod container_util;

use container_util::{new_netns_on, nsenter, resource};
use serde_json::json;
use stead_reconciler::driver::{Driver, Health, HostEnv, Impact};
use stead_schema::{Kind, Resource, ResourceId};

use stead_drivers::supervise::SupervisorArgs;
use stead_drivers::vm::config::{Paths, Phase, cgroup_name};
use stead_drivers::vm::qemu::accel::Accel;
use stead_drivers::vm::qemu::config::{
    DiskFormat, FirmwareRun, Machine, QemuConfig, QemuDisk, Sockets,
};
use stead_drivers::vm::qemu::qmp::{Qmp, RunState};
use stead_drivers::vm::qemu::runas;
use stead_drivers::vm::qemu::supervisor::{self, QemuState};
use stead_host::cgroup::Hierarchy;
use stead_schema::RestartPolicy;

fn run_as_supervisor_if_asked(args: &[String]) {
    if args.get(1).map(String::as_str) == Some("qemu") {
        let code = match SupervisorArgs::parse(args[2..].iter().cloned()) {
            Ok(a) => supervisor::main(&a),
            Err(e) => {
                eprintln!("qemu: {e}");
                2
            }
        };
        std::process::exit(code);
    }
}

/// One VM's sandbox: temp run dir, own cgroup parent; kills and removes everything on
/// drop, even after a failed assertion.
struct Rig {
    dir: tempfile::TempDir,
    name: String,
    parent: String,
}

impl Rig {
    fn new(tag: &str) -> Self {
        Rig {
            dir: tempfile::tempdir().expect("tempdir"),
            name: format!("q{tag}{}", std::process::id()),
            parent: format!("stead-qtest-{}", std::process::id()),
        }
    }

    fn paths(&self) -> Paths {
        Paths::new(self.dir.path(), &self.name)
    }

    fn config(&self, policy: RestartPolicy) -> QemuConfig {
        let p = self.paths();
        QemuConfig {
            engine: "qemu".into(),
            name: self.name.clone(),
            binary: "qemu-system-x86_64".into(),
            cpus: 1,
            memory: 64 << 20,
            requested_accel: stead_schema::VmAccel::Auto,
            accel: Accel::Tcg,
            accel_warning: None,
            run_as: None,
            user_warning: None,
            incoming: false,
            machine: Machine::Pc,
            firmware: FirmwareRun::Bios,
            disks: vec![],
            cdroms: vec![],
            nics: vec![],
            agent: false,
            cloud_init: None,
            sockets: Sockets {
                qmp: p.qmp_socket(),
                qga: p.qga_socket(),
                vnc: p.vnc_socket(),
            },
            sandbox: true,
            restart_policy: policy,
            running: true,
            cgroup_parent: self.parent.clone(),
            netns: None,
            shutdown_timeout_secs: 1,
            fence_file: None,
        }
    }

    /// Writes `cfg` and launches its supervisor (this binary as `qemu`).
    fn launch(&self, cfg: &QemuConfig) -> Result<(), String> {
        let p = self.paths();
        std::fs::create_dir_all(&p.dir).expect("run dir");
        std::fs::write(p.config(), serde_json::to_vec(cfg).expect("json")).expect("config");
        let args = SupervisorArgs {
            run_dir: self.dir.path().to_path_buf(),
            name: self.name.clone(),
            config: p.config(),
        };
        let exe = std::env::current_exe().expect("current_exe");
        stead_drivers::supervise::launch(&exe, "qemu", &args).map_err(|e| e.to_string())
    }

    fn state(&self) -> QemuState {
        let text = std::fs::read_to_string(self.paths().supervisor_state()).expect("state");
        serde_json::from_str(&text).expect("parse state")
    }

    fn cgroup_pids(&self) -> Vec<i32> {
        let h = Hierarchy::detect().expect("cgroups");
        h.cgroup(&self.parent, &cgroup_name(&self.name)).pids()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.paths().vmm_log()).unwrap_or_default()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Ok(text) = std::fs::read_to_string(self.paths().supervisor_state())
            && let Ok(st) = serde_json::from_str::<QemuState>(&text)
        {
            for pid in [Some(st.supervisor_pid), st.qemu_pid].into_iter().flatten() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if let Ok(h) = Hierarchy::detect() {
            let cg = h.cgroup(&self.parent, &cgroup_name(&self.name));
            let _ = cg.kill_all();
            let _ = cg.destroy();
            let _ = h.remove_parent(&self.parent);
        }
        reap();
    }
}

/// Reaps re-parented supervisors (this process is their subreaper).
fn reap() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    while let Ok(st) = waitpid(None::<nix::unistd::Pid>, Some(WaitPidFlag::WNOHANG)) {
        if st == WaitStatus::StillAlive {
            break;
        }
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        reap();
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// A guestless QEMU with a fence deadline 3 s ahead, never renewed: killed within 0.5 s of
/// the deadline, `fenced`, not restarted; a launch while the file says `0` is refused.
fn fence_deadline_kills_qemu() {
    let rig = Rig::new("f");
    let file = rig.dir.path().join("fence-deadline");
    let deadline = stead_host::fence::boottime_now() + Duration::from_secs(3);
    std::fs::write(&file, stead_host::fence::deadline_content(deadline)).expect("deadline");
    let mut cfg = rig.config(RestartPolicy::Always);
    cfg.fence_file = Some(file.clone());
    rig.launch(&cfg).expect("launch");
    let st = rig.state();
    assert_eq!(st.phase, Phase::Running);
    let qemu = st.qemu_pid.expect("qemu pid");
    let t = Instant::now();
    while alive(qemu) {
        assert!(t.elapsed() < Duration::from_secs(6), "QEMU still runs");
        std::thread::sleep(Duration::from_millis(5));
    }
    let gone = stead_host::fence::boottime_now();
    assert!(gone >= deadline, "killed before the deadline");
    let late = gone - deadline;
    println!(
        "fence: QEMU gone {} ms after the deadline",
        late.as_millis()
    );
    assert!(late <= Duration::from_millis(500), "{late:?}");
    wait_until("supervisor exit", Duration::from_secs(5), || {
        !rig.paths().lock().exists() || !alive(rig.state().supervisor_pid)
    });
    let st = rig.state();
    assert_eq!(st.phase, Phase::Fenced, "{}", rig.log());
    assert_eq!(st.restarts, 0);
    assert!(st.qemu_pid.is_none());
    assert!(rig.cgroup_pids().is_empty(), "nothing left in the cgroup");
    // Fenced now: the supervisor refuses to start it.
    std::fs::write(&file, stead_host::fence::FENCED).expect("fenced");
    let err = rig.launch(&cfg).expect_err("refused while fenced");
    assert!(err.contains("fenced"), "{err}");
}

/// With an unprivileged user configured, QEMU runs with that uid (and the `kvm` group),
/// owns its socket directory (0700) and opens a disk it was handed: the QMP socket answers
/// and the disk's node is open. SKIPs when the host has no `stead-qemu` user
/// (scripts/install-deps.sh creates it).
fn qemu_runs_as_the_unprivileged_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let name = "qemu_runs_as_the_unprivileged_user";
    let Some(creds) = runas::lookup(runas::DEFAULT_USER) else {
        println!("SKIP {name}: no user {} on this host", runas::DEFAULT_USER);
        return;
    };
    let rig = Rig::new("u");
    // Temp dirs are root's 0700: open the way down to the VM's files.
    std::fs::set_permissions(rig.dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod");
    let disk = rig.dir.path().join("disk0.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut cfg = rig.config(RestartPolicy::Never);
    cfg.disks = vec![QemuDisk {
        id: "disk0".into(),
        volume: "d0".into(),
        path: disk.clone(),
        format: DiskFormat::Raw,
        bus: stead_schema::DiskBus::Virtio,
        cache: stead_schema::DiskCache::default(),
        discard: false,
        read_only: false,
        boot: None,
    }];
    let files = [disk.clone(), rig.paths().qemu_dir()];
    let decided = runas::decide(
        &runas::Setting::User(runas::DEFAULT_USER.into()),
        runas::lookup,
        runas::blocker,
        &files,
    )
    .expect("the user reaches the VM's files");
    assert_eq!(decided.run_as.as_ref(), Some(&creds));
    cfg.run_as = decided.run_as;
    rig.launch(&cfg).expect("launch");
    let st = rig.state();
    assert_eq!(st.phase, Phase::Running, "{}", rig.log());
    let qemu = st.qemu_pid.expect("qemu pid");
    let status = stead_host::process::Proc::host()
        .read(qemu, "status")
        .expect("status");
    let field = |key: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        field("Uid:"),
        vec![creds.uid; 4],
        "real, effective, saved, fs uid"
    );
    assert_eq!(field("Gid:"), vec![creds.gid; 4]);
    assert_eq!(field("Groups:"), creds.groups);
    let dir = std::fs::metadata(rig.paths().qemu_dir()).expect("socket dir");
    assert_eq!((dir.uid(), dir.mode() & 0o777), (creds.uid, 0o700));
    assert_eq!(std::fs::metadata(&disk).expect("disk").uid(), creds.uid);
    let mut q = Qmp::connect(&cfg.sockets.qmp, Duration::from_secs(5)).expect("qmp");
    assert_eq!(q.query_status().expect("status").status, RunState::Running);
    let nodes = q
        .execute_raw("query-named-block-nodes", serde_json::json!({}))
        .expect("block nodes");
    assert!(
        nodes.to_string().contains("disk0.raw"),
        "the disk is open: {nodes}"
    );
    drop(q);
    println!(
        "{name}: QEMU pid {qemu} runs as {} (uid {}, groups {:?})",
        creds.user, creds.uid, creds.groups
    );
}

fn start_status_restart_and_graceful_stop() {
    let rig = Rig::new("a");
    let cfg = rig.config(RestartPolicy::Always);
    let t = Instant::now();
    rig.launch(&cfg).expect("launch");
    eprintln!("  started in {:?}", t.elapsed());
    let st = rig.state();
    assert_eq!(st.phase, Phase::Running);
    assert_eq!(st.accel, Accel::Tcg);
    let qemu = st.qemu_pid.expect("qemu pid");
    assert!(rig.paths().lock().exists());

    // The public QMP socket answers; the guest runs.
    let mut q = Qmp::connect(&cfg.sockets.qmp, Duration::from_secs(5)).expect("qmp");
    assert_eq!(q.query_status().expect("status").status, RunState::Running);
    drop(q);

    // Supervisor and QEMU sit in the VM's cgroup.
    let pids = rig.cgroup_pids();
    assert!(pids.contains(&qemu), "qemu {qemu} not in {pids:?}");
    assert!(pids.contains(&st.supervisor_pid), "{pids:?}");

    // Killed QEMU: restarted (policy always), counted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill qemu");
    wait_until("a restarted QEMU", Duration::from_secs(20), || {
        let s = rig.state();
        s.phase == Phase::Running && s.qemu_pid.is_some_and(|p| p != qemu)
    });
    let st = rig.state();
    assert_eq!(st.restarts, 1);
    assert_eq!(st.last_exit.as_deref(), Some("signal 9"));
    let qemu2 = st.qemu_pid.expect("new pid");
    let mut q = Qmp::connect(&cfg.sockets.qmp, Duration::from_secs(5)).expect("qmp");
    assert_eq!(q.query_status().expect("status").status, RunState::Running);
    drop(q);

    // Graceful stop: SeaBIOS ignores the ACPI button, so after the 1 s shutdown timeout
    // the supervisor quits QEMU.
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(st.supervisor_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("sigterm");
    wait_until("the supervisor to stop", Duration::from_secs(15), || {
        !rig.paths().instance().lock_held()
    });
    let took = t.elapsed();
    eprintln!("  stopped in {took:?}");
    assert!(took >= Duration::from_secs(1), "waited for ACPI: {took:?}");
    assert!(took < Duration::from_secs(6), "quit, not SIGKILL: {took:?}");
    let st = rig.state();
    assert_eq!(st.phase, Phase::Stopped);
    assert_eq!(
        st.last_exit.as_deref(),
        Some("shutdown"),
        "QEMU quit cleanly"
    );
    let log = rig.log();
    assert!(
        log.contains("ACPI power button") && log.contains("quit"),
        "{log}"
    );
    assert!(!log.contains("SIGKILL"), "{log}");
    wait_until("QEMU gone", Duration::from_secs(5), || !alive(qemu2));
    assert!(rig.cgroup_pids().is_empty(), "{:?}", rig.cgroup_pids());
}

/// Two supervised QEMUs from the same config, the second started as a migration target:
/// it waits in `inmigrate`, the first migrates its (guestless) VM to it; the source's stop
/// then quits at once (no ACPI wait: its guest lives elsewhere), and the target, killed, is
/// not restarted (policy `always`: a fresh boot there would be a second copy of the guest).
fn live_migration_between_two_supervised_qemus() {
    use stead_drivers::vm::qemu::migrate::{
        MigrateOptions, listen_incoming, migrate_out, wait_incoming,
    };
    let (src, dst) = (Rig::new("ms"), Rig::new("md"));
    let mut scfg = src.config(RestartPolicy::Always);
    scfg.shutdown_timeout_secs = 10;
    src.launch(&scfg).expect("launch the source");
    let mut dcfg = dst.config(RestartPolicy::Always);
    dcfg.incoming = true;
    dst.launch(&dcfg).expect("launch the target");
    assert_eq!(dst.state().phase, Phase::Running);
    let mut qd = Qmp::connect(&dcfg.sockets.qmp, Duration::from_secs(5)).expect("qmp target");
    assert_eq!(
        qd.query_status().expect("status").status,
        RunState::Inmigrate
    );
    let uri = listen_incoming(&mut qd, "127.0.0.1", 0).expect("listen");
    let mut qs = Qmp::connect(&scfg.sockets.qmp, Duration::from_secs(5)).expect("qmp source");
    let done = migrate_out(&mut qs, &uri, &MigrateOptions::default(), |_| {}).expect("migrate");
    wait_incoming(&mut qd, Duration::from_secs(10)).expect("the target runs");
    eprintln!(
        "  migrated in {} ms, downtime {} ms",
        done.total_time_ms, done.downtime_ms
    );
    assert_eq!(
        qs.query_status().expect("status").status,
        RunState::Postmigrate
    );
    drop((qs, qd));

    let t = Instant::now();
    let sst = src.state();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sst.supervisor_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("sigterm");
    wait_until(
        "the source supervisor to stop",
        Duration::from_secs(8),
        || !src.paths().instance().lock_held(),
    );
    let took = t.elapsed();
    eprintln!("  source stopped in {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "quit without the 10 s ACPI wait: {took:?}"
    );
    assert!(src.log().contains("migrated away"), "{}", src.log());
    assert_eq!(src.state().phase, Phase::Stopped);

    let qemu = dst.state().qemu_pid.expect("target qemu");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the target qemu");
    wait_until(
        "the target supervisor to end",
        Duration::from_secs(10),
        || !dst.paths().instance().lock_held(),
    );
    let st = dst.state();
    assert_eq!((st.phase, st.restarts), (Phase::Exited, 0), "{}", dst.log());
}

fn never_policy_and_bad_start() {
    let rig = Rig::new("b");
    let cfg = rig.config(RestartPolicy::Never);
    rig.launch(&cfg).expect("launch");
    let st = rig.state();
    let qemu = st.qemu_pid.expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    wait_until("the supervisor to give up", Duration::from_secs(10), || {
        !rig.paths().instance().lock_held()
    });
    assert_eq!(rig.state().phase, Phase::Exited);
    assert_eq!(rig.state().restarts, 0);

    // A QEMU that cannot start: the launcher fails with QEMU's own words, nothing runs.
    let rig = Rig::new("c");
    let mut cfg = rig.config(RestartPolicy::Always);
    cfg.firmware = FirmwareRun::Uefi {
        code: PathBuf::from("/nonexistent/OVMF_CODE.fd"),
        vars: rig.dir.path().join("vars.fd"),
        vars_template: PathBuf::from("/nonexistent/OVMF_VARS.fd"),
        secure_boot: false,
    };
    cfg.machine = Machine::Q35;
    let e = rig.launch(&cfg).expect_err("bad firmware");
    assert!(e.contains("OVMF_CODE.fd"), "{e}");
    // The supervisor reports the failure, then releases its lock and exits.
    wait_until(
        "the failed supervisor to exit",
        Duration::from_secs(5),
        || !rig.paths().instance().lock_held(),
    );
    assert_eq!(rig.state().phase, Phase::Exited);
    assert!(rig.cgroup_pids().is_empty());
}

/// A world, a netns with bridge `lan0`, and the VM driver, for driver-level tests.
struct DriverRig {
    dir: tempfile::TempDir,
    netns: PathBuf,
    env: HostEnv,
    world: std::collections::BTreeMap<ResourceId, Resource>,
}

impl DriverRig {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let netns = dir.path().join("netns");
        new_netns_on(&netns);
        nsenter(&netns, &["ip", "link", "add", "lan0", "type", "bridge"]);
        nsenter(&netns, &["ip", "link", "set", "lan0", "up"]);
        let env = HostEnv {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            cgroup_parent: format!("stead-qdrv-{}", std::process::id()),
            netns: Some(netns.clone()),
            self_exe: std::env::current_exe().expect("current_exe"),
            fence_file: None,
        };
        let mut world = std::collections::BTreeMap::new();
        let pool = dir.path().join("pool");
        let mut add = |r: Resource| {
            world.insert(r.id.clone(), r);
        };
        add(resource(
            Kind::StoragePool,
            "p",
            json!({"type": "dir", "path": pool}),
        ));
        for v in ["root", "data"] {
            add(resource(
                Kind::Volume,
                v,
                json!({"pool": "p", "size": "8Mi"}),
            ));
        }
        for v in ["root", "data"] {
            let p = stead_drivers::storage::volume_path(&world, v).expect("path");
            std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
            std::fs::File::create(&p)
                .expect("disk")
                .set_len(8 << 20)
                .expect("size");
        }
        DriverRig {
            dir,
            netns,
            env,
            world,
        }
    }

    fn driver(&self) -> stead_drivers::vm::VmDriver {
        let mut d = stead_drivers::vm::VmDriver::new(&self.env).expect("driver");
        d.shutdown_timeout_secs = 1;
        d
    }

    fn vm(&self, name: &str, spec: serde_json::Value) -> Resource {
        resource(Kind::VirtualMachine, name, spec)
    }

    fn observe(
        &self,
        d: &stead_drivers::vm::VmDriver,
        r: &Resource,
    ) -> stead_reconciler::driver::Observed {
        d.observe(&[r], &self.world)
            .expect("observe")
            .remove(&r.id)
            .expect("entry")
    }

    fn apply(&self, d: &stead_drivers::vm::VmDriver, r: &Resource) {
        let o = self.observe(d, r);
        d.apply(r, &o, &self.world).expect("apply");
        let o = self.observe(d, r);
        assert_eq!(o.state, d.desired_state(r, &self.world), "converged");
        assert_eq!(o.health, Health::Ready, "{:?} {}", o.health, o.status);
    }

    fn pid(&self, d: &stead_drivers::vm::VmDriver, r: &Resource) -> i64 {
        self.observe(d, r).status["pid"].as_i64().expect("pid")
    }

    fn links(&self) -> String {
        nsenter(&self.netns, &["ip", "-o", "link", "show"])
    }
}

impl Drop for DriverRig {
    fn drop(&mut self) {
        let run = self.env.run_dir.join("vms");
        if let Ok(rd) = std::fs::read_dir(&run) {
            for e in rd.flatten() {
                if let Ok(text) = std::fs::read_to_string(e.path().join("supervisor.json"))
                    && let Ok(st) = serde_json::from_str::<QemuState>(&text)
                {
                    for pid in [Some(st.supervisor_pid), st.qemu_pid].into_iter().flatten() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                if let Ok(h) = Hierarchy::detect() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let cg = h.cgroup(&self.env.cgroup_parent, &cgroup_name(&name));
                    let _ = cg.kill_all();
                    let _ = cg.destroy();
                }
            }
        }
        if let Ok(h) = Hierarchy::detect() {
            let _ = h.remove_parent(&self.env.cgroup_parent);
        }
        let _ = nix::mount::umount2(&self.netns, nix::mount::MntFlags::MNT_DETACH);
        reap();
        let _ = self.dir.path();
    }
}

fn driver_apply_hot_plug_restart_delete() {
    let rig = DriverRig::new();
    let d = rig.driver();
    let mac1 = "52:54:00:aa:00:01";
    let mac2 = "52:54:00:aa:00:02";
    let v1 = rig.vm(
        "hp",
        json!({"accel": "tcg", "memory": "64Mi", "agent": true,
               "disks": [{"volume": "root", "cache": "writeback", "boot": 1}],
               "interfaces": [{"network": "lan0", "mac": mac1}]}),
    );
    assert!(!rig.observe(&d, &v1).exists);
    let t = Instant::now();
    rig.apply(&d, &v1);
    eprintln!("  created in {:?}", t.elapsed());
    let o = rig.observe(&d, &v1);
    assert_eq!(o.status["accel"], "tcg");
    assert_eq!(o.status["vmState"], "running");
    assert_eq!(o.status["disks"][0]["node"], "disk0");
    let pid = rig.pid(&d, &v1);
    let links = rig.links();
    let tap1 = o.status["taps"][0].as_str().expect("tap").to_string();
    assert!(links.contains(&tap1), "{links}");

    // Adding a disk and an interface: hot, plugged into the running QEMU.
    let v2 = rig.vm(
        "hp",
        json!({"accel": "tcg", "memory": "64Mi", "agent": true,
               "disks": [{"volume": "root", "cache": "writeback", "boot": 1},
                         {"volume": "data", "cache": "writeback"}],
               "interfaces": [{"network": "lan0", "mac": mac1}, {"network": "lan0", "mac": mac2}]}),
    );
    assert_eq!(d.impact("/disks/data"), Impact::Hot);
    assert_eq!(d.impact(&format!("/interfaces/{mac2}")), Impact::Hot);
    rig.apply(&d, &v2);
    assert_eq!(rig.pid(&d, &v2), pid, "hot-plugged, not restarted");
    let sock = rig.env.run_dir.join("vms/hp/qemu/qmp.sock");
    let mut q = Qmp::connect(&sock, Duration::from_secs(5)).expect("qmp");
    let blocks = q
        .execute(&stead_drivers::vm::qemu::qmp::QueryBlock)
        .expect("query-block");
    let names: Vec<String> = blocks.iter().filter_map(|b| b.qdev.clone()).collect();
    assert!(names.iter().any(|n| n.contains("disk1-dev")), "{names:?}");
    drop(q);
    let o = rig.observe(&d, &v2);
    assert_eq!(o.status["taps"].as_array().map(Vec::len), Some(2));
    let tap2 = o.status["taps"][1].as_str().expect("tap").to_string();
    assert!(rig.links().contains(&tap2));

    // A change of memory: restart.
    let v3 = rig.vm(
        "hp",
        json!({"accel": "tcg", "memory": "96Mi", "agent": true,
               "disks": [{"volume": "root", "cache": "writeback", "boot": 1},
                         {"volume": "data", "cache": "writeback"}],
               "interfaces": [{"network": "lan0", "mac": mac1}, {"network": "lan0", "mac": mac2}]}),
    );
    assert_eq!(d.impact("/memory"), Impact::Restart);
    rig.apply(&d, &v3);
    let pid3 = rig.pid(&d, &v3);
    assert_ne!(pid3, pid, "restarted");

    // Stopped, then running again.
    let mut stopped = v3.clone();
    if let stead_schema::Spec::VirtualMachine(s) = &mut stopped.spec {
        s.state = stead_schema::RunState::Stopped;
    }
    rig.apply(&d, &stopped);
    assert_eq!(rig.observe(&d, &stopped).state["state"], "stopped");
    rig.apply(&d, &v3);

    // Delete: graceful stop (ignored ACPI, no agent in the guest: quit), run files,
    // taps and cgroup gone; the disks stay.
    let o = rig.observe(&d, &v3);
    let t = Instant::now();
    d.delete(&v3, &o, &rig.world).expect("delete");
    eprintln!("  deleted in {:?}", t.elapsed());
    assert!(!rig.observe(&d, &v3).exists);
    assert!(!rig.env.run_dir.join("vms/hp").exists());
    let links = rig.links();
    assert!(!links.contains(&tap1) && !links.contains(&tap2), "{links}");
    for v in ["root", "data"] {
        assert!(
            stead_drivers::storage::volume_path(&rig.world, v)
                .expect("p")
                .exists()
        );
    }
    let h = Hierarchy::detect().expect("cgroups");
    assert!(
        !h.cgroup(&rig.env.cgroup_parent, &cgroup_name("hp"))
            .exists()
    );
}

fn uefi_nvram_survives_restarts_and_goes_with_the_vm() {
    if !Path::new("/usr/share/qemu/firmware").is_dir() {
        eprintln!("SKIP uefi_nvram_survives_restarts_and_goes_with_the_vm: no OVMF (apt ovmf)");
        return;
    }
    let rig = DriverRig::new();
    let d = rig.driver();
    let v = rig.vm(
        "uefi",
        json!({"accel": "tcg", "memory": "128Mi", "firmware": "uefi",
               "disks": [{"volume": "root", "boot": 1}]}),
    );
    rig.apply(&d, &v);
    let o = rig.observe(&d, &v);
    let nvram = PathBuf::from(o.status["nvram"].as_str().expect("nvram path"));
    assert!(nvram.starts_with(&rig.env.state_dir), "{}", nvram.display());
    assert!(nvram.is_file());
    // Mark the NVRAM (as a guest writing a boot entry would) with QEMU stopped; the mark
    // survives the next start.
    let mut stopped = v.clone();
    if let stead_schema::Spec::VirtualMachine(s) = &mut stopped.spec {
        s.state = stead_schema::RunState::Stopped;
    }
    rig.apply(&d, &stopped);
    let mut data = std::fs::read(&nvram).expect("read nvram");
    let n = data.len();
    data[n - 16..].copy_from_slice(b"stead-nvram-mark");
    std::fs::write(&nvram, &data).expect("mark");
    rig.apply(&d, &v);
    assert!(
        std::fs::read(&nvram)
            .expect("read")
            .ends_with(b"stead-nvram-mark")
    );
    let o = rig.observe(&d, &v);
    d.delete(&v, &o, &rig.world).expect("delete");
    assert!(!nvram.exists(), "the NVRAM goes with the VM");
}

/// The guest image of `scripts/guest-image.sh`, if built (`STEAD_GUEST_IMAGE` overrides).
fn guest_image() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("STEAD_GUEST_IMAGE") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let script = Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../scripts/guest-image.sh");
    let out = std::process::Command::new(script)
        .arg("--print-path")
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.is_file().then_some(p)
}

fn real_guest_cloud_init_agent_ips_and_acpi_shutdown() {
    let Some(image) = guest_image() else {
        eprintln!(
            "SKIP real_guest_cloud_init_agent_ips_and_acpi_shutdown: no guest image (scripts/guest-image.sh)"
        );
        return;
    };
    let mut rig = DriverRig::new();
    let pool = rig.dir.path().join("pool");
    let vol = resource(
        Kind::Volume,
        "guest",
        json!({"pool": "p", "size": "2Gi", "format": "qcow2"}),
    );
    rig.world.insert(vol.id.clone(), vol);
    let _ = pool;
    let disk = stead_drivers::storage::volume_path(&rig.world, "guest").expect("path");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&image)
        .arg(&disk)
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let mut d = rig.driver();
    // This guest image does not act on the ACPI button: after 5 s the guest agent is
    // asked to power it off, then QEMU is told to quit.
    d.shutdown_timeout_secs = 5;
    let mac = "52:54:00:bb:00:05";
    let v = rig.vm(
        "g1",
        json!({"memory": "512Mi", "agent": true,
               "disks": [{"volume": "guest", "boot": 1, "cache": "unsafe"}],
               "interfaces": [{"network": "lan0", "mac": mac}],
               "cloudInit": {"hostname": "stead-g1", "network": {"version": 2, "ethernets": {
                   "e0": {"match": {"macaddress": mac}, "addresses": ["10.77.0.5/24"]}}}}}),
    );
    let t = Instant::now();
    rig.apply(&d, &v);
    let o = rig.observe(&d, &v);
    if o.status["accel"] == "tcg" {
        assert!(
            o.status["warning"]
                .as_str()
                .is_some_and(|w| w.contains("TCG")),
            "{}",
            o.status
        );
    }
    let mut ips = json!(null);
    let deadline = Instant::now() + Duration::from_secs(240);
    let run = rig.env.run_dir.join("vms/g1");
    loop {
        let st = rig.observe(&d, &v).status;
        ips = st["guestIps"].clone();
        if ips
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i == "10.77.0.5"))
        {
            break;
        }
        if Instant::now() > deadline {
            let tail = |f: &str| {
                let t = std::fs::read_to_string(run.join(f)).unwrap_or_default();
                t[t.len().saturating_sub(3000)..].to_string()
            };
            panic!(
                "no guest IPs: {st}\nconsole: {}\nlog: {}",
                tail("console.log"),
                tail("vmm.log")
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("  agent reported {ips} after {:?}", t.elapsed());
    let o = rig.observe(&d, &v);
    assert_eq!(o.status["agent"], "ok");
    let console =
        std::fs::read_to_string(rig.env.run_dir.join("vms/g1/console.log")).expect("console log");
    // The serial port reaches the console log (kernel and cloud-init output).
    assert!(
        console.contains("cloud-init"),
        "{}",
        &console[console.len().saturating_sub(2000)..]
    );
    // Stop: the guest powers off through the agent, QEMU is not told to quit.
    let mut stopped = v.clone();
    if let stead_schema::Spec::VirtualMachine(s) = &mut stopped.spec {
        s.state = stead_schema::RunState::Stopped;
    }
    let t = Instant::now();
    rig.apply(&d, &stopped);
    eprintln!("  stopped in {:?}", t.elapsed());
    let log = std::fs::read_to_string(rig.env.run_dir.join("vms/g1/vmm.log")).expect("log");
    assert!(log.contains("ACPI power button"), "{log}");
    // Under TCG this image may take longer than the agent's grace to power off, then
    // `quit` ends it: never a SIGKILL.
    assert!(!log.contains("SIGKILL"), "{log}");
    assert!(log.contains("QEMU ended: shutdown"), "{log}");
    let o = rig.observe(&d, &stopped);
    d.delete(&stopped, &o, &rig.world).expect("delete");
    assert!(disk.exists(), "the disk stays with its Volume");
    rig.world.clear();
}

fn have_qemu() -> bool {
    std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    run_as_supervisor_if_asked(&args);
    let tests: [(&str, fn()); 8] = [
        ("fence_deadline_kills_qemu", fence_deadline_kills_qemu),
        (
            "qemu_runs_as_the_unprivileged_user",
            qemu_runs_as_the_unprivileged_user,
        ),
        (
            "real_guest_cloud_init_agent_ips_and_acpi_shutdown",
            real_guest_cloud_init_agent_ips_and_acpi_shutdown,
        ),
        (
            "driver_apply_hot_plug_restart_delete",
            driver_apply_hot_plug_restart_delete,
        ),
        (
            "uefi_nvram_survives_restarts_and_goes_with_the_vm",
            uefi_nvram_survives_restarts_and_goes_with_the_vm,
        ),
        (
            "start_status_restart_and_graceful_stop",
            start_status_restart_and_graceful_stop,
        ),
        ("never_policy_and_bad_start", never_policy_and_bad_start),
        (
            "live_migration_between_two_supervised_qemus",
            live_migration_between_two_supervised_qemus,
        ),
    ];
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            for (name, _) in tests {
                println!("{name}: test");
            }
        }
        return;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let filter: Vec<&String> = args[1..]
        .iter()
        .filter(|a| !a.starts_with('-'))
        .filter(|a| a.parse::<u32>().is_err())
        .collect();
    if !nix::unistd::geteuid().is_root() || !have_qemu() {
        for (name, _) in tests {
            eprintln!("SKIP {name}: needs root and qemu-system-x86_64 (apt qemu-system-x86)");
        }
        return;
    }
    nix::sys::prctl::set_child_subreaper(true).expect("become a subreaper");
    let mut failed = 0;
    let mut ran = 0;
    for (name, f) in tests {
        let selected = filter.iter().any(|p| {
            if exact {
                name == p.as_str()
            } else {
                name.contains(p.as_str())
            }
        });
        if !filter.is_empty() && !selected {
            continue;
        }
        ran += 1;
        eprintln!("test {name} ...");
        let t = Instant::now();
        match std::panic::catch_unwind(f) {
            Ok(()) => eprintln!("test {name} ... ok ({:?})", t.elapsed()),
            Err(_) => {
                eprintln!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    eprintln!("qemu_supervisor: {ran} run, {failed} failed");
    println!("{} passed, {failed} failed", ran - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

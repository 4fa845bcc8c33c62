//! Container end-to-end tests on the real kernel.
//!
//! This test target has `harness = false`: its `main` first checks whether it was started
//! as `<this-binary> shim ...` — the ContainerDriver spawns `HostEnv::self_exe shim ...`,
//! and the tests point `self_exe` at this binary — and then runs
//! `stead_drivers::container::shim::main` in a fresh single-threaded process, exactly as
//! `stead shim` does. Otherwise it runs the tests below (a filter substring may be given).
//!
//! Each test has its own sandbox: a network namespace (bind-mounted on a temp file, with a
//! bridge inside it, used as `HostEnv::netns`), a cgroup parent `stead-test-<pid>-<n>`,
//! temp state/run dirs and a busybox rootfs built from the host's `/bin/busybox`
//! (Debian package busybox-static). The sandbox's `Drop` deletes the containers and
//! checks that nothing is left.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stead_drivers::container::{ContainerDriver, exec_with};
use stead_host::cgroup::Hierarchy;
use stead_reconciler::driver::{Driver, HostEnv, Lookup, Observed};
use stead_schema::{Kind, Resource, ResourceId, Spec};

mod container_util;
mod storage_util;

use container_util::{new_netns_on, nsenter, resource, run_as_shim_if_asked};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

const APPLETS: [&str; 31] = [
    "sh", "ps", "ping", "ip", "hostname", "sleep", "cat", "dd", "id", "touch", "ls", "seq",
    "ifconfig", "echo", "true", "false", "mkdir", "rm", "wc", "grep", "kill", "stat", "head",
    "uname", "mount", "env", "init", "reboot", "poweroff", "halt", "unshare",
];

/// Builds a busybox rootfs in `dir` (what scripts/build-rootfs.sh does, minimal).
fn build_rootfs(dir: &Path) {
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "root", "tmp", "usr/bin", "usr/sbin",
    ] {
        fs::create_dir_all(dir.join(d)).expect("mkdir rootfs");
    }
    fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("copy busybox");
    for a in APPLETS {
        let _ = symlink("busybox", dir.join("bin").join(a));
    }
    let _ = symlink("../bin/busybox", dir.join("sbin/init"));
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    fs::write(dir.join("etc/group"), "root:x:0:\ntty:x:5:\n").expect("group");
    fs::write(
        dir.join("etc/inittab"),
        "::sysinit:/bin/echo stead-busybox-up\n::respawn:/bin/sleep 100000\n",
    )
    .expect("inittab");
}

/// Packs `dir` into a .tar.zst template.
fn build_template(dir: &Path, out: &Path) {
    let f = fs::File::create(out).expect("create template");
    let enc = zstd::Encoder::new(f, 3).expect("zstd").auto_finish();
    let mut b = tar::Builder::new(enc);
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).expect("tar");
    b.finish().expect("finish tar");
}

struct Sandbox {
    name: String,
    tmp: tempfile::TempDir,
    netns: PathBuf,
    env: HostEnv,
    driver: ContainerDriver,
    world: BTreeMap<ResourceId, Resource>,
    rootfs: PathBuf,
    template: PathBuf,
}

impl Sandbox {
    fn new(bridge_addr: &str) -> Sandbox {
        Sandbox::with_fence_file(bridge_addr, None)
    }

    /// A sandbox whose `HostEnv::fence_file` is `fence_file` (a cluster node's agent sets it).
    fn with_fence_file(bridge_addr: &str, fence_file: Option<&str>) -> Sandbox {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("stead-test-{}-{n}", std::process::id());
        let tmp = tempfile::tempdir().expect("tmp");
        let netns = tmp.path().join("netns");
        new_netns_on(&netns);
        nsenter(&netns, &["ip", "link", "add", "br0", "type", "bridge"]);
        nsenter(&netns, &["ip", "link", "set", "br0", "up"]);
        nsenter(&netns, &["ip", "link", "set", "lo", "up"]);
        nsenter(&netns, &["ip", "addr", "add", bridge_addr, "dev", "br0"]);
        let env = HostEnv {
            state_dir: tmp.path().join("state"),
            run_dir: tmp.path().join("run"),
            cgroup_parent: name.clone(),
            netns: Some(netns.clone()),
            self_exe: std::env::current_exe().expect("current_exe"),
            fence_file: fence_file.map(|f| tmp.path().join(f)),
        };
        let rootfs = tmp.path().join("rootfs");
        build_rootfs(&rootfs);
        let template = tmp.path().join("busybox.tar.zst");
        build_template(&rootfs, &template);
        let driver = ContainerDriver::new(&env).expect("driver");
        Sandbox {
            name,
            tmp,
            netns,
            env,
            driver,
            world: BTreeMap::new(),
            rootfs,
            template,
        }
    }

    fn resource(&mut self, name: &str, spec: Value) -> Resource {
        let r = resource(Kind::Container, name, spec);
        self.world.insert(r.id.clone(), r.clone());
        r
    }

    /// Adds a non-container resource (pool, volume) to the lookup world.
    fn insert(&mut self, kind: Kind, name: &str, spec: Value) {
        let r = resource(kind, name, spec);
        self.world.insert(r.id.clone(), r);
    }

    fn observe(&self, r: &Resource) -> Observed {
        let world: &dyn Lookup = &self.world;
        let mut m = self.driver.observe(&[r], world).expect("observe");
        m.remove(&r.id).expect("observed entry")
    }

    fn apply(&self, r: &Resource) {
        let o = self.observe(r);
        self.driver.apply(r, &o, &self.world).expect("apply");
    }

    fn delete(&self, r: &Resource) {
        let o = self.observe(r);
        self.driver.delete(r, &o, &self.world).expect("delete");
    }

    /// Runs a command in container `name`; returns (exit code, stdout+stderr).
    fn exec(&self, name: &str, args: &[&str]) -> (i32, String) {
        let (mut r, w) = std::io::pipe().expect("pipe");
        let null = fs::File::open("/dev/null").expect("null");
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let code = exec_with(
            &self.env.run_dir,
            name,
            &args,
            &BTreeMap::new(),
            [&null.as_fd(), &w.as_fd(), &w.as_fd()],
        )
        .expect("exec");
        drop(w);
        let mut out = String::new();
        r.read_to_string(&mut out).expect("read exec output");
        (code, out)
    }

    fn links(&self) -> String {
        nsenter(&self.netns, &["ip", "-o", "link", "show"])
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let hier = Hierarchy::detect().expect("hier");
        hier.cgroup(&self.name, "x")
            .procs_dirs()
            .into_iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .filter(|d| d.exists())
            .collect()
    }

    /// Asserts nothing of this sandbox is left: cgroups, veths, mounts, processes.
    fn assert_clean(&self) {
        let mi = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let tmp = self.tmp.path().to_string_lossy().to_string();
        let left: Vec<&str> = mi
            .lines()
            .filter(|l| l.contains(&tmp) && !l.contains(&self.netns.to_string_lossy().to_string()))
            .collect();
        assert!(left.is_empty(), "mounts left: {left:?}");
        assert!(
            self.cgroup_dirs().is_empty(),
            "cgroups left: {:?}",
            self.cgroup_dirs()
        );
        let links = self.links();
        assert!(!links.contains("vs"), "veth left: {links}");
        let ps = Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .expect("ps");
        let ps = String::from_utf8_lossy(&ps.stdout);
        assert!(
            !ps.lines()
                .any(|l| l.contains(&format!("{} ", self.env.run_dir.display()))),
            "shim left: {ps}"
        );
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let ids: Vec<Resource> = self
            .world
            .values()
            .filter(|r| r.id.kind == Kind::Container)
            .cloned()
            .collect();
        for r in ids {
            let o = self.observe(&r);
            if let Err(e) = self.driver.delete(&r, &o, &self.world) {
                eprintln!("cleanup {}: {e}", r.id.name);
            }
        }
        // Best effort in case a delete failed.
        let hier = Hierarchy::detect().expect("hier");
        for r in self.world.keys().filter(|r| r.kind == Kind::Container) {
            let _ = hier.cgroup(&self.name, &r.name).destroy();
        }
        let _ = nix::mount::umount2(&self.netns, nix::mount::MntFlags::MNT_DETACH);
        reap_orphans();
        let _ = &self.tmp;
    }
}

/// Exited supervisors were re-parented to this process (a subreaper, see `main`): reap
/// them so no zombie is left behind.
fn reap_orphans() {
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
        std::thread::sleep(Duration::from_millis(20));
    }
}

const LOOP: &str = "trap 'exit 0' TERM; while :; do sleep 1; done";

fn container_spec(sb: &Sandbox, addr: &str, extra: Value) -> Value {
    let mut spec = json!({
        "rootfs": {"template": sb.template},
        "command": ["/bin/sh", "-c", LOOP],
        "unprivileged": false,
        "interfaces": [{"name": "eth0", "network": "br0", "address": addr, "gateway": "10.77.0.1"}],
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    spec
}

// ------------------------------------------------------------------ fencing

/// Writes the fence deadline `ahead` from now on the boot clock; returns it.
fn write_deadline(file: &Path, ahead: Duration) -> Duration {
    let at = stead_host::fence::boottime_now() + ahead;
    let tmp = file.with_extension("tmp");
    fs::write(&tmp, stead_host::fence::deadline_content(at)).expect("write deadline");
    fs::rename(&tmp, file).expect("publish deadline");
    at
}

fn write_fenced(file: &Path) {
    fs::write(file, stead_host::fence::FENCED).expect("write fenced");
}

/// Whether `pid` still runs: it exists and is not a zombie (dead, waiting to be reaped).
fn pid_alive(pid: i32) -> bool {
    stead_host::process::Proc::host()
        .read(pid, "stat")
        .is_ok_and(|s| !s.contains(") Z") && !s.contains(") X"))
}

/// A sandbox with a fence file, and an HA container `name` running in it.
fn fenced_sandbox(name: &str, ha: bool, ahead: Duration) -> (Sandbox, Resource, PathBuf, Duration) {
    let mut sb = Sandbox::with_fence_file("10.77.0.1/24", Some("fence-deadline"));
    let file = sb.env.fence_file.clone().expect("fence file");
    let deadline = write_deadline(&file, ahead);
    let placement = if ha { json!({"ha": true}) } else { json!({}) };
    let spec = container_spec(
        &sb,
        "10.77.0.2/24",
        json!({"placement": placement, "restartPolicy": "always"}),
    );
    let r = sb.resource(name, spec);
    sb.apply(&r);
    (sb, r, file, deadline)
}

fn running_pid(sb: &Sandbox, r: &Resource) -> i32 {
    let o = sb.observe(r);
    assert_eq!(o.state["state"], "running", "{o:?}");
    o.status["pid"].as_i64().expect("pid") as i32
}

/// Waits until `pid` is gone; returns when, on the boot clock.
fn wait_gone(pid: i32, timeout: Duration) -> Duration {
    let t = Instant::now();
    while pid_alive(pid) {
        assert!(t.elapsed() < timeout, "pid {pid} still alive");
        std::thread::sleep(Duration::from_millis(5));
    }
    stead_host::fence::boottime_now()
}

/// The shim is gone, the state says fenced, nothing was restarted.
fn assert_fenced(sb: &Sandbox, r: &Resource) {
    wait_until("shim exit", Duration::from_secs(5), || {
        sb.observe(r).status["shimPid"].is_null()
    });
    let o = sb.observe(r);
    assert_eq!(o.status["phase"], "fenced", "{o:?}");
    assert_eq!(o.state["state"], "stopped", "{o:?}");
    assert_eq!(o.status["restarts"], 0, "{o:?}");
    assert!(
        matches!(o.health, stead_reconciler::driver::Health::Failed(ref m) if m.contains("fenced")),
        "{o:?}"
    );
    std::thread::sleep(Duration::from_millis(600));
    assert!(sb.observe(r).status["pid"].is_null(), "not restarted");
}

/// A deadline 3 s ahead, never renewed: killed within 0.5 s after it, not restarted.
fn fence_deadline_kills_an_ha_container() {
    let (sb, r, _file, deadline) = fenced_sandbox("fa", true, Duration::from_secs(3));
    let pid = running_pid(&sb, &r);
    let gone = wait_gone(pid, Duration::from_secs(6));
    assert_fenced(&sb, &r);
    // When the watchdog sent SIGKILL, and when the test saw init dead (a zombie or gone:
    // that includes the kernel's teardown of the container's namespaces).
    let killed = Duration::from_nanos(fenced_at(&sb, "fa"));
    assert!(killed >= deadline, "killed before the deadline");
    let late = killed - deadline;
    let dead = gone.saturating_sub(deadline);
    println!(
        "fence: SIGKILL {} ms after the deadline, init dead after {} ms",
        late.as_millis(),
        dead.as_millis()
    );
    assert!(late <= Duration::from_millis(500), "{late:?}");
    // After the SIGKILL no code of the container runs; the kernel's unmounting of its
    // mount namespace before init turns zombie took up to 1.7 s at load 6 on 2 cores.
    assert!(dead <= Duration::from_secs(3), "{dead:?}");
}

/// `fencedAtBootNs` of container `name`'s state file.
fn fenced_at(sb: &Sandbox, name: &str) -> u64 {
    let path = sb
        .env
        .run_dir
        .join("containers")
        .join(name)
        .join("state.json");
    let st: Value = serde_json::from_slice(&fs::read(&path).expect("state")).expect("json");
    st["fencedAtBootNs"].as_u64().expect("fencedAtBootNs")
}

fn renewed_deadline_keeps_the_container() {
    let (sb, r, file, _) = fenced_sandbox("fr", true, Duration::from_secs(1));
    let pid = running_pid(&sb, &r);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        write_deadline(&file, Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(pid_alive(pid), "renewed: still running");
    assert_eq!(running_pid(&sb, &r), pid);
    assert_eq!(sb.observe(&r).status["restarts"], 0);
}

fn fenced_file_kills_at_once_and_refuses_a_start() {
    let (sb, r, file, _) = fenced_sandbox("fz", true, Duration::from_secs(30));
    let pid = running_pid(&sb, &r);
    write_fenced(&file);
    let at = stead_host::fence::boottime_now();
    wait_gone(pid, Duration::from_secs(3));
    assert_fenced(&sb, &r);
    let late = Duration::from_nanos(fenced_at(&sb, "fz")).saturating_sub(at);
    println!("fence: SIGKILL {} ms after `0`", late.as_millis());
    assert!(late <= Duration::from_millis(500), "{late:?}");
    // Applying again while fenced: refused, retryable.
    let o = sb.observe(&r);
    let err = sb
        .driver
        .apply(&r, &o, &sb.world)
        .expect_err("a fenced node starts no HA workload");
    assert!(err.retryable(), "{err}");
    assert!(err.to_string().contains("fenced"), "{err}");
    // The agent renews its lease: the next apply starts it again.
    write_deadline(&file, Duration::from_secs(30));
    sb.apply(&r);
    assert_ne!(running_pid(&sb, &r), pid);
}

fn non_ha_container_ignores_the_fence_file() {
    let (sb, r, file, _) = fenced_sandbox("fn", false, Duration::from_secs(30));
    write_fenced(&file);
    let pid = running_pid(&sb, &r);
    std::thread::sleep(Duration::from_millis(800));
    assert!(pid_alive(pid));
    assert_eq!(running_pid(&sb, &r), pid);
}

// ------------------------------------------------------------------ tests

fn two_containers_on_a_bridge() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let a = sb.resource("ca", container_spec(&sb, "10.77.0.2/24", json!({})));
    let spec_b = container_spec(
        &sb,
        "10.77.0.3/24",
        json!({"rootfs": {"path": sb.rootfs}, "hostname": "bee"}),
    );
    let b = sb.resource("cb", spec_b);
    sb.apply(&a);
    sb.apply(&b);
    for r in [&a, &b] {
        let o = sb.observe(r);
        assert_eq!(o.state["state"], "running", "{:?}", o);
        assert_eq!(o.health, stead_reconciler::driver::Health::Ready);
        assert!(o.status["pid"].as_i64().is_some());
        assert_eq!(
            o.state,
            sb.driver.desired_state(r, &sb.world),
            "no diff when converged"
        );
    }
    let (code, ps) = sb.exec("ca", &["ps", "-o", "pid,args"]);
    assert_eq!(code, 0, "{ps}");
    let procs = ps.lines().skip(1).count();
    assert!(procs <= 4, "container sees only its own processes: {ps}");
    assert!(ps.lines().any(|l| l.trim_start().starts_with("1 ")), "{ps}");
    assert_eq!(sb.exec("ca", &["hostname"]).1.trim(), "ca");
    assert_eq!(sb.exec("cb", &["hostname"]).1.trim(), "bee");
    let (_, ip) = sb.exec("ca", &["ip", "-o", "addr"]);
    assert!(
        ip.contains("10.77.0.2/24") && !ip.contains("10.77.0.3"),
        "{ip}"
    );
    // No `mac` in the spec: the generated one, salted with this host's machine id.
    let (_, link) = sb.exec("ca", &["ip", "-o", "link", "show", "eth0"]);
    let mac = stead_drivers::vm::config::generated_container_mac("ca", 0).to_string();
    assert!(link.contains(&mac.to_lowercase()), "{mac}: {link}");
    let (code, out) = sb.exec("ca", &["ping", "-c", "1", "-W", "3", "10.77.0.3"]);
    assert_eq!(code, 0, "ping b from a: {out}");
    let (code, out) = sb.exec("cb", &["ping", "-c", "1", "-W", "3", "10.77.0.2"]);
    assert_eq!(code, 0, "ping a from b: {out}");
    // Confinement spot checks.
    let (code, masked) = sb.exec("ca", &["cat", "/proc/timer_list"]);
    assert!(
        code == 0 && masked.is_empty(),
        "/proc/timer_list is masked: {masked:.200}"
    );
    let (code, _) = sb.exec("ca", &["sh", "-c", "echo 1 > /proc/sys/kernel/domainname"]);
    assert_ne!(code, 0, "/proc/sys is read-only");
    let (_, status) = sb.exec("ca", &["cat", "/proc/self/status"]);
    let bnd = status
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .expect("CapBnd");
    let mask = u64::from_str_radix(bnd.split_whitespace().nth(1).expect("mask"), 16).expect("hex");
    assert_eq!(mask & (1 << 21), 0, "CAP_SYS_ADMIN dropped: {bnd}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    sb.delete(&a);
    sb.delete(&b);
    sb.assert_clean();
}

fn memory_and_pids_limits() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    // init is the hog: it is OOM-killed, and restarted per policy (on-failure).
    let hog = sb.resource(
        "hog",
        json!({
            "rootfs": {"path": sb.rootfs},
            "command": ["/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=96M", "count=1"],
            "unprivileged": false,
            "resources": {"memory": "32Mi"},
            "restartPolicy": "on-failure",
        }),
    );
    sb.apply(&hog);
    wait_until("OOM kill + restart", Duration::from_secs(20), || {
        let o = sb.observe(&hog);
        o.status["restarts"].as_u64().unwrap_or(0) >= 1
            && o.status["oomKills"].as_u64().unwrap_or(0) >= 1
    });
    let o = sb.observe(&hog);
    assert_eq!(o.status["lastExit"]["signal"], 9, "{}", o.status);
    assert_eq!(o.state["resources"]["memory"], 32 << 20);

    // The same looping container with other pids and cpus limits.
    let rootfs = sb.rootfs.clone();
    let limited = move |pids: u32, cpus: f64| {
        json!({
            "rootfs": {"path": rootfs},
            "command": ["/bin/sh", "-c", LOOP],
            "unprivileged": false,
            "resources": {"pids": pids, "cpus": cpus},
        })
    };
    let p = sb.resource("pids", limited(8, 0.5));
    sb.apply(&p);
    let (_, out) = sb.exec(
        "pids",
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 5 & done; wait",
        ],
    );
    assert!(out.contains("fork"), "fork refused by pids.max: {out}");
    let o = sb.observe(&p);
    assert_eq!(o.state["resources"]["pids"], 8);
    assert_eq!(o.state["resources"]["cpus"], 0.5);
    // Hot update: new limits without a restart.
    let pid_before = o.status["pid"].clone();
    let p2 = sb.resource("pids", limited(64, 1.0));
    sb.apply(&p2);
    let o = sb.observe(&p2);
    assert_eq!(o.state["resources"]["pids"], 64);
    assert_eq!(
        o.status["pid"], pid_before,
        "hot update keeps the container"
    );
    sb.delete(&hog);
    sb.delete(&p2);
    sb.assert_clean();
}

fn restart_after_kill_and_shim_recovery() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let c = sb.resource(
        "rk",
        container_spec(
            &sb,
            "10.77.0.5/24",
            json!({"resources": {"cpus": 0.3333, "memory": "100M", "pids": 50}}),
        ),
    );
    sb.apply(&c);
    let o = sb.observe(&c);
    assert_eq!(
        o.state,
        sb.driver.desired_state(&c, &sb.world),
        "kernel-rounded limits show no diff"
    );
    let pid = o.status["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill init");
    wait_until("restart", Duration::from_secs(10), || {
        let o = sb.observe(&c);
        o.status["restarts"] == 1 && o.status["pid"].as_i64().is_some_and(|p| p as i32 != pid)
    });
    let (code, out) = sb.exec("rk", &["ip", "-o", "addr"]);
    assert!(
        code == 0 && out.contains("10.77.0.5/24"),
        "network back after restart: {out}"
    );

    // Kill the supervisor: observe reports it, apply recovers without a duplicate.
    let o = sb.observe(&c);
    let shim_pid = o.status["shimPid"].as_i64().expect("shim pid") as i32;
    let init_pid = o.status["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill shim");
    wait_until("shim death seen", Duration::from_secs(5), || {
        sb.observe(&c).health != stead_reconciler::driver::Health::Ready
    });
    let o = sb.observe(&c);
    assert_eq!(o.state["state"], "orphaned", "{o:?}");
    assert!(matches!(
        o.health,
        stead_reconciler::driver::Health::Degraded(_)
    ));
    assert_ne!(
        o.state,
        sb.driver.desired_state(&c, &sb.world),
        "a diff triggers apply"
    );
    sb.apply(&c);
    let o = sb.observe(&c);
    assert_eq!(o.state["state"], "running");
    let new_pid = o.status["pid"].as_i64().expect("pid") as i32;
    assert_ne!(new_pid, init_pid);
    // Gone, or a zombie waiting for whoever adopted it after the shim died.
    let stat = fs::read_to_string(format!("/proc/{init_pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
        "old init gone: {stat}"
    );
    let hier = Hierarchy::detect().expect("hier");
    let pids = hier.cgroup(&sb.name, "rk").pids();
    assert!(pids.len() <= 3, "one container, no duplicate: {pids:?}");
    sb.delete(&c);
    sb.assert_clean();
}

fn unprivileged_container() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let c = sb.resource(
        "up",
        json!({
            "rootfs": {"template": sb.template},
            "command": ["/bin/sh", "-c", LOOP],
            "interfaces": [{"name": "eth0", "network": "br0", "address": "10.77.0.9/24"}],
        }),
    );
    sb.apply(&c);
    let o = sb.observe(&c);
    let pid = o.status["pid"].as_i64().expect("pid");
    let map = fs::read_to_string(format!("/proc/{pid}/uid_map")).expect("uid_map");
    let f: Vec<u64> = map
        .split_whitespace()
        .map(|x| x.parse().expect("num"))
        .collect();
    assert_eq!(f[0], 0);
    assert!(
        f[1] >= 100_000,
        "uid 0 maps to an unprivileged host uid: {map}"
    );
    assert_eq!(f[2], 65536);
    let (code, id) = sb.exec("up", &["id", "-u"]);
    assert_eq!((code, id.trim()), (0, "0"));
    let (code, out) = sb.exec("up", &["touch", "/root/made-inside"]);
    assert_eq!(code, 0, "{out}");
    let host_file = sb.env.state_dir.join("rootfs/up/root/root/made-inside");
    let m = fs::metadata(&host_file).expect("file on host");
    assert_eq!(u64::from(m.uid()), f[1], "owned by the mapped host uid");
    let (code, _) = sb.exec("up", &["ping", "-c", "1", "-W", "3", "10.77.0.1"]);
    assert_eq!(code, 0, "unprivileged container reaches the bridge");
    sb.delete(&c);
    assert!(!host_file.exists(), "rootfs removed");
    sb.assert_clean();
}

/// Two looping containers without interfaces, `<prefix>priv` privileged and
/// `<prefix>user` in a user namespace (not applied yet).
fn looping_pair(sb: &mut Sandbox, prefix: &str) -> [Resource; 2] {
    [(json!({}), "priv"), (json!({"unprivileged": true}), "user")].map(|(extra, kind)| {
        let spec = plain_spec(sb, &["/bin/sh", "-c", LOOP], extra);
        sb.resource(&format!("{prefix}{kind}"), spec)
    })
}

/// A container without interfaces still has `lo` up (its init brings it up itself before
/// exec), privileged and in a user namespace.
fn loopback_is_up_without_interfaces() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let [root, user] = looping_pair(&mut sb, "lo");
    for c in [&root, &user] {
        sb.apply(c);
        let name = c.id.name.as_str();
        let (code, link) = sb.exec(name, &["ip", "-o", "link", "show", "lo"]);
        assert_eq!(code, 0, "{link}");
        assert!(link.contains(",UP"), "{name}: lo is up: {link}");
        let (code, links) = sb.exec(name, &["ip", "-o", "link"]);
        assert_eq!(
            links.lines().count(),
            1,
            "{name}: only lo: {links} ({code})"
        );
        let (code, out) = sb.exec(name, &["ping", "-c", "1", "-W", "3", "127.0.0.1"]);
        assert_eq!(code, 0, "{name}: loopback answers: {out}");
    }
    sb.delete(&root);
    sb.delete(&user);
    sb.assert_clean();
}

/// Init and an exec'd process are in the container's cgroup in every hierarchy stead
/// uses, privileged and in a user namespace (on v1 each moves itself in by writing `0`
/// to `tasks`; a miss would leave it unlimited in the shim's cgroup).
fn init_and_exec_join_every_cgroup() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let hier = Hierarchy::detect().expect("hier");
    let [root, user] = looping_pair(&mut sb, "j");
    for c in [&root, &user] {
        sb.apply(c);
        let name = c.id.name.as_str();
        let pid = running_pid(&sb, c).to_string();
        let dirs = hier.cgroup(&sb.name, name).procs_dirs();
        assert!(!dirs.is_empty());
        for d in &dirs {
            let procs = fs::read_to_string(d.join("cgroup.procs")).expect("cgroup.procs");
            assert!(
                procs.lines().any(|l| l == pid),
                "{name}: init {pid} in {}: {procs:?}",
                d.display()
            );
        }
        // Inside its cgroup namespace (rooted at the container's cgroup) a process that
        // joined shows `/` for each hierarchy; one left outside would show `/..`.
        let (code, out) = sb.exec(name, &["cat", "/proc/self/cgroup"]);
        assert_eq!(code, 0, "{out}");
        for ctrl in ["memory", "pids"] {
            let line = out
                .lines()
                .find(|l| {
                    l.split(':')
                        .nth(1)
                        .is_some_and(|c| c.split(',').any(|x| x == ctrl))
                })
                .or_else(|| out.lines().find(|l| l.starts_with("0::")))
                .unwrap_or_else(|| panic!("{name}: no {ctrl} line in {out}"));
            assert!(
                line.ends_with(":/"),
                "{name}: exec joined {ctrl}: {line} ({out})"
            );
        }
    }
    sb.delete(&root);
    sb.delete(&user);
    sb.assert_clean();
}

fn stop_start_delete_leave_nothing() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let spec = container_spec(&sb, "10.77.0.7/24", json!({"command": ["/sbin/init"]}));
    let c = sb.resource("ssd", spec.clone());
    sb.apply(&c);
    let o = sb.observe(&c);
    assert_eq!(o.state["state"], "running");
    assert!(sb.links().contains("vs"), "veth present while running");
    wait_until("busybox init output", Duration::from_secs(5), || {
        fs::read_to_string(sb.env.run_dir.join("containers/ssd/console.log"))
            .is_ok_and(|s| s.contains("stead-busybox-up"))
    });
    // Console attach: what the container writes to /dev/console reaches the client.
    {
        use std::io::{BufRead, BufReader, Write};
        let sock = sb.env.run_dir.join("containers/ssd/control.sock");
        let mut conn = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        conn.write_all(b"{\"op\":\"console\"}\n").expect("send");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut r = BufReader::new(conn.try_clone().expect("clone"));
        let mut line = String::new();
        r.read_line(&mut line).expect("reply");
        assert!(line.contains("\"ok\":true"), "{line}");
        let (code, _) = sb.exec("ssd", &["sh", "-c", "echo hello-console > /dev/console"]);
        assert_eq!(code, 0);
        let mut seen = String::new();
        while !seen.contains("hello-console") {
            let mut l = String::new();
            if r.read_line(&mut l).expect("console output") == 0 {
                break;
            }
            seen.push_str(&l);
        }
        assert!(seen.contains("hello-console"), "{seen}");
    }
    let mut log = Vec::new();
    stead_drivers::container::logs(&sb.env.run_dir, "ssd", false, &mut log).expect("logs");
    assert!(String::from_utf8_lossy(&log).contains("stead-busybox-up"));
    let mut stopped = spec.clone();
    stopped["state"] = json!("stopped");
    let s = sb.resource("ssd", stopped);
    let t = Instant::now();
    sb.apply(&s);
    eprintln!("  graceful stop of busybox init took {:?}", t.elapsed());
    let o = sb.observe(&s);
    assert_eq!(o.state["state"], "stopped");
    assert_eq!(o.state, sb.driver.desired_state(&s, &sb.world));
    sb.assert_clean();
    let c = sb.resource("ssd", spec);
    sb.apply(&c);
    assert_eq!(sb.observe(&c).state["state"], "running");
    sb.delete(&c);
    assert!(!sb.env.run_dir.join("containers/ssd").exists());
    assert_eq!(sb.observe(&c), Observed::absent());
    sb.assert_clean();
}

/// Issue 6, consistency modes on a running container whose rootfs is a directory (cannot
/// be reflink-cloned): `snapshot` keeps it frozen while the backup reads, then thaws it;
/// `stop` stops it and starts it again from its manifest.
fn backup_freezes_or_stops_the_container() {
    use stead_drivers::backup::consistency::WorkloadHooks;
    use stead_drivers::backup::hooks::{BackupHooks, backup_target};
    use stead_drivers::backup::store::{BackupOptions, BackupStore};
    use stead_drivers::backup::targets;
    use stead_schema::kinds::BackupMode;

    let mut sb = Sandbox::new("10.77.0.1/24");
    let writer =
        "trap 'exit 0' TERM; i=0; while :; do i=$((i+1)); echo $i > /counter; sleep 0.01; done";
    let spec = container_spec(
        &sb,
        "10.77.0.9/24",
        json!({"command": ["/bin/sh", "-c", writer]}),
    );
    let c = sb.resource("bk", spec);
    sb.apply(&c);
    // The rootfs as backed up: the unpacked template, or the upper layer of an overlay.
    let target = targets::resolve(&sb.env, &sb.world, &c.id).expect("target");
    let counter = target.inputs[0].1.join("counter");
    let stamp = || {
        fs::metadata(&counter)
            .ok()
            .map(|m| (m.mtime(), m.mtime_nsec(), m.len()))
    };
    wait_until("the writer to run", Duration::from_secs(10), || {
        stamp().is_some()
    });
    let world = std::sync::Arc::new(sb.world.clone());
    let hooks = WorkloadHooks::new(&sb.env, world).expect("hooks");

    // snapshot: frozen for as long as the inputs are read.
    let p = hooks
        .prepare(&target, BackupMode::Snapshot)
        .expect("prepare");
    assert_eq!(p.consistency, "frozen Container/bk while read");
    assert!(sb.driver.is_frozen("bk"));
    let before = stamp();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(stamp(), before, "nothing is written while frozen");
    assert_eq!(p.inputs, target.inputs, "a directory is read in place");
    // The backup holds it: another process (a controller's drift repair through `apply`)
    // finds the hold locked and waits instead of thawing it.
    let hold_file = sb.env.run_dir.join("holds/Container-bk");
    assert_eq!(
        shared_lock_free(&hold_file),
        Some(false),
        "hold taken and locked"
    );
    (p.cleanup)().expect("thaw");
    assert!(!sb.driver.is_frozen("bk"));
    assert!(!hold_file.exists(), "hold released with the thaw");
    wait_until(
        "the writer to go on after the thaw",
        Duration::from_secs(5),
        || stamp() != before,
    );

    // A backup that fails mid-read (its store is full) still thaws and releases.
    let full = sb.tmp.path().join("full");
    fs::create_dir(&full).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        &full,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k"),
    )
    .expect("mount a tiny tmpfs");
    {
        use std::io::Write;
        let mut filler = fs::File::create(full.join("filler")).expect("filler");
        while filler.write_all(&[1u8; 4096]).is_ok() {}
    }
    let r = backup_target(
        &BackupStore::for_pool(&full),
        &target,
        BackupMode::Snapshot,
        &hooks,
        BackupOptions::default(),
    );
    let _ = nix::mount::umount2(&full, nix::mount::MntFlags::MNT_DETACH);
    let e = r.expect_err("the store is full");
    assert!(
        format!("{e:?}").contains("No space left on device"),
        "{e:?}"
    );
    assert!(!sb.driver.is_frozen("bk"), "thawed after a failed backup");
    assert!(!hold_file.exists(), "hold released after a failed backup");

    // Through the store, both modes.
    let store = BackupStore::for_pool(&sb.tmp.path().join("backups"));
    let info = backup_target(
        &store,
        &target,
        BackupMode::Snapshot,
        &hooks,
        BackupOptions::default(),
    )
    .expect("snapshot backup");
    assert_eq!(
        info.consistency.as_deref(),
        Some("frozen Container/bk while read")
    );
    assert!(!sb.driver.is_frozen("bk"));
    let pid = sb.observe(&c).status["pid"].as_i64().expect("pid");
    let info = backup_target(
        &store,
        &target,
        BackupMode::Stop,
        &hooks,
        BackupOptions::default(),
    )
    .expect("stop backup");
    assert_eq!(info.consistency.as_deref(), Some("stopped Container/bk"));
    let o = sb.observe(&c);
    assert_eq!(o.state["state"], "running", "started again: {o:?}");
    assert_ne!(o.status["pid"].as_i64(), Some(pid), "a new init");
    let before = stamp();
    wait_until("the restarted writer", Duration::from_secs(5), || {
        stamp() != before
    });
    assert!(store.verify(&info.id).expect("verify").ok());

    // Not running: read as is, nothing to quiesce.
    let mut stopped = c.spec.clone();
    if let Spec::Container(cs) = &mut stopped {
        cs.state = stead_schema::RunState::Stopped;
    }
    let s = sb.resource("bk", serde_json::to_value(&stopped).expect("spec"));
    sb.apply(&s);
    let p = hooks
        .prepare(&target, BackupMode::Snapshot)
        .expect("prepare");
    assert_eq!(p.consistency, "not running");
    (p.cleanup)().expect("cleanup");
    sb.delete(&s);
    sb.assert_clean();
}

/// Whether a shared `flock` on `file` is free for another process (`None`: no such file).
fn shared_lock_free(file: &Path) -> Option<bool> {
    if !file.exists() {
        return None;
    }
    let st = Command::new("flock")
        .args(["-n", "-s"])
        .arg(file)
        .arg("true")
        .status()
        .expect("flock");
    Some(st.success())
}

/// Issue 6, workload snapshots of a container: its own rootfs directory is snapshotted
/// with the container frozen; a rollback stops it, restores the tree and starts it again.
fn container_snapshot_and_rollback() {
    use stead_drivers::storage::workload_snapshot as ws;

    let mut sb = Sandbox::new("10.77.0.1/24");
    let c = sb.resource("sn", container_spec(&sb, "10.77.0.11/24", json!({})));
    sb.apply(&c);
    let (code, out) = sb.exec("sn", &["sh", "-c", "echo first > /state"]);
    assert_eq!(code, 0, "{out}");
    let created = ws::create(&sb.env, &sb.world, &c.id, "s1").expect("create");
    assert_eq!(created.parts.len(), 1, "{created:?}");
    assert_eq!(created.parts[0].0, "rootfs");
    assert!(
        created.consistency.starts_with("frozen Container/sn "),
        "{created:?}"
    );
    assert!(!sb.driver.is_frozen("sn"), "thawed after the snapshot");
    let (code, out) = sb.exec("sn", &["sh", "-c", "echo second > /state; touch /extra"]);
    assert_eq!(code, 0, "{out}");
    let plan = ws::rollback_plan(&sb.env, &sb.world, &c.id, "s1").expect("plan");
    assert_eq!(plan.parts(), ["rootfs"]);
    assert_eq!(
        plan.running,
        std::slice::from_ref(&c.id),
        "the restart is announced"
    );
    let pid = sb.observe(&c).status["pid"].as_i64();
    let done = ws::rollback(&sb.env, &sb.world, &plan).expect("rollback");
    assert_eq!(done.len(), 1);
    let o = sb.observe(&c);
    assert_eq!(o.state["state"], "running", "started again: {o:?}");
    assert_ne!(o.status["pid"].as_i64(), pid, "restarted");
    let (_, state) = sb.exec("sn", &["cat", "/state"]);
    assert_eq!(state.trim(), "first", "rolled back");
    let (code, _) = sb.exec("sn", &["ls", "/extra"]);
    assert_ne!(code, 0, "files created after the snapshot are gone");
    let list = ws::list(&sb.env, &sb.world, &c.id).expect("list");
    assert_eq!(list.len(), 1);
    assert!(list[0].complete);
    ws::delete(&sb.env, &sb.world, &c.id, "s1").expect("delete");
    assert!(
        ws::list(&sb.env, &sb.world, &c.id)
            .expect("list")
            .is_empty()
    );
    sb.delete(&c);
    sb.assert_clean();
}

/// Issue 6: a container whose rootfs lives on a reflink file system (a btrfs pool) is
/// frozen only while its rootfs tree is reflink-copied; the backup reads the copy while
/// the container runs on.
fn backup_clones_a_reflink_rootfs() {
    use stead_drivers::backup::consistency::WorkloadHooks;
    use stead_drivers::backup::hooks::BackupHooks;
    use stead_drivers::backup::targets;
    use stead_schema::kinds::BackupMode;

    let lb = match storage_util::LoopBtrfs::new() {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIP backup_clones_a_reflink_rootfs: {why}");
            return;
        }
    };
    // Declared after the file system: dropped (containers deleted) before it is unmounted.
    let mut sb = Sandbox::new("10.77.0.1/24");
    let pool = lb.mnt.join("pool");
    fs::create_dir_all(&pool).expect("pool dir");
    sb.insert(
        Kind::StoragePool,
        "fast",
        json!({"type": "btrfs", "path": pool, "content": ["rootdir"]}),
    );
    let writer =
        "trap 'exit 0' TERM; i=0; while :; do i=$((i+1)); echo $i > /counter; sleep 0.01; done";
    let spec = container_spec(
        &sb,
        "10.77.0.12/24",
        json!({"command": ["/bin/sh", "-c", writer], "rootfs": {"template": sb.template, "pool": "fast"}}),
    );
    let c = sb.resource("rc", spec);
    sb.apply(&c);
    let target = targets::resolve(&sb.env, &sb.world, &c.id).expect("target");
    assert!(target.inputs[0].1.starts_with(&pool), "{:?}", target.inputs);
    let counter = target.inputs[0].1.join("counter");
    wait_until("the writer to run", Duration::from_secs(10), || {
        counter.exists()
    });
    let hooks = WorkloadHooks::new(&sb.env, std::sync::Arc::new(sb.world.clone())).expect("hooks");
    let p = hooks
        .prepare(&target, BackupMode::Snapshot)
        .expect("prepare");
    assert!(
        p.consistency.starts_with("frozen Container/rc ")
            && p.consistency.ends_with("ms; reflink clones"),
        "{}",
        p.consistency
    );
    eprintln!("  consistency: {}", p.consistency);
    assert!(
        !sb.driver.is_frozen("rc"),
        "running again while the copy is read"
    );
    let clone = p.inputs[0].1.clone();
    assert!(
        clone.to_string_lossy().contains(".stead-backup-"),
        "{clone:?}"
    );
    let frozen_copy = fs::read_to_string(clone.join("counter")).expect("copy");
    let live = counter.clone();
    wait_until("the live rootfs to move on", Duration::from_secs(5), || {
        fs::read_to_string(&live).is_ok_and(|s| s != frozen_copy && !s.is_empty())
    });
    assert_eq!(
        fs::read_to_string(clone.join("counter")).expect("copy"),
        frozen_copy,
        "the copy stays as it was"
    );
    (p.cleanup)().expect("cleanup");
    assert!(!clone.exists(), "copy removed");
    sb.delete(&c);
    sb.assert_clean();
    drop(sb);
    drop(lb);
}

/// Devices cgroup (v1): a container can use the nodes of its /dev but not a block
/// device node that happens to be in its rootfs.
fn device_access_is_restricted() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let hier = Hierarchy::detect().expect("hier");
    // v1: the devices controller; v2: stead's eBPF device program (same exec checks).
    let v1 = !hier.is_v2();
    if v1 && !Path::new("/sys/fs/cgroup/devices").is_dir() {
        eprintln!("SKIP device_access_is_restricted: cgroup v1 without the devices controller");
        return;
    }
    // A loop block device node (7:0) inside the rootfs directory.
    nix::sys::stat::mknod(
        &sb.rootfs.join("blk"),
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(7, 0),
    )
    .expect("mknod");
    let spec = container_spec(&sb, "10.77.0.13/24", json!({"rootfs": {"path": sb.rootfs}}));
    let c = sb.resource("dv", spec);
    sb.apply(&c);
    if v1 {
        let list = hier
            .cgroup(&sb.name, "dv")
            .devices_list()
            .expect("devices.list");
        assert!(
            list.contains("c 1:3 rwm") && !list.contains("a *:*"),
            "{list}"
        );
    }
    let (code, out) = sb.exec("dv", &["sh", "-c", "head -c 4 /dev/zero | wc -c"]);
    assert_eq!((code, out.trim()), (0, "4"), "/dev/zero works");
    let (code, out) = sb.exec("dv", &["sh", "-c", "head -c 1 /blk"]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("not permitted"),
        "open of a denied device: {out}"
    );
    // The cgroup is what denied it: allowed there, the same open gets past the permission.
    if v1 {
        let allow = Path::new("/sys/fs/cgroup/devices")
            .join(&sb.name)
            .join("dv/devices.allow");
        fs::write(&allow, "b 7:0 rwm").expect("allow 7:0");
        let (_, out) = sb.exec("dv", &["sh", "-c", "head -c 1 /blk; echo rc=$?"]);
        eprintln!("  with 7:0 allowed: {}", out.trim());
        assert!(!out.contains("not permitted"), "{out}");
    }
    sb.delete(&c);
    let _ = fs::remove_file(sb.rootfs.join("blk"));
    sb.assert_clean();
}

fn loop_devices_backed_by(file: &Path) -> Vec<String> {
    let want = file.to_string_lossy().to_string();
    fs::read_dir("/sys/block")
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    fs::read_to_string(e.path().join("loop/backing_file"))
                        .is_ok_and(|b| b.trim() == want)
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn raw_volume_mount() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let pool = sb.tmp.path().join("pool");
    fs::create_dir_all(pool.join("images")).expect("pool");
    let img = pool.join("images/data.raw");
    fs::File::create(&img)
        .and_then(|f| f.set_len(64 << 20))
        .expect("sparse image");
    sb.insert(
        Kind::StoragePool,
        "local",
        json!({"type": "dir", "path": pool}),
    );
    sb.insert(
        Kind::Volume,
        "data",
        json!({"pool": "local", "size": "64Mi"}),
    );
    let c = sb.resource(
        "vol",
        json!({
            "rootfs": {"template": sb.template},
            "command": ["/bin/sh", "-c", LOOP],
            "mounts": [{"volume": "data", "path": "/data"}],
        }),
    );
    sb.apply(&c);
    let (code, out) = sb.exec("vol", &["sh", "-c", "echo hello > /data/f && cat /data/f"]);
    assert_eq!((code, out.trim()), (0, "hello"));
    let staging = sb.env.run_dir.join("containers/vol/volumes/0");
    let m = fs::metadata(staging.join("f")).expect("file on the volume");
    assert!(
        m.uid() >= 100_000,
        "written by the container's mapped root: {}",
        m.uid()
    );
    assert_eq!(loop_devices_backed_by(&img).len(), 1);
    // Data survives a restart of the container.
    let pid = sb.observe(&c).status["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    wait_until("restart", Duration::from_secs(10), || {
        sb.observe(&c).status["restarts"] == 1
    });
    assert_eq!(sb.exec("vol", &["cat", "/data/f"]).1.trim(), "hello");
    // A Volume as the root file system (an ext4 image made from the busybox tree).
    let rimg = pool.join("images/root.raw");
    fs::File::create(&rimg)
        .and_then(|f| f.set_len(64 << 20))
        .expect("root image");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&sb.rootfs)
        .arg(&rimg)
        .status()
        .expect("mkfs.ext4");
    assert!(st.success());
    sb.insert(
        Kind::Volume,
        "root",
        json!({"pool": "local", "size": "64Mi"}),
    );
    let rv = sb.resource(
        "rootvol",
        json!({
            "rootfs": {"volume": "root"},
            "command": ["/bin/sh", "-c", LOOP],
            "unprivileged": false,
        }),
    );
    sb.apply(&rv);
    let (code, out) = sb.exec("rootvol", &["sh", "-c", "mount | grep ' / '"]);
    assert!(
        code == 0 && out.contains("ext4"),
        "root is the volume: {out}"
    );
    sb.delete(&rv);
    assert!(
        loop_devices_backed_by(&rimg).is_empty() || {
            std::thread::sleep(Duration::from_millis(500));
            loop_devices_backed_by(&rimg).is_empty()
        }
    );
    sb.delete(&c);
    assert!(!staging.exists(), "staging mount removed");
    wait_until("loop device detached", Duration::from_secs(5), || {
        loop_devices_backed_by(&img).is_empty()
    });
    sb.assert_clean();
}

fn bad_command_is_reported() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let c = sb.resource(
        "bad",
        json!({
            "rootfs": {"path": sb.rootfs},
            "command": ["/no/such/init"],
            "unprivileged": false,
            "restartPolicy": "never",
        }),
    );
    let o = sb.observe(&c);
    let err = sb
        .driver
        .apply(&c, &o, &sb.world)
        .expect_err("apply must fail");
    assert!(err.to_string().contains("/no/such/init"), "{err}");
    let o = sb.observe(&c);
    assert_eq!(o.state["state"], "stopped");
    assert!(
        o.status["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("/no/such/init")),
        "{}",
        o.status
    );
    sb.delete(&c);
    sb.assert_clean();
}

/// A link in the rootfs pointing at a host path must not take stead's mounts out of the
/// root: targets resolve inside the root (as the container itself would resolve them).
fn rootfs_symlink_stays_inside() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let host = sb.tmp.path().join("host");
    fs::create_dir_all(&host).expect("host dir");
    symlink(&host, sb.rootfs.join("data")).expect("plant link");
    let pool = sb.tmp.path().join("pool");
    fs::create_dir_all(pool.join("images")).expect("pool");
    fs::File::create(pool.join("images/vol.raw"))
        .and_then(|f| f.set_len(32 << 20))
        .expect("sparse image");
    sb.insert(
        Kind::StoragePool,
        "local",
        json!({"type": "dir", "path": pool}),
    );
    sb.insert(
        Kind::Volume,
        "vol",
        json!({"pool": "local", "size": "32Mi"}),
    );
    let spec = json!({
        "rootfs": {"path": sb.rootfs},
        "command": ["/bin/sh", "-c", LOOP],
        "unprivileged": false,
        "mounts": [{"volume": "vol", "path": "/data/sub"}],
    });
    let c = sb.resource("link", spec);
    sb.apply(&c);
    let listing: Vec<_> = fs::read_dir(&host).expect("read host dir").collect();
    assert!(listing.is_empty(), "created on the host: {listing:?}");
    let inner = sb.rootfs.join(host.strip_prefix("/").expect("absolute"));
    assert!(inner.join("sub").is_dir(), "target made inside the rootfs");
    let (code, out) = sb.exec(
        "link",
        &["sh", "-c", "echo hi > /data/sub/f && cat /data/sub/f"],
    );
    assert_eq!((code, out.trim()), (0, "hi"));
    let staging = sb.env.run_dir.join("containers/link/volumes/0");
    assert!(staging.join("f").is_file(), "the write went to the volume");
    let (_, mi) = sb.exec("link", &["cat", "/proc/self/mountinfo"]);
    let want = format!(" {}/sub ", host.display());
    assert!(
        mi.contains(&want),
        "volume at the link's in-root target: {mi}"
    );
    sb.delete(&c);
    assert!(fs::read_dir(&host).expect("read").next().is_none());
    // A link into the container's own /proc: refused, not mounted over kernel files.
    symlink("/proc/sys", sb.rootfs.join("ksys")).expect("plant link");
    let spec = json!({
        "rootfs": {"path": sb.rootfs},
        "command": ["/bin/sh", "-c", LOOP],
        "unprivileged": false,
        "mounts": [{"volume": "vol", "path": "/ksys"}],
    });
    let k = sb.resource("ksys", spec);
    let o = sb.observe(&k);
    let err = sb.driver.apply(&k, &o, &sb.world).expect_err("refused");
    assert!(err.to_string().contains("/proc or /sys"), "{err}");
    sb.delete(&k);
    sb.assert_clean();
}

/// Capability sets of a process from /proc/<pid>/status, by name (`CapInh`, ...).
fn cap_sets(pid: i64) -> BTreeMap<String, u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .filter_map(|l| l.split_once(":\t"))
        .filter(|(k, _)| k.starts_with("Cap"))
        .map(|(k, v)| {
            let v = u64::from_str_radix(v.trim(), 16).expect("hex capability set");
            (k.to_string(), v)
        })
        .collect()
}

/// Waits until init (`LOOP`) has installed its TERM trap: a pid 1 ignores signals it has
/// no handler for, so a stop sent earlier would wait for the SIGKILL timeout.
fn wait_for_term_trap(sb: &Sandbox, c: &Resource) {
    let pid = sb.observe(c).status["pid"].as_i64().expect("init pid");
    wait_until("TERM trap", Duration::from_secs(5), || {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:\t"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|m| m & (1 << (libc::SIGTERM - 1)) != 0)
    });
}

/// A container spec without network, with memory and pids limits, running `command`.
fn plain_spec(sb: &Sandbox, command: &[&str], extra: Value) -> Value {
    let mut spec = json!({
        "rootfs": {"template": sb.template},
        "command": command,
        "unprivileged": false,
        "resources": {"memory": "64Mi", "pids": 64},
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    spec
}

/// Waits until init of `c` catches SIGTERM.
fn wait_until_term_caught(sb: &Sandbox, c: &Resource) {
    let pid = sb.observe(c).status["pid"].as_i64().expect("init pid");
    wait_until("TERM handler", Duration::from_secs(5), || {
        stead_host::procfs::ProcFs::host()
            .signal_masks(pid)
            .is_ok_and(|m| m.catches(libc::SIGTERM))
    });
}

/// Deletes `c` and returns how long it took.
fn timed_delete(sb: &Sandbox, c: &Resource) -> Duration {
    let t = Instant::now();
    sb.delete(c);
    let took = t.elapsed();
    eprintln!("  delete of {} took {took:?}", c.id.name);
    took
}

/// Issue 17: a stop honours SIGTERM handling. An init that exits on TERM is gone at once;
/// `sleep` as PID 1 (no handler: the kernel drops the TERM) is killed at once instead of
/// after the timeout; an init that handles TERM but keeps running gets its `stopTimeout`.
fn stop_detects_how_init_handles_term() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let trap = plain_spec(
        &sb,
        &["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"],
        json!({}),
    );
    let c = sb.resource("trapexit", trap);
    sb.apply(&c);
    wait_until_term_caught(&sb, &c);
    assert_eq!(sb.driver.stop_timeout_secs(&c, &sb.observe(&c)), Some(10));
    assert!(timed_delete(&sb, &c) < Duration::from_secs(2));

    let sleep = plain_spec(&sb, &["/bin/sleep", "1000"], json!({}));
    let c = sb.resource("sleeper", sleep);
    sb.apply(&c);
    let pid = sb.observe(&c).status["pid"].as_i64().expect("init pid");
    let masks = stead_host::procfs::ProcFs::host()
        .signal_masks(pid)
        .expect("masks of sleep");
    assert!(!masks.catches(libc::SIGTERM), "{masks:?}");
    assert!(timed_delete(&sb, &c) < Duration::from_secs(2));

    let stubborn = plain_spec(
        &sb,
        &[
            "/bin/sh",
            "-c",
            "trap 'echo got-term' TERM; while :; do sleep 1; done",
        ],
        json!({"stopTimeout": "3s"}),
    );
    let c = sb.resource("stubborn", stubborn);
    sb.apply(&c);
    wait_until_term_caught(&sb, &c);
    assert_eq!(sb.driver.stop_timeout_secs(&c, &sb.observe(&c)), Some(3));
    let took = timed_delete(&sb, &c);
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    sb.assert_clean();
}

/// Raises a capability in this thread's inheritable and ambient sets until dropped.
struct InheritedCap(caps::Capability);

impl InheritedCap {
    fn raise(cap: caps::Capability) -> Self {
        caps::raise(None, caps::CapSet::Inheritable, cap).expect("raise inheritable");
        caps::raise(None, caps::CapSet::Ambient, cap).expect("raise ambient");
        InheritedCap(cap)
    }
}

impl Drop for InheritedCap {
    fn drop(&mut self) {
        let _ = caps::drop(None, caps::CapSet::Ambient, self.0);
        let _ = caps::drop(None, caps::CapSet::Inheritable, self.0);
    }
}

/// A shim started with an inheritable (and ambient) CAP_SYS_ADMIN, as systemd's
/// `AmbientCapabilities=` would start it, must not pass it to the container's init.
/// Privileged containers are where it bites: a new user namespace clears the inheritable
/// set by itself, so the unprivileged one here checks the same sets as a control.
fn inherited_caps_do_not_reach_init() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    for (name, unprivileged, addr) in [
        ("capp", false, "10.77.0.2/24"),
        ("capu", true, "10.77.0.3/24"),
    ] {
        let spec = container_spec(&sb, addr, json!({"unprivileged": unprivileged}));
        let c = sb.resource(name, spec);
        {
            let _inherited = InheritedCap::raise(caps::Capability::CAP_SYS_ADMIN);
            sb.apply(&c);
        }
        let st = sb.observe(&c).status;
        let sys_admin = caps::Capability::CAP_SYS_ADMIN.bitmask();
        let shim = cap_sets(st["shimPid"].as_i64().expect("shim pid"));
        assert_ne!(
            shim["CapInh"] & sys_admin,
            0,
            "the shim inherited it: {shim:?}"
        );
        let init = cap_sets(st["pid"].as_i64().expect("init pid"));
        assert_eq!(init["CapInh"], 0, "{name}: {init:?}");
        assert_eq!(init["CapAmb"], 0, "{name}: {init:?}");
        for set in ["CapPrm", "CapEff", "CapBnd"] {
            assert_eq!(
                init[set] & sys_admin,
                0,
                "{name}: {set} has CAP_SYS_ADMIN: {init:?}"
            );
        }
        let kept = stead_drivers::container::security::KEPT_CAPS
            .iter()
            .filter(|(c, _)| unprivileged || *c != 27) // MKNOD: user namespaces only
            .fold(0u64, |m, (c, _)| m | 1 << c);
        assert_eq!(init["CapBnd"], kept, "{name}: {init:?}");
        assert_eq!(init["CapPrm"], kept, "{name}: {init:?}");
        wait_for_term_trap(&sb, &c);
        sb.delete(&c);
    }
    sb.assert_clean();
}

/// The container's own cgroup directories that exist, in every hierarchy.
fn container_cgroups(sb: &Sandbox, name: &str) -> Vec<PathBuf> {
    let hier = Hierarchy::detect().expect("hier");
    let mut dirs = hier.cgroup(&sb.name, name).procs_dirs();
    // procs_dirs lists every v1 controller stead uses; add the others mounted here.
    if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            dirs.push(e.path().join(&sb.name).join(name));
        }
    }
    dirs.retain(|d| d.exists());
    dirs.sort();
    dirs.dedup();
    dirs
}

/// A start that fails (command missing, init exiting at once, a device filter the
/// cgroup refuses) leaves no cgroup or veth behind; the run dir goes with the delete.
fn failed_start_leaves_nothing() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    let missing = json!({"command": ["/no/such/init"], "restartPolicy": "never"});
    let bad = sb.resource("bad", container_spec(&sb, "10.77.0.2/24", missing));
    let o = sb.observe(&bad);
    sb.driver
        .apply(&bad, &o, &sb.world)
        .expect_err("missing command");
    let quick = json!({"command": ["/bin/true"], "restartPolicy": "never"});
    let quick = sb.resource("quick", container_spec(&sb, "10.77.0.3/24", quick));
    let o = sb.observe(&quick);
    let _ = sb.driver.apply(&quick, &o, &sb.world);
    wait_until("quick init exited", Duration::from_secs(10), || {
        sb.observe(&quick).state["state"] == "stopped"
    });
    for c in [&bad, &quick] {
        let name = c.id.name.as_str();
        let left = container_cgroups(&sb, name);
        assert!(
            left.is_empty(),
            "{name}: cgroups left after the start: {left:?}"
        );
        sb.delete(c);
        let dir = sb.env.run_dir.join("containers").join(name);
        assert!(!dir.exists(), "{name}: run dir left: {}", dir.display());
    }
    sb.assert_clean();
}

/// A device filter the cgroup cannot take fails the start, and nothing is left.
fn device_filter_failure_fails_start() {
    let devices = Path::new("/sys/fs/cgroup/devices");
    if Hierarchy::detect().expect("hier").is_v2() || !devices.is_dir() {
        eprintln!(
            "SKIP device_filter_failure_fails_start: injects through the v1 devices controller"
        );
        return;
    }
    let mut sb = Sandbox::new("10.77.0.1/24");
    // The parent allows no device: the container's allow lines are refused (EPERM).
    let parent = devices.join(&sb.name);
    fs::create_dir_all(&parent).expect("parent devices cgroup");
    fs::write(parent.join("devices.deny"), "a").expect("deny all in the parent");
    let c = sb.resource("nodev", container_spec(&sb, "10.77.0.2/24", json!({})));
    let o = sb.observe(&c);
    let err = sb
        .driver
        .apply(&c, &o, &sb.world)
        .expect_err("start must fail");
    assert!(err.to_string().contains("devices"), "{err}");
    let left = container_cgroups(&sb, "nodev");
    assert!(
        left.is_empty(),
        "cgroups left after the failed start: {left:?}"
    );
    assert!(!sb.links().contains("vs"), "veth left: {}", sb.links());
    sb.delete(&c);
    let dir = sb.env.run_dir.join("containers/nodev");
    assert!(!dir.exists(), "run dir left: {}", dir.display());
    let _ = fs::remove_dir(&parent);
    sb.assert_clean();
}

/// The seccomp allow list: a new user namespace (which needs no capability) is refused
/// with EPERM in privileged and unprivileged containers; ordinary work still runs.
fn seccomp_refuses_new_namespaces() {
    let mut sb = Sandbox::new("10.77.0.1/24");
    for (name, unprivileged, addr) in [
        ("scp", false, "10.77.0.2/24"),
        ("scu", true, "10.77.0.3/24"),
    ] {
        let spec = container_spec(&sb, addr, json!({"unprivileged": unprivileged}));
        let c = sb.resource(name, spec);
        sb.apply(&c);
        let (code, out) = sb.exec(name, &["unshare", "-U", "true"]);
        assert_ne!(code, 0, "{name}: unshare -U succeeded: {out}");
        assert!(out.contains("Operation not permitted"), "{name}: {out}");
        let (code, out) = sb.exec(name, &["sh", "-c", "echo a > /tmp/f && cat /tmp/f | wc -c"]);
        assert_eq!((code, out.trim()), (0, "2"), "{name}");
        wait_for_term_trap(&sb, &c);
        sb.delete(&c);
    }
    sb.assert_clean();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    run_as_shim_if_asked(&args);
    let tests: [(&str, fn()); 23] = [
        (
            "init_and_exec_join_every_cgroup",
            init_and_exec_join_every_cgroup,
        ),
        (
            "loopback_is_up_without_interfaces",
            loopback_is_up_without_interfaces,
        ),
        (
            "stop_detects_how_init_handles_term",
            stop_detects_how_init_handles_term,
        ),
        (
            "fence_deadline_kills_an_ha_container",
            fence_deadline_kills_an_ha_container,
        ),
        (
            "renewed_deadline_keeps_the_container",
            renewed_deadline_keeps_the_container,
        ),
        (
            "fenced_file_kills_at_once_and_refuses_a_start",
            fenced_file_kills_at_once_and_refuses_a_start,
        ),
        (
            "non_ha_container_ignores_the_fence_file",
            non_ha_container_ignores_the_fence_file,
        ),
        (
            "seccomp_refuses_new_namespaces",
            seccomp_refuses_new_namespaces,
        ),
        ("failed_start_leaves_nothing", failed_start_leaves_nothing),
        (
            "device_filter_failure_fails_start",
            device_filter_failure_fails_start,
        ),
        (
            "inherited_caps_do_not_reach_init",
            inherited_caps_do_not_reach_init,
        ),
        ("rootfs_symlink_stays_inside", rootfs_symlink_stays_inside),
        ("device_access_is_restricted", device_access_is_restricted),
        (
            "backup_clones_a_reflink_rootfs",
            backup_clones_a_reflink_rootfs,
        ),
        (
            "container_snapshot_and_rollback",
            container_snapshot_and_rollback,
        ),
        (
            "backup_freezes_or_stops_the_container",
            backup_freezes_or_stops_the_container,
        ),
        ("bad_command_is_reported", bad_command_is_reported),
        ("raw_volume_mount", raw_volume_mount),
        ("two_containers_on_a_bridge", two_containers_on_a_bridge),
        ("memory_and_pids_limits", memory_and_pids_limits),
        (
            "restart_after_kill_and_shim_recovery",
            restart_after_kill_and_shim_recovery,
        ),
        ("unprivileged_container", unprivileged_container),
        (
            "stop_start_delete_leave_nothing",
            stop_start_delete_leave_nothing,
        ),
    ];
    // The libtest listing protocol, so cargo-nextest runs these tests one by one:
    // `--list --format terse` prints `name: test` lines (`--ignored`: none are ignored).
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
        .filter(|a| a.parse::<u32>().is_err()) // values of --test-threads N and the like
        .collect();
    if !nix::unistd::geteuid().is_root() || !Path::new("/bin/busybox").exists() {
        for (name, _) in tests {
            eprintln!("SKIP {name}: needs root and /bin/busybox (apt busybox-static)");
        }
        return;
    }
    // Double-forked supervisors are re-parented here rather than to a PID 1 that may not
    // reap them; tests run one at a time, so reaping in `Sandbox::drop` steals no
    // `Command`'s exit status.
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
    eprintln!("container_e2e: {ran} run, {failed} failed");
    println!("{} passed, {failed} failed", ran - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

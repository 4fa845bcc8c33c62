//! Container start benchmark (not a test): prints figures.
//!
//! ```text
//! cargo build -p stead-drivers --example container_bench [--release]
//! sudo target/.../examples/container_bench [ITERATIONS]
//! ```
//!
//! Like the e2e tests, this binary doubles as the shim (`<binary> shim ...`). Everything
//! runs in a private network namespace with a bridge, a private cgroup parent and a temp
//! dir, all removed at the end. Measures:
//! 1. shim-internal start (clone → init exec'd: namespaces, cgroup attach, veth on the
//!    bridge, mounts, pivot_root, caps, seccomp) — `startMicros` in the state file;
//! 2. driver `apply` of one container from nothing (spawn the shim binary, double fork,
//!    cgroup create + limits, start, readiness);
//! 3. `crun run` of /bin/true on the same busybox rootfs (when `crun` is installed);
//! 4. apply of 50 containers (each with a veth) from empty, then their deletion.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stead_drivers::container::ContainerDriver;
use stead_reconciler::driver::{Driver, HostEnv};
use stead_schema::{Kind, Resource, ResourceId};

#[path = "../tests/container_util/mod.rs"]
mod container_util;

use container_util::{new_netns_on, nsenter, resource, run_as_shim_if_asked};

const LOOP: &str = "trap 'exit 0' TERM; while :; do sleep 1000 & wait; done";

fn build_rootfs(dir: &Path) {
    for d in ["bin", "sbin", "etc", "proc", "sys", "dev", "root", "tmp"] {
        fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("copy busybox");
    for a in ["sh", "sleep", "true", "ps", "ip", "ping"] {
        let _ = symlink("busybox", dir.join("bin").join(a));
    }
    let _ = symlink("../bin/busybox", dir.join("sbin/init"));
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
}

fn stats(label: &str, mut v: Vec<Duration>) {
    if v.is_empty() {
        return;
    }
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label:<58} n={:<3} min {:>7.2} ms  median {:>7.2} ms  p90 {:>7.2} ms",
        v.len(),
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[(v.len() * 9 / 10).min(v.len() - 1)])
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    run_as_shim_if_asked(&args);
    if args.get(1).map(String::as_str) == Some("crun-loop") {
        let n = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
        crun_loop(Path::new(&args[2]), n);
        return;
    }
    let iters: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(30);
    if !nix::unistd::geteuid().is_root() || !Path::new("/bin/busybox").exists() {
        eprintln!("container_bench needs root and /bin/busybox (apt busybox-static)");
        std::process::exit(1);
    }
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let tmp = tempfile::tempdir().expect("tmp");
    let netns = tmp.path().join("netns");
    new_netns_on(&netns);
    nsenter(&netns, &["ip", "link", "add", "br0", "type", "bridge"]);
    nsenter(&netns, &["ip", "link", "set", "br0", "up"]);
    let rootfs = tmp.path().join("rootfs");
    build_rootfs(&rootfs);
    let env = HostEnv {
        state_dir: tmp.path().join("state"),
        run_dir: tmp.path().join("run"),
        cgroup_parent: format!("stead-bench-{}", std::process::id()),
        netns: Some(netns.clone()),
        self_exe: std::env::current_exe().expect("exe"),
        fence_file: None,
    };
    let driver = ContainerDriver::new(&env).expect("driver");
    let world: BTreeMap<ResourceId, Resource> = BTreeMap::new();
    let spec = |veth: bool, i: usize| {
        let mut s = json!({
            "rootfs": {"path": rootfs},
            "command": ["/bin/sh", "-c", LOOP],
            "unprivileged": false,
            "resources": {"memory": "64Mi", "cpus": 1, "pids": 100},
        });
        if veth {
            s["interfaces"] = json!([{"name": "eth0", "network": "br0",
                "address": format!("10.88.{}.{}/16", i / 250, i % 250 + 2)}]);
        }
        s
    };
    let state_of = |name: &str| -> Value {
        let p = env.run_dir.join("containers").join(name).join("state.json");
        serde_json::from_slice(&fs::read(p).expect("state")).expect("json")
    };

    println!(
        "container start ({iters} iterations each; debug/release = how this binary was built)"
    );
    for (veth, label) in [(false, "no interface"), (true, "one veth on a bridge")] {
        let mut inner = Vec::new();
        let mut apply = Vec::new();
        for i in 0..iters {
            let r = resource(Kind::Container, "bench", spec(veth, i));
            let t = Instant::now();
            driver
                .apply(&r, &Default::default(), &world)
                .expect("apply");
            apply.push(t.elapsed());
            let us = state_of("bench")["startMicros"].as_u64().unwrap_or(0);
            inner.push(Duration::from_micros(us));
            driver
                .delete(&r, &Default::default(), &world)
                .expect("delete");
        }
        stats(
            &format!("stead shim start: clone -> init exec ({label})"),
            inner,
        );
        stats(
            &format!("stead apply: spawn shim -> running ({label})"),
            apply,
        );
    }

    match Command::new("crun").arg("--version").output() {
        Ok(o) if o.status.success() => bench_crun(tmp.path(), &rootfs, iters),
        _ => println!("crun: not installed (apt-get install crun), skipped"),
    }
    if Command::new("lxc-execute")
        .arg("--version")
        .output()
        .is_err()
    {
        println!(
            "lxc: not installed (its Debian package also brings the lxc-net service), skipped"
        );
    }

    let n = 50;
    let rs: Vec<Resource> = (0..n)
        .map(|i| resource(Kind::Container, &format!("c{i}"), spec(true, i)))
        .collect();
    let t = Instant::now();
    for r in &rs {
        driver.apply(r, &Default::default(), &world).expect("apply");
    }
    let up = t.elapsed();
    let t = Instant::now();
    for r in &rs {
        driver
            .delete(r, &Default::default(), &world)
            .expect("delete");
    }
    let down = t.elapsed();
    println!(
        "apply of {n} containers from empty (veth each, sequential): {:.0} ms ({:.1} ms each); delete all: {:.0} ms",
        up.as_secs_f64() * 1000.0,
        up.as_secs_f64() * 1000.0 / n as f64,
        down.as_secs_f64() * 1000.0
    );
    // The same with 4 workers, as a reconciler with bounded parallelism would run it.
    let t = Instant::now();
    std::thread::scope(|sc| {
        for chunk in rs.chunks(n.div_ceil(4)) {
            let (driver, world) = (&driver, &world);
            sc.spawn(move || {
                for r in chunk {
                    driver.apply(r, &Default::default(), world).expect("apply");
                }
            });
        }
    });
    let up = t.elapsed();
    for r in &rs {
        driver
            .delete(r, &Default::default(), &world)
            .expect("delete");
    }
    println!(
        "apply of {n} containers from empty (veth each, 4 workers): {:.0} ms",
        up.as_secs_f64() * 1000.0
    );
    let _ = nix::mount::umount2(&netns, nix::mount::MntFlags::MNT_DETACH);
    // Exited supervisors were re-parented to us (subreaper): reap them.
    while let Ok(st) = nix::sys::wait::waitpid(
        None::<nix::unistd::Pid>,
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    ) {
        if st == nix::sys::wait::WaitStatus::StillAlive {
            break;
        }
    }
}

fn bench_crun(tmp: &Path, rootfs: &Path, iters: usize) {
    let bundle = tmp.join("crun-bundle");
    fs::create_dir_all(&bundle).expect("bundle");
    let st = Command::new("crun")
        .args(["spec"])
        .current_dir(&bundle)
        .status()
        .expect("crun spec");
    assert!(st.success());
    let p = bundle.join("config.json");
    let mut cfg: Value = serde_json::from_slice(&fs::read(&p).expect("read")).expect("json");
    cfg["process"]["args"] = json!(["/bin/true"]);
    cfg["process"]["terminal"] = json!(false);
    cfg["root"]["path"] = json!(rootfs);
    cfg["root"]["readonly"] = json!(false);
    cfg["linux"]["cgroupsPath"] = json!(format!("/stead-bench-crun-{}", std::process::id()));
    cfg["linux"]["resources"] = json!({"memory": {"limit": 64 << 20},
        "cpu": {"quota": 100000, "period": 100000}, "pids": {"limit": 100}});
    fs::write(&p, serde_json::to_vec_pretty(&cfg).expect("ser")).expect("write");
    // crun refuses this host's hybrid layout ("cgroups in hybrid mode not supported") while
    // the empty cgroup2 mount is visible: run it in a private mount namespace without it.
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(std::env::current_exe().expect("exe"))
        .arg("crun-loop")
        .arg(&bundle)
        .arg(iters.to_string())
        .output()
        .expect("unshare");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        println!("crun: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
}

/// Inside `unshare -m`: hide the hybrid cgroup2 mount, then time `crun run`.
fn crun_loop(bundle: &Path, iters: usize) {
    let _ = nix::mount::umount2("/sys/fs/cgroup/unified", nix::mount::MntFlags::MNT_DETACH);
    let mut v = Vec::new();
    for i in 0..iters {
        let id = format!("stead-bench-crun-{}-{i}", std::process::id());
        let t = Instant::now();
        let out = Command::new("crun")
            .args(["--cgroup-manager=cgroupfs", "run", "-b"])
            .arg(bundle)
            .arg(&id)
            .output()
            .expect("crun run");
        v.push(t.elapsed());
        if !out.status.success() {
            eprintln!(
                "crun run failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            std::process::exit(1);
        }
    }
    stats(
        "crun run /bin/true (v1 cgroups, no veth; run to exit + delete)",
        v,
    );
}

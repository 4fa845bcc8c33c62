//! Fault injection on workloads through the real `stead` binary: the container shim and
//! the VM supervisor/VMM SIGKILLed while `stead apply` starts them, then another apply
//! converges (the workload running, one supervisor, one cgroup) and `destroy` leaves
//! nothing of the sandbox behind; and a Volume whose source does not fit in its pool
//! fails with ENOSPC naming the volume, then converges once the pool has room.
//!
//! Needs root (and busybox-static for the container, /dev/kvm for the VM); otherwise
//! `SKIP`. Build the binary first: `cargo build --bin stead`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stead_e2e::{Sandbox, Tmpfs, busybox_ok, is_root, kvm_ok, skip_unless};

/// Pids and command lines of processes whose command line names this sandbox and runs
/// `stead <sub>` (`shim` or `vmm`).
fn sandbox_processes(sb: &Sandbox, sub: &str) -> Vec<(i32, String)> {
    let needle = sb.dir.path().to_string_lossy().into_owned();
    let sub = format!(" {sub} ");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(&needle) && c.contains(&sub) {
                out.push((pid, c));
            }
        }
    }
    out
}

fn pids(procs: &[(i32, String)]) -> Vec<i32> {
    let mut p: Vec<i32> = procs.iter().map(|(p, _)| *p).collect();
    p.sort();
    p
}

fn sigkill(pid: i32) {
    stead_e2e::signal(pid, rustix::process::Signal::KILL);
}

/// Which of the sandbox's `stead <sub>` processes to kill.
type Pick = fn(&[(i32, String)]) -> Vec<i32>;

/// Every one of them.
fn all(procs: &[(i32, String)]) -> Vec<i32> {
    pids(procs)
}

/// Those whose parent is one of them too (the VMM under its supervisor).
fn children(procs: &[(i32, String)]) -> Vec<i32> {
    let ours = pids(procs);
    ours.iter()
        .copied()
        .filter(|p| ppid(*p).is_some_and(|pp| ours.contains(&pp)))
        .collect()
}

fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs `stead apply --yes m`; as soon as `pick` chooses some of this sandbox's
/// `stead <sub>` processes, waits `delay` and SIGKILLs what `pick` chooses then.
/// Returns the pids killed and the apply's exit code.
fn apply_killing(sb: &Sandbox, m: &str, sub: &str, pick: Pick, delay: Duration) -> (Vec<i32>, i32) {
    let mut child = sb
        .cmd()
        .args(["apply", "--yes", m])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn apply");
    let t = Instant::now();
    let mut killed = Vec::new();
    while t.elapsed() < Duration::from_secs(60) {
        // Whether apply had exited is read before the scan: on a loaded machine a scan of
        // /proc can take longer than the rest of the apply, and a workload that appeared
        // during the scan must still be found (it outlives the apply) before giving up.
        let exited = child.try_wait().ok().flatten().is_some();
        if !pick(&sandbox_processes(sb, sub)).is_empty() {
            std::thread::sleep(delay);
            let now = pick(&sandbox_processes(sb, sub));
            // Seen, then gone by the second look (a process between fork and exec, or a
            // supervisor restarting its VMM): look again rather than kill nothing.
            if now.is_empty() {
                continue;
            }
            for pid in now {
                sigkill(pid);
                killed.push(pid);
            }
            break;
        }
        if exited {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let code = child.wait().map(|s| s.code().unwrap_or(-1)).unwrap_or(-1);
    (killed, code)
}

/// After a kill in round `round`: `stead apply` succeeds and `stead diff` is clean.
fn reapply_converges(sb: &Sandbox, m: &str, round: &str) {
    let out = sb.run(&["apply", "--yes", m]);
    assert_eq!(
        out.code(),
        0,
        "delay {round}: the apply after the kill\n{}\n{}",
        out.stdout(),
        out.stderr()
    );
    sb.run(&["diff", m]).expect_code(0);
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Child cgroups of the sandbox's cgroup parent, per v1 controller (`ctrl/child`).
fn child_cgroups(sb: &Sandbox) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let ctrl = e.path();
        // `cpu` and `cpuacct` are links to `cpu,cpuacct`: count each hierarchy once.
        if ctrl.is_symlink() || !ctrl.is_dir() {
            continue;
        }
        let parent = ctrl.join(&sb.cgroup_parent);
        for c in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            if c.path().is_dir() {
                out.push(format!(
                    "{}/{}",
                    e.file_name().to_string_lossy(),
                    c.file_name().to_string_lossy()
                ));
            }
        }
    }
    out.sort();
    out
}

/// What `scripts/leak-check.sh` looks for, restricted to this sandbox: processes, child
/// cgroups, mounts and loop devices naming its dir, stead links in its netns.
fn leaks(sb: &Sandbox) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for sub in ["shim", "vmm"] {
        out.extend(
            sandbox_processes(sb, sub)
                .into_iter()
                .map(|(p, c)| format!("process {p}: {c}")),
        );
    }
    out.extend(child_cgroups(sb).into_iter().map(|c| format!("cgroup {c}")));
    let needle = sb.dir.path().to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    out.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&needle))
            .map(|l| format!("mount {l}")),
    );
    if let Ok(o) = Command::new("losetup").arg("-a").output() {
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains(&needle))
                .map(|l| format!("loop {l}")),
        );
    }
    out.extend(
        sb.links()
            .lines()
            .filter(|l| l.contains("stead") || l.contains("master"))
            .map(|l| format!("link {l}")),
    );
    out
}

/// Kills what a failed test left running (before the sandbox removes its cgroup parent).
struct Leftovers<'a>(&'a Sandbox);

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        for sub in ["shim", "vmm"] {
            for (pid, _) in sandbox_processes(self.0, sub) {
                sigkill(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for c in child_cgroups(self.0) {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(c.split('/').next().unwrap_or(""))
                    .join(&self.0.cgroup_parent)
                    .join(c.split('/').nth(1).unwrap_or("")),
            );
        }
    }
}

/// After a round of a kill test (`round`, named in failures): the workload's cgroups are
/// all named `leaf`, the leak list sees it running (so an empty list after destroy means
/// something), and `stead destroy` of the manifests `m` leaves nothing.
fn destroy_leaves_nothing(sb: &Sandbox, m: &str, leaf: &str, round: impl std::fmt::Display) {
    let cgs = child_cgroups(sb);
    assert!(!cgs.is_empty());
    assert!(
        cgs.iter().all(|c| c.ends_with(&format!("/{leaf}"))),
        "delay {round}: cgroups {cgs:?}"
    );
    let running = leaks(sb);
    assert!(
        running.iter().any(|l| l.starts_with("process"))
            && running.iter().any(|l| l.starts_with("cgroup")),
        "{running:?}"
    );
    sb.run(&["destroy", "--yes", "--allow-data-loss", m])
        .expect_code(0);
    assert_eq!(leaks(sb), Vec::<String>::new(), "delay {round}");
}

// ------------------------------------------------------------------ container shim

/// Links enslaved to `bridge` in the sandbox's netns.
fn attached(sb: &Sandbox, bridge: &str) -> Vec<String> {
    let ns = sb.netns.as_deref().expect("netns");
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "master", bridge])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn container_pid(sb: &Sandbox) -> Option<i32> {
    let out = sb.run(&["get", "container/busy", "-o", "json"]);
    let v: Value = serde_json::from_str(&out.stdout()).ok()?;
    v["items"][0]["status"]["runtime"]["pid"]
        .as_i64()
        .map(|p| p as i32)
}

#[test]
fn fault_shim_sigkill_during_apply_converges_and_destroy_leaves_nothing() {
    const TEST: &str = "fault_shim_sigkill_during_apply_converges_and_destroy_leaves_nothing";
    if !busybox_ok(TEST) {
        return;
    }
    let sb = Sandbox::with_netns();
    let _leftovers = Leftovers(&sb);
    let root = sb.busybox_rootfs();
    sb.write(
        "m/ct.yaml",
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: lan0}}\nspec: {{addresses: [10.236.0.1/24]}}\n---\napiVersion: stead.dev/v1alpha1\nkind: Container\nmetadata: {{name: busy}}\nspec:\n  rootfs: {{path: {}}}\n  unprivileged: false\n  interfaces: [{{name: eth0, network: lan0, address: 10.236.0.2/24}}]\n  command: [/bin/sh, -c, \"trap 'exit 0' TERM; while :; do sleep 1; done\"]\n",
            root.display()
        ),
    );
    let m = sb.path("m");
    let m = m.to_str().unwrap();
    for delay_ms in [0u64, 5, 40, 150] {
        let (killed, code) = apply_killing(&sb, m, "shim", all, Duration::from_millis(delay_ms));
        assert!(!killed.is_empty(), "delay {delay_ms}: no shim was seen");
        eprintln!("delay {delay_ms}: killed {killed:?}, apply exited {code}");
        reapply_converges(&sb, m, &delay_ms.to_string());
        let pid = container_pid(&sb).expect("container pid");
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "container pid {pid}"
        );
        // Exactly one supervisor, none of the killed ones.
        wait_for("one shim", Duration::from_secs(10), || {
            sandbox_processes(&sb, "shim").len() == 1
        });
        let shims = pids(&sandbox_processes(&sb, "shim"));
        assert!(
            !killed.iter().any(|k| shims.contains(k)),
            "delay {delay_ms}: {shims:?} vs killed {killed:?}"
        );
        // One veth on the bridge: none left over from the killed start.
        let ports = attached(&sb, "lan0");
        assert_eq!(ports.len(), 1, "delay {delay_ms}: {ports:?}");
        // Stop it again so that the next round starts the shim anew.
        destroy_leaves_nothing(&sb, m, "busy", delay_ms);
    }
}

// ------------------------------------------------------------------ VM supervisor/VMM

fn vm_manifest(sb: &Sandbox, kernel: &Path) -> PathBuf {
    let text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\nspec: {{type: dir, path: {}}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: vm1-root}}\nspec: {{pool: local, size: 16Mi, deletionPolicy: Delete}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: lan0}}\nspec: {{type: bridge, addresses: [10.232.0.1/24]}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: vm1}}\nspec:\n  cpus: 1\n  memory: 32Mi\n  boot: {{kernel: {}, cmdline: \"mode=idle\"}}\n  disks: [{{volume: vm1-root}}]\n  interfaces: [{{network: lan0}}]\n  restartPolicy: always\n",
        sb.path("pools/local").display(),
        kernel.display()
    );
    sb.write("m/all.yaml", &text);
    sb.path("m")
}

/// `stead get vm/vm1 -o json`: (observed state, runtime status).
fn get_vm(sb: &Sandbox) -> (Value, Value) {
    let out = sb.run(&["get", "vm/vm1", "-o", "json"]).expect_code(0);
    let v: Value = serde_json::from_str(&out.stdout()).expect("get json");
    let item = &v["items"][0]["status"];
    (item["observed"].clone(), item["runtime"].clone())
}

#[test]
fn fault_vmm_sigkill_during_apply_converges_and_destroy_leaves_nothing() {
    const TEST: &str = "fault_vmm_sigkill_during_apply_converges_and_destroy_leaves_nothing";
    if !kvm_ok(TEST) {
        return;
    }
    let sb = Sandbox::with_netns();
    let _leftovers = Leftovers(&sb);
    let kernel = sb.path("images/tiny-guest.bin");
    sb.run(&["vmm", "--write-demo-guest", kernel.to_str().unwrap()])
        .expect_code(0);
    let m = vm_manifest(&sb, &kernel);
    let m = m.to_str().unwrap();
    // Supervisor and VMM at four points; the VMM alone (its supervisor lives on) at two.
    let rounds: [(&str, Pick, u64); 6] = [
        ("all", all, 0),
        ("all", all, 5),
        ("all", all, 40),
        ("all", all, 150),
        ("vmm", children, 0),
        ("vmm", children, 30),
    ];
    for (what, pick, ms) in rounds {
        let delay_ms = format!("{what} {ms}");
        let delay = Duration::from_millis(ms);
        let (killed, code) = apply_killing(&sb, m, "vmm", pick, delay);
        assert!(!killed.is_empty(), "delay {delay_ms}: no VMM was seen");
        eprintln!("delay {delay_ms}: killed {killed:?}, apply exited {code}");
        reapply_converges(&sb, m, &delay_ms);
        let (state, status) = get_vm(&sb);
        assert_eq!(state["state"], "running", "delay {delay_ms}: {status}");
        // One supervisor and one VMM, the ones stead reports, none of the killed ones.
        wait_for(
            "one supervisor and one VMM",
            Duration::from_secs(10),
            || sandbox_processes(&sb, "vmm").len() == 2,
        );
        let (_, status) = get_vm(&sb);
        let mut want = vec![
            status["supervisorPid"].as_i64().unwrap_or(-1) as i32,
            status["pid"].as_i64().unwrap_or(-1) as i32,
        ];
        want.sort();
        let have = pids(&sandbox_processes(&sb, "vmm"));
        assert_eq!(have, want, "delay {delay_ms}: {status}");
        assert!(!killed.iter().any(|k| have.contains(k)));
        destroy_leaves_nothing(&sb, m, "vm-vm1", &delay_ms);
        assert!(!sb.path("run/vms/vm1").exists());
    }
}

/// The line of `ip -o link show` for link `name` in the sandbox's netns, if any.
fn link_line(sb: &Sandbox, name: &str) -> Option<String> {
    sb.links()
        .lines()
        .find(|l| l.split(':').nth(1).map(str::trim) == Some(name))
        .map(str::to_string)
}

/// A VMM restarted after its tap was deleted (what a failed apply's undo does while an
/// orphaned supervisor lives on) must not make the tap again: a tap without stead's alias
/// would make every later apply refuse it as not owned. The deleted tap is drift that
/// apply repairs, and the VM runs again on the tap apply made.
#[test]
fn fault_vmm_restart_after_its_tap_was_deleted_makes_no_tap_and_apply_repairs_it() {
    const TEST: &str =
        "fault_vmm_restart_after_its_tap_was_deleted_makes_no_tap_and_apply_repairs_it";
    if !kvm_ok(TEST) {
        return;
    }
    let sb = Sandbox::with_netns();
    let _leftovers = Leftovers(&sb);
    let kernel = sb.path("images/tiny-guest.bin");
    sb.run(&["vmm", "--write-demo-guest", kernel.to_str().unwrap()])
        .expect_code(0);
    let m = vm_manifest(&sb, &kernel);
    let m = m.to_str().unwrap();
    sb.run(&["apply", "--yes", m]).expect_code(0);
    let (_, status) = get_vm(&sb);
    let tap = status["taps"][0].as_str().expect("a tap").to_string();
    let vmm = status["pid"].as_i64().expect("VMM pid") as i32;
    assert!(link_line(&sb, &tap).is_some_and(|l| l.contains("stead:VirtualMachine/vm1")));

    let ns = sb.netns.as_deref().expect("netns");
    let del = Command::new("ip")
        .args(["-n", ns, "link", "del", &tap])
        .status()
        .expect("ip link del");
    assert!(del.success());
    sigkill(vmm);
    // The supervisor tries again (backoff from 100 ms): no try may make the tap.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert_eq!(link_line(&sb, &tap), None, "a restarted VMM made {tap}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, status) = get_vm(&sb);
    assert_eq!(status["lostTaps"][0], tap.as_str(), "{status}");
    assert_ne!(sb.run(&["diff", m]).code(), 0, "a lost tap is drift");

    reapply_converges(&sb, m, "tap deleted");
    assert!(link_line(&sb, &tap).is_some_and(|l| l.contains("stead:VirtualMachine/vm1")));
    wait_for("the VM running again", Duration::from_secs(20), || {
        let (_, st) = get_vm(&sb);
        st["vmState"] == "running" && st["pid"].as_i64().is_some_and(|p| p as i32 != vmm)
    });
    destroy_leaves_nothing(&sb, m, "vm-vm1", "tap deleted");
}

// ------------------------------------------------------------------ ENOSPC on the pool

/// Files under `dir` (relative paths), recursively.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(
                    p.strip_prefix(dir)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

#[test]
fn fault_pool_enospc_names_the_volume_and_converges_after_growth() {
    pool_enospc(
        "fault_pool_enospc_names_the_volume_and_converges_after_growth",
        false,
    );
}

#[test]
fn fault_pool_enospc_leaves_no_temp_file() {
    pool_enospc("fault_pool_enospc_leaves_no_temp_file", true);
}

/// A 12 MiB source copied into a Volume of an 8 MiB tmpfs pool fails with ENOSPC naming
/// the volume (and, with `no_temp`, leaves nothing of it in the pool); after the pool
/// grows, the next apply converges and destroy removes the volume.
fn pool_enospc(test: &str, no_temp: bool) {
    if skip_unless(is_root(), test, "needs root") {
        return;
    }
    let sb = Sandbox::new();
    // The pool is a dir on the tmpfs (destroying the pool removes its dir, which a
    // mount point cannot be).
    let pool = sb.path("fs/small");
    let Some(tmpfs) = Tmpfs::mount(&sb.path("fs"), "8m") else {
        skip_unless(false, test, "cannot mount a tmpfs");
        return;
    };
    // 12 MiB of real (non-zero) data: a sparse copy cannot skip it.
    let src = sb.path("src.img");
    std::fs::write(&src, vec![0xa5u8; 12 << 20]).unwrap();
    sb.write(
        "m/v.yaml",
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: small}}\nspec: {{type: dir, path: {}}}\n\
             ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: big}}\nspec: {{pool: small, size: 16Mi, deletionPolicy: Delete, source: {{file: {}}}}}\n",
            pool.display(),
            src.display()
        ),
    );
    let m = sb.path("m");
    let m = m.to_str().unwrap();
    let out = sb.run(&["apply", "--yes", m]).expect_code(1);
    let text = format!("{}{}", out.stdout(), out.stderr());
    assert!(text.contains("No space left on device"), "{text}");
    assert!(text.contains("Volume/big"), "{text}");
    // Nothing half made is left filling the pool.
    let left: Vec<String> = files_under(&pool)
        .into_iter()
        .filter(|f| f.contains("big"))
        .collect();
    if no_temp {
        assert!(left.is_empty(), "left in the pool after ENOSPC: {left:?}");
    }

    tmpfs.resize("64m");
    sb.run(&["apply", "--yes", m]).expect_code(0);
    sb.run(&["diff", m]).expect_code(0);
    let img = files_under(&pool)
        .into_iter()
        .filter(|f| f.contains("big"))
        .collect::<Vec<_>>();
    assert_eq!(img.len(), 1, "{img:?}");
    let data = std::fs::read(pool.join(&img[0])).unwrap();
    assert_eq!(data.len(), 16 << 20);
    assert!(data[..12 << 20].iter().all(|b| *b == 0xa5));
    sb.run(&["destroy", "--yes", "--allow-data-loss", m])
        .expect_code(0);
    assert!(
        files_under(&pool).iter().all(|f| !f.contains("big")),
        "{:?}",
        files_under(&pool)
    );
}

// ------------------------------------------------------------------ network failures

/// `nft -j list ruleset` of the sandbox's netns, as text.
fn ruleset(sb: &Sandbox) -> String {
    let ns = sb.netns.as_deref().expect("netns");
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "ruleset"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn network_doc(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

#[test]
fn fault_network_refused_by_nft_then_destroy_leaves_nothing() {
    const TEST: &str = "fault_network_refused_by_nft_then_destroy_leaves_nothing";
    let nft = Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if skip_unless(is_root(), TEST, "needs root") || skip_unless(nft, TEST, "nft missing") {
        return;
    }
    let sb = Sandbox::with_netns();
    let text = network_doc(
        "lan0",
        "{addresses: [10.233.0.1/24], nat: {enabled: true}, forwards: [{hostPort: 8080, to: '10.233.0.5:80'}]}",
    ) + &network_doc(
        "bad0",
        "{addresses: [10.234.0.1/24], nat: {enabled: true, egress: '@wan'}}",
    );
    sb.write("m/net.yaml", &text);
    let m = sb.path("m");
    let m = m.to_str().unwrap();
    let out = sb.run(&["apply", "--yes", m]).expect_code(1);
    let text = format!("{}{}", out.stdout(), out.stderr());
    assert!(text.contains("Network/bad0"), "{text}");
    let links = sb.links();
    assert!(links.contains("lan0"), "{links}");
    assert!(!links.contains("bad0"), "half-made bridge: {links}");
    let rules = ruleset(&sb);
    assert!(rules.contains("stead:Network/lan0"), "{rules}");
    assert!(!rules.contains("bad0"), "half-written rules: {rules}");
    // The failed network is still planned (its create is retried), nothing else.
    let out = sb.run(&["diff", m]).expect_code(2);
    assert!(out.stdout().contains("+ Network/bad0"), "{}", out.stdout());
    assert!(!out.stdout().contains("Network/lan0"), "{}", out.stdout());

    sb.run(&["destroy", "--yes", m]).expect_code(0);
    let links = sb.links();
    assert!(
        !links.contains("lan0") && !links.contains("bad0"),
        "{links}"
    );
    assert!(!ruleset(&sb).contains("stead"), "{}", ruleset(&sb));
}

#[test]
fn fault_network_forward_to_bad_address_refused_before_anything_is_made() {
    const TEST: &str = "fault_network_forward_to_bad_address_refused_before_anything_is_made";
    if skip_unless(is_root(), TEST, "needs root") {
        return;
    }
    let sb = Sandbox::with_netns();
    sb.write(
        "m/net.yaml",
        &network_doc(
            "fw0",
            "{addresses: [10.235.0.1/24], forwards: [{hostPort: 8080, to: '10.235.0.255:80'}]}",
        ),
    );
    let m = sb.path("m");
    let m = m.to_str().unwrap();
    // The create's check refuses it at plan time: diff reports the plan error (exit 1)
    // and apply stops before executing anything.
    for cmd in [&["diff", m][..], &["apply", "--yes", m][..]] {
        let out = sb.run(cmd).expect_code(1);
        let text = out.stdout();
        assert!(
            text.contains("error: Network/fw0:")
                && text.contains("10.235.0.255:80")
                && text.contains("broadcast")
                && text.contains("the plan cannot be applied"),
            "{cmd:?}: {text}{}",
            out.stderr()
        );
        assert!(!text.contains("+ Network/fw0"), "{cmd:?}: {text}");
    }
    assert!(!sb.links().contains("fw0"), "{}", sb.links());
}

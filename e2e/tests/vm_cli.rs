//! Issue 5 acceptance (VM part): the real `stead` binary running VirtualMachines in its own
//! VMM. Each test has its own network namespace, state/run dirs and cgroup parent; the
//! guest is stead's embedded tiny guest (`stead vmm --write-demo-guest`).
//!
//! Needs root and /dev/kvm (otherwise `SKIP`). Build the binary first:
//! `cargo build --bin stead`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use stead_e2e::{LoopBtrfs, Sandbox, kvm_ok};

struct Vm<'a> {
    cpus: u32,
    state: &'a str,
    policy: &'a str,
    with_vm: bool,
    /// The demo guest's `mode=`.
    mode: &'a str,
    stop_timeout: Option<&'a str>,
}

impl Default for Vm<'_> {
    fn default() -> Self {
        Vm {
            cpus: 1,
            state: "running",
            policy: "always",
            with_vm: true,
            mode: "idle",
            stop_timeout: None,
        }
    }
}

/// Writes pool + volume + bridge network (+ the VM) and returns the manifest dir.
fn manifest(sb: &Sandbox, kernel: &Path, vm: &Vm) -> PathBuf {
    let mut text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\nspec: {{type: dir, path: {}}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: vm1-root}}\nspec: {{pool: local, size: 16Mi, deletionPolicy: Delete}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: lan0}}\nspec: {{type: bridge, addresses: [10.231.0.1/24]}}\n",
        sb.path("pools/local").display()
    );
    if vm.with_vm {
        text.push_str(&format!(
            "---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: vm1}}\nspec:\n  cpus: {}\n  memory: 32Mi\n  boot: {{kernel: {}, cmdline: \"mode={}\"}}\n  disks: [{{volume: vm1-root}}]\n  interfaces: [{{network: lan0}}]\n  state: {}\n  restartPolicy: {}\n",
            vm.cpus,
            kernel.display(),
            vm.mode,
            vm.state,
            vm.policy
        ));
        if let Some(t) = vm.stop_timeout {
            text.push_str(&format!("  stopTimeout: {t}\n"));
        }
    }
    sb.write("m/all.yaml", &text);
    sb.path("m")
}

fn demo_guest(sb: &Sandbox) -> PathBuf {
    let p = sb.path("images/tiny-guest.bin");
    let out = sb
        .run(&["vmm", "--write-demo-guest", p.to_str().unwrap()])
        .expect_code(0);
    assert!(out.stdout().contains("mode=idle"), "{}", out.stdout());
    p
}

/// `stead get vm/vm1 -o json`: (observed state, runtime status, health).
fn get_vm(sb: &Sandbox) -> (Value, Value, String) {
    let out = sb.run(&["get", "vm/vm1", "-o", "json"]).expect_code(0);
    let v: Value = serde_json::from_str(&out.stdout()).expect("get json");
    let item = &v["items"][0]["status"];
    (
        item["observed"].clone(),
        item["runtime"].clone(),
        item["health"].as_str().unwrap_or("").to_string(),
    )
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pid_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn cgroup_dir(sb: &Sandbox, ctrl: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup")
        .join(ctrl)
        .join(&sb.cgroup_parent)
        .join("vm-vm1")
}

/// Processes whose command line mentions this sandbox (supervisors, VMMs).
fn sandbox_processes(sb: &Sandbox) -> Vec<String> {
    let needle = sb.dir.path().to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(&needle) && c.contains(" vmm ") {
                out.push(format!("{}: {c}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

/// Kills VM processes and removes VM cgroups a failed test left behind (runs before the
/// sandbox's own cleanup, which removes the netns and the cgroup parent).
struct Leftovers<'a>(&'a Sandbox);

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        for p in sandbox_processes(self.0) {
            if let Some(pid) = p.split(':').next().and_then(|n| n.parse::<i32>().ok()) {
                stead_e2e::signal(pid, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for ctrl in [
            "unified",
            "memory",
            "cpu",
            "cpuacct",
            "pids",
            "freezer",
            "cpu,cpuacct",
            "",
        ] {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(ctrl)
                    .join(&self.0.cgroup_parent)
                    .join("vm-vm1"),
            );
        }
    }
}

fn console(sb: &Sandbox, input: &[u8]) -> String {
    let mut child = sb
        .cmd()
        .args(["console", "vm/vm1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn console");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write console input");
    let out = child.wait_with_output().expect("console");
    assert!(
        out.status.success(),
        "console failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn control(socket: &str, command: &str) -> String {
    use std::io::{BufRead, BufReader};
    let s = std::os::unix::net::UnixStream::connect(socket).expect("control socket");
    (&s).write_all(format!("{command}\n").as_bytes())
        .expect("control write");
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .expect("control read");
    line
}

/// `stead diff <m>` reports changes (exit 2) and its output holds every one of `want`.
fn assert_diff(sb: &Sandbox, m: &str, want: &[&str]) {
    let text = sb.run(&["diff", m]).expect_code(2).stdout();
    assert!(want.iter().all(|w| text.contains(w)), "{text}");
}

/// Runs `body` in a sandbox with its own network namespace whose VM processes are killed
/// when it ends (`Leftovers`), or skips (with a SKIP line) without KVM.
fn with_vm_sandbox(name: &str, body: impl FnOnce(&Sandbox)) {
    if !kvm_ok(name) {
        return;
    }
    let sb = Sandbox::with_netns();
    let _leftovers = Leftovers(&sb);
    body(&sb);
}

#[test]
fn vm_apply_console_restart_resize_delete() {
    with_vm_sandbox("vm_apply_console_restart_resize_delete", |sb| {
        let kernel = demo_guest(sb);
        let m = manifest(sb, &kernel, &Vm::default());
        let m = m.to_str().unwrap();

        let out = sb.run(&["apply", "--yes", m]).expect_code(0);
        assert!(
            out.stderr().contains("VirtualMachine/vm1: created"),
            "{}",
            out.stderr()
        );
        let (state, status, health) = get_vm(sb);
        assert_eq!(state["state"], "running", "{state}");
        assert_eq!(health, "Ready", "{status}");
        assert_eq!(status["restarts"], 0);
        let pid = status["pid"].as_i64().expect("vmm pid");
        assert!(pid_alive(pid));
        let text = sb.run(&["get", "vm"]).expect_code(0).stdout();
        assert!(
            text.contains("vm1") && text.contains("running") && text.contains("pid="),
            "{text}"
        );
        // Nothing to do on a second run.
        let out = sb.run(&["diff", m]).expect_code(0);
        assert!(out.stdout().contains("No changes"), "{}", out.stdout());

        // The tap is on the bridge, with stead's alias; the cgroup holds the VMM.
        let l = sb.links();
        let tap = status["taps"][0].as_str().expect("tap").to_string();
        assert!(
            l.lines()
                .any(|x| x.contains(&format!("{tap}:")) && x.contains("master lan0")),
            "{l}"
        );
        let procs = std::fs::read_to_string(cgroup_dir(sb, "memory").join("cgroup.procs"))
            .expect("VM cgroup");
        assert!(procs.lines().any(|p| p == pid.to_string()), "{procs}");

        // Serial output: logs and an interactive console (the guest echoes upper-cased).
        let banner = "stead tiny guest: idle";
        wait_for("the banner in the log", Duration::from_secs(10), || {
            sb.run(&["logs", "vm/vm1"]).stdout().contains(banner)
        });
        let seen = console(sb, b"hello stead\n");
        assert!(seen.contains(banner), "console replays output: {seen}");
        assert!(seen.contains("HELLO STEAD"), "guest echo: {seen}");
        assert!(
            sb.run(&["logs", "vm/vm1"])
                .expect_code(0)
                .stdout()
                .contains("HELLO STEAD")
        );

        // A VM paused behind stead's back is drift with a hot fix: apply resumes it.
        let ctl = status["controlSocket"].as_str().expect("control socket");
        let reply = control(ctl, "pause");
        assert!(reply.contains("\"ok\":true"), "{reply}");
        assert_eq!(get_vm(sb).0["state"], "paused");
        assert_diff(sb, m, &["state: paused -> running", "impact: hot"]);
        sb.run(&["apply", "--yes", m]).expect_code(0);
        let (state, status, _) = get_vm(sb);
        assert_eq!(state["state"], "running");
        assert_eq!(status["pid"].as_i64(), Some(pid), "resumed, not restarted");

        // Kill the VMM by hand: the supervisor boots it again and counts the restart.
        assert!(stead_e2e::signal(pid as i32, rustix::process::Signal::KILL));
        wait_for("a restarted VMM", Duration::from_secs(15), || {
            let (state, status, _) = get_vm(sb);
            state["state"] == "running"
                && status["restarts"] == 1
                && status["pid"].as_i64().is_some_and(|p| p != pid)
                && status["vmState"] == "running"
        });
        let (_, status, _) = get_vm(sb);
        assert_eq!(status["lastExit"], "signal 9", "{status}");
        let pid2 = status["pid"].as_i64().expect("pid");

        // cpus: 1 -> 2 is a restart-impact change.
        let m2 = manifest(
            sb,
            &kernel,
            &Vm {
                cpus: 2,
                ..Vm::default()
            },
        );
        let m2 = m2.to_str().unwrap();
        assert_diff(sb, m2, &["cpus: 1 -> 2", "impact: restart"]);
        let json = sb.run(&["diff", "-o", "json", m2]).expect_code(2);
        let v: Value = serde_json::from_str(&json.stdout()).expect("plan json");
        assert_eq!(v["changes"][0]["impact"], "restart", "{v}");
        sb.run(&["apply", "--yes", m2]).expect_code(0);
        let (state, status, _) = get_vm(sb);
        assert_eq!(state["cpus"], 2);
        assert_eq!(state["state"], "running");
        assert!(!pid_alive(pid2), "old VMM {pid2} must be gone");
        assert_ne!(status["pid"].as_i64(), Some(pid2));
        let quota = std::fs::read_to_string(cgroup_dir(sb, "cpu").join("cpu.cfs_quota_us"))
            .or_else(|_| std::fs::read_to_string(cgroup_dir(sb, "unified").join("cpu.max")))
            .unwrap_or_default();
        assert!(
            quota.starts_with("200000"),
            "CPU quota for 2 vCPUs: {quota}"
        );
        sb.run(&["diff", m2]).expect_code(0);

        // restartPolicy is hot: the supervisor re-reads it, the VMM keeps running.
        let pid3 = get_vm(sb).1["pid"].as_i64().expect("pid");
        let m_pol = manifest(
            sb,
            &kernel,
            &Vm {
                cpus: 2,
                policy: "on-failure",
                ..Vm::default()
            },
        );
        let m_pol = m_pol.to_str().unwrap();
        assert_diff(
            sb,
            m_pol,
            &["restartPolicy: always -> on-failure", "impact: hot"],
        );
        sb.run(&["apply", "--yes", m_pol]).expect_code(0);
        assert_eq!(get_vm(sb).1["pid"].as_i64(), Some(pid3), "not restarted");
        wait_for("the supervisor to reload", Duration::from_secs(5), || {
            std::fs::read_to_string(sb.path("run/vms/vm1/vmm.log"))
                .unwrap_or_default()
                .contains("restart policy OnFailure")
        });
        sb.run(&["diff", m_pol]).expect_code(0);

        // Delete: remove the VM from the manifests.
        let m3 = manifest(
            sb,
            &kernel,
            &Vm {
                with_vm: false,
                ..Vm::default()
            },
        );
        let out = sb
            .run(&["apply", "--yes", m3.to_str().unwrap()])
            .expect_code(0);
        assert!(
            out.stderr().contains("VirtualMachine/vm1: deleted"),
            "{}",
            out.stderr()
        );
        assert!(!sb.links().contains(&tap), "tap left behind");
        assert!(!cgroup_dir(sb, "memory").exists(), "cgroup left behind");
        assert!(!sb.path("run/vms/vm1").exists(), "run dir left behind");
        assert!(
            sandbox_processes(sb).is_empty(),
            "{:?}",
            sandbox_processes(sb)
        );
        sb.run(&[
            "destroy",
            "--yes",
            "--allow-data-loss",
            m3.to_str().unwrap(),
        ])
        .expect_code(0);
    });
}

#[test]
fn vm_stopped_state_and_restart_policy_never() {
    with_vm_sandbox("vm_stopped_state_and_restart_policy_never", |sb| {
        let kernel = demo_guest(sb);
        let never = Vm {
            policy: "never",
            ..Vm::default()
        };
        let m = manifest(sb, &kernel, &never);
        let m = m.to_str().unwrap();
        sb.run(&["apply", "--yes", m]).expect_code(0);
        let (_, status, _) = get_vm(sb);
        let pid = status["pid"].as_i64().expect("pid");

        // restartPolicy never: a killed VMM stays down; that is drift the next apply heals.
        assert!(stead_e2e::signal(pid as i32, rustix::process::Signal::KILL));
        wait_for(
            "the VM to be reported stopped",
            Duration::from_secs(10),
            || get_vm(sb).0["state"] == "stopped",
        );
        let (_, status, health) = get_vm(sb);
        assert_eq!(health, "Failed", "{status}");
        assert_eq!(status["lastExit"], "signal 9");
        let out = sb.run(&["diff", m]).expect_code(2);
        assert!(
            out.stdout().contains("state: stopped -> running"),
            "{}",
            out.stdout()
        );
        sb.run(&["apply", "--yes", m]).expect_code(0);
        let (state, status, _) = get_vm(sb);
        assert_eq!(state["state"], "running");
        assert_eq!(status["restarts"], 1, "the re-start counts: {status}");

        // state: stopped is a hot change; the config and taps stay.
        let stopped = manifest(
            sb,
            &kernel,
            &Vm {
                state: "stopped",
                ..never
            },
        );
        assert_diff(sb, stopped.to_str().unwrap(), &["impact: hot"]);
        sb.run(&["apply", "--yes", stopped.to_str().unwrap()])
            .expect_code(0);
        let (state, status, health) = get_vm(sb);
        assert_eq!(state["state"], "stopped");
        assert_eq!(health, "Ready", "{status}");
        assert!(status["pid"].is_null(), "{status}");
        assert!(sandbox_processes(sb).is_empty());
        let err = sb.run(&["console", "vm/vm1"]).expect_code(1);
        assert!(err.stderr().contains("not running"), "{}", err.stderr());

        // Back to running, then destroy everything.
        let m = manifest(sb, &kernel, &never);
        let m = m.to_str().unwrap();
        let out = sb.run(&["apply", "--yes", m]).expect_code(0);
        let (state, status, _) = get_vm(sb);
        assert_eq!(
            state["state"],
            "running",
            "{}\n{}\n{status}\n{}",
            out.stdout(),
            out.stderr(),
            std::fs::read_to_string(sb.path("run/vms/vm1/vmm.log")).unwrap_or_default()
        );

        // A supervisor killed by hand takes its VMM along (parent-death signal); the VM
        // shows as stopped (drift) and the next apply starts a new supervisor.
        let sup = status["supervisorPid"].as_i64().expect("supervisor pid");
        let vmm = status["pid"].as_i64().expect("vmm pid");
        assert!(stead_e2e::signal(sup as i32, rustix::process::Signal::KILL));
        wait_for(
            "the VMM to die with its supervisor",
            Duration::from_secs(10),
            || !pid_alive(vmm) && !pid_alive(sup),
        );
        let (state, status, health) = get_vm(sb);
        assert_eq!(state["state"], "stopped", "{status}");
        assert_eq!(health, "Degraded", "{status}");
        sb.run(&["diff", m]).expect_code(2);
        sb.run(&["apply", "--yes", m]).expect_code(0);
        let (state, status2, _) = get_vm(sb);
        assert_eq!(state["state"], "running");
        assert_eq!(
            status2["restarts"].as_u64(),
            status["restarts"].as_u64().map(|r| r + 1),
            "{status2}"
        );
        sb.run(&["destroy", "--yes", "--allow-data-loss", m])
            .expect_code(0);
        assert!(sandbox_processes(sb).is_empty());
        assert!(!cgroup_dir(sb, "memory").exists());
        assert!(!sb.links().contains("master lan0"));
    });
}

/// `stopTimeout`: the plan shows it on changes that stop the VM, a change of it is hot (the
/// running supervisor re-reads it: same VMM), and a guest that ignores the shutdown request
/// (the demo guest's `mode=halt`) is forced off once the timeout passes.
#[test]
fn vm_stop_timeout_is_shown_hot_and_forces_a_deaf_guest_off() {
    with_vm_sandbox(
        "vm_stop_timeout_is_shown_hot_and_forces_a_deaf_guest_off",
        |sb| {
            let kernel = demo_guest(sb);
            let deaf = Vm {
                mode: "halt",
                stop_timeout: Some("5s"),
                ..Vm::default()
            };
            let m = manifest(sb, &kernel, &deaf);
            sb.run(&["apply", "--yes", m.to_str().unwrap()])
                .expect_code(0);
            let (state, status, _) = get_vm(sb);
            assert_eq!(state["stopTimeout"], 5, "{state}");
            let pid = status["pid"].as_i64().expect("pid");

            let two = Vm {
                stop_timeout: Some("2s"),
                ..deaf
            };
            let m = manifest(sb, &kernel, &two);
            let m = m.to_str().unwrap();
            assert_diff(sb, m, &["stopTimeout: 5 -> 2", "impact: hot"]);
            sb.run(&["apply", "--yes", m]).expect_code(0);
            let (state, status, _) = get_vm(sb);
            assert_eq!(state["stopTimeout"], 2, "{state}");
            assert_eq!(status["pid"].as_i64(), Some(pid), "not restarted: {status}");
            sb.run(&["diff", m]).expect_code(0);

            // A change that restarts it says how long the stop may take.
            let bigger = Vm { cpus: 2, ..two };
            assert_diff(
                sb,
                manifest(sb, &kernel, &bigger).to_str().unwrap(),
                &["impact: restart, stop up to 2s"],
            );

            // Stopping the deaf guest takes the (new) timeout, then it is forced off.
            let stopped = Vm {
                state: "stopped",
                ..two
            };
            let t = Instant::now();
            sb.run(&[
                "apply",
                "--yes",
                manifest(sb, &kernel, &stopped).to_str().unwrap(),
            ])
            .expect_code(0);
            let took = t.elapsed();
            let (state, status, _) = get_vm(sb);
            assert_eq!(state["state"], "stopped", "{status}");
            assert!(!pid_alive(pid));
            println!("deaf guest forced off after {took:?} (stopTimeout 2s)");
            assert!(took >= Duration::from_secs(2), "{took:?}");
            assert!(
                took < Duration::from_secs(5),
                "the old 5 s timeout was used: {took:?}"
            );
            sb.run(&["destroy", "--yes", "--allow-data-loss", m])
                .expect_code(0);
            assert!(sandbox_processes(sb).is_empty());
        },
    );
}

/// VM cgroups named `vm-vm1` under the sandbox's cgroup parent, in every mounted
/// controller (v1 and the unified hierarchy).
fn vm_cgroups(sb: &Sandbox) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let d = e.path().join(&sb.cgroup_parent).join("vm-vm1");
        if d.exists() {
            out.push(d);
        }
    }
    out
}

#[test]
fn vm_failed_start_leaves_nothing_behind() {
    with_vm_sandbox("vm_failed_start_leaves_nothing_behind", |sb| {
        // An ELF header over garbage: the VMM fails to load it and exits during start.
        let kernel = sb.write(
            "images/garbage.elf",
            &format!("\x7fELF{}", "garbage ".repeat(4096)),
        );
        let m = manifest(
            sb,
            &kernel,
            &Vm {
                policy: "never",
                ..Vm::default()
            },
        );
        let m = m.to_str().unwrap();
        let out = sb.run(&["apply", "--yes", m]).expect_code(1);
        assert!(
            out.stderr().contains("during start") || out.stdout().contains("during start"),
            "{}\n{}",
            out.stdout(),
            out.stderr()
        );
        assert!(
            sandbox_processes(sb).is_empty(),
            "{:?}",
            sandbox_processes(sb)
        );
        assert_eq!(vm_cgroups(sb), Vec::<PathBuf>::new(), "cgroups left behind");
        assert!(
            !sb.path("run/vms/vm1").exists(),
            "run dir left behind: {:?}",
            std::fs::read_dir(sb.path("run/vms/vm1")).map(|d| d.count())
        );
        assert!(!sb.links().contains("master lan0"), "{}", sb.links());
        // The VM is not there: a second apply tries again (and fails the same way).
        let out = sb.run(&["get", "vm/vm1", "-o", "json"]);
        assert!(!out.stdout().contains("\"running\""), "{}", out.stdout());
        sb.run(&["apply", "--yes", m]).expect_code(1);
        assert_eq!(vm_cgroups(sb), Vec::<PathBuf>::new(), "cgroups left behind");
        sb.run(&["destroy", "--yes", "--allow-data-loss", m])
            .expect_code(0);
        assert!(sandbox_processes(sb).is_empty());
        assert_eq!(vm_cgroups(sb), Vec::<PathBuf>::new());
        assert!(!sb.path("run/vms/vm1").exists());
    });
}

/// The `Name:\tv1\tv2...` fields of `/proc/<pid>/status`.
fn proc_status_field(pid: i64, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn vm_vmm_runs_jailed_without_privileges() {
    use std::os::unix::fs::MetadataExt;
    with_vm_sandbox("vm_vmm_runs_jailed_without_privileges", |sb| {
        let kernel = demo_guest(sb);
        let m = manifest(sb, &kernel, &Vm::default());
        let m = m.to_str().unwrap();
        sb.run(&["apply", "--yes", m]).expect_code(0);
        let (_, status, _) = get_vm(sb);
        let pid = status["pid"].as_i64().expect("vmm pid");

        // Its own non-root uid and gid (real, effective, saved, fs), no groups, no caps.
        for field in ["Uid", "Gid"] {
            let ids = proc_status_field(pid, field);
            assert_eq!(ids.len(), 4, "{ids:?}");
            assert!(
                ids.iter().all(|i| i != "0" && i == &ids[0]),
                "{field}: {ids:?}"
            );
        }
        assert!(proc_status_field(pid, "Groups").is_empty());
        for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                proc_status_field(pid, field),
                vec!["0000000000000000"],
                "{field}"
            );
        }
        assert_eq!(proc_status_field(pid, "NoNewPrivs"), vec!["1"]);
        assert_eq!(proc_status_field(pid, "Seccomp"), vec!["2"]);
        // Its root is an empty directory in its own mount namespace, not the host's /.
        let root = Path::new("/proc").join(pid.to_string()).join("root");
        let (jail, host) = (
            std::fs::metadata(&root).expect("vmm root"),
            std::fs::metadata("/").expect("/"),
        );
        assert!(
            (jail.dev(), jail.ino()) != (host.dev(), host.ino()),
            "root is the host's /"
        );
        assert_eq!(std::fs::read_dir(&root).expect("list vmm root").count(), 0);
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("vmm mnt ns"),
            std::fs::read_link("/proc/self/ns/mnt").expect("own mnt ns")
        );

        // Open files: KVM, the tap, the disk, its logs and state file; nothing else.
        let run = sb.path("run/vms/vm1");
        let allowed = |p: &Path| {
            ["/dev/null", "/dev/kvm", "/dev/net/tun"]
                .iter()
                .any(|a| p == Path::new(a))
                || ["console.log", "vmm.log", "state.json"]
                    .iter()
                    .any(|f| p == run.join(f))
                || p.starts_with(sb.path("pools/local"))
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("vmm fds");
        let mut disk_open = false;
        for fd in fds.flatten() {
            let target = std::fs::read_link(fd.path()).expect("fd link");
            disk_open |= target.starts_with(sb.path("pools/local"));
            if target.is_absolute() {
                assert!(
                    allowed(&target),
                    "unexpected open file {}",
                    target.display()
                );
            }
        }

        assert!(disk_open, "the disk image is among the VMM's open files");

        // The VM still works: console, pause/resume, stop.
        let banner = "stead tiny guest: idle";
        wait_for("the banner in the log", Duration::from_secs(10), || {
            sb.run(&["logs", "vm/vm1"]).stdout().contains(banner)
        });
        let seen = console(sb, b"jailed\n");
        assert!(seen.contains("JAILED"), "guest echo: {seen}");
        let ctl = status["controlSocket"].as_str().expect("control socket");
        assert!(control(ctl, "pause").contains("\"state\":\"paused\""));
        let state = std::fs::read_to_string(sb.path("run/vms/vm1/state.json")).expect("state.json");
        assert!(state.contains("\"state\":\"paused\""), "{state}");
        assert!(control(ctl, "resume").contains("\"state\":\"running\""));
        sb.run(&["destroy", "--yes", "--allow-data-loss", m])
            .expect_code(0);
        assert!(!pid_alive(pid));
        assert!(sandbox_processes(sb).is_empty());
        assert_eq!(vm_cgroups(sb), Vec::<PathBuf>::new());
    });
}

/// A btrfs pool `local` at `pool` with the 16 MiB volume `vm1-root`, an idle VM `vm1` on
/// it and, with `backups`, a dir pool `backups` for backups there; applied. Returns the
/// manifest path and the VM's disk image.
fn btrfs_vm(sb: &Sandbox, pool: &Path, kernel: &Path, backups: Option<&Path>) -> (String, PathBuf) {
    let mut text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\nspec: {{type: btrfs, path: {}}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: vm1-root}}\nspec: {{pool: local, size: 16Mi, deletionPolicy: Delete}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: vm1}}\nspec:\n  cpus: 1\n  memory: 32Mi\n  boot: {{kernel: {}, cmdline: \"mode=idle\"}}\n  disks: [{{volume: vm1-root}}]\n",
        pool.display(),
        kernel.display()
    );
    if let Some(b) = backups {
        text.push_str(&format!(
            "---\napiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: backups}}\nspec: {{type: dir, path: {}, content: [backup]}}\n",
            b.display()
        ));
    }
    let m = sb.write("m/all.yaml", &text);
    let m = m.to_str().unwrap().to_string();
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    (m, pool.join("images/vm1-root/disk.raw"))
}

/// Runs `body(sandbox, manifest path, disk image)` against a running VM `vm1` whose disk
/// is on a btrfs pool in a loop file (and a `backups` dir pool if `backups`). Skips (with
/// a SKIP line) without KVM or btrfs.
fn with_btrfs_vm(name: &str, backups: bool, body: impl FnOnce(&Sandbox, &str, PathBuf)) {
    if !kvm_ok(name) {
        return;
    }
    let sb = Sandbox::with_netns();
    let Some(fs) = LoopBtrfs::for_test(&sb, name) else {
        return;
    };
    // Dropped first: VMMs die before the file system is unmounted.
    let _leftovers = Leftovers(&sb);
    let kernel = demo_guest(&sb);
    let pool = fs.mnt.join("pool");
    let backups = backups.then(|| sb.path("pools/backups"));
    let (m, disk) = btrfs_vm(&sb, &pool, &kernel, backups.as_deref());
    body(&sb, &m, disk);
}

/// Issue 6, consistency modes: a running VM with its disk on a btrfs pool is paused only
/// while its disk is reflink-cloned (`mode: snapshot`), then backed up from the clone;
/// `--mode stop` stops it, reads the disk and starts it again. Both restore bit-identical.
#[test]
fn vm_backup_snapshot_pauses_for_the_clone_and_stop_restarts() {
    let name = "vm_backup_snapshot_pauses_for_the_clone_and_stop_restarts";
    with_btrfs_vm(name, true, |sb, m, disk| {
        backup_snapshot_then_stop(sb, m, disk)
    });
}

fn backup_snapshot_then_stop(sb: &Sandbox, m: &str, disk: PathBuf) {
    // `stead backup <verb> VirtualMachine/vm1 -f <m> -s backups <extra…>`, must succeed.
    let backup = |verb: &str, extra: &[&str]| {
        let mut args = vec![
            "backup",
            verb,
            "VirtualMachine/vm1",
            "-f",
            m,
            "-s",
            "backups",
        ];
        args.extend_from_slice(extra);
        sb.run(&args).expect_code(0)
    };
    let backup_run = |extra: &[&str]| backup("run", extra);
    // Restores into `<sandbox>/<dir>` and checks the disk comes back bit-identical.
    let same = |a: &Path, b: &Path| std::fs::read(a).unwrap() == std::fs::read(b).unwrap();
    let restore_is_identical = |dir: &str, what: &str| {
        let restored = sb.path(dir);
        backup("restore", &["--to", restored.to_str().unwrap()]);
        assert!(same(&restored.join("vm1-root"), &disk), "{what}");
        restored
    };
    // Content to recognise in the restore (the idle guest does not write its disk).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open disk");
        f.write_all_at(&[0x5a; 65536], 1 << 20).expect("write");
    }
    // Past the 2 s racy window, so the backup records the disk's change stamp.
    std::thread::sleep(Duration::from_millis(2100));
    let (_, status, _) = get_vm(sb);
    let pid = status["pid"].as_i64().expect("pid");

    let out = backup_run(&[]);
    let text = out.stdout();
    eprintln!("{text}");
    assert!(
        text.contains("consistency: paused VirtualMachine/vm1 ")
            && text.contains("ms; reflink clones"),
        "{text}\n{}",
        out.stderr()
    );
    let (state, status, _) = get_vm(sb);
    assert_eq!(state["state"], "running", "resumed: {status}");
    assert_eq!(status["pid"].as_i64(), Some(pid), "same VMM");
    let left: Vec<_> = std::fs::read_dir(disk.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["disk.raw".to_string()], "clone removed");
    let restored = restore_is_identical("restore1", "snapshot-mode restore is bit-identical");
    let info = std::fs::metadata(&disk).unwrap();
    let rinfo = std::fs::metadata(restored.join("vm1-root")).unwrap();
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            rinfo.mtime(),
            info.mtime(),
            "the original's mtime, not the clone's"
        );
    }
    // Unchanged since: the next snapshot-mode backup takes the chunk list over without
    // reading the clone (the stamp is the original disk's, taken at clone time).
    let out = backup_run(&[]);
    assert!(
        out.stdout()
            .contains("16.0 MiB (16.0 MiB unchanged, not read)"),
        "{}",
        out.stdout()
    );

    let out = backup_run(&["--mode", "stop"]);
    assert!(
        out.stdout()
            .contains("consistency: stopped VirtualMachine/vm1"),
        "{}\n{}",
        out.stdout(),
        out.stderr()
    );
    let (state, status, _) = get_vm(sb);
    assert_eq!(state["state"], "running", "started again: {status}");
    let pid2 = status["pid"].as_i64().expect("pid");
    assert_ne!(pid2, pid, "a new VMM");
    let list = backup("list", &["-o", "json"]);
    let v: Value = serde_json::from_str(&list.stdout()).expect("list json");
    assert_eq!(v.as_array().map(Vec::len), Some(3), "{v}");
    // The manifest names the disk it is a backup of, not the clone it was read from.
    let first: Value = serde_json::from_str(
        &std::fs::read_to_string(v[0]["manifest"].as_str().expect("manifest path"))
            .expect("manifest"),
    )
    .expect("manifest json");
    assert_eq!(
        first["inputs"][0]["source"].as_str(),
        disk.to_str(),
        "{}",
        first["inputs"]
    );
    restore_is_identical("restore2", "stop-mode restore is bit-identical");

    sb.run(&["destroy", "--yes", "--allow-data-loss", m])
        .expect_code(0);
    assert!(sandbox_processes(sb).is_empty());
}

/// Issue 6, workload snapshots: `stead snapshot create VirtualMachine/vm1` pauses the VM
/// while its disk is snapshotted; a rollback shows its restart impact, refuses without
/// `--yes` (no terminal), and with it stops the VM, rolls the disk back and starts it again.
#[test]
fn vm_snapshot_pauses_and_rollback_restarts() {
    let name = "vm_snapshot_pauses_and_rollback_restarts";
    with_btrfs_vm(name, false, |sb, m, disk| {
        snapshot_then_rollback(sb, m, disk)
    });
}

fn snapshot_then_rollback(sb: &Sandbox, m: &str, disk: PathBuf) {
    let write = |byte: u8| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open disk");
        f.write_all_at(&[byte; 4096], 8192).expect("write");
    };
    let read = || {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 4096];
        std::fs::File::open(&disk)
            .expect("open")
            .read_exact_at(&mut b, 8192)
            .expect("read");
        b[0]
    };
    write(0xa1);
    let pid = get_vm(sb).1["pid"].as_i64().expect("pid");

    let out = sb
        .run(&["snapshot", "create", "VirtualMachine/vm1", "s1"])
        .expect_code(0);
    assert!(
        out.stdout().contains("Volume/vm1-root (btrfs)")
            && out
                .stdout()
                .contains("consistency: paused VirtualMachine/vm1 "),
        "{}\n{}",
        out.stdout(),
        out.stderr()
    );
    assert_eq!(get_vm(sb).0["state"], "running", "resumed");
    assert_eq!(get_vm(sb).1["pid"].as_i64(), Some(pid));
    sb.run(&["snapshot", "create", "VirtualMachine/vm1", "s1"])
        .expect_code(1);
    let list = sb
        .run(&["snapshot", "list", "VirtualMachine/vm1", "-o", "json"])
        .expect_code(0);
    let v: Value = serde_json::from_str(&list.stdout()).expect("json");
    assert_eq!(v[0]["name"], "s1", "{v}");
    assert_eq!(v[0]["complete"], true, "{v}");

    write(0xb2);
    // No terminal and no --yes: the restart impact is shown and nothing happens.
    let out = sb
        .run(&["snapshot", "rollback", "VirtualMachine/vm1", "s1"])
        .expect_code(1);
    assert!(
        out.stdout().contains("VirtualMachine/vm1  impact: restart"),
        "{}",
        out.stdout()
    );
    assert!(out.stderr().contains("--yes"), "{}", out.stderr());
    assert_eq!(read(), 0xb2);
    assert_eq!(get_vm(sb).1["pid"].as_i64(), Some(pid), "not restarted");

    let out = sb
        .run(&["snapshot", "rollback", "VirtualMachine/vm1", "s1", "--yes"])
        .expect_code(0);
    assert!(
        out.stdout().contains("started again: VirtualMachine/vm1"),
        "{}",
        out.stdout()
    );
    assert_eq!(read(), 0xa1, "disk rolled back");
    let (state, status, _) = get_vm(sb);
    assert_eq!(state["state"], "running", "{status}");
    assert_ne!(status["pid"].as_i64(), Some(pid), "restarted");
    sb.run(&["diff", m]).expect_code(0);

    sb.run(&["snapshot", "delete", "VirtualMachine/vm1", "s1"])
        .expect_code(0);
    let list = sb
        .run(&["snapshot", "list", "VirtualMachine/vm1", "-o", "json"])
        .expect_code(0);
    assert_eq!(list.stdout().trim(), "[]");
    sb.run(&["destroy", "--yes", "--allow-data-loss", m])
        .expect_code(0);
    assert!(sandbox_processes(sb).is_empty());
}

/// Kills `stead apply` at several points while it creates the VM and re-applies: one
/// supervisor and one VMM, recorded in the inventory, deleted cleanly.
#[test]
fn vm_apply_killed_midway_converges_without_duplicates() {
    with_vm_sandbox(
        "vm_apply_killed_midway_converges_without_duplicates",
        |sb| {
            let kernel = demo_guest(sb);
            let with_vm = manifest(sb, &kernel, &Vm::default());
            let with_vm = with_vm.to_str().unwrap().to_string();
            let without = sb.path("m-novm");
            std::fs::create_dir_all(&without).expect("mkdir");
            {
                let m = manifest(
                    sb,
                    &kernel,
                    &Vm {
                        with_vm: false,
                        ..Vm::default()
                    },
                );
                std::fs::copy(m.join("all.yaml"), without.join("all.yaml")).expect("copy");
                manifest(sb, &kernel, &Vm::default());
            }
            let without = without.to_str().unwrap();
            sb.run(&["apply", "--yes", without]).expect_code(0);
            for delay_ms in [0u64, 30, 60, 90, 120, 160, 220] {
                let mut child = sb
                    .cmd()
                    .args(["apply", "--yes", &with_vm])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn apply");
                std::thread::sleep(Duration::from_millis(delay_ms));
                let _ = child.kill();
                let _ = child.wait();
                sb.run(&["apply", "--yes", &with_vm]).expect_code(0);
                let (state, status, health) = get_vm(sb);
                assert_eq!(state["state"], "running", "delay {delay_ms}: {status}");
                assert_eq!(health, "Ready", "delay {delay_ms}: {status}");
                // Once the killed run's launcher is gone: exactly one supervisor and one VMM.
                wait_for("launchers to exit", Duration::from_secs(10), || {
                    sandbox_processes(sb).len() == 2
                });
                sb.run(&["diff", &with_vm]).expect_code(0);
                sb.run(&["apply", "--yes", without]).expect_code(0);
                assert!(
                    sandbox_processes(sb).is_empty(),
                    "delay {delay_ms}: {:?}",
                    sandbox_processes(sb)
                );
                assert!(!sb.path("run/vms/vm1").exists());
                assert!(!sb.links().contains("master lan0"));
            }
            sb.run(&["destroy", "--yes", "--allow-data-loss", without])
                .expect_code(0);
        },
    );
}

const ETH_P_STEAD_TEST: u16 = 0x88b5;

/// An AF_PACKET socket for EtherType 0x88b5 bound to `ifname` inside network namespace
/// `netns` (created on a helper thread that entered the namespace; the socket stays
/// in it), and the interface index.
fn packet_socket_in(netns: &str, ifname: &str) -> (std::os::fd::OwnedFd, i32) {
    use std::os::fd::FromRawFd;
    let ns = PathBuf::from("/run/netns").join(netns);
    let ifname = ifname.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).expect("open netns");
        // This helper thread alone enters the namespace.
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&f),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns");
        let cname = std::ffi::CString::new(ifname).expect("ifname");
        // SAFETY: FFI with valid pointers; the descriptor is owned at once.
        unsafe {
            let idx = libc::if_nametoindex(cname.as_ptr()) as i32;
            assert!(idx > 0, "no such interface");
            let proto = ETH_P_STEAD_TEST.to_be();
            let s = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            );
            assert!(s >= 0, "socket: {}", std::io::Error::last_os_error());
            let s = std::os::fd::OwnedFd::from_raw_fd(s);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = idx;
            let r = libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            (s, idx)
        }
    })
    .join()
    .expect("packet socket thread")
}

#[test]
fn vm_frames_cross_the_bridge_through_the_tap() {
    use std::os::fd::AsRawFd;
    with_vm_sandbox("vm_frames_cross_the_bridge_through_the_tap", |sb| {
        let kernel = demo_guest(sb);
        // Storage and bridge first; then listen on the bridge before the guest boots.
        let m = manifest(
            sb,
            &kernel,
            &Vm {
                with_vm: false,
                ..Vm::default()
            },
        );
        sb.run(&["apply", "--yes", m.to_str().unwrap()])
            .expect_code(0);
        let (sock, ifindex) = packet_socket_in(sb.netns.as_deref().expect("netns"), "lan0");
        let m = manifest(
            sb,
            &kernel,
            &Vm {
                policy: "never",
                ..Vm::default()
            },
        );
        let text = std::fs::read_to_string(m.join("all.yaml"))
            .expect("read")
            .replace("mode=idle", "mode=net")
            // The test guest drives the first virtio device: no disk in front of the NIC.
            .replace("  disks: [{volume: vm1-root}]\n", "");
        std::fs::write(m.join("all.yaml"), text).expect("write");
        let m = m.to_str().unwrap();
        sb.run(&["apply", "--yes", m]).expect_code(0);
        let mac = get_vm(sb).0["interfaces"][0]["mac"]
            .as_str()
            .expect("mac")
            .to_string();

        // Guest -> tap -> bridge: the guest's broadcast frame.
        let mut buf = [0u8; 2048];
        let t = Instant::now();
        let mut got = None;
        while got.is_none() && t.elapsed() < Duration::from_secs(10) {
            // SAFETY: recv into a buffer we own.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 14 {
                got = Some(buf[..n as usize].to_vec());
            }
        }
        let frame = got.expect("no frame from the guest on the bridge");
        let src: Vec<String> = frame[6..12].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            src.join(":"),
            mac,
            "source MAC is the declared/generated one"
        );
        assert!(
            String::from_utf8_lossy(&frame[14..]).starts_with("stead-guest-tx"),
            "{frame:?}"
        );

        // Bridge -> tap -> guest: the guest prints the payload and powers off.
        let mut out = vec![0xffu8; 6];
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        out.extend_from_slice(&ETH_P_STEAD_TEST.to_be_bytes());
        out.extend_from_slice(b"stead-host-rx");
        out.resize(60, 0);
        wait_for(
            "the guest to receive the frame",
            Duration::from_secs(10),
            || {
                // SAFETY: sockaddr_ll is plain data; sendto reads `out` and `sll` only.
                unsafe {
                    let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                    sll.sll_family = libc::AF_PACKET as u16;
                    sll.sll_ifindex = ifindex;
                    sll.sll_halen = 6;
                    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
                    libc::sendto(
                        sock.as_raw_fd(),
                        out.as_ptr().cast(),
                        out.len(),
                        0,
                        &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                }
                sb.run(&["logs", "vm/vm1"])
                    .stdout()
                    .contains("net: rx stead-host-rx")
            },
        );
        drop(sock);
        sb.run(&["destroy", "--yes", "--allow-data-loss", m])
            .expect_code(0);
        assert!(sandbox_processes(sb).is_empty());
    });
}

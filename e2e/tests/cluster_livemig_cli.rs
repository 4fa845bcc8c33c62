//! `stead migrate --live` end to end (issue 15): two nodes of the cluster lab, each running
//! `stead agent`, a controller candidate in the hub, and a QEMU VM (TCG, the Debian guest
//! image) whose disk is a Volume on a pool declared `shared` (one directory both nodes
//! see). The migration goes through etcd and the agents: the leader chooses live, the
//! target's agent starts the VM waiting for its guest through the driver, the source's agent
//! sends it and reports progress, then the ownership moves. Afterwards the owner key names
//! the target, the guest's boot id (read by its agent) is the one it had before, and the
//! source has no QEMU left. Before that, a move whose target QEMU is killed as soon as it
//! appears fails with the reason and leaves the guest (same boot) on, and owned by, the
//! source. Times are printed.
//!
//! The second test has no shared pool: n1 and n2 each have a btrfs pool on a loop file of
//! their own and the VM's volume is replicated from n1 to n2; `--live` then promotes the
//! replica on n2 and copies the disk during the migration. The guest keeps its boot and a
//! file it wrote (and synced) on n1 just before the move.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use stead_drivers::vm::config::Paths;
use stead_drivers::vm::qemu::qga::Qga;
use stead_e2e::cluster::{ClusterLab, owner_in};
use stead_e2e::{LoopBtrfs, Sandbox, guest_image, qemu_ok};

fn manifests(pool: &Path, image: &Path) -> String {
    format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: vms}}\n\
         spec: {{type: dir, path: {}, shared: true, content: [images, rootdir]}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: web-root}}\n\
         spec: {{pool: vms, size: 2Gi, format: qcow2, source: {{file: {}}}}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: web}}\n\
         spec:\n  engine: qemu\n  accel: tcg\n  cpus: 1\n  memory: 512Mi\n  \
         disks: [{{volume: web-root, boot: 1}}]\n  agent: true\n  restartPolicy: always\n",
        pool.display(),
        image.display()
    )
}

fn owner(lab: &ClusterLab) -> Option<String> {
    owner_in(&lab.cluster_status(), "VirtualMachine/web")
}

fn logs(lab: &ClusterLab) -> String {
    let mut out = String::new();
    for name in ["agent-n1", "agent-n2", "controller"] {
        out.push_str(&format!(
            "--- {name}\n{}\n",
            lab.log_tail(name, 30).join("\n")
        ));
    }
    out
}

fn wait_for(what: &str, limit: Duration, lab: &ClusterLab, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < limit,
            "{what}: not after {limit:?}\n{}",
            logs(lab)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The guest's boot id, read by its agent on node `i` (retried: the driver's observer may
/// hold the agent's socket for a moment).
fn boot_id(lab: &ClusterLab, i: usize, limit: Duration) -> String {
    let sock = Paths::new(&lab.node_run(i), "web").qga_socket();
    let t0 = Instant::now();
    loop {
        let got = Qga::connect(&sock, Duration::from_secs(10)).and_then(|mut a| {
            a.set_timeout(Duration::from_secs(20));
            a.exec(
                "/usr/bin/systemd-id128",
                &["boot-id"],
                None,
                Duration::from_secs(30),
            )
        });
        match got {
            Ok(out) => return String::from_utf8_lossy(&out.stdout).trim().to_string(),
            Err(e) if t0.elapsed() < limit => {
                let _ = e;
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => panic!("guest agent on node {i}: {e}\n{}", logs(lab)),
        }
    }
}

/// Pids of the lab's QEMU processes of node `i`.
/// Waits for the `stead migrate` in `child` to exit, SIGKILLing node `i`'s QEMU as soon as
/// one appears there (the move's target); its exit status and whether the kill was made.
fn wait_killing_target(
    lab: &ClusterLab,
    child: &mut std::process::Child,
    i: usize,
) -> (std::process::ExitStatus, bool) {
    let mut killed = false;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return (s, killed);
        }
        if !killed && let Some(pid) = qemus(lab, i).first() {
            killed = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemus(lab: &ClusterLab, i: usize) -> Vec<i32> {
    let run = lab.node_run(i).display().to_string();
    lab.workload_pids_with(&["qemu-system", &run])
}

/// `stead migrate VirtualMachine/web --to TO --live`, output piped.
fn migrate_cmd(lab: &ClusterLab, to: &str) -> std::process::Command {
    let mut c = lab.operator_cmd(&[
        "migrate",
        "VirtualMachine/web",
        "--to",
        to,
        "--live",
        "--timeout",
        "300s",
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// What an exited child wrote (stdout, stderr).
fn outputs(child: &mut std::process::Child) -> (String, String) {
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (out, err)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn migrate_live_moves_a_running_qemu_vm_through_the_agents_keeping_its_boot() {
    let test = "migrate_live_moves_a_running_qemu_vm_through_the_agents_keeping_its_boot";
    if !qemu_ok(test) {
        return;
    }
    let Some(image) = guest_image(test) else {
        return;
    };
    let Some(mut lab) = ClusterLab::for_test(test, 2) else {
        return;
    };
    let pool = lab.path("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let dir = lab.path("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web.yaml"), manifests(&pool, &image)).unwrap();
    lab.destroy_on_drop(std::slice::from_ref(&dir));
    let mut agents = Vec::new();
    for i in 0..lab.nodes.len() {
        lab.join_node(i, &[]);
        agents.push(lab.start_agent(i, &dir));
    }
    lab.start_controller(&dir);

    let t0 = Instant::now();
    let mut from = None;
    wait_for("web has an owner", Duration::from_secs(240), &lab, || {
        from = owner(&lab);
        from.is_some()
    });
    let from = from.unwrap();
    let src = lab.nodes.iter().position(|n| n.name == from).unwrap();
    let dst = 1 - src;
    let to = lab.nodes[dst].name.clone();
    let before = boot_id(&lab, src, Duration::from_secs(300));
    assert_eq!(before.len(), 32, "{before:?}");
    println!(
        "{test}: the guest answered on {from} after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(qemus(&lab, dst).is_empty(), "no QEMU on {to} yet");

    // A move whose target QEMU is killed as soon as it appears: the record says why, the
    // CLI exits 1, and the guest keeps running on the source, which keeps owning it.
    let mut child = migrate_cmd(&lab, &to).spawn().expect("stead migrate");
    let (status, killed) = wait_killing_target(&lab, &mut child, dst);
    let (out, err) = outputs(&mut child);
    println!("stead migrate --live with its target killed:\n{out}{err}");
    assert!(killed, "the target's QEMU was killed: {out}{err}");
    assert_eq!(status.code(), Some(1), "{out}{err}\n{}", logs(&lab));
    assert!(
        err.contains(&format!("it keeps running on {from}")),
        "{out}{err}"
    );
    assert_eq!(owner(&lab).as_deref(), Some(from.as_str()));
    assert_eq!(boot_id(&lab, src, Duration::from_secs(60)), before);
    wait_for(
        "no QEMU left on the target",
        Duration::from_secs(30),
        &lab,
        || qemus(&lab, dst).is_empty(),
    );

    let t1 = Instant::now();
    let mut child = migrate_cmd(&lab, &to).spawn().expect("stead migrate");
    // Sample the QEMUs of both nodes while it runs: the target's waits while the source's
    // runs the guest; once done only the target has one.
    let mut both_seen = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        both_seen |= !qemus(&lab, src).is_empty() && !qemus(&lab, dst).is_empty();
        std::thread::sleep(Duration::from_millis(200));
    };
    let cli = t1.elapsed();
    let (out, err) = outputs(&mut child);
    println!("stead migrate --live output:\n{out}{err}");
    assert!(
        status.success(),
        "stead migrate --live: {out}{err}\n{}",
        logs(&lab)
    );
    assert!(out.contains("method: live"), "{out}");
    assert!(out.contains("RAM "), "progress lines: {out}");
    assert!(out.contains(&format!("runs on {to}")), "{out}");
    assert!(both_seen, "the target's QEMU waited beside the source's");
    assert_eq!(owner(&lab).as_deref(), Some(to.as_str()));

    wait_for(
        "no QEMU left on the source",
        Duration::from_secs(30),
        &lab,
        || qemus(&lab, src).is_empty(),
    );
    assert_eq!(qemus(&lab, dst).len(), 1, "one QEMU on {to}");
    assert!(
        pool.join("images/web-root.qcow2").is_file(),
        "the shared disk stays"
    );
    let after = boot_id(&lab, dst, Duration::from_secs(60));
    assert_eq!(after, before, "the same boot runs on {to}");
    println!(
        "{test}: {from} -> {to} live through the agents: CLI done after {:.1} s",
        cli.as_secs_f64()
    );
    // It stays there: nothing restarts it on either node.
    std::thread::sleep(Duration::from_secs(3));
    assert!(qemus(&lab, src).is_empty());
    assert_eq!(boot_id(&lab, dst, Duration::from_secs(30)), before);

    // The agent of the second node is SIGKILLed in the middle of two more moves:
    // - back to the first node, as the source, started again at once: QEMU goes on alone,
    //   the new agent follows the send to its end;
    // - to the second node again, as the target, started again only once the source
    //   recorded the move: the new agent takes the guest its QEMU received and starts it.
    let cases = [
        (
            src,
            &from,
            "source",
            "transferring",
            "live migration under way from a previous agent",
        ),
        (
            dst,
            &to,
            "target",
            "completed",
            "live migration to here from a previous agent: taking it up",
        ),
    ];
    for (on, name, role, restart_after, says) in cases {
        let kill = AgentKill {
            agents: &mut agents,
            manifests: &dir,
            victim: dst,
            restart_after,
        };
        let (status, out, err, at_kill) = migrate_killing_agent(&mut lab, name, kill);
        println!("stead migrate --live, the {role}'s agent killed ({at_kill}):\n{out}{err}");
        assert!(status.success(), "{out}{err}\n{}", logs(&lab));
        assert!(out.contains(&format!("runs on {name}")), "{out}");
        moved_keeping_boot(&lab, on, 1 - on, &before);
        let log = agent_log(&lab, dst);
        assert!(
            log.contains(says),
            "the {role}'s new agent: {says:?}:\n{log}"
        );
    }
    let out = lab
        .operator_cmd(&["migrate", "VirtualMachine/web", "--clear"])
        .output()
        .expect("clear");
    assert!(out.status.success(), "{}", text(&out));
}

/// `web`'s migration record as node `i`'s etcd member holds it.
fn record(lab: &ClusterLab, i: usize) -> Option<serde_json::Value> {
    let key = "/stead/v1/migrate/VirtualMachine/web";
    let text = lab.get(i, key, false, Duration::from_secs(5)).ok()??;
    serde_json::from_str(&text).ok()
}

/// An agent [`migrate_killing_agent`] kills and starts again.
struct AgentKill<'a> {
    /// The agents' process indices (the victim's is replaced by its successor's).
    agents: &'a mut Vec<usize>,
    manifests: &'a Path,
    /// The node whose agent is killed.
    victim: usize,
    /// The record's state after which the new agent starts (`transferring`: at once).
    restart_after: &'a str,
}

/// `stead migrate --live` of `web` to node `to`, SIGKILLing the victim's agent as soon as
/// the record says `transferring` (QEMU sends) and starting a new one once it says
/// `kill.restart_after` (or anything later). The CLI's exit status, its output and what the
/// record said at the kill.
fn migrate_killing_agent(
    lab: &mut ClusterLab,
    to: &str,
    kill: AgentKill<'_>,
) -> (std::process::ExitStatus, String, String, String) {
    let mut child = migrate_cmd(lab, to).spawn().expect("stead migrate");
    let t0 = Instant::now();
    let state =
        |lab: &ClusterLab| record(lab, 0).and_then(|r| r["state"].as_str().map(str::to_string));
    let at_kill = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            let (out, err) = outputs(&mut child);
            panic!("the move ended ({s}) before it was transferring: {out}{err}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "never transferring"
        );
        if let Some(r) = record(lab, 0).filter(|r| r["state"] == "transferring") {
            lab.kill_proc(kill.agents[kill.victim]);
            break format!(
                "at {:.1} s, RAM {}%",
                t0.elapsed().as_secs_f64(),
                r["progress"]["ramPercent"]
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let order = ["transferring", "completed", "assigned"];
    let wanted = order
        .iter()
        .position(|s| *s == kill.restart_after)
        .expect("a state of the move");
    wait_for(
        "the state to start the new agent at",
        Duration::from_secs(120),
        lab,
        || {
            // A failed move starts it too: the assertions after the CLI say why.
            state(lab).is_some_and(|s| {
                s == "failed" || order.iter().position(|o| *o == s) >= Some(wanted)
            })
        },
    );
    let at_kill = format!("{at_kill}; new agent after {:?}", state(lab));
    kill.agents[kill.victim] = lab.start_agent(kill.victim, kill.manifests);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = outputs(&mut child);
    (status, out, err, at_kill)
}

/// After a move from node `from` to `to`: `to` owns `web`, runs the one QEMU with the boot
/// `boot`, and `from` has none left.
fn moved_keeping_boot(lab: &ClusterLab, to: usize, from: usize, boot: &str) {
    let name = &lab.nodes[to].name;
    assert_eq!(owner(lab).as_deref(), Some(name.as_str()), "{}", logs(lab));
    wait_for(
        "no QEMU left on the source",
        Duration::from_secs(30),
        lab,
        || qemus(lab, from).is_empty(),
    );
    assert_eq!(qemus(lab, to).len(), 1, "one QEMU on {name}");
    assert_eq!(
        boot_id(lab, to, Duration::from_secs(60)),
        boot,
        "the same boot on {name}"
    );
}

/// Node `i`'s agent log.
fn agent_log(lab: &ClusterLab, i: usize) -> String {
    let path = lab.log_path(&format!("agent-{}", lab.nodes[i].name));
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The VM on a btrfs pool at `pool` (each node's own), its volume replicated to n2; an HA
/// group starts it on n1.
fn replicated_manifests(pool: &Path, image: &Path) -> String {
    format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: fast}}\n\
         spec: {{type: btrfs, path: {}}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: web-root}}\n\
         spec: {{pool: fast, size: 2Gi, format: qcow2, source: {{file: {}}}, \
         deletionPolicy: Delete, replication: {{to: n2, every: 2s}}}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: HaGroup\nmetadata: {{name: pair}}\n\
         spec: {{nodes: {{n1: 2, n2: 1}}, restricted: true, noFailback: true}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: web}}\n\
         spec:\n  engine: qemu\n  accel: tcg\n  cpus: 1\n  memory: 512Mi\n  \
         disks: [{{volume: web-root, boot: 1}}]\n  agent: true\n  restartPolicy: always\n  \
         placement: {{haGroup: pair}}\n",
        pool.display(),
        image.display()
    )
}

/// A node's own pool (a 3 GiB loop btrfs in a sandbox) and manifests naming it.
struct NodePool {
    fs: LoopBtrfs,
    manifests: std::path::PathBuf,
    _sb: Sandbox,
}

fn node_pool(test: &str, image: &Path) -> Option<NodePool> {
    let sb = Sandbox::new();
    if stead_e2e::skip_unless(stead_e2e::is_root(), test, "needs root for loop devices") {
        return None;
    }
    let Some(fs) = LoopBtrfs::sized(&sb, 3 << 30) else {
        println!("SKIP {test}: no loop-mounted btrfs here");
        return None;
    };
    let manifests = sb.path("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("m.yaml"),
        replicated_manifests(&fs.mnt.join("pool"), image),
    )
    .unwrap();
    Some(NodePool {
        fs,
        manifests,
        _sb: sb,
    })
}

/// Runs `args` in the guest on node `i` through its agent.
fn guest_exec(lab: &ClusterLab, i: usize, prog: &str, args: &[&str]) -> Vec<u8> {
    let sock = Paths::new(&lab.node_run(i), "web").qga_socket();
    let mut a = Qga::connect(&sock, Duration::from_secs(30)).expect("guest agent");
    a.set_timeout(Duration::from_secs(30));
    a.exec(prog, args, None, Duration::from_secs(60))
        .expect("guest exec")
        .stdout
}

#[test]
fn migrate_live_copies_a_replicated_disk_and_keeps_the_boot_and_its_data() {
    let test = "migrate_live_copies_a_replicated_disk";
    if !qemu_ok(test) {
        return;
    }
    let Some(image) = guest_image(test) else {
        return;
    };
    // Declared before the lab: dropped after it.
    let Some(p1) = node_pool(test, &image) else {
        return;
    };
    let Some(p2) = node_pool(test, &image) else {
        return;
    };
    let Some(mut lab) = ClusterLab::for_test(test, 2) else {
        return;
    };
    for (i, p) in [&p1, &p2].iter().enumerate() {
        lab.destroy_node_on_drop(i, std::slice::from_ref(&p.manifests));
    }
    for (i, p) in [&p1, &p2].iter().enumerate() {
        lab.join_node(i, &["--pool", "fast"]);
        lab.start_agent(i, &p.manifests);
    }
    lab.start_controller(&p1.manifests);

    let t0 = Instant::now();
    wait_for("web runs on n1", Duration::from_secs(300), &lab, || {
        owner(&lab).as_deref() == Some("n1")
    });
    let before = boot_id(&lab, 0, Duration::from_secs(300));
    assert_eq!(before.len(), 32, "{before:?}");
    println!(
        "{test}: the guest answered on n1 after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    wait_for(
        "a replica of web-root on n2",
        Duration::from_secs(120),
        &lab,
        || lab.cluster_status()["replication"]["web-root"]["lastPoint"].is_u64(),
    );
    let st = lab.cluster_status();
    println!(
        "{test}: replication of web-root: {} bytes in {} ms",
        st["replication"]["web-root"]["bytes"], st["replication"]["web-root"]["durationMs"]
    );
    // Written after the replica was taken: only the copy during the move brings it.
    let marker = format!("livedisk-{before}");
    guest_exec(
        &lab,
        0,
        "/bin/sh",
        &["-c", &format!("echo {marker} > /var/tmp/marker && sync")],
    );

    // A move whose target QEMU is killed as soon as it appears (n2 promoted the replica
    // by then): it fails, the guest stays on n1, and n2 drops the promoted copy.
    let promoted = p2.fs.mnt.join("pool/images/web-root");
    let mut child = migrate_cmd(&lab, "n2").spawn().expect("stead migrate");
    let (status, killed) = wait_killing_target(&lab, &mut child, 1);
    let (out, err) = outputs(&mut child);
    println!("stead migrate --live with its target killed:\n{out}{err}");
    assert!(killed, "n2's QEMU was killed: {out}{err}");
    assert_eq!(status.code(), Some(1), "{out}{err}\n{}", logs(&lab));
    assert!(err.contains("it keeps running on n1"), "{out}{err}");
    assert_eq!(owner(&lab).as_deref(), Some("n1"));
    wait_for(
        "n2 drops the copy it promoted",
        Duration::from_secs(30),
        &lab,
        || !promoted.exists(),
    );
    assert_eq!(boot_id(&lab, 0, Duration::from_secs(60)), before);

    let t1 = Instant::now();
    let out = migrate_cmd(&lab, "n2").output().expect("stead migrate");
    let cli = t1.elapsed();
    println!("stead migrate --live output:\n{}", text(&out));
    assert!(
        out.status.success(),
        "stead migrate --live: {}\n{}",
        text(&out),
        logs(&lab)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("method: live"), "{printed}");
    assert!(printed.contains("disk "), "disk progress: {printed}");
    assert!(printed.contains("RAM "), "RAM progress: {printed}");
    assert_eq!(owner(&lab).as_deref(), Some("n2"));
    wait_for("no QEMU left on n1", Duration::from_secs(30), &lab, || {
        qemus(&lab, 0).is_empty()
    });
    let n2 = Paths::new(&lab.node_run(1), "web");
    let status =
        stead_drivers::vm::qemu::qmp::Qmp::connect(&n2.qmp_socket(), Duration::from_secs(5))
            .and_then(|mut q| q.query_status());
    println!("{test}: n2's QEMU: {status:?}");
    let console = || {
        let data = std::fs::read(n2.console_log()).unwrap_or_default();
        String::from_utf8_lossy(&data[data.len().saturating_sub(3000)..]).into_owned()
    };
    let after = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        boot_id(&lab, 1, Duration::from_secs(120))
    }));
    let Ok(after) = after else {
        panic!(
            "no guest agent on n2; its console ends with:\n{}",
            console()
        );
    };
    assert_eq!(after, before);
    let n2_log = std::fs::read_to_string(lab.log_path("agent-n2")).unwrap_or_default();
    assert!(
        n2_log.contains("live move: replica promoted"),
        "n2 started from the promoted replica\n{}",
        logs(&lab)
    );
    assert!(
        n2_log.contains("failed live move: promoted copy dropped"),
        "the failed move's copy was dropped\n{}",
        logs(&lab)
    );
    let read = guest_exec(&lab, 1, "/bin/cat", &["/var/tmp/marker"]);
    assert_eq!(String::from_utf8_lossy(&read).trim(), marker);
    // The guest stays sound on n2 (a corrupted guest once oopsed ~10 s after the move).
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(boot_id(&lab, 1, Duration::from_secs(30)), before);
    }
    let log =
        String::from_utf8_lossy(&std::fs::read(n2.console_log()).unwrap_or_default()).into_owned();
    for bad in ["Kernel panic", "BUG:", "Oops", "list_del corruption"] {
        assert!(
            !log.contains(bad),
            "n2's console shows {bad:?}:\n{}",
            console()
        );
    }
    println!(
        "{test}: n1 -> n2 live with the disk copied: CLI done after {:.1} s",
        cli.as_secs_f64()
    );
    let out = lab
        .operator_cmd(&["migrate", "VirtualMachine/web", "--clear"])
        .output()
        .expect("clear");
    assert!(out.status.success(), "{}", text(&out));
}

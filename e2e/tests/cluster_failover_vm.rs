//! Failover of an HA VM end to end (issue 15): the cluster lab's three nodes, each running
//! `stead agent` in its own network namespace, a controller candidate in the hub, and one
//! `VirtualMachine` with `placement: {ha: true}` on the vmm engine (stead's own VMM under
//! KVM) booting stead's tiny demo guest, idle, 1 vCPU, 32 MiB, no network.
//!
//! The guest cannot write a probe file, so the host watches it: every 50 ms a recorder
//! thread asks each node whether its VMM process for the VM is alive (the pid in the VM's
//! `supervisor.json`, not a zombie, inside that node's cgroup of the VM) and records per
//! node when the VM ran, on one monotonic clock. Two nodes' runs overlapping is a double
//! run and fails the test.
//!
//! Faults, five rounds each, each on the node running the VM then: SIGKILL of its agent
//! (only the agent: the VM's supervisor, reading the fence deadline the agent no longer
//! renews, must kill the VM itself), SIGSTOP of its agent (continued once the VM runs
//! elsewhere: it must not start it again), and its link down (its agent, cut off from
//! etcd, fences and removes the VM; healed once the VM runs elsewhere). Each round asserts
//! the VM runs on another node, never overlapping, that the old node's guest is gone (its
//! supervisor in phase `fenced` after a kill or a pause), and that the new guest printed
//! its banner; failover figures are printed. A last test crashes the etcd quorum five
//! times: the VM must run on where it is, one run throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::Signal;
use serde_json::Value;
use stead_drivers::vm::config::{Paths, cgroup_name};
use stead_e2e::cluster::{
    ClusterLab, NodeRun, RunRecorder, RunningProbe, agent_logs, overlap, owner_in, wait_for,
};
use stead_e2e::kvm_ok;

/// The VM's name.
const VM: &str = "fv";

/// The VM as `stead cluster status` names it.
const RESOURCE: &str = "VirtualMachine/fv";

/// What the demo guest prints on its serial console when it boots.
const BANNER: &str = "stead tiny guest: idle";

/// Failovers per fault.
const ROUNDS: usize = 5;

/// The failover goal, in seconds.
const FAILOVER_GOAL_S: f64 = 20.0;

fn manifest(kernel: &Path) -> String {
    format!(
        "apiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {VM}}}\n\
         spec:\n  engine: vmm\n  cpus: 1\n  memory: 32Mi\n  \
         boot: {{kernel: {}, cmdline: \"mode=idle\"}}\n  restartPolicy: always\n  \
         placement: {{ha: true}}\n",
        kernel.display()
    )
}

/// Whether the VM's VMM process runs on the node with run dir `run` and cgroup parent
/// `cgroup`: the pid its supervisor recorded is alive (not a zombie) and in the VM's cgroup
/// under that parent (so neither a reused pid nor another node's VM counts).
fn vm_runs_on(run: &Path, cgroup: &str) -> bool {
    let Ok(text) = std::fs::read(Paths::new(run, VM).supervisor_state()) else {
        return false;
    };
    let Some(pid) = serde_json::from_slice::<Value>(&text)
        .ok()
        .and_then(|v| v["vmmPid"].as_i64())
        .and_then(|p| i32::try_from(p).ok())
    else {
        return false;
    };
    let in_cgroup = format!("/{cgroup}/{}", cgroup_name(VM));
    pid_running(pid)
        && std::fs::read_to_string(stead_host::ProcFs::host().pid_file(pid, "cgroup"))
            .is_ok_and(|c| c.lines().any(|l| l.ends_with(&in_cgroup)))
}

/// Whether process `pid` exists and has not exited (a zombie has).
fn pid_running(pid: i32) -> bool {
    let stat = stead_host::ProcFs::host().pid_file(pid, "stat");
    std::fs::read_to_string(stat).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Node `i`'s `supervisor.json` of the VM (`null` when there is none).
fn supervisor_state(lab: &ClusterLab, i: usize) -> Value {
    std::fs::read(Paths::new(&lab.node_run(i), VM).supervisor_state())
        .ok()
        .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
        .unwrap_or(Value::Null)
}

/// Whether node `i`'s console log of the VM shows the guest's banner.
fn banner_on(lab: &ClusterLab, i: usize) -> bool {
    std::fs::read(Paths::new(&lab.node_run(i), VM).console_log())
        .is_ok_and(|t| String::from_utf8_lossy(&t).contains(BANNER))
}

fn owner(lab: &ClusterLab) -> Option<String> {
    owner_in(&lab.cluster_status(), RESOURCE)
}

/// How the node running the VM is taken away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL of its agent (the VM's supervisor and VMM are left alone).
    Kill,
    /// SIGSTOP of its agent, SIGCONT once the VM runs elsewhere.
    Pause,
    /// Its link to the hub down (cut off: its agent or the VM's supervisor stops the VM),
    /// up again once the VM runs elsewhere.
    Partition,
}

/// The lab with the VM running, its agents' process indexes, the manifests' dir and the
/// recorder watching the VM on every node.
struct VmLab {
    lab: ClusterLab,
    agents: Vec<usize>,
    manifests: PathBuf,
    rec: RunRecorder,
}

/// A lab of three nodes running the HA VM, or `None` after a SKIP line.
fn vm_lab(test: &str) -> Option<VmLab> {
    if !kvm_ok(test) {
        return None;
    }
    let mut lab = ClusterLab::for_test(test, 3)?;
    // The VMM reads the guest image after dropping privileges: the lab's temp dir must be
    // traversable.
    std::fs::set_permissions(lab.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let kernel = lab.path("guest/tiny.bin");
    stead_drivers::vm::write_demo_guest(&kernel).expect("demo guest");
    std::fs::set_permissions(
        kernel.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let manifests = lab.path("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("vm.yaml"), manifest(&kernel)).unwrap();
    lab.destroy_on_drop(std::slice::from_ref(&manifests));

    let probes: Vec<RunningProbe> = (0..lab.nodes.len())
        .map(|i| {
            let (run, cg) = (lab.node_run(i), lab.node_cgroup(i));
            Box::new(move || vm_runs_on(&run, &cg)) as RunningProbe
        })
        .collect();
    let rec = RunRecorder::start(probes);
    let mut agents = Vec::new();
    for i in 0..lab.nodes.len() {
        lab.join_node(i, &[]);
        agents.push(lab.start_agent(i, &manifests));
    }
    lab.start_controller(&manifests);
    wait_for(
        "the VM runs on a node",
        Duration::from_secs(90),
        || rec.runs().iter().any(|r| r.open),
        &lab,
    );
    println!("first start after {:.2} s", rec.now());
    Some(VmLab {
        lab,
        agents,
        manifests,
        rec,
    })
}

/// Panics on a double run in the record.
fn assert_no_overlap(v: &VmLab) {
    let runs = v.rec.runs();
    if let Some((a, b)) = overlap(&runs) {
        panic!(
            "double run: {a:?} and {b:?} (nodes by index, seconds on the recorder's clock)\n\
             all runs: {runs:#?}\n{}",
            agent_logs(&v.lab)
        );
    }
}

/// One round's figures.
#[derive(Debug, Clone, Copy)]
struct Round {
    /// From the fault to the first sample that saw the VM running on another node.
    failover: f64,
    /// From the fault to the last sample that saw it on the old node.
    gone: f64,
}

/// Waits for the VM on a node and for its owner, takes that node away with `fault`, waits
/// for the VM on another node, checks the old node's guest is gone (fenced) and the record
/// has no overlap, then brings the node back.
fn fail_over_once(v: &mut VmLab, round: usize, fault: Fault) -> Round {
    let mut first = None;
    wait_for(
        "an owner in cluster status",
        Duration::from_secs(30),
        || {
            first = owner(&v.lab);
            first.is_some()
        },
        &v.lab,
    );
    let first = first.unwrap();
    let victim = v.lab.nodes.iter().position(|n| n.name == first).unwrap();
    wait_for(
        "the VM runs on its owner",
        Duration::from_secs(30),
        || v.rec.runs().iter().any(|r| r.open && r.node == victim),
        &v.lab,
    );
    // An etcd leader cut off with its node answers the node's keepalives until it steps
    // down: that node fences later (printed, to tell such rounds apart).
    let leader_here = v.lab.leader() == Some(victim);
    let at = v.rec.now();
    match fault {
        Fault::Kill => v.lab.kill_proc(v.agents[victim]),
        Fault::Pause => assert!(v.lab.signal_proc(v.agents[victim], Signal::STOP)),
        Fault::Partition => v.lab.partition(victim),
    }
    let mut moved: Option<NodeRun> = None;
    wait_for(
        "the VM runs on another node",
        Duration::from_secs(60),
        || {
            moved = v
                .rec
                .runs()
                .into_iter()
                .find(|r| r.node != victim && r.first > at && r.open);
            moved.is_some()
        },
        &v.lab,
    );
    let moved = moved.unwrap();
    let old = v
        .rec
        .runs()
        .into_iter()
        .rfind(|r| r.node == victim && r.first <= at)
        .expect("the victim's run");
    assert!(
        !old.open,
        "round {round}: the VM still runs on {first}\n{}",
        agent_logs(&v.lab)
    );
    assert!(
        !vm_runs_on(&v.lab.node_run(victim), &v.lab.node_cgroup(victim)),
        "round {round}: the VM came back on {first}"
    );
    // Killed by its supervisor at the fence deadline, or (a cut-off agent still runs)
    // stopped by its agent's fence just before.
    let st = supervisor_state(&v.lab, victim);
    let stopped_as = st["phase"].as_str().unwrap_or_default().to_string();
    let expected: &[&str] = match fault {
        Fault::Kill | Fault::Pause => &["fenced"],
        Fault::Partition => &["fenced", "stopped", ""],
    };
    assert!(
        expected.contains(&stopped_as.as_str()),
        "round {round}: {first}'s VM ended as {stopped_as:?}, not {expected:?}\n{}",
        agent_logs(&v.lab)
    );
    // A fenced supervisor has exited too: nothing of the VM is left on the old node.
    let sup = st["supervisorPid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok());
    assert!(
        !sup.is_some_and(pid_running),
        "round {round}: {first}'s supervisor {sup:?} still runs: {st}"
    );
    wait_for(
        "the new guest's banner on its console",
        Duration::from_secs(10),
        || banner_on(&v.lab, moved.node),
        &v.lab,
    );
    // A second after the move: the old node still has nothing, the record no overlap.
    std::thread::sleep(Duration::from_secs(1));
    assert_no_overlap(v);
    let r = Round {
        failover: moved.first - at,
        gone: old.last - at,
    };
    assert!(
        r.failover <= FAILOVER_GOAL_S,
        "round {round}: failover took {:.2} s\n{}",
        r.failover,
        agent_logs(&v.lab)
    );
    println!(
        "{fault:?} round {round}: {first} -> {} after {:.2} s (guest on {first} last seen {:.2} s \
         after the fault, {}; etcd leader on {first}: {leader_here})",
        v.lab.nodes[moved.node].name,
        r.failover,
        r.gone,
        if stopped_as.is_empty() {
            "removed by its agent".to_string()
        } else {
            format!("phase {stopped_as}")
        }
    );
    match fault {
        Fault::Kill => v.agents[victim] = v.lab.start_agent(victim, &v.manifests),
        Fault::Pause => assert!(v.lab.signal_proc(v.agents[victim], Signal::CONT)),
        Fault::Partition => v.lab.heal(victim),
    }
    wait_for(
        "the node registers again",
        Duration::from_secs(30),
        || {
            v.lab.cluster_status()["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == v.lab.nodes.len())
        },
        &v.lab,
    );
    r
}

/// `ROUNDS` failovers with `fault`, the figures printed; after the last, the VM runs on
/// exactly one node and never ran on two at once.
fn run_failovers(test: &str, fault: Fault) {
    let Some(mut v) = vm_lab(test) else {
        return;
    };
    let rounds: Vec<Round> = (0..ROUNDS)
        .map(|round| fail_over_once(&mut v, round, fault))
        .collect();
    // The restarted or resumed node has had time to act on a stale view: still one run.
    std::thread::sleep(Duration::from_secs(3));
    assert_no_overlap(&v);
    let open: Vec<NodeRun> = v.rec.runs().into_iter().filter(|r| r.open).collect();
    assert_eq!(open.len(), 1, "{open:?}\n{}", agent_logs(&v.lab));
    let what = match fault {
        Fault::Kill => "agent SIGKILL",
        Fault::Pause => "agent SIGSTOP",
        Fault::Partition => "link down",
    };
    let (med, max) = median_max(rounds.iter().map(|r| r.failover).collect());
    println!(
        "FIGURE vm failover ({what}): median {med:.2} s, max {max:.2} s over {}",
        rounds.len()
    );
    let (gmed, gmax) = median_max(rounds.iter().map(|r| r.gone).collect());
    println!(
        "FIGURE vm gone from the old node ({what}): median {gmed:.2} s, max {gmax:.2} s after \
         the fault over {}, 0 double runs (sampled every {} ms)",
        rounds.len(),
        RunRecorder::PERIOD.as_millis()
    );
    let least = rounds
        .iter()
        .map(|r| r.failover - r.gone)
        .fold(f64::INFINITY, f64::min);
    println!(
        "FIGURE vm margin ({what}): the old guest's last sample to the new one's first, least \
         {least:.2} s over {}",
        rounds.len()
    );
}

/// The median (upper, for an even count) and the maximum of `v`.
fn median_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

#[test]
fn a_killed_agent_s_ha_vm_is_fenced_and_runs_on_another_node_without_overlap() {
    run_failovers(
        "a_killed_agent_s_ha_vm_is_fenced_and_runs_on_another_node_without_overlap",
        Fault::Kill,
    );
}

#[test]
fn a_paused_agent_s_ha_vm_is_fenced_by_its_watchdog_before_it_runs_elsewhere() {
    run_failovers(
        "a_paused_agent_s_ha_vm_is_fenced_by_its_watchdog_before_it_runs_elsewhere",
        Fault::Pause,
    );
}

#[test]
fn a_cut_off_node_stops_its_ha_vm_before_it_runs_elsewhere() {
    run_failovers(
        "a_cut_off_node_stops_its_ha_vm_before_it_runs_elsewhere",
        Fault::Partition,
    );
}

/// Loss of etcd quorum by crash (two of three members SIGKILLed for 8 s, twice the node
/// lease, then started again), five times: the VM keeps running where it is (the same run
/// in the record throughout), is started nowhere else, and never runs twice.
#[test]
fn etcd_quorum_crash_keeps_the_ha_vm_running_where_it_is() {
    let test = "etcd_quorum_crash_keeps_the_ha_vm_running_where_it_is";
    let Some(mut v) = vm_lab(test) else {
        return;
    };
    for round in 0..ROUNDS {
        let before = v.rec.runs();
        let running: Vec<NodeRun> = before.iter().copied().filter(|r| r.open).collect();
        assert_eq!(running.len(), 1, "round {round}: {running:?}");
        let lost_at = v.rec.now();
        let killed = v.lab.crash_quorum(round % v.lab.nodes.len());
        std::thread::sleep(Duration::from_secs(8));
        let held = v.rec.now() - lost_at;
        for &i in &killed {
            v.lab.start_etcd(i);
        }
        let healthy = v.lab.wait_healthy(Duration::from_secs(30));
        std::thread::sleep(Duration::from_secs(2));
        assert_no_overlap(&v);
        let after = v.rec.runs();
        assert_eq!(
            after.len(),
            before.len(),
            "round {round}: the VM stopped or started elsewhere: {after:#?}\n{}",
            agent_logs(&v.lab)
        );
        let same = after
            .iter()
            .find(|r| r.node == running[0].node && r.first == running[0].first);
        assert!(
            same.is_some_and(|r| r.open),
            "round {round}: the VM did not run through the loss: {after:#?}\n{}",
            agent_logs(&v.lab)
        );
        println!(
            "quorum crash {round}: the VM ran on through {held:.1} s without quorum on {}, \
             healthy again after {:.2} s, 0 new runs",
            v.lab.nodes[running[0].node].name,
            healthy.as_secs_f64()
        );
    }
}

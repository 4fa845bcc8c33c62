//! Storage replication end to end (issue 15): three nodes of the cluster lab; n1 and n2 each
//! have a btrfs pool `fast` on a loop file of their own (each agent reads manifests naming
//! its own mount point, as two hosts would each mount their disk at the pool's path). An HA
//! container (HA group: n1 first, then n2) mounts volume `data` on that pool, replicated to
//! n2 `every: 2s`. It writes its run token into `/data/hello` once (the volume is empty) and
//! then appends `RUN-TOKEN HELLO` to its rootfs every 200 ms. After status shows a replication
//! point taken after the write, SIGKILL of n1's agent and workloads → the container runs on
//! n2 from the promoted replica and reads the first run's token; status shows the failover's
//! data-loss window. Figures printed: replication lag, failover time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use stead_e2e::cluster::{ClusterLab, metric, owner_in};
use stead_e2e::{LoopBtrfs, Sandbox, busybox_ok, busybox_rootfs_at};

const TEST: &str = "an_ha_container_fails_over_to_its_volume_s_replica";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn manifest(root: &Path, pool: &Path, every: &str) -> String {
    format!(
        r#"apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {{name: fast}}
spec: {{type: btrfs, path: {pool}}}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {{name: data}}
spec:
  pool: fast
  size: 64Mi
  deletionPolicy: Delete
  replication: {{to: n2, every: {every}}}
---
apiVersion: stead.dev/v1alpha1
kind: HaGroup
metadata: {{name: pair}}
spec:
  nodes: {{n1: 2, n2: 1}}
  restricted: true
  noFailback: true
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {{name: probe}}
spec:
  rootfs: {{path: {root}}}
  unprivileged: false
  placement: {{haGroup: pair}}
  mounts: [{{volume: data, path: /data}}]
  command:
    - /bin/sh
    - -c
    - "trap 'exit 0' TERM; t=$RANDOM$RANDOM; [ -s /data/hello ] || {{ echo $t > /data/hello; sync; }}; while :; do [ -f /trigger ] && [ \"$(cat /trigger)\" != \"$(cat /data/late 2>/dev/null)\" ] && {{ cat /trigger > /data/late; sync; }}; echo \"$t $(cat /data/hello) $(cat /data/late 2>/dev/null || echo -)\" >> /seen.log; sleep 0.2; done"
"#,
        pool = pool.display(),
        root = root.display()
    )
}

/// `(run token, what it read from /data/hello)` per line of the probe's record.
fn seen(log: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

fn owner(st: &Value) -> Option<String> {
    owner_in(st, "Container/probe")
}

fn logs(lab: &ClusterLab) -> String {
    let mut s = String::new();
    for name in ["agent-n1", "agent-n2", "controller"] {
        let lines = lab.log_tail(name, usize::MAX);
        let from = lines.len().saturating_sub(30);
        let repl: Vec<&str> = lines
            .iter()
            .map(String::as_str)
            .filter(|l| l.contains("promot") || l.contains("failover") || l.contains("WARN"))
            .take(20)
            .collect();
        s.push_str(&format!(
            "--- {name} (replication, warnings)\n{}\n--- {name}\n{}\n",
            repl.join("\n"),
            lines[from..].join("\n")
        ));
    }
    s
}

fn wait_for(what: &str, limit: Duration, lab: &ClusterLab, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        if t0.elapsed() > limit {
            panic!("{what}: not after {limit:?}\n{}", logs(lab));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A node's pool: its own loop btrfs (in a sandbox of its own) and manifests naming it.
struct NodePool {
    fs: LoopBtrfs,
    manifests: PathBuf,
    _sb: Sandbox,
}

fn node_pool(root: &Path, test: &str, every: &str) -> Option<NodePool> {
    let sb = Sandbox::new();
    let fs = LoopBtrfs::for_test(&sb, test)?;
    let manifests = sb.path("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("m.yaml"),
        manifest(root, &fs.mnt.join("pool"), every),
    )
    .unwrap();
    Some(NodePool {
        fs,
        manifests,
        _sb: sb,
    })
}

#[test]
fn an_ha_container_fails_over_to_its_volume_s_replica() {
    if !busybox_ok(TEST) {
        return;
    }
    let rootfs_sb = Sandbox::new();
    let root = busybox_rootfs_at(&rootfs_sb.path("ct-root"));
    let seen_log = root.join("seen.log");
    // Declared before the lab: dropped after it (mounts go once its processes are gone).
    let Some(p1) = node_pool(&root, TEST, "2s") else {
        return;
    };
    let Some(p2) = node_pool(&root, TEST, "2s") else {
        return;
    };
    let Some(mut lab) = ClusterLab::for_test(TEST, 3) else {
        return;
    };
    for (i, p) in [&p1, &p2].iter().enumerate() {
        lab.destroy_node_on_drop(i, std::slice::from_ref(&p.manifests));
    }
    // n3 has no pool: its manifests are n1's (it never runs the container).
    let manifests = [&p1.manifests, &p2.manifests, &p1.manifests];
    let mut agents = Vec::new();
    for (i, m) in manifests.iter().enumerate() {
        lab.join_node(i, if i < 2 { &["--pool", "fast"] } else { &[] });
        agents.push(lab.start_agent(i, m));
    }
    lab.start_controller(&p1.manifests);

    wait_for(
        "the probe runs on n1",
        Duration::from_secs(90),
        &lab,
        || seen(&seen_log).len() >= 3,
    );
    let hello = seen(&seen_log)[0].1.clone();
    let written = unix_now();
    assert_eq!(owner(&lab.cluster_status()).as_deref(), Some("n1"));

    let mut lag = None;
    wait_for(
        "a replication point after the write",
        Duration::from_secs(60),
        &lab,
        || {
            let st = lab.cluster_status();
            let r = &st["replication"]["data"];
            let fresh = r["lastPoint"].as_u64().is_some_and(|p| p > written);
            lag = r["lagS"].as_u64();
            fresh
        },
    );
    let st = lab.cluster_status();
    println!(
        "FIGURE replication: lag {:?} s, last transfer {} bytes in {} ms",
        lag, st["replication"]["data"]["bytes"], st["replication"]["data"]["durationMs"]
    );

    // The sender's metrics: bytes of the last send and the lag of the volume.
    let mut sent = None;
    wait_for(
        "replication metrics on n1",
        Duration::from_secs(10),
        &lab,
        || {
            let m = lab.agent_metrics(0).unwrap_or_default();
            sent = metric(
                &m,
                "stead_cluster_replication_last_send_bytes",
                "volume=\"data\"",
            );
            let lag = metric(
                &m,
                "stead_cluster_replication_lag_seconds",
                "volume=\"data\"",
            );
            sent.is_some_and(|b| b > 0.0) && lag.is_some()
        },
    );
    println!("FIGURE replication metrics: last send {sent:?} bytes");

    let t0 = Instant::now();
    lab.kill_proc(agents[0]);
    assert!(lab.kill_workloads(0) > 0, "no workload process of n1 found");
    let on_replica = || {
        let lines = seen(&seen_log);
        let first = lines.first().map(|l| l.0.clone());
        lines
            .last()
            .is_some_and(|(t, h)| Some(t) != first.as_ref() && *h == hello)
    };
    while !on_replica() {
        if t0.elapsed() > Duration::from_secs(120) {
            let lines = seen(&seen_log);
            panic!(
                "the probe does not run on n2 reading the first run's file; hello {hello}, \
                 record: first {:?} last {:?}\n{}",
                lines.first(),
                lines.last(),
                logs(&lab)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let failover = t0.elapsed();
    let tail = seen(&seen_log);
    println!(
        "probe record: first {:?}, last {:?}",
        tail.first(),
        tail.last()
    );
    let st = lab.cluster_status();
    assert_eq!(owner(&st).as_deref(), Some("n2"), "{st:#}");
    assert!(
        p2.fs.mnt.join("pool/images/data").exists(),
        "the replica became n2's volume"
    );
    let mut window = None;
    wait_for(
        "the failover in status",
        Duration::from_secs(30),
        &lab,
        || {
            window = lab.cluster_status()["replication"]["data"]["failover"]["windowS"].as_u64();
            window.is_some()
        },
    );
    println!(
        "FIGURE failover: {:.2} s from SIGKILL to the container reading the replica on n2; data-loss window {} s",
        failover.as_secs_f64(),
        window.unwrap_or(0)
    );
}

/// The lab of the replication tests: n1 and n2 with a pool each (n2 receiving replicas on
/// port 7444, n1 on the default 7443), agents, a controller; each node's manifests are
/// destroyed when the lab drops, after its agents are gone. The agents' process indices
/// come last.
fn start_repl_lab(test: &str, p1: &NodePool, p2: &NodePool) -> Option<(ClusterLab, Vec<usize>)> {
    let mut lab = ClusterLab::for_test(test, 3)?;
    for (i, p) in [p1, p2].iter().enumerate() {
        lab.destroy_node_on_drop(i, std::slice::from_ref(&p.manifests));
    }
    let manifests = [&p1.manifests, &p2.manifests, &p1.manifests];
    // Each node receives on a port of its own (n1 the default): a sender dials the port
    // its peer registered.
    let joins: [&[&str]; 3] = [
        &["--pool", "fast"],
        &["--pool", "fast", "--replication-port", "7444"],
        &[],
    ];
    let mut agents = Vec::new();
    for (i, m) in manifests.iter().enumerate() {
        lab.join_node(i, joins[i]);
        agents.push(lab.start_agent(i, m));
    }
    // The controller once every node is registered: a placement made while n1 was still
    // joining would put the probe on n2 and keep it there (noFailback).
    wait_for(
        "three nodes registered",
        Duration::from_secs(60),
        &lab,
        || {
            lab.cluster_status()["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 3)
        },
    );
    lab.start_controller(&p1.manifests);
    Some((lab, agents))
}

/// Waits for the probe on n1 and the first replication point, then makes a late write
/// (after that point): the probe copies the trigger file of its rootfs into its volume. The
/// trigger is removed again, so only the replica can bring the late file to another node.
/// The first run's hello and the late file's content.
fn late_write_after_the_first_point(lab: &ClusterLab, root: &Path) -> (String, String) {
    let seen_log = root.join("seen.log");
    wait_for("the probe runs on n1", Duration::from_secs(90), lab, || {
        seen(&seen_log).len() >= 3
    });
    let hello = seen(&seen_log)[0].1.clone();
    let written = unix_now();
    wait_for(
        "the first replication point",
        Duration::from_secs(60),
        lab,
        || {
            lab.cluster_status()["replication"]["data"]["lastPoint"]
                .as_u64()
                .is_some_and(|p| p >= written.saturating_sub(5))
        },
    );
    let late = format!("late{}", unix_now());
    let trigger = root.join("trigger");
    std::fs::write(&trigger, &late).expect("trigger");
    wait_for(
        "the probe reads the late file on n1",
        Duration::from_secs(10),
        lab,
        || late_of(&seen_log).is_some_and(|(_, l)| l == late),
    );
    std::fs::remove_file(&trigger).expect("remove the trigger");
    (hello, late)
}

const MIGRATE_TEST: &str = "migrate_runs_a_final_replication_before_starting_on_the_replica";

/// `stead migrate` of a container whose volume is replicated to the target `every: 1h`:
/// after the first (immediate) replication the test writes a file into the volume on n1
/// (from the host, as a late write the schedule would not carry for an hour), then migrates
/// the container to n2: the source stops it, sends a final replication, releases it, and n2
/// promotes the replica and starts it, reading the late file.
#[test]
fn migrate_runs_a_final_replication_before_starting_on_the_replica() {
    let Some(l) = late_write_lab(MIGRATE_TEST, "1h") else {
        return;
    };
    let t0 = Instant::now();
    let cli = l.migrate_to_n2();
    let final_line = l.wait_for_the_late_write_on_n2();
    let moved = t0.elapsed();
    println!(
        "FIGURE migrate with final replication: CLI done {:.2} s, probe on n2 reading the late write {:.2} s; {final_line}",
        cli.as_secs_f64(),
        moved.as_secs_f64()
    );
    assert_eq!(owner(&l.lab.cluster_status()).as_deref(), Some("n2"));
}

/// The last record line's run token and late-file content.
fn late_of(log: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().last()?;
    let mut it = line.split_whitespace();
    let token = it.next()?.to_string();
    let _hello = it.next()?;
    Some((token, it.next()?.to_string()))
}

/// A replication lab (n1 replicating the probe's volume to n2 `every`) whose probe ran on
/// n1, read its first point, then read a late write made after it. Fields drop in order:
/// the lab (its agents, then each node's manifests destroyed), the pools, the probe's
/// rootfs.
struct LateWriteLab {
    lab: ClusterLab,
    p2: NodePool,
    p1: NodePool,
    root: PathBuf,
    seen_log: PathBuf,
    hello: String,
    late: String,
    agents: Vec<usize>,
    _rootfs: Sandbox,
}

/// [`LateWriteLab`] for `test`, or `None` (with a SKIP line) when something is missing.
fn late_write_lab(test: &str, every: &str) -> Option<LateWriteLab> {
    if !busybox_ok(test) {
        return None;
    }
    let rootfs = Sandbox::new();
    let root = busybox_rootfs_at(&rootfs.path("ct-root"));
    let seen_log = root.join("seen.log");
    let p1 = node_pool(&root, test, every)?;
    let p2 = node_pool(&root, test, every)?;
    let (lab, agents) = start_repl_lab(test, &p1, &p2)?;
    let (hello, late) = late_write_after_the_first_point(&lab, &root);
    Some(LateWriteLab {
        lab,
        p2,
        p1,
        root,
        seen_log,
        hello,
        late,
        agents,
        _rootfs: rootfs,
    })
}

impl LateWriteLab {
    /// Waits until a new run of the probe (on n2) reads the late write; every run read the
    /// first run's hello. Returns n1's log line of the final replication ("" when none).
    fn wait_for_the_late_write_on_n2(&self) -> String {
        let lab = &self.lab;
        let first = seen(&self.seen_log).first().map(|l| l.0.clone());
        wait_for(
            "the probe runs on n2 with the late file",
            Duration::from_secs(60),
            lab,
            || {
                late_of(&self.seen_log)
                    .is_some_and(|(t, l)| Some(&t) != first.as_ref() && l == self.late)
            },
        );
        assert!(
            seen(&self.seen_log).iter().all(|(_, h)| *h == self.hello),
            "every run read the first run's hello"
        );
        lab.log_tail("agent-n1", usize::MAX)
            .into_iter()
            .find(|l| l.contains("final replication before the migration"))
            .unwrap_or_default()
    }

    /// `stead migrate Container/probe --to n2`, asserted to succeed; how long it took.
    fn migrate_to_n2(&self) -> Duration {
        let lab = &self.lab;
        let t0 = Instant::now();
        let out = lab.migrate("Container/probe", "n2", "90s");
        println!(
            "stead migrate output:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "stead migrate failed\n{}", logs(lab));
        t0.elapsed()
    }
}

const PLACEMENT_TEST: &str = "a_placement_change_runs_a_final_replication_before_the_move";

/// A manifest change takes n1 out of the container's restricted HA group (it runs on n1, its
/// volume replicated to n2 `every: 1h`) after a late write: the leader marks the move as a hand-over, so n1 stops it, sends a
/// final replication and only then releases it; on n2 it reads the late write.
#[test]
fn a_placement_change_runs_a_final_replication_before_the_move() {
    let Some(l) = late_write_lab(PLACEMENT_TEST, "1h") else {
        return;
    };
    let t0 = Instant::now();
    for p in [&l.p1, &l.p2] {
        only_n2_in_the_group(&p.manifests.join("m.yaml"));
    }
    let final_line = l.wait_for_the_late_write_on_n2();
    let moved = t0.elapsed();
    assert!(
        !final_line.is_empty(),
        "no final replication\n{}",
        logs(&l.lab)
    );
    println!(
        "FIGURE placement change with final replication: probe on n2 reading the late write {:.2} s after the manifest edit; {final_line}",
        moved.as_secs_f64()
    );
    assert_eq!(owner(&l.lab.cluster_status()).as_deref(), Some("n2"));
}

/// Rewrites the manifests at `file` (atomically) with n2 alone in the HA group.
fn only_n2_in_the_group(file: &Path) {
    let text = std::fs::read_to_string(file).expect("manifests");
    let pinned = text.replace("nodes: {n1: 2, n2: 1}", "nodes: {n2: 1}");
    assert_ne!(pinned, text, "the group's nodes");
    // Beside the manifests directory (the same file system), so no reader sees it.
    let dir = file.parent().and_then(Path::parent).expect("sandbox");
    let tmp = dir.join("m.yaml.tmp");
    std::fs::write(&tmp, pinned).expect("write");
    std::fs::rename(&tmp, file).expect("rename");
}

const REVERSE_TEST: &str = "after_a_move_to_the_replica_node_the_volume_replicates_back";

/// The reversal rule: the container moves (`stead migrate`) from n1 to n2, the node its
/// volume's `to` names; n2 then replicates the volume back to n1. A write made on n2 after
/// the move reaches n1's replica.
#[test]
fn after_a_move_to_the_replica_node_the_volume_replicates_back() {
    let Some(l) = late_write_lab(REVERSE_TEST, "2s") else {
        return;
    };
    l.migrate_to_n2();
    l.wait_for_the_late_write_on_n2();
    let (lab, root, seen_log, p1) = (&l.lab, &l.root, &l.seen_log, &l.p1);

    // A write on n2, after the move.
    let t0 = Instant::now();
    let after = unix_now();
    let later = format!("after-move{}", unix_now());
    std::fs::write(root.join("trigger"), &later).expect("trigger");
    wait_for(
        "the probe writes on n2",
        Duration::from_secs(10),
        lab,
        || late_of(seen_log).is_some_and(|(_, l)| l == later),
    );
    let mut status = Value::Null;
    wait_for(
        "a replication point from n2 to n1 after the write",
        Duration::from_secs(60),
        lab,
        || {
            status = lab.cluster_status()["replication"]["data"].clone();
            status["from"] == "n2"
                && status["to"] == "n1"
                && status["lastPoint"].as_u64().is_some_and(|p| p > after)
        },
    );
    let back = t0.elapsed();
    let replicas = p1.fs.mnt.join("pool/replicas/data");
    assert!(
        holds(&replicas, later.as_bytes()),
        "n1's replica lacks the write made on n2: {status:#}"
    );
    let n2_log = lab.log_tail("agent-n2", usize::MAX);
    let back_lines: Vec<&String> = n2_log.iter().filter(|l| l.contains("to=n1")).collect();
    let failed: Vec<&&String> = back_lines
        .iter()
        .filter(|l| l.contains("replication failed"))
        .collect();
    for l in &failed {
        println!(
            "failed attempt back: {}",
            l.rsplit("error=").next().unwrap_or(l)
        );
    }
    let refused = failed.len();
    // The sender's own line says whether it was incremental (`parent=Some(..)`).
    let first_back = n2_log
        .iter()
        .find(|l| l.contains(": replicated ") && l.contains("parent="))
        .map_or("-", String::as_str);
    println!(
        "FIGURE reversal: n1's replica holds the write made on n2 {:.2} s after it; last transfer n2→n1 {} bytes in {} ms; failed attempts first: {refused}; first one back: {first_back}",
        back.as_secs_f64(),
        status["bytes"],
        status["durationMs"]
    );
}

/// Whether a file under `dir` contains `needle`.
fn holds(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            return holds(&path, needle);
        }
        std::fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
    })
}

/// Node `i`'s agent and workloads SIGKILLed (its node is lost).
fn kill_node(l: &mut LateWriteLab, i: usize) {
    l.lab.kill_proc(l.agents[i]);
    assert!(
        l.lab.kill_workloads(i) > 0,
        "no workload process of n{} found",
        i + 1
    );
}

/// Waits until a run of the probe other than `not` reads `late` from its volume; the run's
/// token.
fn wait_for_a_run_reading(l: &LateWriteLab, not: &str, late: &str, what: &str) -> String {
    wait_for(what, Duration::from_secs(120), &l.lab, || {
        late_of(&l.seen_log).is_some_and(|(t, v)| t != not && v == late)
    });
    late_of(&l.seen_log).map(|(t, _)| t).unwrap_or_default()
}

const BACK_TEST: &str = "after_a_failover_and_back_the_previous_owner_is_a_failover_target";

/// The failover n1 → n2 (n1 killed), a write on n1's stale copy that the failover gave up,
/// n1 back: n1's converge deletes the volume no longer placed there, keeping a read-only
/// safety snapshot first (issue #15: the divergent write is there); n2 replicates the volume
/// back to n1, incrementally from n1's own last snapshot, and the status names that safety
/// snapshot as the stale copy; n1 holds a replica. Then n2 dies:
/// the container returns to n1 (its replica holder, though `to` names n2) with the write
/// made on n2.
#[test]
fn after_a_failover_and_back_the_previous_owner_is_a_failover_target() {
    let Some(mut l) = late_write_lab(BACK_TEST, "2s") else {
        return;
    };
    let first = late_of(&l.seen_log).map(|(t, _)| t).unwrap_or_default();
    // A point holding the late write, then n1 is lost.
    let wrote = unix_now();
    wait_for(
        "a replication point after the late write",
        Duration::from_secs(60),
        &l.lab,
        || {
            l.lab.cluster_status()["replication"]["data"]["lastPoint"]
                .as_u64()
                .is_some_and(|p| p > wrote)
        },
    );
    kill_node(&mut l, 0);
    let on_n2 = wait_for_a_run_reading(&l, &first, &l.late.clone(), "the probe runs on n2");
    assert_eq!(owner(&l.lab.cluster_status()).as_deref(), Some("n2"));

    // n1's copy diverges (what n1 wrote after the last point is given up by the failover).
    let stale_mark = format!("stale{}", unix_now());
    let n1_live = l.p1.fs.mnt.join("pool/images/data");
    std::fs::write(n1_live.join("diverged"), &stale_mark).expect("write on n1's copy");

    // n1 back; a write on n2 after that.
    let m1 = l.p1.manifests.clone();
    l.agents[0] = l.lab.start_agent(0, &m1);
    let after = unix_now();
    let later = format!("on-n2-{}", unix_now());
    std::fs::write(l.root.join("trigger"), &later).expect("trigger");
    wait_for(
        "the probe writes on n2",
        Duration::from_secs(10),
        &l.lab,
        || late_of(&l.seen_log).is_some_and(|(_, v)| v == later),
    );
    std::fs::remove_file(l.root.join("trigger")).expect("remove the trigger");
    let mut status = Value::Null;
    wait_for(
        "a replication point from n2 to n1 after the write",
        Duration::from_secs(90),
        &l.lab,
        || {
            status = l.lab.cluster_status()["replication"]["data"].clone();
            status["from"] == "n2"
                && status["to"] == "n1"
                && status["failover"].is_null()
                && status["lastPoint"].as_u64().is_some_and(|p| p > after)
        },
    );
    assert!(
        holds(&l.p1.fs.mnt.join("pool/replicas/data"), later.as_bytes()),
        "n1's replica lacks the write made on n2: {status:#}"
    );
    assert!(!n1_live.exists(), "n1's stale live copy is still live");
    let kept = status["staleCopy"]["path"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(status["staleCopy"]["node"], "n1", "{status:#}");
    assert_eq!(
        std::fs::read_to_string(Path::new(&kept).join("diverged")).unwrap_or_default(),
        stale_mark,
        "the divergent copy is kept"
    );
    let n2_log = l.lab.log_tail("agent-n2", usize::MAX);
    let first_back = n2_log
        .iter()
        .find(|x| x.contains(": replicated ") && x.contains("parent="))
        .cloned()
        .unwrap_or_default();
    assert!(
        first_back.contains("parent=Some"),
        "the first transfer back was not incremental: {first_back}"
    );
    println!("FIGURE failover and back: first transfer back: {first_back}; kept {kept}");

    // n2 dies: the container comes back to n1 with the write made on n2.
    let t0 = Instant::now();
    kill_node(&mut l, 1);
    wait_for_a_run_reading(&l, &on_n2, &later, "the probe runs on n1 again");
    let back = t0.elapsed();
    assert_eq!(owner(&l.lab.cluster_status()).as_deref(), Some("n1"));
    assert!(
        l.p1.fs.mnt.join("pool/images/data").exists(),
        "n1 promoted its replica"
    );
    println!(
        "FIGURE failover back to the previous owner: {:.2} s from SIGKILL of n2 to the probe on n1 reading the write made on n2",
        back.as_secs_f64()
    );
}

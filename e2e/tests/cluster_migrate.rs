//! `stead migrate` end to end (issue 15): three nodes of the cluster lab, each running
//! `stead agent`, a controller candidate in the hub, an HA container whose probe appends
//! `RUN-TOKEN UPTIME` to a file every 200 ms, and a second container pinned to n1 by its
//! manifest. Migrating the probe to another node moves it there (stopped on the source
//! before it starts on the target: no overlap in the record) and it stays there, also after
//! the override is cleared; migrating the pinned one is refused with the reason; an unknown
//! node is refused by the CLI. Times are printed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use stead_e2e::cluster::{ClusterLab, owner_in};
use stead_e2e::{busybox_ok, busybox_rootfs_at};

/// First and last uptime written by each run (by token).
fn runs(log: &Path) -> BTreeMap<String, (f64, f64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(token), Some(Ok(t))) = (it.next(), it.next().map(str::parse::<f64>)) else {
            continue;
        };
        let r = out.entry(token.to_string()).or_insert((t, t));
        r.0 = r.0.min(t);
        r.1 = r.1.max(t);
    }
    out
}

fn assert_no_overlap(runs: &BTreeMap<String, (f64, f64)>) {
    let mut v: Vec<(f64, f64)> = runs.values().copied().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in v.windows(2) {
        assert!(w[1].0 > w[0].1, "double run: {runs:?}");
    }
}

fn uptime() -> f64 {
    let path = stead_host::ProcFs::host().root().join("uptime");
    let text = std::fs::read_to_string(path).expect("uptime");
    text.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .expect("uptime value")
}

fn container(name: &str, root: &Path, placement: &str, log: &str) -> String {
    format!(
        r#"apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {{name: {name}}}
spec:
  rootfs: {{path: {}}}
  unprivileged: false
  placement: {placement}
  command:
    - /bin/sh
    - -c
    - "trap 'exit 0' TERM; t=$RANDOM$RANDOM; while :; do read up idle < /proc/uptime; echo \"$t $up\" >> /{log}; sleep 0.2; done"
"#,
        root.display()
    )
}

fn owner(lab: &ClusterLab, resource: &str) -> Option<String> {
    owner_in(&lab.cluster_status(), resource)
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool, lab: &ClusterLab) {
    let t0 = Instant::now();
    while !ok() {
        if t0.elapsed() > limit {
            let mut logs = String::new();
            for name in ["agent-n1", "agent-n2", "agent-n3", "controller"] {
                logs.push_str(&format!(
                    "--- {name}\n{}\n",
                    lab.log_tail(name, 20).join("\n")
                ));
            }
            panic!("{what}: not after {limit:?}\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn migrate_moves_a_container_and_refuses_what_its_manifest_forbids() {
    let test = "migrate_moves_a_container_and_refuses_what_its_manifest_forbids";
    if !busybox_ok(test) {
        return;
    }
    let Some(mut lab) = ClusterLab::for_test(test, 3) else {
        return;
    };
    let root = busybox_rootfs_at(&lab.path("ct-root"));
    let pinned_root = busybox_rootfs_at(&lab.path("ct-root-pinned"));
    let probe = root.join("probe.log");
    let manifests = lab.path("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("probe.yaml"),
        container("probe", &root, "{ha: true}", "probe.log"),
    )
    .unwrap();
    std::fs::write(
        manifests.join("pinned.yaml"),
        container("pinned", &pinned_root, "{node: n1}", "pinned.log"),
    )
    .unwrap();
    lab.destroy_on_drop(std::slice::from_ref(&manifests));
    for i in 0..lab.nodes.len() {
        lab.join_node(i, &[]);
        lab.start_agent(i, &manifests);
    }
    lab.start_controller(&manifests);

    let mut from = None;
    wait_for(
        "the probe runs and has an owner",
        Duration::from_secs(90),
        || {
            from = owner(&lab, "Container/probe");
            from.is_some() && runs(&probe).values().any(|r| uptime() - r.1 < 0.6)
        },
        &lab,
    );
    let from = from.unwrap();
    let to = lab
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| *n != from && n != "n1")
        .unwrap_or_else(|| "n3".into());

    // The move.
    let before = runs(&probe).len();
    let at = uptime();
    let t0 = Instant::now();
    let out = lab.migrate("Container/probe", &to, "60s");
    let cli = t0.elapsed();
    println!("stead migrate output:\n{}", text(&out));
    assert!(out.status.success(), "stead migrate: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("runs on {to}")),
        "{}",
        text(&out)
    );
    wait_for(
        "the probe writes from the target",
        Duration::from_secs(30),
        || {
            runs(&probe)
                .values()
                .any(|r| r.0 > at && uptime() - r.1 < 0.6)
        },
        &lab,
    );
    let moved = t0.elapsed();
    let all = runs(&probe);
    assert_no_overlap(&all);
    let mut v: Vec<(f64, f64)> = all.values().copied().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let gap = v[v.len() - 1].0 - v[v.len() - 2].1;
    println!(
        "migrate {from} -> {to}: CLI done after {:.2} s, probe writing on the target after {:.2} s \
         (probe gap {gap:.2} s, {} new run(s))",
        cli.as_secs_f64(),
        moved.as_secs_f64(),
        all.len() - before
    );
    assert_eq!(owner(&lab, "Container/probe").as_deref(), Some(to.as_str()));

    // It stays there, with the override and after it is cleared.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(owner(&lab, "Container/probe").as_deref(), Some(to.as_str()));
    let out = lab
        .operator_cmd(&["migrate", "Container/probe", "--clear"])
        .output()
        .expect("stead migrate --clear");
    assert!(out.status.success(), "--clear: {}", text(&out));
    assert!(text(&out).contains("override cleared"), "{}", text(&out));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(owner(&lab, "Container/probe").as_deref(), Some(to.as_str()));
    assert_eq!(runs(&probe).len(), all.len(), "clearing moved nothing");

    // What the manifest forbids is refused with the reason.
    let out = lab
        .operator_cmd(&[
            "migrate",
            "Container/pinned",
            "--to",
            "n2",
            "--timeout",
            "30s",
        ])
        .output()
        .expect("stead migrate pinned");
    println!("refused migration output:\n{}", text(&out));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("pins it to node n1"),
        "the reason: {}",
        text(&out)
    );
    assert_eq!(owner(&lab, "Container/pinned").as_deref(), Some("n1"));
    let out = lab
        .operator_cmd(&["migrate", "Container/pinned", "--clear"])
        .output()
        .expect("clear");
    assert!(out.status.success(), "{}", text(&out));

    // An unknown node is refused before anything is written.
    let out = lab
        .operator_cmd(&["migrate", "Container/probe", "--to", "n9"])
        .output()
        .expect("stead migrate n9");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not registered"), "{}", text(&out));
}

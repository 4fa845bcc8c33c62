//! The cluster verbs against the lab's etcd (issue 15): `stead node join` checks etcd with
//! the credentials it is given before writing the agent's configuration, and `stead cluster
//! status` shows a running agent's node with its lease and capacity; `stead migrate --live`
//! of a container is refused with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stead_e2e::cluster::{AGENT_METRICS_PORT, ClusterLab, LEADER_METRICS_PORT};
use stead_e2e::stead_bin;

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `stead node join` on node `i` with `cert`/`key`.
fn join(lab: &mut ClusterLab, i: usize, cert: &std::path::Path, key: &std::path::Path) -> Output {
    let eps = lab.endpoints().join(",");
    let name = lab.nodes[i].name.clone();
    let ca = lab.ca();
    lab.stead(i)
        .args([
            "node", "join", "--etcd", &eps, "--name", &name, "--label", "zone=a",
        ])
        .arg("--ca")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .output()
        .expect("stead node join")
}

/// `curl URL` in n2's namespace, trusting the cluster's CA, with `n2:PORT` resolving to
/// loopback and the client certificate `cert` when given.
fn curl_n2(
    lab: &ClusterLab,
    port: u16,
    cert: Option<&(std::path::PathBuf, std::path::PathBuf)>,
    url: &str,
) -> Output {
    let resolve = format!("n2:{port}:127.0.0.1");
    let mut c = lab.in_netns(1, std::path::Path::new("curl"));
    c.args(["-sS", "--max-time", "5", "--resolve", &resolve, "--cacert"])
        .arg(lab.ca());
    if let Some((crt, key)) = cert {
        c.arg("--cert").arg(crt).arg("--key").arg(key);
    }
    c.arg(url).output().expect("curl")
}

#[test]
fn node_join_writes_the_agent_config_only_when_etcd_accepts_the_credentials() {
    let test = "node_join_writes_the_agent_config_only_when_etcd_accepts_the_credentials";
    let Some(mut lab) = ClusterLab::for_test(test, 3) else {
        return;
    };
    let other = lab.path("other-pki");
    let out = std::process::Command::new(stead_bin())
        .args(["cluster", "init", "--dir"])
        .arg(&other)
        .args(["--node", "n1=10.77.0.1"])
        .output()
        .expect("init");
    assert!(out.status.success(), "{}", show(&out));
    let config = lab.node_state(0).join("cluster/agent.json");

    let bad = join(
        &mut lab,
        0,
        &other.join("agent/n1.crt"),
        &other.join("agent/n1.key"),
    );
    assert_eq!(bad.status.code(), Some(1), "{}", show(&bad));
    assert!(!config.exists(), "a config was written for a refused join");

    let (cert, key) = lab.agent_cert(0);
    let good = join(&mut lab, 0, &cert, &key);
    assert!(good.status.success(), "{}", show(&good));
    let v: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    assert_eq!(v["name"], "n1");
    assert_eq!(v["labels"]["zone"], "a");
    assert_eq!(v["endpoints"].as_array().map(Vec::len), Some(3));
}

#[test]
fn cluster_status_shows_a_running_agent_s_node() {
    let test = "cluster_status_shows_a_running_agent_s_node";
    let Some(mut lab) = ClusterLab::for_test(test, 3) else {
        return;
    };
    let (cert, key) = lab.agent_cert(1);
    let eps = lab.endpoints().join(",");
    let ca = lab.ca();
    let out = lab
        .stead(1)
        .args([
            "node", "join", "--etcd", &eps, "--name", "n2", "--label", "zone=a",
        ])
        .args(["--pool", "fast", "--network", "lan0", "--ca"])
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .output()
        .expect("stead node join");
    assert!(out.status.success(), "{}", show(&out));
    let manifests = lab.path("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("net.yaml"),
        "apiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {name: lan0}\nspec: {addresses: [10.78.0.1/24]}\n",
    )
    .unwrap();
    let log = std::fs::File::create(lab.log_path("agent-n2")).unwrap();
    let mut agent = lab.stead(1);
    let metrics = format!("127.0.0.1:{AGENT_METRICS_PORT}");
    agent
        .arg("agent")
        .arg(&manifests)
        .args(["--metrics-listen", &metrics, "--metrics-tls"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    lab.spawn(1, "agent n2", agent);

    let t0 = Instant::now();
    let node = loop {
        let out = lab
            .stead(1)
            .args(["cluster", "status", "-o", "json"])
            .output()
            .expect("status");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(n) = v["nodes"].as_array().and_then(|n| n.first()) {
            break n.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no node registered: {}\n{}",
            show(&out),
            std::fs::read_to_string(lab.log_path("agent-n2")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(node["name"], "n2");
    assert_eq!(node["labels"]["zone"], "a");
    assert!(
        node["capacity"]["milliCpus"].as_u64().unwrap_or(0) >= 1000,
        "{node}"
    );
    assert!(
        node["capacity"]["memoryBytes"].as_u64().unwrap_or(0) > 0,
        "{node}"
    );
    assert!(node["leaseTtlSeconds"].as_i64().unwrap_or(-1) > 0, "{node}");
    assert_eq!(node["networks"], serde_json::json!(["lan0"]));
    assert_eq!(node["pools"], serde_json::json!(["fast"]));

    // The fence deadline for a watchdog: a CLOCK_BOOTTIME time while the agent runs.
    let deadline =
        std::fs::read_to_string(lab.node_run(1).join("cluster/fence-deadline")).unwrap_or_default();
    assert!(
        deadline.trim().parse::<u64>().is_ok_and(|ns| ns > 0),
        "fence deadline {deadline:?}"
    );

    let text = lab.stead(1).args(["cluster", "status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("leader: (none)"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("n2 ")), "{text}");

    // --metrics-tls: the operator's certificate reads the metrics, no certificate does not,
    // and neither does plain HTTP.
    let url = format!("https://n2:{AGENT_METRICS_PORT}/metrics");
    let curl = |cert, url: &str| curl_n2(&lab, AGENT_METRICS_PORT, cert, url);
    let admin = lab.admin();
    let out = curl(Some(&admin), &url);
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", show(&out));
    assert!(body.contains("stead_cluster_"), "{body}");
    let out = curl(None, &url);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("stead_cluster_"),
        "no client certificate: {}",
        show(&out)
    );
    let out = curl(
        None,
        &format!("http://127.0.0.1:{AGENT_METRICS_PORT}/metrics"),
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("stead_cluster_"),
        "plain HTTP: {}",
        show(&out)
    );

    // A controller candidate on the node: `cluster lead --metrics-tls` serves with the
    // node's certificate (it dials etcd with it too, from agent.json) on the same terms.
    let log = std::fs::File::create(lab.log_path("lead-n2")).unwrap();
    let mut lead = lab.stead(1);
    lead.args(["cluster", "lead"])
        .arg(&manifests)
        .args([
            "--name",
            "n2",
            "--metrics-listen",
            &format!("127.0.0.1:{LEADER_METRICS_PORT}"),
            "--metrics-tls",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    lab.spawn(1, "lead n2", lead);
    let url = format!("https://n2:{LEADER_METRICS_PORT}/metrics");
    let curl = |cert, url: &str| curl_n2(&lab, LEADER_METRICS_PORT, cert, url);
    let t0 = Instant::now();
    let body = loop {
        let out = curl(Some(&admin), &url);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && body.contains("stead_cluster_leader_terms_total") {
            break body;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the candidate's metrics over TLS: {}\n{}",
            show(&out),
            std::fs::read_to_string(lab.log_path("lead-n2")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.contains("stead_cluster_leader_"), "{body}");
    let out = curl(None, &url);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("stead_cluster_"),
        "candidate, no client certificate: {}",
        show(&out)
    );
    let out = curl(
        None,
        &format!("http://127.0.0.1:{LEADER_METRICS_PORT}/metrics"),
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("stead_cluster_"),
        "candidate, plain HTTP: {}",
        show(&out)
    );
}

/// `stead migrate --live` of a container is refused with the reason before anything is
/// written (no etcd needed: only a VirtualMachine moves live), and `--live --cold` is a
/// usage error.
#[test]
fn migrate_live_is_refused_for_a_container_before_anything_is_written() {
    let state = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        std::process::Command::new(stead_bin())
            .arg("--state-dir")
            .arg(state.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("stead migrate")
    };
    let ct = run(&["migrate", "Container/c1", "--to", "n2", "--live"]);
    assert_eq!(ct.status.code(), Some(1), "{}", show(&ct));
    assert!(
        String::from_utf8_lossy(&ct.stderr).contains("only a VirtualMachine moves live"),
        "{}",
        show(&ct)
    );
    let both = run(&[
        "migrate",
        "VirtualMachine/vm1",
        "--to",
        "n2",
        "--live",
        "--cold",
    ]);
    assert_eq!(both.status.code(), Some(2), "{}", show(&both));
}

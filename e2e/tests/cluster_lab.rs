//! The cluster lab itself (issue 15): three etcd members with TLS in their own network
//! namespaces form a cluster, refuse clients without a certificate from the cluster's CA,
//! elect a new leader when the leader is SIGKILLed, refuse writes on a partitioned member
//! that catches up after the partition heals, and stop writing without a quorum.
//! Times are printed, not asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use stead_e2e::cluster::ClusterLab;
use stead_e2e::stead_bin;

const T: Duration = Duration::from_secs(3);

/// Retries `put` through member `i` until it succeeds (a leader may be being elected).
fn put_eventually(lab: &ClusterLab, i: usize, key: &str, value: &str, limit: Duration) {
    let t0 = Instant::now();
    loop {
        match lab.put(i, key, value, T) {
            Ok(()) => return,
            Err(e) if t0.elapsed() > limit => {
                panic!(
                    "put {key} via {}: {e}\n{}",
                    lab.nodes[i].name,
                    lab.logs_tail()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn three_tls_members_form_a_cluster_and_refuse_clients_without_a_certificate() {
    let test = "three_tls_members_form_a_cluster_and_refuse_clients_without_a_certificate";
    let Some(lab) = ClusterLab::for_test(test, 3) else {
        return;
    };
    let members = lab
        .call(0, "cluster/member/list", &json!({}), T)
        .expect("member list");
    let urls: Vec<String> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .flat_map(|m| m["peerURLs"].as_array().cloned().unwrap_or_default())
        .filter_map(|u| u.as_str().map(str::to_string))
        .collect();
    assert_eq!(urls.len(), 3, "{members}");
    assert!(urls.iter().all(|u| u.starts_with("https://")), "{urls:?}");

    lab.put(0, "lab/hello", "world", T).expect("put via n1");
    assert_eq!(
        lab.get(2, "lab/hello", false, T).unwrap().as_deref(),
        Some("world")
    );

    let url = format!("https://{}:2379/v3/kv/range", lab.nodes[1].ip);
    let body = json!({"key": stead_e2e::cluster::b64(b"lab/hello")});
    let no_cert = lab.curl(0, &url, None, &body, T);
    assert!(
        no_cert.is_err(),
        "a client without a certificate was served: {no_cert:?}"
    );

    // A certificate from another CA (another `stead cluster init`) is refused too.
    let other = lab.path("other-pki");
    let out = Command::new(stead_bin())
        .args(["cluster", "init", "--dir"])
        .arg(&other)
        .args(["--node", "x1=10.77.0.1"])
        .output()
        .expect("init");
    assert!(out.status.success());
    let foreign = lab.curl(
        0,
        &url,
        Some((&other.join("admin.crt"), &other.join("admin.key"))),
        &body,
        T,
    );
    assert!(
        foreign.is_err(),
        "a foreign certificate was accepted: {foreign:?}"
    );

    // Plain HTTP gets nothing either.
    let mut plain = lab.in_netns(0, Path::new("curl"));
    plain.args([
        "-sS",
        "--max-time",
        "3",
        "-X",
        "POST",
        "-d",
        &body.to_string(),
        &format!("http://{}:2379/v3/kv/range", lab.nodes[1].ip),
    ]);
    let out = plain.output().expect("curl");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("kvs"),
        "plaintext read served data"
    );

    // An agent's certificate is a client certificate the members accept.
    let (cert, key) = lab.agent_cert(2);
    lab.curl(2, &url, Some((&cert, &key)), &body, T)
        .expect("the agent certificate is accepted");
}

fn stats(label: &str, times: &mut [Duration]) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label}: n={} min={:.0} ms median={:.0} ms max={:.0} ms",
        times.len(),
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    );
}

#[test]
fn a_sigkilled_leader_is_replaced_five_times_in_a_row() {
    let test = "a_sigkilled_leader_is_replaced_five_times_in_a_row";
    let Some(mut lab) = ClusterLab::for_test(test, 3) else {
        return;
    };
    let mut elected = Vec::new();
    let mut writable = Vec::new();
    for round in 0..5 {
        let old = lab.leader().expect("a leader");
        let old_id = lab.status(old).expect("leader status").member_id;
        let t0 = Instant::now();
        lab.kill_etcd(old);
        let (new, _) = lab
            .wait_new_leader(old_id, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("round {round}: no new leader\n{}", lab.logs_tail()));
        elected.push(t0.elapsed());
        put_eventually(
            &lab,
            new,
            "lab/round",
            &round.to_string(),
            Duration::from_secs(10),
        );
        writable.push(t0.elapsed());
        println!(
            "round {round}: killed {} -> leader {} after {:?} (writable after {:?})",
            lab.nodes[old].name, lab.nodes[new].name, elected[round], writable[round]
        );
        lab.start_etcd(old);
        lab.wait_healthy(Duration::from_secs(30));
        let back = lab
            .get(old, "lab/round", false, T)
            .expect("read on the restarted member");
        assert_eq!(back, Some(round.to_string()));
    }
    stats("leader SIGKILL -> new leader", &mut elected);
    stats("leader SIGKILL -> write accepted", &mut writable);
}

#[test]
fn a_partitioned_member_refuses_writes_and_catches_up_after_heal() {
    let test = "a_partitioned_member_refuses_writes_and_catches_up_after_heal";
    let Some(lab) = ClusterLab::for_test(test, 3) else {
        return;
    };
    let cut = 2;
    lab.put(0, "lab/p", "before", T).expect("put before");
    lab.partition(cut);
    let t0 = Instant::now();
    // A timed-out write is not refused for good: etcd keeps the proposal and may apply it
    // after the heal (which is why side effects need fencing tokens, not timeouts). So it
    // goes to a key of its own.
    let write = lab.put(cut, "lab/minority", "x", T);
    assert!(write.is_err(), "a partitioned member acknowledged a write");
    println!("partitioned write refused after {:?}", t0.elapsed());
    put_eventually(&lab, 0, "lab/p", "during", Duration::from_secs(15));
    let local = lab.get(cut, "lab/p", true, T).expect("local read");
    assert_eq!(
        local.as_deref(),
        Some("before"),
        "the cut member saw the write?"
    );

    lab.heal(cut);
    let t0 = Instant::now();
    loop {
        let got = lab.get(cut, "lab/p", true, T);
        if got.as_ref().is_ok_and(|v| v.as_deref() == Some("during")) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no catch-up: {got:?}\n{}\n{}",
            lab.diagnose(),
            lab.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("healed member caught up after {:?}", t0.elapsed());
    put_eventually(&lab, cut, "lab/p", "after", Duration::from_secs(10));
    assert_eq!(
        lab.get(0, "lab/p", false, T).unwrap().as_deref(),
        Some("after")
    );
}

#[test]
fn without_a_quorum_nothing_is_written_until_it_returns() {
    let test = "without_a_quorum_nothing_is_written_until_it_returns";
    let Some(mut lab) = ClusterLab::for_test(test, 3) else {
        return;
    };
    lab.put(0, "lab/q", "1", T).expect("put");
    let stopped = lab.stop_quorum(0);
    assert!(
        lab.put(0, "lab/q", "2", T).is_err(),
        "written without a quorum"
    );
    lab.resume(&stopped);
    put_eventually(&lab, 0, "lab/q", "3", Duration::from_secs(15));
    assert_eq!(lab.get(1, "lab/q", false, T).unwrap().as_deref(), Some("3"));
}

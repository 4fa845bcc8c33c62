//! Network driver benchmark: converge N bridges with addresses and NAT from empty in a
//! scratch network namespace, then a no-op apply (observe + diff). Prints both times and
//! the netlink round trips / nft runs of the no-op.
//!
//! `cargo run -p stead-drivers --release --example net_bench [-- N [nonat]]` (root; needs `ip`
//! to create the namespace and `nft`).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use serde_json::json;
use stead_drivers::net::NetworkDriver;
use stead_reconciler::driver::{Driver, HostEnv};
use stead_schema::{Kind, Metadata, Name, Resource, ResourceId, Spec};

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn network(i: usize, nat: bool) -> Resource {
    let name = format!("nb{i:03}");
    let mut spec = json!({
        "addresses": [format!("10.{}.{}.1/24", 64 + i / 256, i % 256)],
    });
    if nat {
        spec["nat"] = json!({"enabled": true});
    }
    Resource {
        id: ResourceId::new(Kind::Network, name.clone()),
        metadata: Metadata {
            name: Name(name),
            ..Default::default()
        },
        spec: Spec::from_value(Kind::Network, spec).expect("valid spec"),
        origin: Default::default(),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let nat = std::env::args().nth(2).as_deref() != Some("nonat");
    let ns = Ns(format!("stead-bench-{}", std::process::id()));
    let st = Command::new("ip").args(["netns", "add", &ns.0]).status()?;
    if !st.success() {
        return Err("ip netns add failed".into());
    }
    let env = HostEnv {
        state_dir: std::env::temp_dir(),
        run_dir: std::env::temp_dir(),
        cgroup_parent: "stead-bench".into(),
        netns: Some(format!("/run/netns/{}", ns.0).into()),
        self_exe: "/bin/false".into(),
        fence_file: None,
    };
    let d = NetworkDriver::new(&env)?;
    let rs: Vec<Resource> = (0..n).map(|i| network(i, nat)).collect();
    let world: BTreeMap<ResourceId, Resource> =
        rs.iter().map(|r| (r.id.clone(), r.clone())).collect();
    let targets: Vec<&Resource> = rs.iter().collect();

    // 1. Converge from empty: one observe, then apply each.
    let t = Instant::now();
    let obs = d.observe(&targets, &world)?;
    for r in &rs {
        d.apply(r, &obs[&r.id], &world)?;
    }
    let converge = t.elapsed();

    // 2. No-op apply: observe + diff; apply only what differs (nothing).
    let mut times = Vec::new();
    let mut trips = 0;
    let mut nft_runs = 0;
    let mut changed = 0;
    for _ in 0..5 {
        let (rt0, nft0) = (d.netlink_round_trips(), d.nft_invocations());
        let t = Instant::now();
        let obs = d.observe(&targets, &world)?;
        changed = 0;
        for r in &rs {
            if d.desired_state(r, &world) != obs[&r.id].state {
                changed += 1;
                d.apply(r, &obs[&r.id], &world)?;
            }
        }
        times.push(t.elapsed());
        trips = d.netlink_round_trips() - rt0;
        nft_runs = d.nft_invocations() - nft0;
    }
    times.sort();
    println!(
        "networks: {n} (bridge + 1 address{} each)",
        if nat { " + NAT" } else { "" }
    );
    println!(
        "converge from empty: {:.0} ms",
        converge.as_secs_f64() * 1e3
    );
    println!(
        "no-op apply (observe + diff), median of 5: {:.1} ms (min {:.1}, max {:.1})",
        times[2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[4].as_secs_f64() * 1e3
    );
    println!(
        "no-op: {trips} netlink round trips, {nft_runs} nft runs, {changed} resources changed"
    );
    Ok(())
}

//! NAT traffic: a namespace behind the NAT bridge reaches an upstream HTTP server through
//! masquerade (the upstream has no route back to the bridge subnet), and a DNAT forward
//! reaches a server behind the bridge, from upstream and (hairpin) from the bridge.
#![allow(clippy::unwrap_used)]

mod net_util;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use net_util::*;
use serde_json::json;
use stead_drivers::net::attach::{VethPeer, VethSpec, ensure_veth};
use stead_drivers::net::{NetnsRef, NetworkDriver, owner_alias};
use stead_schema::Kind;

/// `python3 -m http.server` in a namespace, serving a directory with `marker.txt`.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
}

impl Server {
    fn start(ns: &Netns, bind: &str, port: u16, marker: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("marker.txt"), marker).unwrap();
        let log = dir.path().join("access.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-m", "http.server"])
            .arg(port.to_string())
            .args(["--bind", bind, "--directory"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Server {
            child,
            _dir: dir,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fetches `url` from inside `ns`, retrying for up to 5 s (servers start in the background).
fn fetch(ns: &Netns, url: &str) -> Result<String, String> {
    let code = format!(
        "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen('{url}',timeout=2).read().decode())"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (ok, out) = ns.exec(&["python3", "-c", &code]);
        if ok {
            return Ok(out);
        }
        if Instant::now() > deadline {
            return Err(out);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn plug(router: &Netns, guest: &Netns, host_name: &str, addr: &str) {
    ensure_veth(
        Some(&router.path()),
        &VethSpec {
            host_name: host_name.into(),
            bridge: "nat0".into(),
            owner: owner_alias(Kind::Container, host_name),
            peer: VethPeer {
                name: "eth0".into(),
                netns: Some(NetnsRef::Path(guest.path())),
                addresses: vec![addr.parse().unwrap()],
                gateway: Some("10.10.0.1".parse().unwrap()),
                loopback_up: true,
                ..VethPeer::default()
            },
            ..VethSpec::default()
        },
    )
    .unwrap();
}

#[test]
fn net_nat_masquerade_and_dnat_forward_carry_traffic() {
    if let Some(r) = can_run() {
        eprintln!("SKIP net_nat_masquerade_and_dnat_forward_carry_traffic: {r}");
        return;
    }
    if !have_nft() || !try_sh("python3", &["-V"]).0 {
        eprintln!("SKIP net_nat_masquerade_and_dnat_forward_carry_traffic: nft or python3 missing");
        return;
    }
    let router = Netns::new();
    let upstream = Netns::new();
    let client = Netns::new();
    let server = Netns::new();
    // Underlay router <-> upstream; upstream knows no route to 10.10.0.0/24.
    router.ip(&[
        "link",
        "add",
        "wan0",
        "type",
        "veth",
        "peer",
        "name",
        "up0",
        "netns",
        &upstream.name,
    ]);
    router.ip(&["addr", "add", "10.200.0.1/24", "dev", "wan0"]);
    router.ip(&["link", "set", "wan0", "up"]);
    upstream.ip(&["addr", "add", "10.200.0.2/24", "dev", "up0"]);
    upstream.ip(&["link", "set", "up0", "up"]);

    let d = NetworkDriver::new(&env(&router)).unwrap();
    let nat0 = resource(
        Kind::Network,
        "nat0",
        json!({"addresses": ["10.10.0.1/24"], "nat": {"enabled": true, "egress": "wan0"},
               "forwards": [{"protocol": "tcp", "hostPort": 8080, "to": "10.10.0.20:8000"}]}),
    );
    apply(&d, &nat0).unwrap();
    assert_converged(&d, &nat0);
    plug(&router, &client, "vclient", "10.10.0.10/24");
    plug(&router, &server, "vserver", "10.10.0.20/24");

    // Masquerade: client → upstream server; upstream sees the router's address.
    let up = Server::start(&upstream, "10.200.0.2", 8000, "upstream-ok");
    let got = fetch(&client, "http://10.200.0.2:8000/marker.txt");
    assert_eq!(
        got.as_deref(),
        Ok("upstream-ok"),
        "masquerade: {}",
        up.log()
    );
    let log = up.log();
    assert!(
        log.contains("10.200.0.1"),
        "upstream saw the masqueraded source: {log}"
    );
    assert!(
        !log.contains("10.10.0.10"),
        "client address must not leak: {log}"
    );

    // DNAT: upstream → router:8080 → server behind the bridge.
    let srv = Server::start(&server, "10.10.0.20", 8000, "behind-nat-ok");
    let got = fetch(&upstream, "http://10.200.0.1:8080/marker.txt");
    assert_eq!(got.as_deref(), Ok("behind-nat-ok"), "dnat: {}", srv.log());

    // Hairpin: the client reaches the forward through the router's address too.
    let got = fetch(&client, "http://10.200.0.1:8080/marker.txt");
    assert_eq!(
        got.as_deref(),
        Ok("behind-nat-ok"),
        "hairpin: {}",
        srv.log()
    );

    // Without the rules (flushed by hand) masquerade stops working; apply heals it.
    let (ok, out) = router.exec(&["nft", "flush", "table", "inet", "stead"]);
    assert!(ok, "{out}");
    let (ok, _) = client.exec(&[
        "python3",
        "-c",
        "import urllib.request;urllib.request.urlopen('http://10.200.0.2:8000/marker.txt',timeout=2)",
    ]);
    assert!(!ok, "no masquerade, no answer");
    assert_drift(&d, &nat0, "nat");
    apply(&d, &nat0).unwrap();
    assert_converged(&d, &nat0);
    let got = fetch(&client, "http://10.200.0.2:8000/marker.txt");
    assert_eq!(got.as_deref(), Ok("upstream-ok"));

    delete(&d, &nat0).unwrap();
    assert!(!router.has_table("inet", "stead"));
    assert!(router.link("vclient").is_none() && router.link("vserver").is_none());
}

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use x509_parser::extensions::GeneralName;
use x509_parser::pem::{Pem, parse_x509_pem};

use super::*;

fn members() -> Vec<Member> {
    ["n1=10.77.0.1", "n2=10.77.0.2", "n3=10.77.0.3"]
        .iter()
        .map(|s| s.parse().expect("member"))
        .collect()
}

fn request(dir: &Path, ca: CaMode) -> InitRequest {
    InitRequest {
        layout: Layout::new(dir),
        members: members(),
        ca,
        days: 30,
    }
}

fn pem(path: &Path) -> Pem {
    let bytes = std::fs::read(path).expect("read cert");
    parse_x509_pem(&bytes).expect("pem").1
}

/// SANs of a certificate as text (`DNS:name`, `IP:a.b.c.d`).
fn sans(p: &Pem) -> Vec<String> {
    let c = p.parse_x509().expect("x509");
    let Some(ext) = c.subject_alternative_name().expect("san ext") else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .map(|g| match g {
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::IPAddress(b) if b.len() == 4 => {
                format!("IP:{}", Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            other => format!("{other:?}"),
        })
        .collect()
}

fn common_name(p: &Pem) -> String {
    let c = p.parse_x509().expect("x509");
    c.subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Whether `leaf` carries a signature the CA's key made.
fn signed_by(leaf: &Pem, ca: &Pem) -> bool {
    let ca = ca.parse_x509().expect("ca x509");
    let leaf = leaf.parse_x509().expect("leaf x509");
    leaf.verify_signature(Some(ca.public_key())).is_ok()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn members_parse_from_name_equals_ip() {
    let m: Member = "node-1=10.0.0.7".parse().expect("parse");
    assert_eq!(m.name, "node-1");
    assert_eq!(m.ip, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)));
    assert_eq!(m.client_url(), "https://10.0.0.7:2379");
    assert_eq!(m.peer_url(), "https://10.0.0.7:2380");
    let v6: Member = "a=fd00::1".parse().expect("v6");
    assert_eq!(v6.client_url(), "https://[fd00::1]:2379");
    for bad in [
        "n1",
        "=10.0.0.1",
        "N1=10.0.0.1",
        "n/1=10.0.0.1",
        "n1=host",
        "-n=1.2.3.4",
    ] {
        assert!(bad.parse::<Member>().is_err(), "{bad} should not parse");
    }
}

#[test]
fn members_must_be_unique_and_present() {
    assert!(matches!(check_members(&[]), Err(PkiError::NoMembers)));
    let mut m = members();
    m.push("n1=10.77.0.9".parse().expect("m"));
    assert!(matches!(check_members(&m), Err(PkiError::DuplicateMember(n)) if n == "n1"));
    let mut m = members();
    m.push("n9=10.77.0.1".parse().expect("m"));
    assert!(matches!(check_members(&m), Err(PkiError::DuplicateMember(n)) if n == "n9"));
}

#[test]
fn init_writes_certificates_that_chain_to_the_ca_with_their_sans() {
    let d = tempfile::tempdir().expect("tmp");
    let report = init(&request(d.path(), CaMode::New)).expect("init");
    assert!(report.ca_created);
    let l = Layout::new(d.path());
    let ca = pem(&l.ca_cert());
    assert!(ca.parse_x509().expect("ca").is_ca());
    for m in members() {
        for cert in [l.server_cert(&m.name), l.peer_cert(&m.name)] {
            let c = pem(&cert);
            assert!(
                signed_by(&c, &ca),
                "{} not signed by the CA",
                cert.display()
            );
            let s = sans(&c);
            for want in [
                format!("DNS:{}", m.name),
                format!("IP:{}", m.ip),
                "IP:127.0.0.1".to_string(),
            ] {
                assert!(s.contains(&want), "{} lacks {want}: {s:?}", cert.display());
            }
        }
        let agent = pem(&l.agent_cert(&m.name));
        assert!(signed_by(&agent, &ca));
        assert_eq!(common_name(&agent), m.name);
        let a = agent.parse_x509().expect("agent");
        let eku = a.extended_key_usage().expect("eku").expect("has eku").value;
        assert!(eku.client_auth && eku.server_auth);
        let s = sans(&agent);
        for want in [format!("DNS:{}", m.name), format!("IP:{}", m.ip)] {
            assert!(s.contains(&want), "agent of {} lacks {want}: {s:?}", m.name);
        }
        for key in [
            l.server_key(&m.name),
            l.peer_key(&m.name),
            l.agent_key(&m.name),
        ] {
            assert_eq!(mode(&key), 0o600, "{}", key.display());
        }
        assert_eq!(mode(&l.server_cert(&m.name)), 0o644);
    }
    assert_eq!(mode(&l.ca_key()), 0o600);
    assert_eq!(mode(&l.admin_key()), 0o600);
    assert_eq!(common_name(&pem(&l.admin_cert())), ADMIN_CN);
    assert_eq!(report.members.len(), 3);
}

#[test]
fn an_existing_ca_is_refused_reused_or_replaced_only_as_asked() {
    let d = tempfile::tempdir().expect("tmp");
    let l = Layout::new(d.path());
    init(&request(d.path(), CaMode::New)).expect("first init");
    let first = std::fs::read(l.ca_cert()).expect("ca");
    let err = init(&request(d.path(), CaMode::New)).expect_err("second init");
    assert!(matches!(err, PkiError::CaExists(_)), "{err}");
    assert_eq!(
        std::fs::read(l.ca_cert()).expect("ca"),
        first,
        "CA untouched"
    );

    let mut more = request(d.path(), CaMode::Reuse);
    more.members = vec!["n4=10.77.0.4".parse().expect("m")];
    let r = init(&more).expect("reuse");
    assert!(!r.ca_created);
    assert_eq!(std::fs::read(l.ca_cert()).expect("ca"), first);
    assert!(signed_by(&pem(&l.agent_cert("n4")), &pem(&l.ca_cert())));

    init(&request(d.path(), CaMode::Replace)).expect("replace");
    assert_ne!(std::fs::read(l.ca_cert()).expect("ca"), first);
    let fresh = tempfile::tempdir().expect("tmp");
    let err = init(&request(fresh.path(), CaMode::Reuse)).expect_err("nothing to reuse");
    assert!(matches!(err, PkiError::CaMissing(_)), "{err}");
}

/// A second opinion from OpenSSL: each certificate verifies against the CA for its purpose.
#[test]
fn openssl_verifies_each_certificate_for_its_purpose() {
    if Command::new("openssl").arg("version").output().is_err() {
        println!("SKIP openssl_verifies_each_certificate_for_its_purpose: no openssl");
        return;
    }
    let d = tempfile::tempdir().expect("tmp");
    init(&request(d.path(), CaMode::New)).expect("init");
    let l = Layout::new(d.path());
    let verify = |purpose: &str, cert: PathBuf| {
        let out = Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(l.ca_cert())
            .arg(&cert)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{} ({purpose}): {}{}",
            cert.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    verify("sslserver", l.server_cert("n2"));
    verify("sslserver", l.peer_cert("n2"));
    verify("sslclient", l.peer_cert("n2"));
    verify("sslclient", l.agent_cert("n2"));
    verify("sslserver", l.agent_cert("n2"));
    verify("sslclient", l.admin_cert());
}

#[test]
fn etcd_flags_require_certificates_on_both_sides() {
    let l = Layout::new("/etc/stead/pki");
    let all = members();
    let f = etcd_flags(&l, &all, &all[1]);
    for want in [
        "--name=n2",
        "--listen-client-urls=https://10.77.0.2:2379,https://127.0.0.1:2379",
        "--initial-cluster=n1=https://10.77.0.1:2380,n2=https://10.77.0.2:2380,n3=https://10.77.0.3:2380",
        "--client-cert-auth=true",
        "--peer-client-cert-auth=true",
        "--cert-file=/etc/stead/pki/etcd/n2/server.crt",
        "--peer-key-file=/etc/stead/pki/etcd/n2/peer.key",
        "--trusted-ca-file=/etc/stead/pki/ca.crt",
        "--pre-vote=true",
        "--grpc-keepalive-min-time=1s",
    ] {
        assert!(f.iter().any(|x| x == want), "missing {want} in {f:?}");
    }
    assert!(
        !f.iter()
            .any(|x| x.starts_with("http://") || x.contains("=http://"))
    );
}

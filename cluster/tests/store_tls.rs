//! TLS to a real etcd member requiring client certificates: the right certificate connects;
//! a missing, foreign or untrusted one is an authentication error, not an outage.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use stead_cluster::etcd::{EtcdConfig, Store, StoreError};
use stead_cluster::testkit::{EtcdMember, ServerTls, or_skip};

/// A CA in `dir/<name>-ca.pem` with a server certificate for 127.0.0.1 and a client
/// certificate, each with its key.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn write(dir: &Path, file: &str, pem: &str) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, pem).expect("write pem");
    p
}

fn pki(dir: &Path, name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
    let leaf = |sans: Vec<String>, usage: ExtendedKeyUsagePurpose, file: &str| {
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(DnType::CommonName, file);
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &ca).expect("sign");
        (
            write(dir, &format!("{name}-{file}.pem"), &cert.pem()),
            write(dir, &format!("{name}-{file}-key.pem"), &key.serialize_pem()),
        )
    };
    let server = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        "server",
    );
    let client = leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth, "client");
    Pki {
        ca: write(dir, &format!("{name}-ca.pem"), &ca.pem()),
        server,
        client,
    }
}

fn client(url: &str, ca: &Path, cert: &Path, key: &Path) -> EtcdConfig {
    let mut c = EtcdConfig::new(vec![url.to_string()]).with_tls(ca.into(), cert.into(), key.into());
    c.dial_timeout = std::time::Duration::from_secs(3);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_are_required_and_checked() {
    let test = "tls_client_certificates_are_required_and_checked";
    let dir = tempfile::tempdir().expect("tempdir");
    let good = pki(dir.path(), "good");
    let rogue = pki(dir.path(), "rogue");
    let tls = ServerTls {
        ca: good.ca.clone(),
        cert: good.server.0.clone(),
        key: good.server.1.clone(),
    };
    let ok = client(
        "https://127.0.0.1:1",
        &good.ca,
        &good.client.0,
        &good.client.1,
    );
    let Some(etcd) = or_skip(test, EtcdMember::start_tls(&tls, &ok).await) else {
        return;
    };
    let url = etcd.client_url().to_string();
    assert!(url.starts_with("https://"));

    let store = Store::connect(&client(&url, &good.ca, &good.client.0, &good.client.1))
        .await
        .expect("the CA's client certificate connects");
    let mut c = store.client();
    c.put("/t/k", "v", None).await.expect("put over TLS");

    // A client certificate from another CA.
    let foreign = Store::connect(&client(&url, &good.ca, &rogue.client.0, &rogue.client.1)).await;
    assert!(matches!(foreign, Err(StoreError::Auth(_))), "{foreign:?}");
    // A client that does not trust the server's CA.
    let untrusting = Store::connect(&client(&url, &rogue.ca, &good.client.0, &good.client.1)).await;
    assert!(
        matches!(untrusting, Err(StoreError::Auth(_))),
        "{untrusting:?}"
    );
    // No client certificate at all: refused before dialling (the member would only drop the
    // connection, which looks like an outage).
    let mut anonymous = EtcdConfig::new(vec![url.clone()]);
    anonymous.ca = Some(good.ca.clone());
    let anonymous = Store::connect(&anonymous).await;
    assert!(
        matches!(anonymous, Err(StoreError::Config(_))),
        "{anonymous:?}"
    );
    for e in [foreign, untrusting, anonymous]
        .into_iter()
        .filter_map(Result::err)
    {
        assert!(!e.is_retryable());
        println!("refused: {e}");
    }
}

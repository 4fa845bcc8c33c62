use std::process::Command;

use saphyr::{LoadableYamlNode, Scalar, Yaml};
use serde_json::{Value, json};
use stead_schema::{CloudInitSpec, CloudInitUser};

use super::*;

fn ops_user() -> CloudInitUser {
    CloudInitUser {
        name: "ops".into(),
        ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3Nza ops@laptop".into()],
        password_hash: Some("$6$salt$hash/with.dots".into()),
        sudo: true,
        groups: vec!["adm".into(), "wheel".into()],
        shell: Some("/bin/bash".into()),
    }
}

fn typical() -> CloudInitSpec {
    CloudInitSpec {
        hostname: Some("web1".into()),
        users: vec![ops_user()],
        network: Some(json!({
            "version": 2,
            "ethernets": {"eth0": {"addresses": ["10.10.0.20/24"], "gateway4": "10.10.0.1"}},
        })),
        user_data: None,
        vendor_data: None,
    }
}

/// A YAML document as JSON (scalars resolved per YAML 1.2).
fn yaml_json(doc: &str) -> Value {
    let mut docs = Yaml::load_from_str(doc).expect("YAML parses");
    assert_eq!(docs.len(), 1, "one document in {doc}");
    to_json(&docs.remove(0))
}

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Value(Scalar::Null) => Value::Null,
        Yaml::Value(Scalar::Boolean(b)) => json!(b),
        Yaml::Value(Scalar::Integer(i)) => json!(i),
        Yaml::Value(Scalar::FloatingPoint(f)) => json!(f.into_inner()),
        Yaml::Value(Scalar::String(s)) => json!(s),
        Yaml::Sequence(s) => Value::Array(s.iter().map(to_json).collect()),
        Yaml::Mapping(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let k = match to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, to_json(v))
                })
                .collect(),
        ),
        other => panic!("unexpected YAML node {other:?}"),
    }
}

#[test]
fn typical_spec_gives_exactly_these_files() {
    let s = seed_files("vm1", &typical());
    let id = &s.instance_id;
    assert!(id.starts_with("stead-vm1-"), "{id}");
    assert_eq!(id.len(), "stead-vm1-".len() + 12);
    assert!(
        id["stead-vm1-".len()..]
            .chars()
            .all(|c| c.is_ascii_hexdigit())
    );
    assert_eq!(
        s.meta_data,
        format!("instance-id: \"{id}\"\nlocal-hostname: \"web1\"\n")
    );
    assert_eq!(
        s.user_data,
        "#cloud-config
hostname: \"web1\"
users:
  - name: \"ops\"
    groups:
      - \"adm\"
      - \"wheel\"
    shell: \"/bin/bash\"
    sudo: \"ALL=(ALL) NOPASSWD:ALL\"
    lock_passwd: false
    passwd: \"$6$salt$hash/with.dots\"
    ssh_authorized_keys:
      - \"ssh-ed25519 AAAAC3Nza ops@laptop\"
"
    );
    assert_eq!(
        s.network_config.as_deref(),
        Some(
            "version: 2
ethernets:
  eth0:
    addresses:
      - \"10.10.0.20/24\"
    gateway4: \"10.10.0.1\"
"
        )
    );
    assert_eq!(s.vendor_data, None);
    let names: Vec<&str> = s.files().iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["meta-data", "user-data", "network-config"]);
}

#[test]
fn emitted_yaml_parses_back_to_the_same_values() {
    let s = seed_files("vm1", &typical());
    assert_eq!(
        yaml_json(&s.user_data),
        json!({
            "hostname": "web1",
            "users": [{
                "name": "ops",
                "groups": ["adm", "wheel"],
                "shell": "/bin/bash",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "lock_passwd": false,
                "passwd": "$6$salt$hash/with.dots",
                "ssh_authorized_keys": ["ssh-ed25519 AAAAC3Nza ops@laptop"],
            }],
        })
    );
    assert_eq!(
        yaml_json(&s.meta_data),
        json!({"instance-id": s.instance_id, "local-hostname": "web1"})
    );
    assert_eq!(
        yaml_json(s.network_config.as_deref().expect("network")),
        typical().network.expect("network")
    );
}

/// Strings and keys that plain YAML would misread.
fn tricky_value() -> Value {
    json!({
        "yes": "no",
        "on": ["off", "y", "~", "null", "true", "1", "0x1f", "1e3", "-", ""],
        "52:54:00:aa:bb:cc": {"#not a comment": "a: b # c", "$x": "${HOME} $6$a$b"},
        "k": "line one\nline \"two\"\t\\ end\r",
        "ctl": "\u{1}\u{7f}\u{85}\u{2028}\u{feff}é😀",
        "nested": [[1, 2.5, true, null], [], {}, [{"a": [ {"b": "c"} ]}]],
        "-dash": "- item",
        "1": "number key",
        "emptymap": {},
        "emptylist": [],
    })
}

#[test]
fn tricky_strings_and_keys_come_back_unchanged() {
    let v = tricky_value();
    assert_eq!(yaml_json(&to_yaml(&v)), v);
    assert_eq!(yaml_json(&to_yaml(&json!("a: b"))), json!("a: b"));
    assert_eq!(yaml_json(&to_yaml(&json!([1, "x"]))), json!([1, "x"]));
}

#[test]
fn a_user_field_with_yaml_syntax_stays_a_string() {
    let mut spec = typical();
    spec.hostname = Some("h#1: x".into());
    spec.users[0].name = "yes".into();
    spec.users[0].password_hash = Some("$y$j9T$abc:def#".into());
    let s = seed_files("vm1", &spec);
    let ud = yaml_json(&s.user_data);
    assert_eq!(ud["hostname"], "h#1: x");
    assert_eq!(ud["users"][0]["name"], "yes");
    assert_eq!(ud["users"][0]["passwd"], "$y$j9T$abc:def#");
    assert_eq!(yaml_json(&s.meta_data)["local-hostname"], "h#1: x");
}

#[test]
fn instance_id_is_stable_for_equal_input_and_changes_with_anything() {
    let base = typical();
    let id = seed_files("vm1", &base).instance_id;
    assert_eq!(seed_files("vm1", &base.clone()).instance_id, id);
    let mut variants: Vec<(&str, String)> = vec![("name", seed_files("vm2", &base).instance_id)];
    let mut change = |what: &'static str, f: &dyn Fn(&mut CloudInitSpec)| {
        let mut s = base.clone();
        f(&mut s);
        variants.push((what, seed_files("vm1", &s).instance_id));
    };
    change("hostname", &|s| s.hostname = Some("web2".into()));
    change("no hostname", &|s| s.hostname = None);
    change("key", &|s| s.users[0].ssh_authorized_keys[0].push('x'));
    change("password", &|s| s.users[0].password_hash = None);
    change("sudo", &|s| s.users[0].sudo = false);
    change("groups", &|s| {
        s.users[0].groups.pop();
    });
    change("shell", &|s| s.users[0].shell = None);
    change("user", &|s| s.users.push(ops_user()));
    change("network", &|s| s.network = None);
    change("gateway", &|s| {
        s.network = Some(json!({"version": 2, "ethernets": {"eth0": {"dhcp4": true}}}));
    });
    change("user-data", &|s| {
        s.user_data = Some("#cloud-config\n".into())
    });
    change("empty user-data", &|s| s.user_data = Some(String::new()));
    change("vendor-data", &|s| {
        s.vendor_data = Some("#cloud-config\n".into())
    });
    let mut seen = std::collections::BTreeMap::new();
    for (what, v) in &variants {
        assert_ne!(v, &id, "{what} must change the instance-id");
        assert!(
            seen.insert(v.clone(), *what).is_none(),
            "{what} gives the same id as {:?}",
            seen.get(v)
        );
    }
}

#[test]
fn users_default_is_kept_only_when_asked() {
    let mut spec = typical();
    let ud = yaml_json(&seed_files("vm1", &spec).user_data);
    assert_eq!(ud["users"].as_array().map(Vec::len), Some(1));
    assert!(ud.get("ssh_authorized_keys").is_none());

    spec.users.clear();
    let ud = yaml_json(&seed_files("vm1", &spec).user_data);
    assert_eq!(ud["users"], json!([]), "no users: no default user either");
    assert_eq!(ud["hostname"], "web1");

    spec.users = vec![
        CloudInitUser {
            name: "default".into(),
            ssh_authorized_keys: vec!["ssh-rsa AAAA d".into()],
            password_hash: None,
            sudo: false,
            groups: vec![],
            shell: None,
        },
        ops_user(),
    ];
    let ud = yaml_json(&seed_files("vm1", &spec).user_data);
    assert_eq!(ud["users"][0], "default");
    assert_eq!(ud["users"][1]["name"], "ops");
    assert_eq!(ud["ssh_authorized_keys"], json!(["ssh-rsa AAAA d"]));
}

#[test]
fn hostname_defaults_to_the_vm_name_and_a_minimal_user_has_only_its_keys() {
    let spec = CloudInitSpec {
        users: vec![CloudInitUser {
            name: "u".into(),
            ssh_authorized_keys: vec!["k".into()],
            password_hash: None,
            sudo: false,
            groups: vec![],
            shell: None,
        }],
        ..CloudInitSpec::default()
    };
    let s = seed_files("db", &spec);
    assert_eq!(
        s.user_data,
        "#cloud-config\nhostname: \"db\"\nusers:\n  - name: \"u\"\n    ssh_authorized_keys:\n      - \"k\"\n"
    );
    assert!(s.meta_data.ends_with("local-hostname: \"db\"\n"));
    assert_eq!(s.network_config, None);
}

/// The parts of a multipart user-data: (headers, body) each, checked for structure.
fn mime_parts(ud: &str) -> Vec<(String, String)> {
    let first = ud.lines().next().expect("first line");
    let boundary = first
        .split("boundary=\"")
        .nth(1)
        .and_then(|b| b.strip_suffix('"'))
        .expect("boundary");
    assert!(
        first.starts_with("Content-Type: multipart/mixed;"),
        "{first}"
    );
    let (head, rest) = ud.split_once("\n\n").expect("blank line after the headers");
    assert!(head.contains("MIME-Version: 1.0"));
    let (parts, tail) = rest
        .split_once(&format!("\n--{boundary}--\n"))
        .expect("closing boundary");
    assert_eq!(tail, "");
    let parts = parts
        .strip_prefix(&format!("--{boundary}\n"))
        .expect("first boundary");
    parts
        .split(&format!("\n--{boundary}\n"))
        .map(|p| {
            let (h, b) = p.split_once("\n\n").expect("part headers");
            (h.to_string(), b.to_string())
        })
        .collect()
}

#[test]
fn user_cloud_config_is_a_second_part_that_appends_lists() {
    let mut spec = typical();
    let user =
        "#cloud-config\nwrite_files: [{path: /etc/motd, content: hello}]\nusers: [{name: extra}]\n";
    spec.user_data = Some(user.into());
    let s = seed_files("vm1", &spec);
    let parts = mime_parts(&s.user_data);
    assert_eq!(parts.len(), 2);
    let (h0, b0) = &parts[0];
    assert!(h0.starts_with("Content-Type: text/cloud-config; charset=\"utf-8\"\n"));
    assert!(!h0.contains("Merge-Type"));
    assert_eq!(
        format!("{b0}\n"),
        seed_files("vm1", &typical()).user_data,
        "stead's part is the plain cloud-config"
    );
    let (h1, b1) = &parts[1];
    assert!(h1.starts_with("Content-Type: text/cloud-config; charset=\"utf-8\"\n"));
    assert!(h1.contains(&format!("\nMerge-Type: {MERGE_TYPE}")), "{h1}");
    assert!(h1.contains("Content-Transfer-Encoding: 7bit"));
    assert_eq!(format!("{b1}\n"), user);
}

#[test]
fn a_user_script_keeps_its_type_and_non_ascii_goes_base64() {
    let mut spec = typical();
    spec.user_data = Some("#!/bin/sh\necho é > /x".into());
    let parts = mime_parts(&seed_files("vm1", &spec).user_data);
    let (h1, b1) = &parts[1];
    assert!(h1.starts_with("Content-Type: text/x-shellscript;"), "{h1}");
    assert!(!h1.contains("Merge-Type"));
    assert!(h1.contains("Content-Transfer-Encoding: base64"));
    // printf '#!/bin/sh\necho é > /x' | base64
    assert_eq!(b1, "IyEvYmluL3NoCmVjaG8gw6kgPiAveA==");

    for (data, ctype) in [
        ("#cloud-boothook\n", Some("text/cloud-boothook")),
        ("#include\nhttp://x\n", Some("text/x-include-url")),
        ("#cloud-config-archive\n", Some("text/cloud-config-archive")),
        ("## template: jinja\n", Some("text/jinja2")),
        ("plain words\n", Some("text/plain")),
        ("Content-Type: text/x-shellscript\n\n#!/bin/sh\n", None),
        ("content-type: multipart/mixed; boundary=x\n", None),
    ] {
        assert_eq!(part_type(data), ctype, "{data}");
    }
}

#[test]
fn a_user_mime_entity_is_embedded_with_its_own_headers() {
    let mut spec = typical();
    let entity = "Content-Type: text/x-shellscript\n\n#!/bin/sh\ntrue\n";
    spec.user_data = Some(entity.into());
    let parts = mime_parts(&seed_files("vm1", &spec).user_data);
    assert_eq!(parts[1].0, "Content-Type: text/x-shellscript");
    assert_eq!(parts[1].1, "#!/bin/sh\ntrue");
}

#[test]
fn the_boundary_avoids_the_content() {
    let b = boundary_for(&["x"], "stead-a-1");
    let evil = format!("#cloud-config\n# {b}\n");
    let b2 = boundary_for(&["x", &evil], "stead-a-1");
    assert_ne!(b, b2);
    assert!(!evil.contains(&b2));
}

#[test]
fn base64_matches_rfc4648() {
    for (input, want) in [
        ("", ""),
        ("f", "Zg==\n"),
        ("fo", "Zm8=\n"),
        ("foo", "Zm9v\n"),
        ("foob", "Zm9vYg==\n"),
        ("fooba", "Zm9vYmE=\n"),
        ("foobar", "Zm9vYmFy\n"),
    ] {
        assert_eq!(base64_lines(input.as_bytes()), want, "{input}");
    }
    let long = base64_lines(&[0u8; 100]);
    let lines: Vec<&str> = long.lines().collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].len(), 76);
}

/// `python3` with PyYAML (cloud-init's YAML reader) and the email package, when present.
fn python_yaml() -> Option<()> {
    let ok = Command::new("python3")
        .args(["-c", "import yaml, email"])
        .output()
        .ok()?
        .status
        .success();
    ok.then_some(())
}

#[test]
fn pyyaml_and_python_email_read_the_seed_as_cloud_init_would() {
    if python_yaml().is_none() {
        println!(
            "SKIP pyyaml_and_python_email_read_the_seed_as_cloud_init_would: python3 with PyYAML missing"
        );
        return;
    }
    let mut spec = typical();
    spec.user_data = Some("#cloud-config\nruncmd: [\"echo é\"]\n".into());
    let s = seed_files("vm1", &spec);
    // Parses the multipart the way cloud-init does (email.message_from_string, payloads
    // decoded per part) and every YAML with PyYAML's safe loader (YAML 1.1).
    let script = r#"
import email, json, sys, yaml
msg = email.message_from_string(sys.stdin.read())
out = []
for part in msg.walk():
    if part.get_content_maintype() == "multipart":
        continue
    body = part.get_payload(decode=True).decode("utf-8")
    out.append({"type": part.get_content_type(), "merge": part.get("Merge-Type"),
                "yaml": yaml.safe_load(body)})
print(json.dumps(out))
"#;
    let parsed = run_python(script, &s.user_data);
    assert_eq!(parsed[0]["type"], "text/cloud-config");
    assert_eq!(parsed[0]["merge"], Value::Null);
    assert_eq!(
        parsed[0]["yaml"]["users"][0]["passwd"],
        "$6$salt$hash/with.dots"
    );
    assert_eq!(parsed[0]["yaml"]["users"][0]["lock_passwd"], false);
    assert_eq!(parsed[1]["type"], "text/cloud-config");
    assert_eq!(parsed[1]["merge"], MERGE_TYPE);
    assert_eq!(parsed[1]["yaml"]["runcmd"], json!(["echo é"]));

    let v = tricky_value();
    let load = "import json, sys, yaml\nprint(json.dumps(yaml.safe_load(sys.stdin.read())))";
    assert_eq!(run_python(load, &to_yaml(&v)), v);
    assert_eq!(
        run_python(load, &s.meta_data)["instance-id"],
        json!(s.instance_id)
    );
}

fn run_python(script: &str, stdin: &str) -> Value {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "python failed on:\n{stdin}");
    serde_json::from_slice(&out.stdout).expect("json")
}

/// `isoinfo ARGS -i ISO` stdout, or `None` when isoinfo is missing.
fn isoinfo(iso: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("isoinfo")
        .args(args)
        .arg("-i")
        .arg(iso)
        .output()
        .ok()?;
    assert!(out.status.success(), "isoinfo {args:?} failed");
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn seed_iso_is_labelled_cidata_and_holds_the_files() {
    let t = tempfile::tempdir().expect("tmp");
    let iso = t.path().join("seed.iso");
    let mut spec = typical();
    spec.vendor_data = Some("#cloud-config\npackages: []\n".into());
    let seed = seed_files("vm1", &spec);
    match write_seed_iso(&seed, &iso) {
        Err(DriverError::Unsupported(why)) => {
            println!("SKIP seed_iso_is_labelled_cidata_and_holds_the_files: {why}");
            return;
        }
        r => r.expect("write seed ISO"),
    }
    let Some(desc) = isoinfo(&iso, &["-d"]) else {
        println!("SKIP seed_iso_is_labelled_cidata_and_holds_the_files: isoinfo missing");
        return;
    };
    assert!(
        desc.lines().any(|l| l.trim() == "Volume id: cidata"),
        "{desc}"
    );
    assert!(desc.contains("Rock Ridge"), "{desc}");
    assert!(desc.contains("Joliet"), "{desc}");
    let mut listed: Vec<String> = isoinfo(&iso, &["-f", "-R"])
        .expect("list")
        .lines()
        .map(str::to_string)
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "/meta-data",
            "/network-config",
            "/user-data",
            "/vendor-data"
        ]
    );
    for (name, content) in seed.files() {
        let got = isoinfo(&iso, &["-R", "-x", &format!("/{name}")]).expect("extract");
        assert_eq!(got, content, "{name}");
    }
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(&iso).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Rewritten in place (atomically), nothing else left in the directory.
    spec.hostname = Some("other".into());
    write_seed_iso(&seed_files("vm1", &spec), &iso).expect("rewrite");
    let got = isoinfo(&iso, &["-R", "-x", "/meta-data"]).expect("extract");
    assert!(got.contains("local-hostname: \"other\""), "{got}");
    let left: Vec<_> = std::fs::read_dir(t.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("seed.iso")]);
}

#[test]
fn a_missing_genisoimage_says_what_to_install_and_writes_nothing() {
    let t = tempfile::tempdir().expect("tmp");
    let iso = t.path().join("seed.iso");
    let err = write_seed_iso_with(
        "genisoimage-absent-for-this-test",
        &seed_files("vm1", &typical()),
        &iso,
    )
    .expect_err("no such program");
    assert!(matches!(err, DriverError::Unsupported(_)), "{err:?}");
    assert!(err.to_string().contains("install genisoimage"), "{err}");
    assert_eq!(std::fs::read_dir(t.path()).expect("ls").count(), 0);
}

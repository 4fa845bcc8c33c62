//! Rules for the values of `VirtualMachine.spec.cloudInit`: what cloud-init or the guest
//! would refuse, or silently get wrong (a plain-text password, a truncated SSH key, a
//! user-data document that is not a mapping), is refused at `stead validate` instead.
//!
//! Each check returns `Err(reason)`; the caller adds the location.

use serde_json::Value;

/// Longest Linux user or group name (useradd(8): 32 characters).
pub const USER_NAME_MAX: usize = 32;

/// Longest host name (RFC 1123: 253 characters, labels of at most 63).
const HOST_NAME_MAX: usize = 253;

/// Deepest nesting of YAML collections accepted in user-data (as for manifests).
const CLOUD_CONFIG_MAX_DEPTH: usize = 64;

/// SSH public key types OpenSSH accepts in `authorized_keys` (certificates are these
/// with `-cert-v01@openssh.com`).
const SSH_KEY_TYPES: [&str; 8] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// useradd's default rule for user and group names (`NAME_REGEX`,
/// `^[a-z_][a-z0-9_-]*$`), at most [`USER_NAME_MAX`] characters.
pub fn check_user_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > USER_NAME_MAX {
        return Err(format!("must be 1 to {USER_NAME_MAX} characters"));
    }
    if !s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        return Err("must start with a lowercase letter or `_`".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')))
    {
        return Err(format!("contains {c:?}: names use only a-z 0-9 _ -"));
    }
    Ok(())
}

/// A crypt(3) hash in the modular format `$id$[params$]salt$hash` (`$6$…` SHA-512,
/// `$y$…` yescrypt, `$2b$…` bcrypt, …). Anything else is refused: a plain password
/// would be written into the seed as it is, and old DES hashes are trivially cracked.
pub fn check_password_hash(s: &str) -> Result<(), String> {
    if !s.starts_with('$') {
        return Err(
            "is not a crypt(3) hash (`$id$salt$hash`); a plain-text password is never accepted"
                .into(),
        );
    }
    let fields: Vec<&str> = s.split('$').collect();
    let id = fields.get(1).copied().unwrap_or_default();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err("is not a crypt(3) hash: `$id$` must name the method (6, y, 2b, …)".into());
    }
    if fields.len() < 4 || fields.iter().skip(2).any(|f| f.is_empty()) {
        return Err("is not a complete crypt(3) hash (`$id$salt$hash`)".into());
    }
    if let Some(c) = s.chars().find(|c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '$' | '.' | '/' | '=' | ',' | '+' | '-'))
    }) {
        return Err(format!("contains {c:?}, which no crypt(3) hash has"));
    }
    Ok(())
}

/// One `authorized_keys` line without options: `type base64 [comment]`, the type a key
/// type OpenSSH knows and the base64 blob naming the same type.
pub fn check_ssh_key(s: &str) -> Result<(), String> {
    if s.contains(['\n', '\r']) {
        return Err("holds a line break: give one key per list item".into());
    }
    let mut parts = s.split_whitespace();
    let ty = parts.next().unwrap_or_default();
    let known = |t: &str| SSH_KEY_TYPES.contains(&t);
    let is_known = known(ty)
        || ty
            .strip_suffix("-cert-v01@openssh.com")
            .is_some_and(|base| known(base) || known(&format!("{base}@openssh.com")));
    if !is_known {
        return Err(format!(
            "does not start with an SSH key type (ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256, …): {:?}",
            cut(ty, 40)
        ));
    }
    let Some(blob) = parts.next() else {
        return Err("has a type but no key data (`type base64 [comment]`)".into());
    };
    let Some(bytes) = decode_base64(blob) else {
        return Err("has key data that is not valid base64 (a truncated copy?)".into());
    };
    if blob_type(&bytes) != Some(ty.as_bytes()) {
        return Err(format!(
            "has key data that is not a {ty} key (a truncated copy, or the wrong type?)"
        ));
    }
    Ok(())
}

/// A host name: labels of letters, digits and inner `-`, each 1 to 63 characters,
/// joined by `.`, at most 253 characters.
pub fn check_host_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > HOST_NAME_MAX {
        return Err(format!("must be 1 to {HOST_NAME_MAX} characters"));
    }
    for label in s.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated label must be 1 to 63 characters".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} must not start or end with `-`"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "contains {c:?}: host names use only a-z A-Z 0-9 - ."
            ));
        }
    }
    Ok(())
}

/// Network config v2 top-level keys (netplan).
const NETWORK_V2_KEYS: [&str; 7] = [
    "version",
    "renderer",
    "ethernets",
    "bonds",
    "bridges",
    "vlans",
    "wifis",
];

/// A cloud-init network config: a mapping with `version: 1` (a `config` list) or
/// `version: 2` (netplan: `ethernets`, `bonds`, `bridges`, `vlans`, `wifis`, each a
/// mapping). Errors come as (JSON pointer below the config, reason).
pub fn check_network_config(v: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(map) = v.as_object() else {
        out.push((
            String::new(),
            "must be a mapping with `version: 2` (netplan syntax) or `version: 1`".into(),
        ));
        return out;
    };
    match map.get("version").and_then(Value::as_u64) {
        Some(1) => {
            if !map.get("config").is_some_and(Value::is_array) {
                out.push((
                    "/version".into(),
                    "network config version 1 needs a `config` list".into(),
                ));
            }
        }
        Some(2) => {
            for (k, val) in map {
                if !NETWORK_V2_KEYS.contains(&k.as_str()) {
                    out.push((
                        format!("/{}", k.replace('~', "~0").replace('/', "~1")),
                        format!(
                            "unknown network config v2 key `{}` (expected one of {})",
                            cut(k, 40),
                            NETWORK_V2_KEYS[1..].join(", ")
                        ),
                    ));
                } else if k != "version" && k != "renderer" && !val.is_object() {
                    out.push((
                        format!("/{k}"),
                        format!("`{k}` must be a mapping of devices"),
                    ));
                }
            }
        }
        _ => out.push((
            "/version".into(),
            "network config needs `version: 2` (netplan syntax) or `version: 1`".into(),
        )),
    }
    out
}

/// User-data or vendor-data: when it starts with `#cloud-config`, it must be one YAML
/// document whose top level is a mapping (or empty). Other formats (`#!` scripts,
/// `#include`, MIME multi-part) are passed through unchecked.
pub fn check_cloud_config(text: &str) -> Result<(), String> {
    use saphyr_parser::{Event, Parser};
    let first = text.lines().next().unwrap_or_default();
    if first.trim_end() != "#cloud-config" {
        return Ok(());
    }
    let mut depth = 0usize;
    let mut docs = 0usize;
    let mut top_checked = false;
    for ev in Parser::new_from_str(text) {
        let (ev, span) = ev.map_err(|e| {
            format!(
                "is not valid YAML: line {}: {}",
                e.marker().line(),
                e.info()
            )
        })?;
        let line = span.start.line();
        match ev {
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    return Err(format!(
                        "holds a second YAML document at line {line}; #cloud-config is one mapping"
                    ));
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                if !top_checked && matches!(ev, Event::SequenceStart(..)) {
                    return Err(format!(
                        "is a YAML list (line {line}); #cloud-config must be a mapping of modules"
                    ));
                }
                top_checked = true;
                depth += 1;
                if depth > CLOUD_CONFIG_MAX_DEPTH {
                    return Err(format!(
                        "nests deeper than {CLOUD_CONFIG_MAX_DEPTH} levels at line {line}"
                    ));
                }
            }
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            Event::Scalar(ref v, ..) if !top_checked => {
                top_checked = true;
                if !v.is_empty() && v != "~" && v != "null" {
                    return Err(format!(
                        "is a YAML scalar (line {line}); #cloud-config must be a mapping of modules"
                    ));
                }
            }
            Event::StreamEnd => break,
            _ => {}
        }
    }
    Ok(())
}

/// The first `max` characters of `s`, for messages.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The key type an SSH public key blob names in its first field (`uint32 len, type`).
fn blob_type(blob: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    blob.get(4..4usize.checked_add(len)?)
}

/// Standard base64 with padding; `None` on any other character or a bad length.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.is_empty() || !b.len().is_multiple_of(4) {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    let quads = b.len() / 4;
    for (qi, q) in b.chunks(4).enumerate() {
        let pad = q.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && qi + 1 != quads) {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPigcUEKHRZOtbOlOIhStPbDat1nOYfki95ife3CbA05 ops@laptop";

    #[test]
    fn user_names() {
        for ok in ["ops", "_svc", "a-b_1", &"a".repeat(32)] {
            assert_eq!(check_user_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Ops", "1ops", "-x", "o ps", "ops$", &"a".repeat(33)] {
            assert!(check_user_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_hashes() {
        for ok in [
            "$6$rounds=5000$saltsalt$Qm9vL2hhc2g.abc/XYZ",
            "$6$abcdefgh$h4sh",
            "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7",
            "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy",
        ] {
            assert_eq!(check_password_hash(ok), Ok(()), "{ok}");
        }
        assert!(
            check_password_hash("hunter2")
                .unwrap_err()
                .contains("plain-text password")
        );
        for bad in [
            "$",
            "$$salt$hash",
            "$6$salt",
            "$6$$hash",
            "$6$salt$",
            "$6$sa lt$hash",
            "$6$salt$ha:sh",
        ] {
            assert!(check_password_hash(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssh_keys() {
        assert_eq!(check_ssh_key(ED25519), Ok(()));
        assert_eq!(
            check_ssh_key(ED25519.trim_end_matches(" ops@laptop")),
            Ok(())
        );
        assert!(
            check_ssh_key("no-pty ssh-ed25519 AAAA")
                .unwrap_err()
                .contains("SSH key type")
        );
        assert!(
            check_ssh_key("ssh-ed25519")
                .unwrap_err()
                .contains("no key data")
        );
        assert!(
            check_ssh_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqq")
                .unwrap_err()
                .contains("base64")
        );
        // Valid base64 of an ed25519 key, labelled as RSA.
        let relabelled = ED25519.replacen("ssh-ed25519", "ssh-rsa", 1);
        assert!(
            check_ssh_key(&relabelled)
                .unwrap_err()
                .contains("not a ssh-rsa key")
        );
        assert!(check_ssh_key(&format!("{ED25519}\nssh-rsa AAAA")).is_err());
    }

    #[test]
    fn base64_decoding() {
        assert_eq!(decode_base64("aGk="), Some(b"hi".to_vec()));
        assert_eq!(decode_base64("aGVsbG8h"), Some(b"hello!".to_vec()));
        assert_eq!(decode_base64("aA=="), Some(b"h".to_vec()));
        assert_eq!(decode_base64("aGk"), None);
        assert_eq!(decode_base64("aG=k"), None);
        assert_eq!(decode_base64("aA==aGk="), None);
        assert_eq!(decode_base64("a==="), None);
    }

    #[test]
    fn host_names() {
        for ok in ["vm1", "web-1.example.org", "A1"] {
            assert_eq!(check_host_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-vm",
            "vm-",
            "a..b",
            "under_score",
            "sp ace",
            &"a".repeat(64),
        ] {
            assert!(check_host_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn network_configs() {
        let v2 = serde_json::json!({"version": 2, "ethernets": {"eth0": {"dhcp4": true}}});
        assert!(check_network_config(&v2).is_empty());
        let v1 =
            serde_json::json!({"version": 1, "config": [{"type": "physical", "name": "eth0"}]});
        assert!(check_network_config(&v1).is_empty());
        let cases = [
            (serde_json::json!("dhcp"), ""),
            (serde_json::json!({"ethernets": {}}), "/version"),
            (serde_json::json!({"version": 3}), "/version"),
            (serde_json::json!({"version": 1}), "/version"),
            (
                serde_json::json!({"version": 2, "ethernet": {}}),
                "/ethernet",
            ),
            (
                serde_json::json!({"version": 2, "ethernets": [1]}),
                "/ethernets",
            ),
        ];
        for (v, ptr) in cases {
            let errs = check_network_config(&v);
            assert_eq!(errs.len(), 1, "{v}: {errs:?}");
            assert_eq!(errs[0].0, ptr, "{v}");
        }
    }

    #[test]
    fn cloud_configs() {
        for ok in [
            "#cloud-config\nwrite_files: [{path: /etc/motd, content: hi}]\n",
            "#cloud-config\n",
            "#cloud-config\n---\npackages: [htop]\n",
            "#!/bin/sh\necho [not yaml\n",
            "#include\nhttp://x/y\n",
        ] {
            assert_eq!(check_cloud_config(ok), Ok(()), "{ok}");
        }
        let err = |t: &str| check_cloud_config(t).unwrap_err();
        assert!(err("#cloud-config\npackages: [htop\n").contains("not valid YAML: line"));
        assert!(err("#cloud-config\n- a\n").contains("is a YAML list (line 2)"));
        assert!(err("#cloud-config\nhello\n").contains("YAML scalar"));
        assert!(err("#cloud-config\na: 1\n---\nb: 2\n").contains("second YAML document at line 3"));
        let deep = format!("#cloud-config\na: {}{}\n", "[".repeat(70), "]".repeat(70));
        assert!(err(&deep).contains("deeper than 64"));
    }
}

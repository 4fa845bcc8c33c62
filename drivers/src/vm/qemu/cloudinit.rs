//! The cloud-init NoCloud seed, generated from `spec.cloudInit` (both engines).
//!
//! [`seed_files`] is pure: it turns the manifest into the four NoCloud files.
//! - `meta-data`: `instance-id` and `local-hostname`;
//! - `user-data`: stead's own `#cloud-config` built from the typed fields (hostname, users
//!   with SSH keys, password hash, sudo, groups, shell). With `userData` the file is a MIME
//!   multipart (`multipart/mixed`): stead's part first, the user's part second. The user's
//!   part keeps its own type (`#cloud-config`, `#!` script, `#cloud-boothook`, …) and a
//!   cloud-config part carries a `Merge-Type` header ([`MERGE_TYPE`]): lists append, maps
//!   merge recursively, and a key set on both sides keeps stead's typed value;
//! - `network-config`: `spec.cloudInit.network` passed through (version 2), or absent;
//! - `vendor-data`: passed through, or absent.
//!
//! The `instance-id` is `stead-<vm>-<12 hex>`, the hex taken from a SHA-256 of everything
//! else in the seed: any change gives a new instance-id, so cloud-init runs again on the
//! next boot (the engines plan such a change as `restart`).
//!
//! Users: without a user named `default` in the manifest, the image's default user is not
//! created (`users` lists only the manifest's users, or is empty). A user named `default`
//! keeps it; its SSH keys, if any, go to the top-level `ssh_authorized_keys` (which
//! cloud-init gives the default user).
//!
//! YAML is emitted in block style with every string double-quoted (JSON-style escapes,
//! which YAML 1.1 and 1.2 read alike), so host names, hashes (`$6$…`), keys and values
//! with `:`, `#` or `yes`/`no` come back as the same strings.
//!
//! [`write_seed_iso`] writes the files to an ISO 9660 image labelled `cidata`
//! (`genisoimage -volid cidata -joliet -rock`), atomically.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use stead_reconciler::driver::DriverError;
use stead_schema::{CloudInitSpec, CloudInitUser};

/// Volume id cloud-init's NoCloud datasource looks for.
pub const SEED_VOLUME_ID: &str = "cidata";

/// Merge rule of the manifest's raw cloud-config part (cloud-init "merging user-data
/// sections"): lists append, maps merge recursively, an existing value is not replaced.
pub const MERGE_TYPE: &str = "list(append)+dict(no_replace,recurse_list)+str()";

/// The `sudo` rule of a user with `sudo: true`.
const SUDO_ALL: &str = "ALL=(ALL) NOPASSWD:ALL";

/// The user name that keeps the image's default user.
const DEFAULT_USER: &str = "default";

/// The NoCloud seed files of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    /// `stead-<vm>-<12 hex>`: changes whenever anything else in the seed changes.
    pub instance_id: String,
    /// `meta-data`.
    pub meta_data: String,
    /// `user-data`: `#cloud-config`, or a MIME multipart with the manifest's `userData`.
    pub user_data: String,
    /// `network-config` (absent without `network`).
    pub network_config: Option<String>,
    /// `vendor-data` (absent without `vendorData`).
    pub vendor_data: Option<String>,
}

impl SeedFiles {
    /// The files by their NoCloud names, absent ones left out.
    pub fn files(&self) -> Vec<(&'static str, &str)> {
        let mut v = vec![
            ("meta-data", self.meta_data.as_str()),
            ("user-data", self.user_data.as_str()),
        ];
        if let Some(n) = &self.network_config {
            v.push(("network-config", n.as_str()));
        }
        if let Some(d) = &self.vendor_data {
            v.push(("vendor-data", d.as_str()));
        }
        v
    }
}

/// The seed files of VM `vm_name` from its `spec.cloudInit` (see the module docs).
pub fn seed_files(vm_name: &str, spec: &CloudInitSpec) -> SeedFiles {
    let hostname = spec.hostname.as_deref().unwrap_or(vm_name);
    let cloud_config = format!(
        "#cloud-config\n{}",
        to_yaml(&stead_cloud_config(hostname, &spec.users))
    );
    let network_config = spec.network.as_ref().map(to_yaml);
    let instance_id = instance_id(
        vm_name,
        &[
            Some(hostname),
            Some(&cloud_config),
            spec.user_data.as_deref(),
            network_config.as_deref(),
            spec.vendor_data.as_deref(),
        ],
    );
    let user_data = match &spec.user_data {
        None => cloud_config,
        Some(user) => multipart(&cloud_config, user, &instance_id),
    };
    let meta_data = to_yaml(&json!({
        "instance-id": instance_id,
        "local-hostname": hostname,
    }));
    SeedFiles {
        instance_id,
        meta_data,
        user_data,
        network_config,
        vendor_data: spec.vendor_data.clone(),
    }
}

/// `stead-<vm>-<12 hex>` over `parts` (each length-prefixed, absent distinct from empty).
fn instance_id(vm_name: &str, parts: &[Option<&str>]) -> String {
    let mut h = Sha256::new();
    h.update(vm_name.len().to_le_bytes());
    h.update(vm_name.as_bytes());
    for p in parts {
        match p {
            None => h.update([0u8]),
            Some(s) => {
                h.update([1u8]);
                h.update(s.len().to_le_bytes());
                h.update(s.as_bytes());
            }
        }
    }
    let digest = hex::encode(h.finalize());
    format!("stead-{vm_name}-{}", &digest[..12])
}

/// stead's cloud-config from the typed fields.
fn stead_cloud_config(hostname: &str, users: &[CloudInitUser]) -> Value {
    let mut cfg = Map::new();
    cfg.insert("hostname".into(), json!(hostname));
    let default_keys: Vec<&String> = users
        .iter()
        .filter(|u| u.name == DEFAULT_USER)
        .flat_map(|u| &u.ssh_authorized_keys)
        .collect();
    if !default_keys.is_empty() {
        cfg.insert("ssh_authorized_keys".into(), json!(default_keys));
    }
    let users: Vec<Value> = users.iter().map(user_entry).collect();
    cfg.insert("users".into(), Value::Array(users));
    Value::Object(cfg)
}

/// One `users` entry: the string `default`, or a user map.
fn user_entry(u: &CloudInitUser) -> Value {
    if u.name == DEFAULT_USER {
        return json!(DEFAULT_USER);
    }
    let mut m = Map::new();
    m.insert("name".into(), json!(u.name));
    if !u.groups.is_empty() {
        m.insert("groups".into(), json!(u.groups));
    }
    if let Some(shell) = &u.shell {
        m.insert("shell".into(), json!(shell));
    }
    if u.sudo {
        m.insert("sudo".into(), json!(SUDO_ALL));
    }
    if let Some(hash) = &u.password_hash {
        m.insert("lock_passwd".into(), json!(false));
        m.insert("passwd".into(), json!(hash));
    }
    if !u.ssh_authorized_keys.is_empty() {
        m.insert("ssh_authorized_keys".into(), json!(u.ssh_authorized_keys));
    }
    Value::Object(m)
}

/// The MIME multipart user-data: stead's cloud-config, then the user's part.
fn multipart(stead_part: &str, user: &str, instance_id: &str) -> String {
    let boundary = boundary_for(&[stead_part, user], instance_id);
    let mut out = String::new();
    let _ = write!(
        out,
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n"
    );
    let _ = writeln!(out, "--{boundary}");
    push_part(&mut out, "text/cloud-config", "stead.cfg", None, stead_part);
    let _ = writeln!(out, "--{boundary}");
    match part_type(user) {
        Some(ctype) => {
            let merge = (ctype == "text/cloud-config").then_some(MERGE_TYPE);
            push_part(&mut out, ctype, "user-data", merge, user);
        }
        // Already a MIME entity (its own headers): embedded as it is.
        None => push_body(&mut out, user),
    }
    let _ = writeln!(out, "--{boundary}--");
    out
}

/// A boundary that occurs in none of `parts`.
fn boundary_for(parts: &[&str], instance_id: &str) -> String {
    let base = format!("==stead-{instance_id}==");
    let mut boundary = base.clone();
    let mut n = 0u32;
    while parts.iter().any(|p| p.contains(&boundary)) {
        n += 1;
        boundary = format!("{base}{n}");
    }
    boundary
}

/// Appends one part: headers, blank line, body (base64 unless ASCII).
fn push_part(out: &mut String, ctype: &str, filename: &str, merge: Option<&str>, body: &str) {
    let _ = writeln!(out, "Content-Type: {ctype}; charset=\"utf-8\"");
    let _ = writeln!(
        out,
        "Content-Disposition: attachment; filename=\"{filename}\""
    );
    if let Some(m) = merge {
        let _ = writeln!(out, "Merge-Type: {m}");
    }
    if body.is_ascii() {
        out.push_str("Content-Transfer-Encoding: 7bit\n\n");
        push_body(out, body);
    } else {
        // An 8-bit body does not survive Python's email parser intact.
        out.push_str("Content-Transfer-Encoding: base64\n\n");
        push_body(out, &base64_lines(body.as_bytes()));
    }
}

/// Appends `body` ending in a newline (which the next boundary line consumes).
fn push_body(out: &mut String, body: &str) {
    out.push_str(body);
    if !body.ends_with('\n') {
        out.push('\n');
    }
}

/// The MIME type of a user-data part from its first line (cloud-init's own detection);
/// `None` for a MIME entity with its own headers.
fn part_type(data: &str) -> Option<&'static str> {
    const STARTS: [(&str, &str); 10] = [
        ("#cloud-config-archive", "text/cloud-config-archive"),
        ("#cloud-config-jsonp", "text/cloud-config-jsonp"),
        ("#cloud-config", "text/cloud-config"),
        ("#cloud-boothook", "text/cloud-boothook"),
        ("#include-once", "text/x-include-once-url"),
        ("#include", "text/x-include-url"),
        ("#part-handler", "text/part-handler"),
        ("## template: jinja", "text/jinja2"),
        ("#upstart-job", "text/upstart-job"),
        ("#!", "text/x-shellscript"),
    ];
    let head = data.get(..13).unwrap_or(data);
    if head.eq_ignore_ascii_case("content-type:") {
        return None;
    }
    Some(
        STARTS
            .iter()
            .find(|(p, _)| data.starts_with(p))
            .map_or("text/plain", |(_, t)| t),
    )
}

/// Base64 (RFC 4648, padded) in lines of 76 characters.
fn base64_lines(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut flat = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                flat.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                flat.push('=');
            }
        }
    }
    let mut out = String::with_capacity(flat.len() + flat.len() / 76 + 1);
    for line in flat.as_bytes().chunks(76) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out
}

// ------------------------------------------------------------------ YAML emitter

/// `v` as a YAML document in block style (strings double-quoted).
fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => write_map(m, 0, false, &mut out),
        Value::Array(a) if !a.is_empty() => write_seq(a, 0, &mut out),
        _ => {
            out.push_str(&scalar(v));
            out.push('\n');
        }
    }
    out
}

/// Map entries at `indent`; with `inline_first` the first key follows a `- ` already
/// written.
fn write_map(m: &Map<String, Value>, indent: usize, inline_first: bool, out: &mut String) {
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 || !inline_first {
            push_indent(out, indent);
        }
        out.push_str(&key(k));
        out.push(':');
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                write_map(inner, indent + 2, false, out);
            }
            Value::Array(a) if !a.is_empty() => {
                out.push('\n');
                write_seq(a, indent + 2, out);
            }
            _ => {
                out.push(' ');
                out.push_str(&scalar(v));
                out.push('\n');
            }
        }
    }
}

/// Sequence items at `indent`.
fn write_seq(a: &[Value], indent: usize, out: &mut String) {
    for item in a {
        push_indent(out, indent);
        out.push('-');
        match item {
            Value::Object(m) if !m.is_empty() => {
                out.push(' ');
                write_map(m, indent + 2, true, out);
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                write_seq(inner, indent + 2, out);
            }
            _ => {
                out.push(' ');
                out.push_str(&scalar(item));
                out.push('\n');
            }
        }
    }
}

fn push_indent(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// A scalar, or an empty collection in flow style.
fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => quote(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A map key: plain when it can only read back as this string, else double-quoted.
fn key(k: &str) -> String {
    // YAML 1.1 (cloud-init's PyYAML) reads these plain words as booleans or null.
    const WORDS: [&str; 12] = [
        "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", "", "=",
    ];
    let plain = k
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !WORDS.iter().any(|w| w.eq_ignore_ascii_case(k));
    if plain { k.to_string() } else { quote(k) }
}

/// A double-quoted YAML string: `"` and `\` escaped, and every character YAML does not
/// allow raw (controls, C1, line/paragraph separators, BOM, non-characters) as `\uXXXX`.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn needs_escape(c: char) -> bool {
    let u = u32::from(c);
    u < 0x20
        || (0x7f..=0x9f).contains(&u)
        || matches!(u, 0x2028 | 0x2029 | 0xfeff | 0xfffe | 0xffff)
}

// ------------------------------------------------------------------ ISO

/// Writes `seed` to `out` as an ISO 9660 image labelled `cidata` (Joliet and Rock Ridge
/// names), atomically: built in a temp dir beside `out`, then renamed over it. Mode 0600
/// (the seed may hold password hashes; the VMM opens its disks before it drops
/// privileges).
pub fn write_seed_iso(seed: &SeedFiles, out: &Path) -> Result<(), DriverError> {
    write_seed_iso_with("genisoimage", seed, out)
}

fn write_seed_iso_with(program: &str, seed: &SeedFiles, out: &Path) -> Result<(), DriverError> {
    let _span = tracing::debug_span!("seed_iso", instance_id = %seed.instance_id).entered();
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".seed-")
        .tempdir_in(dir)
        .map_err(|e| DriverError::io(format!("create a temp dir in {}", dir.display()), e))?;
    let files = tmp.path().join("files");
    std::fs::create_dir(&files)
        .map_err(|e| DriverError::io(format!("create {}", files.display()), e))?;
    for (name, content) in seed.files() {
        let p = files.join(name);
        std::fs::write(&p, content)
            .map_err(|e| DriverError::io(format!("write {}", p.display()), e))?;
    }
    let iso = tmp.path().join("seed.iso");
    run_genisoimage(program, &iso, &files)?;
    std::fs::set_permissions(&iso, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| DriverError::io(format!("chmod {}", iso.display()), e))?;
    std::fs::rename(&iso, out).map_err(|e| {
        DriverError::io(format!("rename {} to {}", iso.display(), out.display()), e)
    })?;
    tracing::debug!(path = %out.display(), "seed ISO written");
    Ok(())
}

/// `genisoimage -output ISO -volid cidata -joliet -rock DIR`.
fn run_genisoimage(program: &str, iso: &Path, files: &Path) -> Result<(), DriverError> {
    let mut cmd = std::process::Command::new(program);
    cmd.arg("-output")
        .arg(iso)
        .args(["-volid", SEED_VOLUME_ID, "-joliet", "-rock", "-quiet", "--"])
        .arg(files);
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DriverError::Unsupported(format!(
                "{program} not found: install genisoimage (it builds the cloud-init seed)"
            ))
        } else {
            DriverError::io(format!("run {program}"), e)
        }
    })?;
    if !out.status.success() {
        return Err(DriverError::Command {
            command: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;

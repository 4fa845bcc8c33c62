//! Naming rules: Proxmox names (VM names, host names, storage ids, bridges, volume
//! files) made into stead names, and the sets of names already taken.

use std::collections::BTreeSet;

/// Longest stead name.
const MAX_NAME: usize = 63;

/// Lower-cases `s`, turns every character outside `[a-z0-9-]` into `-` and trims
/// leading and trailing `-` (`DB-Primary` → `db-primary`, `mail.corp.example` →
/// `mail-corp-example`). A result longer than 63 characters is cut (and trimmed again).
/// May be empty.
pub fn sanitize(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let cut: String = trimmed.chars().take(MAX_NAME).collect();
    cut.trim_end_matches('-').to_string()
}

/// The file name of a Proxmox volume without its directory and extension:
/// `vm-100-disk-0` → `vm-100-disk-0`, `104/vm-104-disk-1.raw` → `vm-104-disk-1`,
/// `iso/debian-12.iso` → `debian-12`.
pub fn volume_stem(volume: &str) -> &str {
    let file = volume.rsplit('/').next().unwrap_or(volume);
    match file.rsplit_once('.') {
        Some((stem, ext))
            if !stem.is_empty()
                && !ext.is_empty()
                && ext.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            stem
        }
        _ => file,
    }
}

/// Names already used within one kind.
#[derive(Debug, Clone, Default)]
pub struct Taken(BTreeSet<String>);

impl Taken {
    /// Claims the sanitized `preferred` name, or `fallback` when that is empty or taken
    /// (then `fallback-2`, `fallback-3`, … if even the fallback is taken).
    pub fn claim(&mut self, preferred: Option<&str>, fallback: &str) -> String {
        let wanted = preferred.map(sanitize).unwrap_or_default();
        if !wanted.is_empty() && self.0.insert(wanted.clone()) {
            return wanted;
        }
        let base = sanitize(fallback);
        if self.0.insert(base.clone()) {
            return base;
        }
        (2..)
            .map(|i| format!("{base}-{i}"))
            .find(|n| self.0.insert(n.clone()))
            .unwrap_or(base)
    }

    /// Whether `name` is taken.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_rules() {
        assert_eq!(sanitize("DB-Primary"), "db-primary");
        assert_eq!(sanitize("mail.corp.example"), "mail-corp-example");
        assert_eq!(sanitize("--a_b--"), "a-b");
        assert_eq!(sanitize("..."), "");
        assert_eq!(sanitize("Ünïcode"), "n-code");
        let long = "a".repeat(62) + "-b";
        assert_eq!(sanitize(&long), "a".repeat(62));
        assert!(stead_schema::check_name(&sanitize("x.Y_z-1")).is_ok());
    }

    #[test]
    fn volume_stems() {
        assert_eq!(volume_stem("vm-100-disk-0"), "vm-100-disk-0");
        assert_eq!(volume_stem("104/vm-104-disk-1.raw"), "vm-104-disk-1");
        assert_eq!(volume_stem("iso/debian-12.iso"), "debian-12");
        assert_eq!(
            volume_stem("iso/debian-12.0.1-amd64.iso"),
            "debian-12.0.1-amd64"
        );
        assert_eq!(volume_stem("subvol-200-disk-0"), "subvol-200-disk-0");
    }

    #[test]
    fn taken_falls_back() {
        let mut t = Taken::default();
        assert_eq!(t.claim(Some("Web"), "vm-100"), "web");
        assert_eq!(t.claim(Some("WEB"), "vm-101"), "vm-101");
        assert_eq!(t.claim(Some("..."), "vm-102"), "vm-102");
        assert_eq!(t.claim(None, "vm-103"), "vm-103");
        assert_eq!(t.claim(Some("vm-104"), "vm-105"), "vm-104");
        assert_eq!(t.claim(None, "vm-104"), "vm-104-2");
        assert!(t.contains("web"));
    }
}

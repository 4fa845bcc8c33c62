//! Naming rules of the external tools that storage pools hand names to (`lvcreate`,
//! `zfs`, `mount -t nfs`). A name these tools would refuse, or read as an option
//! (a leading `-`), is refused at `stead validate` instead.
//!
//! Each check returns `Err(reason)`; the caller adds the location.

use std::net::IpAddr;

/// Longest LVM volume group or logical volume name (lvm(8): 127 characters).
const LVM_NAME_MAX: usize = 127;
/// Longest ZFS dataset name (`ZFS_MAX_DATASET_NAME_LEN` is 256 including the NUL).
const ZFS_NAME_MAX: usize = 255;

/// LVM's rule for volume group and logical volume names (lvm(8), "VALID NAMES"):
/// characters `A-Z a-z 0-9 + _ . -`, not starting with `-`, not `.` or `..`, and (for
/// LVs) no prefix `snapshot`/`pvmove` and none of LVM's internal suffixes.
pub fn check_lvm_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > LVM_NAME_MAX {
        return Err(format!("must be 1 to {LVM_NAME_MAX} characters"));
    }
    if s.starts_with('-') {
        return Err("must not start with '-' (LVM would read it as an option)".into());
    }
    if s == "." || s == ".." {
        return Err("`.` and `..` are not valid LVM names".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-')))
    {
        return Err(format!(
            "contains {c:?}: LVM names use only A-Z a-z 0-9 + _ . -"
        ));
    }
    if let Some(p) = ["snapshot", "pvmove"].iter().find(|p| s.starts_with(**p)) {
        return Err(format!("the prefix `{p}` is reserved by LVM"));
    }
    const RESERVED: [&str; 12] = [
        "_cdata", "_cmeta", "_corig", "_mlog", "_mimage", "_pmspare", "_rimage", "_rmeta",
        "_tdata", "_tmeta", "_vorigin", "_vdata",
    ];
    if let Some(r) = RESERVED.iter().find(|r| s.contains(**r)) {
        return Err(format!("`{r}` is reserved by LVM for internal volumes"));
    }
    Ok(())
}

/// ZFS's rule for a dataset name: `pool/child/…`, each component of
/// `A-Z a-z 0-9 _ . : -`, the pool name starting with a letter and not one of the
/// vdev words zpool reserves.
pub fn check_zfs_dataset(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > ZFS_NAME_MAX {
        return Err(format!("must be 1 to {ZFS_NAME_MAX} characters"));
    }
    let mut parts = s.split('/');
    let pool = parts.next().unwrap_or_default();
    if !pool.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(format!("pool name {pool:?} must start with a letter"));
    }
    let reserved = ["mirror", "raidz", "draid", "spare", "log"];
    if reserved.iter().any(|r| pool.starts_with(r)) {
        return Err(format!(
            "pool name {pool:?} starts with a word zpool reserves"
        ));
    }
    for comp in s.split('/') {
        if comp.is_empty() {
            return Err("has an empty component (`//` or a trailing `/`)".into());
        }
        if comp == "." || comp == ".." {
            return Err("`.` and `..` are not valid dataset components".into());
        }
        if let Some(c) = comp
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
        {
            return Err(format!(
                "contains {c:?}: dataset names use only A-Z a-z 0-9 _ . : - and `/` between components"
            ));
        }
    }
    Ok(())
}

/// An NFS server: a DNS host name, an IP address, or an IPv6 address in brackets.
pub fn check_nfs_server(s: &str) -> Result<(), String> {
    let unbracketed = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if unbracketed.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if s.is_empty() || s.len() > 253 || !s.split('.').all(label_ok) {
        return Err(
            "must be a host name (letters, digits, '-' between dots) or an IP address".into(),
        );
    }
    Ok(())
}

/// An NFS export: an absolute path without `..`, whitespace or control characters.
pub fn check_nfs_export(s: &str) -> Result<(), String> {
    if !s.starts_with('/') {
        return Err("must be an absolute path".into());
    }
    if s.split('/').any(|c| c == "..") {
        return Err("must not contain `..`".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters".into());
    }
    Ok(())
}

/// NFS mount options: a comma list of `key` or `key=value`, no spaces, no empty item,
/// no key starting with `-`.
pub fn check_nfs_options(s: &str) -> Result<(), String> {
    for item in s.split(',') {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        if key.is_empty() {
            return Err("has an empty option (a stray `,` or `=`)".into());
        }
        if key.starts_with('-') {
            return Err(format!("option {key:?} must not start with '-'"));
        }
        if !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(format!(
                "option name {key:?} may hold only letters, digits, '_', '.' and '-'"
            ));
        }
        if value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '=')
        {
            return Err(format!(
                "the value of {key:?} must not contain whitespace, control characters or '='"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvm_names() {
        for ok in ["pve", "vg0", "data", "thin_pool-1", "a+b.c"] {
            assert_eq!(check_lvm_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-ay",
            "--help",
            ".",
            "..",
            "vg 0",
            "vg/0",
            "snapshot1",
            "pvmove0",
            "x_tmeta",
            "ä",
            &"a".repeat(128),
        ] {
            assert!(check_lvm_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zfs_datasets() {
        for ok in ["rpool", "rpool/data", "tank/stead.pools:a-1/x_y"] {
            assert_eq!(check_zfs_dataset(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-o",
            "1pool/data",
            "rpool/",
            "rpool//data",
            "/rpool",
            "rpool/../x",
            "rpool/a b",
            "rpool/a@snap",
            "mirror/data",
            "rpool/-x ",
        ] {
            assert!(check_zfs_dataset(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nfs_fields() {
        for ok in [
            "nas",
            "nas.example.com",
            "192.0.2.7",
            "fd00::7",
            "[fd00::7]",
        ] {
            assert_eq!(check_nfs_server(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-o", "nas..x", "nas-", "a b", "host:/x", "[nas]"] {
            assert!(check_nfs_server(bad).is_err(), "{bad}");
        }
        assert_eq!(check_nfs_export("/srv/nfs/pool"), Ok(()));
        for bad in ["srv", "-o", "/srv/../etc", "/srv/a b", "/srv/\n"] {
            assert!(check_nfs_export(bad).is_err(), "{bad}");
        }
        for ok in [
            "vers=4.2",
            "vers=4.2,hard,timeo=600",
            "rw",
            "sec=krb5p",
            "x-systemd.automount",
        ] {
            assert_eq!(check_nfs_options(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-o",
            "vers=4.2,-x",
            "vers=4.2, hard",
            "a,,b",
            "=x",
            "a=b=c",
            "a\tb",
        ] {
            assert!(check_nfs_options(bad).is_err(), "{bad}");
        }
    }
}

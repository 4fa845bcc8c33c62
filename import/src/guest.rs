//! What VMs and containers share: volume references (`STORAGE:VOLUME`), sizes, the
//! registry of Volumes the guests use, and the `onboot` rule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use stead_schema::{
    ByteSize, DeletionPolicy, DurationSpec, Kind, MAX_STOP_TIMEOUT, Name, PoolType, RunState,
    VolumeClone, VolumeFormat, VolumeSpec,
};

use crate::model::Manifest;
use crate::names::{Taken, sanitize, volume_stem};
use crate::reader::Entry;
use crate::report::Report;
use crate::storage::Pool;

/// Where a disk's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A volume on a Proxmox storage.
    Volume(VolRef),
    /// A host path (`/dev/disk/by-id/…`).
    HostPath(String),
    /// `none` (an empty cdrom drive).
    None,
    /// `cdrom`: the host's physical drive.
    Physical,
}

/// `STORAGE:VOLUME`, with the base of a linked clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolRef {
    /// Storage id.
    pub storage: String,
    /// Volume as written (`104/vm-104-disk-1.raw`).
    pub volume: String,
    /// File name without directory and extension.
    pub stem: String,
    /// Extension of the file, if any (`qcow2`).
    pub ext: Option<String>,
    /// A linked clone's base volume stem (`base-9000-disk-0`).
    pub base: Option<String>,
}

impl VolRef {
    /// The registry key.
    pub fn key(&self) -> (String, String) {
        (self.storage.clone(), self.stem.clone())
    }

    /// The registry key of the base volume.
    pub fn base_key(&self) -> Option<(String, String)> {
        self.base
            .as_ref()
            .map(|b| (self.storage.clone(), b.clone()))
    }
}

/// Parses the first element of a disk value: `STORAGE:VOLUME`, a host path, `none` or
/// `cdrom`.
pub fn parse_source(first: Option<&str>) -> Result<DiskSource, String> {
    let s = first.unwrap_or("").trim();
    if s.is_empty() {
        return Err("empty disk spec: expected STORAGE:VOLUME".into());
    }
    match s {
        "none" => return Ok(DiskSource::None),
        "cdrom" => return Ok(DiskSource::Physical),
        _ => {}
    }
    if s.starts_with('/') {
        return Ok(DiskSource::HostPath(s.to_string()));
    }
    let Some((storage, volume)) = s.split_once(':') else {
        return Err(format!("`{s}` is not STORAGE:VOLUME"));
    };
    if storage.is_empty() || volume.is_empty() || volume.ends_with('/') {
        return Err(format!("`{s}` is not STORAGE:VOLUME"));
    }
    let parts: Vec<&str> = volume.split('/').collect();
    let base = parts[..parts.len() - 1]
        .iter()
        .find(|p| p.starts_with("base-"))
        .map(|p| volume_stem(p).to_string());
    let file = parts[parts.len() - 1];
    let stem = volume_stem(file).to_string();
    let ext = (stem.len() < file.len()).then(|| file[stem.len() + 1..].to_string());
    Ok(DiskSource::Volume(VolRef {
        storage: storage.to_string(),
        volume: volume.to_string(),
        stem,
        ext,
        base,
    }))
}

/// A Proxmox size: a number with an optional binary `K`/`M`/`G`/`T` suffix (a bare
/// number is bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        Some((i, 'T' | 't')) => (&s[..i], 40),
        _ => (s, 0),
    };
    let bad = || format!("size `{s}` is not a number with an optional K/M/G/T suffix");
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Names every volume the guests use: its file stem, or `STORAGE-STEM` when two
/// storages hold the same stem.
pub fn name_volumes(keys: &BTreeSet<(String, String)>) -> BTreeMap<(String, String), String> {
    let mut storages_per_stem: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, stem) in keys {
        *storages_per_stem.entry(stem).or_default() += 1;
    }
    let mut taken = Taken::default();
    let mut out = BTreeMap::new();
    for (storage, stem) in keys {
        let qualified = format!("{storage}-{stem}");
        let preferred = if storages_per_stem[stem.as_str()] > 1 {
            &qualified
        } else {
            stem
        };
        let name = taken.claim(Some(preferred), &format!("volume-{}", sanitize(&qualified)));
        out.insert((storage.clone(), stem.clone()), name);
    }
    out
}

/// A Volume a guest uses, before it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeUse {
    /// Pool name.
    pub pool: String,
    /// Size in bytes.
    pub size: u64,
    /// Image format.
    pub format: VolumeFormat,
    /// From a template VM.
    pub template: bool,
    /// Linked clone of this base (registry key).
    pub clone_of: Option<(String, String)>,
    /// Output file.
    pub file: String,
    /// Where it was declared (for reports).
    pub origin: (PathBuf, usize, String),
}

/// The volumes every guest uses, by `(storage, stem)`.
#[derive(Debug, Default)]
pub struct Volumes {
    /// Names by key.
    pub names: BTreeMap<(String, String), String>,
    uses: BTreeMap<(String, String), VolumeUse>,
}

impl Volumes {
    /// The volume name of `r`.
    pub fn name(&self, key: &(String, String)) -> String {
        self.names
            .get(key)
            .cloned()
            .unwrap_or_else(|| sanitize(&key.1))
    }

    /// Records a use; a second use of the same volume keeps the larger size.
    pub fn declare(&mut self, key: (String, String), u: VolumeUse) {
        match self.uses.get_mut(&key) {
            Some(old) => {
                old.size = old.size.max(u.size);
                old.template |= u.template;
            }
            None => {
                self.uses.insert(key, u);
            }
        }
    }

    /// The Volume manifests. A linked clone whose base is not imported loses its
    /// `clone` (reported); one on a pool where stead makes no linked clones (lvmthin,
    /// zfs) is written `linked: false` (reported).
    pub fn manifests(&self, pools: &BTreeMap<String, Pool>, report: &mut Report) -> Vec<Manifest> {
        let mut out = Vec::new();
        for (key, u) in &self.uses {
            let clone = match &u.clone_of {
                Some(base) if self.uses.contains_key(base) => {
                    let linked = pools.get(&key.0).is_none_or(|p| {
                        matches!(p.pool_type, PoolType::Dir | PoolType::Nfs | PoolType::Btrfs)
                    });
                    if !linked {
                        report.note(&u.origin.0, u.origin.1, &u.origin.2, "a linked clone on an lvmthin or zfs pool: stead makes linked clones only on dir, nfs and btrfs pools, so it is written `linked: false` (the existing volume is adopted as it is; only a re-creation would copy)");
                    }
                    Some(VolumeClone {
                        from: Name(self.name(base)),
                        linked,
                    })
                }
                Some(base) => {
                    report.note(&u.origin.0, u.origin.1, &u.origin.2, format!("linked clone of `{}`, which is not imported (its template VM is not read): imported as a plain volume", base.1));
                    None
                }
                None => None,
            };
            let spec = VolumeSpec {
                pool: Name(u.pool.clone()),
                size: ByteSize(u.size),
                format: u.format,
                source: None,
                template: u.template,
                clone,
                deletion_policy: DeletionPolicy::Retain,
                replication: None,
                depends_on: vec![],
            };
            out.push(Manifest::new(Kind::Volume, &self.name(key), &spec, &u.file));
        }
        out
    }
}

/// The format of a volume: by its extension on file pools, raw elsewhere. `None` (with
/// the reason) for a format stead cannot use.
pub fn volume_format(r: &VolRef, pool: &Pool) -> Result<VolumeFormat, String> {
    if pool.pool_type != PoolType::Dir
        && pool.pool_type != PoolType::Nfs
        && pool.pool_type != PoolType::Btrfs
    {
        return Ok(VolumeFormat::Raw);
    }
    match r.ext.as_deref() {
        None | Some("raw") | Some("iso") | Some("img") => Ok(VolumeFormat::Raw),
        Some("qcow2") => Ok(VolumeFormat::Qcow2),
        Some(other) => Err(format!(
            "image format `{other}` is not supported (raw and qcow2 are): not imported"
        )),
    }
}

/// `onboot: 1` → running; anything else → stopped, reported so that an import never
/// starts what Proxmox would not.
pub fn run_state(file: &Path, onboot: Option<&Entry>, report: &mut Report) -> RunState {
    match onboot {
        Some(e) if e.value == "1" => RunState::Running,
        Some(e) => {
            report.note(
                file,
                e.line,
                "onboot",
                "not 1: imported with `state: stopped`",
            );
            RunState::Stopped
        }
        None => {
            report.note(file, 0, "onboot", "not set: imported with `state: stopped`");
            RunState::Stopped
        }
    }
}

/// `startup: [order=]N,up=N,down=N`: `down` (the seconds Proxmox waits for the guest to
/// shut down) becomes `stopTimeout`; the start order and delay are reported (stead orders
/// by dependencies). `None` without a usable `down`.
pub fn stop_timeout(
    file: &Path,
    startup: Option<&Entry>,
    report: &mut Report,
) -> Option<DurationSpec> {
    let e = startup?;
    let mut down = None;
    let mut order_or_up = false;
    for part in e.value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("down", v)) => match v.parse::<u64>() {
                Ok(s) if s <= MAX_STOP_TIMEOUT.as_secs() => down = Some(s),
                _ => report.note(
                    file,
                    e.line,
                    "startup",
                    format!(
                        "down={v}: not a number of seconds up to {} (stead's longest stopTimeout): not carried over",
                        MAX_STOP_TIMEOUT.as_secs()
                    ),
                ),
            },
            Some(("order" | "up", _)) | None => order_or_up = true,
            Some((k, _)) => report.note(file, e.line, "startup", format!("`{k}`: unknown part: not carried over")),
        }
    }
    if order_or_up {
        report.note(
            file,
            e.line,
            "startup",
            "start order and delays (stead orders by dependencies): not carried over",
        );
    }
    down.map(|s| DurationSpec(std::time::Duration::from_secs(s)))
}

/// Percent-decodes `s` (`%0A` → newline); a malformed escape is kept as written.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(Ok(v)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16))
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(s: &str) -> VolRef {
        match parse_source(Some(s)).unwrap() {
            DiskSource::Volume(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn startup_down_becomes_the_stop_timeout_and_the_rest_is_reported() {
        let f = Path::new("100.conf");
        let run = |v: &str| {
            let e = Entry {
                key: "startup".into(),
                value: v.into(),
                line: 7,
            };
            let mut r = Report::default();
            let t = stop_timeout(f, Some(&e), &mut r).map(|d| d.0.as_secs());
            let notes: Vec<String> = r.notes().iter().map(|n| n.reason.clone()).collect();
            (t, notes)
        };
        assert_eq!(run("down=120"), (Some(120), vec![]));
        let (t, notes) = run("order=2,up=30,down=90");
        assert_eq!(t, Some(90));
        assert_eq!(notes.len(), 1);
        assert!(notes[0].starts_with("start order and delays"), "{notes:?}");
        let (t, notes) = run("3");
        assert_eq!((t, notes.len()), (None, 1), "a bare number is the order");
        let (t, notes) = run("down=7200");
        assert_eq!(t, None);
        assert!(notes[0].contains("up to 3600"), "{notes:?}");
        let (t, notes) = run("down=x,late=1");
        assert_eq!((t, notes.len()), (None, 2), "{notes:?}");
        let mut r = Report::default();
        assert_eq!(stop_timeout(f, None, &mut r), None);
        assert!(r.notes().is_empty());
    }

    #[test]
    fn sources() {
        let v = vol("local-lvm:vm-100-disk-0");
        assert_eq!(
            (v.storage.as_str(), v.stem.as_str(), v.ext, v.base),
            ("local-lvm", "vm-100-disk-0", None, None)
        );
        let v = vol("local:104/vm-104-disk-1.raw");
        assert_eq!(
            (v.stem.as_str(), v.ext.as_deref()),
            ("vm-104-disk-1", Some("raw"))
        );
        let v = vol("local:iso/debian-12.iso");
        assert_eq!(v.stem, "debian-12");
        assert_eq!(parse_source(Some("none")).unwrap(), DiskSource::None);
        assert_eq!(parse_source(Some("cdrom")).unwrap(), DiskSource::Physical);
        assert!(matches!(
            parse_source(Some("/dev/disk/by-id/ata-X")).unwrap(),
            DiskSource::HostPath(_)
        ));
        assert!(
            parse_source(Some(""))
                .unwrap_err()
                .contains("empty disk spec")
        );
        assert!(parse_source(None).is_err());
        assert!(parse_source(Some("garbage")).is_err());
        assert!(parse_source(Some("local:")).is_err());
    }

    #[test]
    fn linked_clones_name_their_base() {
        let v = vol("local-lvm:base-9000-disk-0/vm-101-disk-0");
        assert_eq!(
            (v.base.as_deref(), v.stem.as_str()),
            (Some("base-9000-disk-0"), "vm-101-disk-0")
        );
        let v = vol("local:9000/base-9000-disk-0.qcow2/101/vm-101-disk-0.qcow2");
        assert_eq!(
            (v.base.as_deref(), v.stem.as_str(), v.ext.as_deref()),
            (Some("base-9000-disk-0"), "vm-101-disk-0", Some("qcow2"))
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("528K"), Ok(528 << 10));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn same_stem_on_two_storages_is_qualified() {
        let keys: BTreeSet<(String, String)> = [
            ("local", "vm-100-disk-0"),
            ("nas", "vm-100-disk-0"),
            ("local", "Debian_12"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let n = name_volumes(&keys);
        assert_eq!(
            n[&("local".into(), "vm-100-disk-0".into())],
            "local-vm-100-disk-0"
        );
        assert_eq!(
            n[&("nas".into(), "vm-100-disk-0".into())],
            "nas-vm-100-disk-0"
        );
        assert_eq!(n[&("local".into(), "Debian_12".into())], "debian-12");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("ssh-ed25519%20AAAA%20a%40b%0Assh-rsa%20B"),
            "ssh-ed25519 AAAA a@b\nssh-rsa B"
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}

//! `storage.cfg` → StoragePools: `dir`, `btrfs`, `lvmthin`, `zfspool`, `nfs`; every
//! other type is reported.

use std::path::{Path, PathBuf};

use stead_schema::{Content, Kind, LvmSpec, NfsSpec, PoolType, StoragePoolSpec, ZfsSpec};

use crate::model::Manifest;
use crate::names::{Taken, sanitize};
use crate::reader::Section;
use crate::report::Report;

/// An imported storage: its Proxmox id and what the guests need to know of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// The Proxmox storage id (`local-lvm`).
    pub id: String,
    /// The StoragePool name.
    pub name: String,
    /// Its type.
    pub pool_type: PoolType,
    /// Its path.
    pub path: PathBuf,
    /// Its content types.
    pub content: Vec<Content>,
}

impl Pool {
    /// Whether volumes on it are files (a format by extension, qcow2 possible).
    pub fn is_file_based(&self) -> bool {
        matches!(
            self.pool_type,
            PoolType::Dir | PoolType::Btrfs | PoolType::Nfs
        )
    }
}

/// Keys of a storage section that are part of the mapping.
const MAPPED: &[&str] = &[
    "path", "content", "vgname", "thinpool", "pool", "server", "export", "options", "shared",
];

/// Imports every section of storage.cfg.
pub fn import_storage(
    file: &Path,
    sections: &[Section],
    report: &mut Report,
) -> (Vec<Pool>, Vec<Manifest>) {
    let mut taken = Taken::default();
    let mut pools = Vec::new();
    let mut manifests = Vec::new();
    for s in sections {
        let Some(pool_type) = pool_type(&s.kind) else {
            report.note(
                file,
                s.line,
                &format!("{}: {}", s.kind, s.id),
                format!("storage type `{}` is not supported by stead: not imported (its guests' disks are reported)", s.kind),
            );
            continue;
        };
        let name = taken.claim(Some(&s.id), &format!("storage-{}", sanitize(&s.id)));
        let Some(spec) = pool_spec(file, s, pool_type, report) else {
            continue;
        };
        for e in &s.entries {
            if !MAPPED.contains(&e.key.as_str()) {
                report.note(
                    file,
                    e.line,
                    &e.key,
                    format!(
                        "`{} {}` has no StoragePool equivalent: not carried over",
                        e.key, e.value
                    ),
                );
            }
        }
        pools.push(Pool {
            id: s.id.clone(),
            name: name.clone(),
            pool_type,
            path: spec.path.clone(),
            content: spec.content.clone(),
        });
        let mut manifest = Manifest::new(Kind::StoragePool, &name, &spec, "storage.yaml");
        manifest.spec["content"] = proxmox_content_names(&spec.content).into();
        manifests.push(manifest);
    }
    (pools, manifests)
}

/// The stead pool type of a Proxmox storage type.
fn pool_type(kind: &str) -> Option<PoolType> {
    Some(match kind {
        "dir" => PoolType::Dir,
        "btrfs" => PoolType::Btrfs,
        "lvmthin" => PoolType::Lvmthin,
        "zfspool" => PoolType::Zfs,
        "nfs" => PoolType::Nfs,
        _ => return None,
    })
}

/// The StoragePool spec of one section, or `None` (reported) when a required key is
/// missing.
fn pool_spec(
    file: &Path,
    s: &Section,
    pool_type: PoolType,
    report: &mut Report,
) -> Option<StoragePoolSpec> {
    let mut missing = |key: &str| {
        report.note(
            file,
            s.line,
            &format!("{}: {}", s.kind, s.id),
            format!("no `{key}`: not imported"),
        );
    };
    let (mut lvm, mut zfs, mut nfs) = (None, None, None);
    let path = match pool_type {
        PoolType::Dir | PoolType::Btrfs | PoolType::Nfs => match s.value("path") {
            Some(p) => PathBuf::from(p),
            None => {
                missing("path");
                return None;
            }
        },
        PoolType::Lvmthin => {
            let (Some(vg), Some(tp)) = (s.value("vgname"), s.value("thinpool")) else {
                missing("vgname/thinpool");
                return None;
            };
            lvm = Some(LvmSpec {
                volume_group: vg.into(),
                thin_pool: tp.into(),
            });
            PathBuf::from(format!("/dev/{vg}/{tp}"))
        }
        PoolType::Zfs => {
            let Some(ds) = s.value("pool") else {
                missing("pool");
                return None;
            };
            zfs = Some(ZfsSpec { dataset: ds.into() });
            PathBuf::from(format!("/{ds}"))
        }
    };
    if pool_type == PoolType::Nfs {
        let (Some(server), Some(export)) = (s.value("server"), s.value("export")) else {
            missing("server/export");
            return None;
        };
        nfs = Some(NfsSpec {
            server: server.into(),
            export: export.into(),
            options: s.value("options").map(str::to_string),
        });
    } else if let Some(e) = s.get("options") {
        report.note(
            file,
            e.line,
            "options",
            "mount options apply to nfs only: not carried over",
        );
    }
    let content = match s.get("content") {
        Some(e) => content_list(file, e.line, &e.value, report),
        None => vec![Content::Images, Content::Rootdir],
    };
    let shared = match s.get("shared") {
        Some(e) if e.value != "0" && matches!(pool_type, PoolType::Dir) => true,
        Some(e) if e.value != "0" && pool_type != PoolType::Nfs => {
            report.note(file, e.line, "shared", "stead refuses `shared` on btrfs, zfs and lvmthin pools (they live on one node): not carried over");
            false
        }
        _ => false,
    };
    Some(StoragePoolSpec {
        pool_type,
        path,
        content,
        nfs,
        lvm,
        zfs,
        shared,
        depends_on: vec![],
    })
}

/// The content list as Proxmox spells it (`templates` is `vztmpl`, which stead accepts
/// as its alias), so an imported pool reads like its storage.cfg section.
fn proxmox_content_names(content: &[Content]) -> Vec<&'static str> {
    content
        .iter()
        .map(|c| match c {
            Content::Images => "images",
            Content::Rootdir => "rootdir",
            Content::Iso => "iso",
            Content::Backup => "backup",
            Content::Templates => "vztmpl",
        })
        .collect()
}

/// Why a Proxmox content type that stead has no equivalent for is left out.
fn content_left_out(c: &str) -> String {
    match c {
        "snippets" => "content type `snippets` (hook scripts, cloud-init snippet files) has no \
             stead equivalent: stead runs no hook scripts and takes cloud-init user-data inline \
             in a VirtualMachine's `cloudInit.userData`: not carried over"
            .to_string(),
        other => format!(
            "content type `{other}` is not one of Proxmox's images, rootdir, vztmpl, iso, \
             backup, snippets: not carried over"
        ),
    }
}

/// Proxmox content types → stead's (`vztmpl` is stead's `templates`); `snippets` and
/// unknown types are reported.
pub fn content_list(file: &Path, line: usize, value: &str, report: &mut Report) -> Vec<Content> {
    let mut out = Vec::new();
    for c in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let mapped = match c {
            "images" => Content::Images,
            "rootdir" => Content::Rootdir,
            "iso" => Content::Iso,
            "backup" => Content::Backup,
            "vztmpl" => Content::Templates,
            "none" => continue,
            other => {
                report.note(file, line, "content", content_left_out(other));
                continue;
            }
        };
        if !out.contains(&mapped) {
            out.push(mapped);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::parse_section_config;

    const CFG: &str = "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup,snippets\n\tshared 0\n\n\
lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n\n\
zfspool: Tank.VMs\n\tpool tank/vms\n\tcontent images\n\tsparse 1\n\n\
btrfs: fast\n\tpath /srv/btrfs\n\tcontent images,rootdir\n\n\
nfs: nas\n\tserver 10.0.0.9\n\texport /export/pve\n\tpath /mnt/pve/nas\n\toptions vers=4.2\n\tcontent backup,iso\n\n\
rbd: ceph\n\tpool rbd\n\tcontent images\n\npbs: backup-server\n\tserver 10.0.0.8\n";

    #[test]
    fn every_type() {
        let f = Path::new("storage.cfg");
        let sections = parse_section_config(f, CFG).unwrap();
        let mut r = Report::default();
        let (pools, manifests) = import_storage(f, &sections, &mut r);
        let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["local", "local-lvm", "tank-vms", "fast", "nas"]);
        assert_eq!(
            pools[0].content,
            [Content::Iso, Content::Templates, Content::Backup]
        );
        assert_eq!(
            manifests[0].spec["content"],
            serde_json::json!(["iso", "vztmpl", "backup"])
        );
        assert_eq!(
            manifests[1].spec["content"],
            serde_json::json!(["rootdir", "images"])
        );
        assert_eq!(manifests[1].spec["lvm"]["volumeGroup"], "pve");
        assert_eq!(manifests[1].spec["path"], "/dev/pve/data");
        assert_eq!(manifests[2].spec["zfs"]["dataset"], "tank/vms");
        assert_eq!(manifests[2].spec["type"], "zfs");
        assert_eq!(manifests[4].spec["nfs"]["options"], "vers=4.2");
        let notes: Vec<String> = r.notes().iter().map(|n| n.render()).collect();
        assert!(
            notes.iter().any(|n| n.starts_with(
                "storage.cfg:3: content: content type `snippets` (hook scripts, cloud-init snippet files) has no stead equivalent"
            )),
            "{notes:?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("storage.cfg:14: sparse:")),
            "{notes:?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.contains("rbd: ceph: storage type `rbd`")),
            "{notes:?}"
        );
        assert!(
            notes.iter().any(|n| n.contains("pbs: backup-server")),
            "{notes:?}"
        );
    }
}

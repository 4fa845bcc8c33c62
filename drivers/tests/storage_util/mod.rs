//! Shared helpers for the storage integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use stead_schema::{
    ByteSize, Content, DeletionPolicy, HostEnv, Kind, Metadata, Name, Origin, PoolType, Resource,
    ResourceId, Spec, StoragePoolSpec, VolumeFormat, VolumeSource, VolumeSpec,
};

pub type World = BTreeMap<ResourceId, Resource>;

pub fn env(dir: &Path) -> HostEnv {
    HostEnv {
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        cgroup_parent: format!("stead-test-{}", std::process::id()),
        netns: None,
        self_exe: PathBuf::from("/nonexistent/stead"),
    }
}

pub fn res(kind: Kind, name: &str, spec: Spec) -> Resource {
    Resource {
        id: ResourceId::new(kind, name),
        metadata: Metadata {
            name: Name(name.to_string()),
            ..Default::default()
        },
        spec,
        origin: Origin::default(),
    }
}

pub fn pool(name: &str, t: PoolType, path: &Path) -> Resource {
    res(
        Kind::StoragePool,
        name,
        Spec::StoragePool(StoragePoolSpec {
            pool_type: t,
            path: path.to_path_buf(),
            content: vec![Content::Images, Content::Rootdir],
            nfs: None,
            lvm: None,
            zfs: None,
            depends_on: vec![],
        }),
    )
}

pub fn volume(name: &str, pool: &str, size: u64) -> Resource {
    res(
        Kind::Volume,
        name,
        Spec::Volume(VolumeSpec {
            pool: Name(pool.to_string()),
            size: ByteSize(size),
            format: VolumeFormat::Raw,
            source: None,
            deletion_policy: DeletionPolicy::Retain,
            depends_on: vec![],
        }),
    )
}

pub fn with_source(mut r: Resource, file: &Path) -> Resource {
    if let Spec::Volume(v) = &mut r.spec {
        v.source = Some(VolumeSource {
            file: file.to_path_buf(),
        });
    }
    r
}

pub fn with_policy(mut r: Resource, p: DeletionPolicy) -> Resource {
    if let Spec::Volume(v) = &mut r.spec {
        v.deletion_policy = p;
    }
    r
}

pub fn world(rs: &[&Resource]) -> World {
    rs.iter().map(|r| (r.id.clone(), (*r).clone())).collect()
}

pub const MI: u64 = 1 << 20;

/// Allocated bytes of a file.
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .map(|m| m.blocks() * 512)
        .unwrap_or(u64::MAX)
}

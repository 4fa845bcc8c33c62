//! `stead env`: isolated, per-branch copies of a manifest set, with a TTL and a
//! teardown that verifies nothing is left.
//!
//! An environment NAME gets its own state dir (`<state-dir>/envs/NAME/state`), run dir
//! (`<run-dir>/envs/NAME`), cgroup parent (`<cgroup-parent>/env-NAME`), network namespace
//! (`stead-env-NAME`, so identical bridges and addresses in two environments don't
//! clash) and an area in each pool (`<pool path>/envs/NAME`; for `zfs` also the child
//! dataset `DATASET/stead-env-NAME`, for `nfs` the export's subdirectory
//! `EXPORT/stead-env-NAME`, for `lvmthin` the LV name prefix `env-NAME-`). Its
//! ownership marks name it (`env/NAME/Volume/x`), so it never adopts or deletes the
//! host's or another environment's volumes. Resource names stay as written: every host
//! object they map to lives inside the environment's own scope.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};
use stead_controller::env::{self, EnvRecord};
use stead_host::cgroup::{CgroupError, Hierarchy};
use stead_reconciler::PlanOptions;
use stead_reconciler::driver::HostEnv;
use stead_reconciler::state::now_secs;
use stead_schema::{DurationSpec, PoolType, Spec, StoragePoolSpec, VolumeSource};

use crate::{ApplyRequest, Global, PlanFormat};

/// `stead env ...`
#[derive(Subcommand, Debug)]
pub enum EnvCmd {
    /// Apply manifests as an isolated environment.
    Up {
        /// Environment name (lowercase letters, digits, '-').
        name: String,
        /// Manifest files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Time to live; `stead env gc` (or the controller) removes it after that.
        #[arg(long)]
        ttl: Option<DurationSpec>,
        /// Clone each volume copy-on-write from this snapshot of the same volume in the
        /// main pool (see `stead snapshot create`).
        #[arg(long)]
        from_snapshot: Option<String>,
        /// Output: text, or json with the workloads' addresses for CI jobs.
        #[arg(short, long, value_enum, default_value_t = PlanFormat::Text)]
        output: PlanFormat,
    },
    /// Remove everything an environment owns and verify nothing is left.
    Down {
        /// Environment name.
        name: String,
    },
    /// List environments with age, TTL, resources and usage.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = PlanFormat::Text)]
        output: PlanFormat,
    },
    /// Remove environments whose TTL has expired.
    Gc,
}

fn check_env_name(name: &str) -> Result<()> {
    stead_schema::check_name(name).map_err(|e| anyhow::anyhow!("environment name: {e}"))?;
    if name.len() > 40 {
        bail!("environment name {name:?} is longer than 40 characters");
    }
    Ok(())
}

fn env_dir(base: &HostEnv, name: &str) -> PathBuf {
    base.state_dir.join("envs").join(name)
}

/// The host handles of environment `name`.
pub fn env_host(base: &HostEnv, name: &str) -> HostEnv {
    HostEnv {
        state_dir: env_dir(base, name).join("state"),
        run_dir: base.run_dir.join("envs").join(name),
        cgroup_parent: format!("{}/env-{name}", base.cgroup_parent),
        netns: Some(drivers_netns_path(name)),
        self_exe: base.self_exe.clone(),
        fence_file: base.fence_file.clone(),
    }
}

fn netns_name(name: &str) -> String {
    format!("stead-env-{name}")
}

fn drivers_netns_path(name: &str) -> PathBuf {
    stead_drivers::net::netns::path_of(&netns_name(name))
}

fn read_record(base: &HostEnv, name: &str) -> Result<Option<EnvRecord>> {
    Ok(env::read(&base.state_dir, name)?)
}

fn write_record(base: &HostEnv, rec: &EnvRecord) -> Result<()> {
    Ok(env::write(&base.state_dir, rec)?)
}

/// The name of an environment's own child (zfs dataset, nfs export subdirectory).
fn env_child(env: &str) -> String {
    format!("stead-env-{env}")
}

/// Moves one pool into environment `env`'s namespace: its path to `<path>/envs/ENV`, a
/// zfs dataset to its child `DATASET/stead-env-ENV`, an nfs export to its subdirectory
/// `EXPORT/stead-env-ENV`; lvmthin LVs get the name prefix `env-ENV-` from the driver.
/// A pool that cannot be isolated is an error naming it.
fn scope_pool(env: &str, pool_name: &str, p: &mut StoragePoolSpec) -> Result<(), String> {
    let child = env_child(env);
    let unscoped = |what: &str| {
        format!(
            "StoragePool/{pool_name}: cannot isolate this pool for environment {env}: it has \
             no spec.{what} to scope"
        )
    };
    match p.pool_type {
        PoolType::Dir | PoolType::Btrfs => {}
        PoolType::Nfs => {
            let nfs = p.nfs.as_mut().ok_or_else(|| unscoped("nfs"))?;
            nfs.export = format!("{}/{child}", nfs.export.trim_end_matches('/'));
        }
        PoolType::Zfs => {
            let z = p.zfs.as_mut().ok_or_else(|| unscoped("zfs"))?;
            z.dataset = format!("{}/{child}", z.dataset.trim_end_matches('/'));
        }
        // LVs share the volume group: in the environment's scope the driver names them
        // `env-ENV-<volume>` and sees no other LV (storage::set_owner_scope).
        PoolType::Lvmthin => {
            p.lvm.as_ref().ok_or_else(|| unscoped("lvm"))?;
        }
    }
    p.path = p.path.join("envs").join(env);
    Ok(())
}

/// Rewrites the desired set into the environment's scope: pools move to their
/// environment area; with `from_snapshot`, volumes start from that snapshot.
fn scope_desired(
    desired: &mut stead_schema::Desired,
    name: &str,
    from_snapshot: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let mut areas = Vec::new();
    let mut original_pools = std::collections::BTreeMap::new();
    for r in desired.resources.values_mut() {
        if let Spec::StoragePool(p) = &mut r.spec {
            original_pools.insert(r.id.name.clone(), p.path.clone());
            scope_pool(name, &r.id.name, p).map_err(|e| anyhow::anyhow!("{e}"))?;
            areas.push(p.path.clone());
        }
    }
    if let Some(snap) = from_snapshot {
        stead_drivers::storage::snapshot::check_snapshot_name(snap)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for r in desired.resources.values_mut() {
            if let Spec::Volume(v) = &mut r.spec {
                let Some(pool) = original_pools.get(v.pool.as_str()) else {
                    continue;
                };
                let base = pool.join("snapshots").join(&r.id.name);
                let candidates = [
                    base.join(format!("{snap}.raw")),
                    base.join(snap).join("disk.raw"),
                ];
                match candidates.iter().find(|c| c.is_file()) {
                    Some(file) => {
                        v.source = Some(VolumeSource {
                            file: Some(file.clone()),
                            ..VolumeSource::default()
                        })
                    }
                    None => bail!(
                        "--from-snapshot {snap}: Volume/{} has no snapshot {snap} (looked for {})",
                        r.id.name,
                        candidates[0].display()
                    ),
                }
            }
        }
    }
    Ok(areas)
}

/// Addresses and ports of the environment's workloads, for CI jobs.
fn outputs(desired: &stead_schema::Desired, rec: &EnvRecord) -> Value {
    let mut workloads = Vec::new();
    let mut forwards = Vec::new();
    for r in desired.resources.values() {
        match &r.spec {
            Spec::Container(c) => workloads.push(json!({
                "kind": "Container",
                "name": r.id.name,
                "interfaces": c.interfaces.iter().map(|i| json!({
                    "name": i.name.as_str(),
                    "network": i.network.as_str(),
                    "address": i.address.map(|a| a.addr.to_string()),
                    "cidr": i.address.map(|a| a.to_string()),
                })).collect::<Vec<_>>(),
            })),
            Spec::VirtualMachine(vm) => workloads.push(json!({
                "kind": "VirtualMachine",
                "name": r.id.name,
                "interfaces": vm.interfaces.iter().map(|i| json!({
                    "network": i.network.as_str(),
                    "mac": i.mac.map(|m| m.to_string()),
                })).collect::<Vec<_>>(),
            })),
            Spec::Network(n) => {
                for f in &n.forwards {
                    forwards.push(json!({"network": r.id.name, "protocol": f.protocol, "hostPort": f.host_port, "to": f.to.to_string()}));
                }
            }
            _ => {}
        }
    }
    json!({
        "apiVersion": stead_schema::API_VERSION,
        "kind": "Environment",
        "name": rec.name,
        "netns": rec.netns,
        "netnsPath": stead_drivers::net::netns::path_of(&rec.netns),
        "expiresAt": rec.expires_at(),
        "workloads": workloads,
        "forwards": forwards,
        "hint": format!("reach workloads from inside the environment: ip netns exec {} <command>", rec.netns),
    })
}

/// Runs `stead env ...`.
pub fn run(cmd: EnvCmd, g: &Global) -> Result<u8> {
    let base = crate::host_env_unchecked(g)?;
    match cmd {
        EnvCmd::Up {
            name,
            paths,
            ttl,
            from_snapshot,
            output,
        } => {
            check_env_name(&name)?;
            let Some(mut desired) = crate::load(&paths) else {
                return Ok(1);
            };
            let areas = scope_desired(&mut desired, &name, from_snapshot.as_deref())?;
            let rec = match read_record(&base, &name)? {
                Some(mut old) => {
                    old.ttl_seconds = ttl.map(|t| t.0.as_secs()).or(old.ttl_seconds);
                    for a in &areas {
                        if !old.pool_areas.contains(a) {
                            old.pool_areas.push(a.clone());
                        }
                    }
                    old.manifests = paths.clone();
                    old
                }
                None => EnvRecord {
                    name: name.clone(),
                    created_at: now_secs(),
                    ttl_seconds: ttl.map(|t| t.0.as_secs()),
                    manifests: paths.clone(),
                    netns: netns_name(&name),
                    pool_areas: areas,
                },
            };
            // Record first: a crash from here on is still cleaned up by `env down`.
            write_record(&base, &rec)?;
            stead_drivers::storage::set_owner_scope(Some(&name));
            stead_drivers::net::netns::create_named(&rec.netns)
                .context("cannot create the environment's network namespace")?;
            let env = env_host(&base, &name);
            let code = crate::apply(
                g,
                &env,
                ApplyRequest {
                    desired: &desired,
                    only: None,
                    opts: PlanOptions {
                        no_prune: false,
                        allow_data_loss: false,
                        ..Default::default()
                    },
                    purge: false,
                    yes: true,
                    dry_run: false,
                    parallelism: 4,
                    lock_timeout: Duration::from_secs(60),
                    output: PlanFormat::Text,
                },
            )?;
            if code != 0 {
                eprintln!(
                    "environment {name} did not converge; `stead env down {name}` removes what was created"
                );
                return Ok(code);
            }
            match output {
                PlanFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&outputs(&desired, &rec))?
                ),
                PlanFormat::Text | PlanFormat::Markdown => {
                    println!("environment {name} is up (network namespace {})", rec.netns)
                }
            }
            Ok(0)
        }
        EnvCmd::Down { name } => down(g, &base, &name),
        EnvCmd::List { output } => list(&base, output),
        EnvCmd::Gc => gc(g, &base),
    }
}

fn records(base: &HostEnv) -> Result<Vec<EnvRecord>> {
    Ok(env::list(&base.state_dir)?)
}

/// `stead env gc`: tears down every environment whose TTL has run out; the exit code
/// is the worst of their teardowns. The controller's housekeeping calls it too.
pub fn gc(g: &Global, base: &HostEnv) -> Result<u8> {
    let mut worst = 0;
    for rec in records(base)? {
        if rec.is_expired(now_secs()) {
            eprintln!("environment {} expired: tearing it down", rec.name);
            worst = worst.max(down(g, base, &rec.name)?);
        }
    }
    Ok(worst)
}

fn down(g: &Global, base: &HostEnv, name: &str) -> Result<u8> {
    check_env_name(name)?;
    let Some(rec) = read_record(base, name)? else {
        bail!("no environment named {name} (see `stead env list`)");
    };
    let env = env_host(base, name);
    stead_drivers::storage::set_owner_scope(Some(name));
    let mut code = 0;
    if env.state_dir.join("stead.db").exists() {
        // The namespace may be gone after a crash; networking then has nothing to delete,
        // but the drivers need the namespace to exist to open it.
        stead_drivers::net::netns::create_named(&rec.netns)?;
        code = crate::apply(
            g,
            &env,
            ApplyRequest {
                desired: &stead_schema::Desired::default(),
                only: None,
                opts: PlanOptions {
                    no_prune: false,
                    allow_data_loss: true,
                    ..Default::default()
                },
                purge: true,
                yes: true,
                dry_run: false,
                parallelism: 4,
                lock_timeout: Duration::from_secs(60),
                output: PlanFormat::Text,
            },
        )?;
    }
    // A failed purge may have left a volume or an export mounted: stop here rather
    // than remove trees that may still hold someone's data.
    let leftovers = if code == 0 {
        teardown_scope(&env, &rec)
    } else {
        vec!["the purge did not complete; nothing removed (see the errors above)".into()]
    };
    if !leftovers.is_empty() {
        for l in &leftovers {
            eprintln!("leftover: {l}");
        }
        eprintln!("environment {name}: teardown incomplete; run `stead env down {name}` again");
        count_teardown_failure(base);
        return Ok(1);
    }
    stead_host::remove_tree_beneath(&env_dir(base, name))
        .with_context(|| format!("cannot remove {}", env_dir(base, name).display()))?;
    println!("environment {name} is down; nothing left behind");
    Ok(0)
}

/// The host's cgroup hierarchy; `None` where the cgroup file systems are not visible
/// (then nothing of an environment can be in them either).
fn cgroups() -> Option<Hierarchy> {
    Hierarchy::detect().ok()
}

/// A cgroup that could not be removed, as a leftover line.
fn cgroup_leftover(e: &CgroupError) -> String {
    match e {
        CgroupError::Io { context, source } => format!("{context}: {source}"),
        e => e.to_string(),
    }
}

/// Removes the environment's scope (namespace, cgroups, run dir, pool areas) and returns
/// whatever could not be removed.
fn teardown_scope(env: &HostEnv, rec: &EnvRecord) -> Vec<String> {
    let mut left = Vec::new();
    if let Some(h) = cgroups() {
        let problems = h.remove_parent(&env.cgroup_parent);
        left.extend(problems.iter().map(cgroup_leftover));
    }
    if let Err(e) = stead_drivers::net::netns::delete_named(&rec.netns) {
        left.push(format!("network namespace {}: {e}", rec.netns));
    }
    for p in std::iter::once(&env.run_dir).chain(rec.pool_areas.iter()) {
        let foreign = foreign_marks(p, &rec.name);
        if !foreign.is_empty() {
            left.extend(foreign);
            continue;
        }
        // Never follows a symlink and never crosses a mount: a mount left below the
        // tree stops its removal and is reported.
        if let Err(e) = stead_host::remove_tree_beneath(p) {
            left.push(format!("{}: {e}", p.display()));
            continue;
        }
        // The `envs` dir inside a pool goes too once empty.
        if let Some(parent) = p.parent()
            && parent.file_name().is_some_and(|n| n == "envs")
        {
            let _ = std::fs::remove_dir(parent);
        }
    }
    if stead_drivers::net::netns::exists(&rec.netns) {
        left.push(format!("network namespace {} still mounted", rec.netns));
    }
    left
}

/// Files under `area` whose ownership mark does not name environment `env` (the host's
/// or another environment's volumes): the area is then not removed.
fn foreign_marks(area: &Path, env: &str) -> Vec<String> {
    let prefix = stead_drivers::storage::env_owner_prefix(env);
    stead_drivers::storage::marks_outside(area, &prefix)
        .into_iter()
        .map(|(file, m)| {
            format!(
                "{} is marked {m}, not by environment {env}; not removing {}",
                file.display(),
                area.display()
            )
        })
        .collect()
}

/// CPU seconds and memory bytes used by the environment's cgroup parent (zero when it
/// has none).
fn usage(cgroups: Option<&Hierarchy>, env: &HostEnv) -> (f64, u64) {
    let Some(parent) = cgroups.map(|h| h.parent(&env.cgroup_parent)) else {
        return (0.0, 0);
    };
    match parent.usage() {
        Ok(u) if parent.exists() => (u.cpu_seconds, u.memory_bytes),
        _ => (0.0, 0),
    }
}

fn list(base: &HostEnv, output: PlanFormat) -> Result<u8> {
    let mut rows = Vec::new();
    let cgroups = cgroups();
    for rec in records(base)? {
        let env = env_host(base, &rec.name);
        let resources = stead_reconciler::StateDb::open(&env.state_dir)
            .and_then(|db| db.inventory())
            .map(|i| i.len())
            .unwrap_or(0);
        let (cpu, mem) = usage(cgroups.as_ref(), &env);
        rows.push(json!({
            "name": rec.name,
            "ageSeconds": (now_secs() - rec.created_at).max(0.0) as u64,
            "ttlSeconds": rec.ttl_seconds,
            "expiresAt": rec.expires_at(),
            "expired": rec.is_expired(now_secs()),
            "resources": resources,
            "cpuSeconds": cpu,
            "memoryBytes": mem,
            "netns": rec.netns,
        }));
    }
    match output {
        PlanFormat::Json => println!("{}", serde_json::to_string_pretty(&json!({"items": rows}))?),
        PlanFormat::Text | PlanFormat::Markdown => {
            if rows.is_empty() {
                println!("No environments.");
                return Ok(0);
            }
            println!(
                "{:<24} {:>8} {:>8} {:>9} {:>9} {:>10}",
                "NAME", "AGE", "TTL", "RESOURCES", "CPU", "MEMORY"
            );
            for r in rows {
                let ttl = match r["ttlSeconds"].as_u64() {
                    Some(t) if r["expired"] == true => format!("{}s!", t),
                    Some(t) => format!("{t}s"),
                    None => "-".into(),
                };
                println!(
                    "{:<24} {:>7}s {:>8} {:>9} {:>8.2}s {:>10}",
                    r["name"].as_str().unwrap_or(""),
                    r["ageSeconds"],
                    ttl,
                    r["resources"],
                    r["cpuSeconds"].as_f64().unwrap_or(0.0),
                    stead_schema::ByteSize(r["memoryBytes"].as_u64().unwrap_or(0)).to_string()
                );
            }
        }
    }
    Ok(0)
}

/// Counts a failed teardown (the controller exports it as
/// `stead_environment_teardown_failures_total`).
fn count_teardown_failure(base: &HostEnv) {
    let _ = env::count_teardown_failure(&base.state_dir);
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_schema::{Content, LvmSpec, NfsSpec, ZfsSpec};

    fn pool(t: PoolType) -> StoragePoolSpec {
        StoragePoolSpec {
            pool_type: t,
            path: PathBuf::from("/srv/pool"),
            content: vec![Content::Images],
            nfs: None,
            lvm: None,
            zfs: None,
            shared: false,
            depends_on: vec![],
        }
    }

    /// `p` isolated for the environment ci1 as the pool `name`; its path moves to the
    /// environment's area whatever its type.
    fn scoped(mut p: StoragePoolSpec, name: &str) -> StoragePoolSpec {
        scope_pool("ci1", name, &mut p).expect("isolated");
        assert_eq!(p.path, PathBuf::from("/srv/pool/envs/ci1"));
        p
    }

    #[test]
    fn dir_and_btrfs_pools_move_to_the_env_area() {
        for t in [PoolType::Dir, PoolType::Btrfs] {
            scoped(pool(t), "p");
        }
    }

    #[test]
    fn zfs_pools_get_a_child_dataset() {
        let mut p = pool(PoolType::Zfs);
        p.zfs = Some(ZfsSpec {
            dataset: "rpool/data/".into(),
        });
        let p = scoped(p, "p");
        assert_eq!(
            p.zfs.map(|z| z.dataset),
            Some("rpool/data/stead-env-ci1".to_string())
        );
    }

    #[test]
    fn nfs_pools_get_an_export_subdirectory() {
        let mut p = pool(PoolType::Nfs);
        p.nfs = Some(NfsSpec {
            server: "fs1".into(),
            export: "/export/vms".into(),
            options: Some("soft".into()),
        });
        let nfs = scoped(p, "p").nfs.expect("nfs");
        assert_eq!(nfs.export, "/export/vms/stead-env-ci1");
        assert_eq!(nfs.server, "fs1");
    }

    #[test]
    fn lvmthin_pools_get_env_prefixed_lv_names_and_marks() {
        use stead_drivers::storage::{lvm, set_owner_scope};
        let mut p = pool(PoolType::Lvmthin);
        let l = LvmSpec {
            volume_group: "vg0".into(),
            thin_pool: "data".into(),
        };
        p.lvm = Some(l.clone());
        let p = scoped(p, "fast");
        assert_eq!(p.lvm.as_ref(), Some(&l), "same volume group and thin pool");

        set_owner_scope(Some("ci1"));
        let argv = lvm::cmd_create(&l, "web", 1 << 30);
        let path = lvm::lv_path(&l, "web");
        let (mine, host) = (
            lvm::volume_of_lv("env-ci1-web").map(str::to_string),
            lvm::volume_of_lv("web").map(str::to_string),
        );
        let snap = lvm::snapshot_lv("web", "s1");
        set_owner_scope(None);
        assert_eq!(
            argv,
            [
                "lvcreate",
                "--yes",
                "-V",
                "1073741824b",
                "--thin",
                "-n",
                "env-ci1-web",
                "--addtag",
                "stead-owner=env/ci1/Volume/web",
                "--",
                "vg0/data"
            ]
        );
        assert_eq!(path, PathBuf::from("/dev/vg0/env-ci1-web"));
        assert_eq!(mine.as_deref(), Some("web"));
        assert_eq!(host, None, "the host's LV web is not the environment's");
        assert_eq!(snap, "env-ci1-web--snap--s1");
        assert_eq!(lvm::volume_of_lv("web"), Some("web"), "host scope again");
    }

    #[test]
    fn a_pool_without_its_backend_section_is_refused_with_a_clear_error() {
        for (t, what) in [
            (PoolType::Zfs, "zfs"),
            (PoolType::Nfs, "nfs"),
            (PoolType::Lvmthin, "lvm"),
        ] {
            let mut p = pool(t);
            let before = p.clone();
            let err = scope_pool("ci1", "fast", &mut p).expect_err("refused");
            assert_eq!(
                err,
                format!(
                    "StoragePool/fast: cannot isolate this pool for environment ci1: it has no \
                     spec.{what} to scope"
                )
            );
            assert_eq!(p, before, "nothing rewritten");
        }
    }

    #[test]
    fn a_desired_set_with_an_lvmthin_pool_moves_it_into_the_environment() {
        let text = "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {name: fast}\n\
                    spec: {type: lvmthin, path: /srv/fast, lvm: {volumeGroup: vg0, thinPool: data}}\n";
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("m.yaml");
        std::fs::write(&f, text).expect("write");
        let Some(mut desired) = crate::load(&[f]) else {
            panic!("the manifest loads");
        };
        let areas = scope_desired(&mut desired, "ci1", None).expect("isolated");
        assert_eq!(areas, vec![PathBuf::from("/srv/fast/envs/ci1")]);
    }
}

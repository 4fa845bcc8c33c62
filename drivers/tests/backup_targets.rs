//! Target resolution from manifests: schedule selectors and Kind/name → paths, then a backup
//! of what they resolve to.

use std::fs;

use stead_drivers::backup::store::{BackupOptions, BackupStore};
use stead_drivers::backup::targets;
use stead_reconciler::driver::HostEnv;
use stead_schema::{Kind, ResourceId, Spec};

#[test]
fn schedule_selector_and_names_resolve_to_paths() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pool = tmp.path().join("pool");
    let bpool = tmp.path().join("bpool");
    let rootfs = tmp.path().join("rootfs-web");
    fs::create_dir_all(&pool).expect("mkdir");
    fs::create_dir_all(&bpool).expect("mkdir");
    fs::create_dir_all(rootfs.join("etc")).expect("mkdir");
    fs::write(rootfs.join("etc/hostname"), "web\n").expect("write");
    let yaml = format!(
        r#"apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {{name: local}}
spec: {{type: dir, path: {pool}, content: [images, rootdir]}}
---
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {{name: backups}}
spec: {{type: dir, path: {bpool}, content: [backup]}}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {{name: web-data}}
spec: {{pool: local, size: 1Mi}}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {{name: vm1-root}}
spec: {{pool: local, size: 1Mi}}
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {{name: web, labels: {{backup: "yes"}}}}
spec:
  rootfs: {{path: {rootfs}}}
  mounts: [{{volume: web-data, path: /data}}]
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {{name: other, labels: {{backup: "no"}}}}
spec:
  rootfs: {{path: {rootfs}}}
---
apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: vm1}}
spec:
  cpus: 1
  memory: 64Mi
  boot: {{kernel: /nonexistent/vmlinuz}}
  disks: [{{volume: vm1-root}}]
---
apiVersion: stead.dev/v1alpha1
kind: BackupSchedule
metadata: {{name: nightly}}
spec:
  schedule: "0 2 * * *"
  timezone: Europe/Berlin
  targets: {{selector: {{matchLabels: {{backup: "yes"}}}}, names: [VirtualMachine/vm1]}}
  storage: backups
  retention: {{keepLast: 2}}
"#,
        pool = pool.display(),
        bpool = bpool.display(),
        rootfs = rootfs.display()
    );
    let file = tmp.path().join("m.yaml");
    fs::write(&file, yaml).expect("write");
    let desired = match stead_schema::load_and_validate(&[file]) {
        Ok(d) => d,
        Err(diags) => panic!("manifests: {diags:?}"),
    };
    let world = &desired.resources;
    let sched = world
        .get(&ResourceId::new(Kind::BackupSchedule, "nightly"))
        .expect("schedule");
    let Spec::BackupSchedule(spec) = &sched.spec else {
        panic!("not a schedule")
    };
    let ids = targets::select(&spec.targets, world.values());
    assert_eq!(
        ids,
        vec![
            ResourceId::new(Kind::Container, "web"),
            ResourceId::new(Kind::VirtualMachine, "vm1")
        ]
    );

    let env = HostEnv {
        state_dir: tmp.path().join("state"),
        run_dir: tmp.path().join("run"),
        cgroup_parent: "stead-test".into(),
        netns: None,
        self_exe: "/bin/true".into(),
        fence_file: None,
    };
    let web = targets::resolve(&env, world, &ids[0]).expect("resolve web");
    assert_eq!(web.resource, "Container/web");
    assert_eq!(
        web.inputs,
        vec![
            ("rootfs".to_string(), rootfs.clone()),
            ("web-data".to_string(), pool.join("images/web-data.raw")),
        ]
    );
    assert_eq!(web.spec["rootfs"]["path"], rootfs.display().to_string());
    let vm = targets::resolve(&env, world, &ids[1]).expect("resolve vm");
    assert_eq!(
        vm.inputs,
        vec![("vm1-root".to_string(), pool.join("images/vm1-root.raw"))]
    );
    assert!(targets::resolve(&env, world, &ResourceId::new(Kind::StoragePool, "local")).is_err());

    // Back up what resolved (the volume file stands in for what the storage driver creates).
    fs::create_dir_all(pool.join("images")).expect("mkdir");
    fs::write(pool.join("images/web-data.raw"), vec![7u8; 100_000]).expect("write");
    let store =
        BackupStore::for_pool(&stead_drivers::storage::pool_path(world, "backups").expect("pool"));
    let info = store
        .backup_paths(
            &web.resource,
            &web.spec,
            &web.inputs,
            &BackupOptions::default(),
        )
        .expect("backup");
    assert!(
        info.manifest
            .starts_with(bpool.join("backups/Container/web"))
    );
    assert!(store.verify(&info.id).expect("verify").ok());
}

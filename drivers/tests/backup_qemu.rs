//! Backups of running QEMU VMs, for real and without a guest: a `-machine none` QEMU with
//! the disk attached by `blockdev-add`, data written through `qemu-io`, backed up through
//! QMP into a chunk store, restored and compared with the live image.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stead_drivers::backup::BackupStore;
use stead_drivers::backup::store::{BackupInfo, BackupOptions};
use stead_drivers::vm::qemu::backup::{
    self, BITMAP, Disk, DiskFormat, GuestFreeze, VmBackupOptions,
};

#[path = "qemu_util/mod.rs"]
mod qemu_util;

use qemu_util::Qemu;

const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn qemu_present(test: &str) -> bool {
    let ok = have("qemu-system-x86_64") && have("qemu-img");
    if !ok {
        eprintln!("SKIP {test}: qemu-system-x86_64 or qemu-img missing");
    }
    ok
}

/// Runs `qemu-img args`; whether it succeeded.
fn qemu_img(args: &[&str]) -> bool {
    Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img")
        .success()
}

/// Disk `disk0` of a VM: node `disk0` reading `image`.
fn disk0(image: &Path) -> Vec<Disk> {
    vec![Disk {
        input: "disk0".into(),
        node: "disk0".into(),
        image: image.to_path_buf(),
    }]
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    image: PathBuf,
    store: BackupStore,
}

fn fixture(size_mib: u64) -> Fixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_path_buf();
    let image = dir.join("disk0.qcow2");
    let size = format!("{size_mib}M");
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &image.to_string_lossy(),
        &size
    ]));
    Fixture {
        store: BackupStore::for_pool(&dir.join("pool")),
        _tmp: tmp,
        dir,
        image,
    }
}

impl Fixture {
    fn disks(&self) -> Vec<Disk> {
        disk0(&self.image)
    }

    /// A guestless QEMU with the image attached as node `disk0`.
    fn qemu(&self) -> Qemu {
        let mut q = Qemu::start(&self.dir).expect("start qemu");
        q.attach("disk0", &self.image);
        q
    }

    fn vm_opts(&self) -> VmBackupOptions {
        VmBackupOptions {
            work_dir: self.dir.clone(),
            speed: None,
            nvram: None,
        }
    }

    fn backup(&self, q: &mut Qemu) -> BackupInfo {
        self.backup_with(q, None, &self.disks(), &self.vm_opts())
    }

    fn backup_with(
        &self,
        q: &mut Qemu,
        agent: Option<&mut dyn GuestFreeze>,
        disks: &[Disk],
        opts: &VmBackupOptions,
    ) -> BackupInfo {
        backup::backup_vm(
            &mut q.qmp,
            agent,
            &self.store,
            "VirtualMachine/vm",
            &json!({}),
            disks,
            opts,
            BackupOptions::default(),
        )
        .expect("backup")
    }

    /// Restores `id` as qcow2 and raw and checks both equal the (quit) live image.
    fn assert_restores_live(&self, id: &str, name: &str) {
        let q = self.dir.join(format!("{name}.qcow2"));
        backup::restore_disk(&self.store, id, "disk0", &q, DiskFormat::Qcow2).expect("restore");
        let raw = self.dir.join(format!("{name}.raw"));
        backup::restore_disk(&self.store, id, "disk0", &raw, DiskFormat::Raw).expect("restore");
        for (img, fmt) in [(&q, "qcow2"), (&raw, "raw")] {
            let (img, live) = (img.to_string_lossy(), self.image.to_string_lossy());
            assert!(
                qemu_img(&["compare", "-q", "-f", fmt, "-F", "qcow2", &img, &live]),
                "{img} differs from the live image"
            );
        }
        assert!(self.store.verify(id).expect("verify").ok());
    }
}

fn read(info: &BackupInfo) -> u64 {
    info.stats.read_bytes.expect("read bytes reported")
}

#[test]
fn a_re_backup_reads_only_the_changed_blocks_and_restores_the_live_image() {
    let t = "a_re_backup_reads_only_the_changed_blocks_and_restores_the_live_image";
    if !qemu_present(t) {
        return;
    }
    let f = fixture(256);
    let mut q = f.qemu();
    let found = backup::find_disks(&mut q.qmp, &[("disk0".into(), f.image.clone())]);
    assert_eq!(found.expect("the node of the image"), f.disks());
    q.io("disk0", "write -P 0xab 0 10M");
    let first = f.backup(&mut q);
    eprintln!("first backup: read {} bytes", read(&first));
    let c = first.consistency.clone().unwrap_or_default();
    assert!(c.contains("disk0 full read (no dirty bitmap yet)"), "{c}");
    assert!(c.contains("crash-consistent"), "{c}");
    assert!((10 * MIB..=12 * MIB).contains(&read(&first)));
    assert_eq!(
        q.bitmap_count("disk0", BITMAP),
        Some(0),
        "bitmap made at commit"
    );

    q.io("disk0", "write -P 0xcd 100M 10M");
    q.io("disk0", "write -z 4M 1M");
    let second = f.backup(&mut q);
    eprintln!("second backup: read {} bytes", read(&second));
    let c = second.consistency.clone().unwrap_or_default();
    assert!(c.contains("disk0 incremental from"), "{c}");
    // 10 MiB of 0xcd, and the 3 MiB of 0xab around the zeroed MiB in the block at 4 MiB
    // (the zeros themselves are not read).
    assert_eq!(read(&second), 13 * MIB);
    assert_eq!(second.stats.reused_bytes, 256 * MIB - 4 * 4 * MIB);
    q.quit();
    f.assert_restores_live(&second.id, "second");
    // The first backup is untouched by the second.
    assert!(f.store.verify(&first.id).expect("verify").ok());
}

#[test]
fn a_cancelled_incremental_backup_loses_no_dirty_block() {
    let t = "a_cancelled_incremental_backup_loses_no_dirty_block";
    if !qemu_present(t) {
        return;
    }
    let f = fixture(64);
    let mut q = f.qemu();
    q.io("disk0", "write -P 0x11 0 8M");
    f.backup(&mut q);
    q.io("disk0", "write -P 0x22 40M 10M");
    let slow = VmBackupOptions {
        speed: Some(MIB),
        ..f.vm_opts()
    };
    let t0 = Instant::now();
    let started = backup::start(
        &mut q.qmp,
        None,
        &f.store,
        "VirtualMachine/vm",
        &f.disks(),
        &slow,
    )
    .expect("start");
    for id in started.job_ids() {
        q.execute("job-cancel", json!({"id": id})).expect("cancel");
    }
    let waited = backup::wait(&mut q.qmp, &started);
    assert!(waited.is_err(), "a cancelled job is an error");
    backup::abort(&mut q.qmp, started);
    eprintln!("cancelled in {:?}", t0.elapsed());
    assert_eq!(q.bitmap_count("disk0", backup::NEXT), None);
    assert_eq!(q.bitmap_count("disk0", BITMAP), Some(12 * MIB), "bits kept");
    assert_eq!(f.store.list(None).expect("list").len(), 1);

    let third = f.backup(&mut q);
    let c = third.consistency.clone().unwrap_or_default();
    assert!(c.contains("incremental"), "{c}");
    assert!(
        (10 * MIB..=12 * MIB).contains(&read(&third)),
        "{}",
        read(&third)
    );
    q.quit();
    f.assert_restores_live(&third.id, "third");
    let leftovers: Vec<_> = std::fs::read_dir(&f.dir)
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".stead-backup-"))
        .collect();
    assert!(leftovers.is_empty(), "job targets removed: {leftovers:?}");
}

#[test]
fn the_bitmap_survives_a_qemu_restart_and_a_kill_or_a_replaced_image_means_a_full_read() {
    let t = "the_bitmap_survives_a_qemu_restart_and_a_kill_or_a_replaced_image_means_a_full_read";
    if !qemu_present(t) {
        return;
    }
    let f = fixture(64);
    let mut q = f.qemu();
    q.io("disk0", "write -P 0x33 0 20M");
    f.backup(&mut q);
    q.quit();

    let mut q = f.qemu();
    q.io("disk0", "write -P 0x44 32M 4M");
    let second = f.backup(&mut q);
    let c = second.consistency.clone().unwrap_or_default();
    assert!(c.contains("incremental"), "after a clean restart: {c}");
    assert_eq!(read(&second), 4 * MIB);
    q.io("disk0", "write -P 0x55 48M 4M");
    q.io("disk0", "flush");
    drop(q); // killed: the persistent bitmap is left marked in use

    let mut q = f.qemu();
    let third = f.backup(&mut q);
    let c = third.consistency.clone().unwrap_or_default();
    assert!(c.contains("full read"), "after a kill: {c}");
    assert_eq!(read(&third), 28 * MIB);
    q.io("disk0", "write -P 0x66 8M 4M");
    let fourth = f.backup(&mut q);
    let c = fourth.consistency.clone().unwrap_or_default();
    assert!(
        c.contains("incremental"),
        "a fresh bitmap after the full read: {c}"
    );
    q.quit();
    f.assert_restores_live(&fourth.id, "fourth");

    // The image replaced by a copy (bitmap and all, but another file): a full read.
    let copy = f.dir.join("copy.qcow2");
    std::fs::copy(&f.image, &copy).expect("copy");
    std::fs::rename(&copy, &f.image).expect("replace");
    let mut q = f.qemu();
    let fifth = f.backup(&mut q);
    let c = fifth.consistency.clone().unwrap_or_default();
    assert!(c.contains("full read (the disk image was replaced"), "{c}");
    q.quit();
}

/// Records freeze/thaw calls.
#[derive(Default)]
struct Agent {
    calls: Vec<&'static str>,
}

impl GuestFreeze for Agent {
    fn freeze(&mut self) -> Result<u64, String> {
        self.calls.push("freeze");
        Ok(2)
    }
    fn thaw(&mut self) -> Result<u64, String> {
        self.calls.push("thaw");
        Ok(2)
    }
}

#[test]
fn the_guest_is_thawed_even_when_the_jobs_cannot_start() {
    let t = "the_guest_is_thawed_even_when_the_jobs_cannot_start";
    if !qemu_present(t) {
        return;
    }
    let f = fixture(16);
    let mut q = f.qemu();
    // A UEFI VM: its NVRAM vars file goes with the disks.
    let nvram = f.dir.join("nvram.fd");
    let vars: Vec<u8> = (0..540_672u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&nvram, &vars).expect("nvram");
    let with_nvram = VmBackupOptions {
        nvram: Some(nvram),
        ..f.vm_opts()
    };
    let mut agent = Agent::default();
    let ok = f.backup_with(&mut q, Some(&mut agent), &f.disks(), &with_nvram);
    assert_eq!(ok.inputs, ["disk0", backup::NVRAM_INPUT]);
    let restored_vars = f.dir.join("vars.restored");
    f.store
        .restore_image(&ok.id, backup::NVRAM_INPUT, &restored_vars)
        .expect("restore the vars");
    assert_eq!(std::fs::read(&restored_vars).expect("read"), vars);
    assert_eq!(agent.calls, ["freeze", "thaw"]);
    let c = ok.consistency.unwrap_or_default();
    assert!(c.contains("guest agent froze 2 file systems"), "{c}");

    // Another job already has the id the backup wants: its transaction fails, after the
    // freeze. The guest is thawed, and the other job is left alone.
    let other = f.dir.join("other.qcow2");
    let other_target = f.dir.join("other-target.qcow2");
    for p in [&other, &other_target] {
        assert!(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &p.to_string_lossy(),
            "16M"
        ]));
    }
    q.attach("other", &other);
    q.attach("other-target", &other_target);
    q.io("other", "write -P 1 0 8M");
    let foreign = "stead-backup-0";
    q.execute(
        "blockdev-backup",
        json!({"job-id": foreign, "device": "other", "target": "other-target",
               "sync": "full", "speed": 1}),
    )
    .expect("foreign job");
    let mut agent = Agent::default();
    let r = backup::start(
        &mut q.qmp,
        Some(&mut agent),
        &f.store,
        "VirtualMachine/vm",
        &f.disks(),
        &f.vm_opts(),
    );
    assert!(r.is_err(), "the transaction fails");
    assert_eq!(agent.calls, ["freeze", "thaw"]);
    let jobs = q.execute("query-jobs", Value::Null).expect("jobs");
    assert_eq!(jobs.as_array().map(Vec::len), Some(1), "{jobs}");
    assert_eq!(jobs[0]["id"], foreign);
    assert_eq!(q.bitmap_count("disk0", backup::NEXT), None);
    q.execute("job-cancel", json!({"id": foreign}))
        .expect("cancel");
    q.quit();
}

#[test]
fn stead_backup_of_a_running_qemu_vm_goes_through_its_qmp_socket() {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use stead_drivers::backup::consistency::WorkloadHooks;
    use stead_drivers::backup::hooks::{Target, backup_target};
    use stead_reconciler::driver::HostEnv;
    use stead_schema::kinds::BackupMode;
    use stead_schema::{Kind, Metadata, Origin, Resource, ResourceId, Spec};

    let t = "stead_backup_of_a_running_qemu_vm_goes_through_its_qmp_socket";
    if !qemu_present(t) {
        return;
    }
    let f = fixture(64);
    let env = HostEnv {
        state_dir: f.dir.join("state"),
        run_dir: f.dir.join("run"),
        cgroup_parent: "stead-unit".into(),
        netns: None,
        self_exe: PathBuf::from("/bin/true"),
        fence_file: None,
    };
    let spec_json = json!({"disks": [{"volume": "v0"}]});
    let vm = Resource {
        id: ResourceId::new(Kind::VirtualMachine, "vm1"),
        metadata: Metadata {
            name: "vm1".parse().expect("name"),
            ..Default::default()
        },
        spec: Spec::from_value(Kind::VirtualMachine, spec_json.clone()).expect("spec"),
        origin: Origin::default(),
    };
    let world = Arc::new(BTreeMap::from([(vm.id.clone(), vm)]));
    let hooks = match WorkloadHooks::new(&env, world) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("SKIP {t}: {e}");
            return;
        }
    };
    // The VM's QEMU: the engine's QMP socket for short-lived clients, and one for the test.
    let sock = stead_drivers::vm::config::Paths::new(&env.run_dir, "vm1").qmp_socket();
    std::fs::create_dir_all(sock.parent().expect("dir")).expect("run dir");
    let test_sock = f.dir.join("test-qmp.sock");
    let mut q = Qemu::spawn(
        &test_sock,
        &[
            "-machine".to_string(),
            "none".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", sock.display()),
        ],
    )
    .expect("start qemu");
    q.attach("drive-v0", &f.image);
    q.io("drive-v0", "write -P 0x77 0 6M");
    let target = Target {
        resource: "VirtualMachine/vm1".into(),
        spec: spec_json,
        inputs: vec![("v0".into(), f.image.clone())],
    };
    let run = || {
        backup_target(
            &f.store,
            &target,
            BackupMode::Snapshot,
            &hooks,
            BackupOptions::default(),
        )
        .expect("backup")
    };
    let first = run();
    let c = first.consistency.clone().unwrap_or_default();
    assert!(c.contains("QEMU backup job point in time"), "{c}");
    assert!(c.contains("v0 full read"), "{c}");
    assert_eq!(read(&first), 6 * MIB);
    q.io("drive-v0", "write -P 0x78 32M 2M");
    let second = run();
    let c = second.consistency.clone().unwrap_or_default();
    assert!(c.contains("v0 incremental"), "{c}");
    assert_eq!(read(&second), 2 * MIB);
    q.quit();
    let out = f.dir.join("v0.restored.qcow2");
    backup::restore_disk(&f.store, &second.id, "v0", &out, DiskFormat::Qcow2).expect("restore");
    let (out, live) = (out.to_string_lossy(), f.image.to_string_lossy());
    assert!(
        qemu_img(&["compare", "-q", &out, &live]),
        "restored image differs"
    );
}

/// The cached Debian guest image (`scripts/guest-image.sh`), or `None` after a SKIP line.
fn guest_image(test: &str) -> Option<PathBuf> {
    let path = match std::env::var_os("STEAD_GUEST_IMAGE") {
        Some(p) => Some(PathBuf::from(p)),
        None => Command::new("bash")
            .arg(
                Path::new(
                    &std::env::var_os("CARGO_MANIFEST_DIR")
                        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
                )
                .join("../scripts/guest-image.sh"),
            )
            .arg("--print-path")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())),
    };
    let path = path.filter(|p| p.is_file());
    if path.is_none() {
        eprintln!("SKIP {test}: guest image not built (scripts/guest-image.sh)");
    }
    path
}

/// A Debian guest under TCG with its agent (one client at a time: each use connects);
/// killed on drop.
struct Guest {
    vm: Qemu,
    agent_sock: PathBuf,
}

fn boot(dir: &Path, disk: &Path, tag: &str) -> Guest {
    let qmp_sock = dir.join(format!("{tag}-qmp.sock"));
    let agent_sock = dir.join(format!("{tag}-qga.sock"));
    let serial = dir.join(format!("{tag}-serial.log"));
    let args = [
        "-accel".to_string(),
        "tcg".into(),
        "-m".into(),
        "512".into(),
        "-serial".into(),
        format!("file:{}", serial.display()),
        "-blockdev".into(),
        format!(
            "driver=file,filename={},node-name=disk0-file",
            disk.display()
        ),
        "-blockdev".into(),
        "driver=qcow2,file=disk0-file,node-name=disk0".into(),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,bootindex=1".into(),
        "-chardev".into(),
        format!(
            "socket,path={},server=on,wait=off,id=qga0",
            agent_sock.display()
        ),
        "-device".into(),
        "virtio-serial-pci".into(),
        "-device".into(),
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
    ];
    let vm = Qemu::spawn(&qmp_sock, &args).expect("start qemu");
    let t = Instant::now();
    stead_drivers::vm::qemu::qga::Qga::connect(&agent_sock, Duration::from_secs(300))
        .expect("the guest agent answers");
    eprintln!("{tag}: guest agent up after {:?}", t.elapsed());
    Guest { vm, agent_sock }
}

impl Guest {
    fn sh(&mut self, script: &str) -> String {
        let mut agent =
            stead_drivers::vm::qemu::qga::Qga::connect(&self.agent_sock, Duration::from_secs(60))
                .expect("agent");
        let out = agent
            .exec("/bin/sh", &["-c", script], None, Duration::from_secs(300))
            .expect("guest-exec");
        assert!(
            out.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

#[test]
fn a_file_written_in_the_guest_between_backups_is_intact_after_restore_and_boot() {
    let t = "a_file_written_in_the_guest_between_backups_is_intact_after_restore_and_boot";
    if !qemu_present(t) {
        return;
    }
    let Some(image) = guest_image(t) else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    // A copy-on-write overlay: the cached image is never written.
    let disk = dir.join("disk0.qcow2");
    let (backing, overlay) = (image.to_string_lossy(), disk.to_string_lossy());
    assert!(qemu_img(&[
        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &backing, &overlay
    ]));
    let store = BackupStore::for_pool(&dir.join("pool"));
    let images = [("disk0".to_string(), disk.clone())];
    let mut g = boot(dir, &disk, "orig");
    let backup = |g: &mut Guest| {
        let sock = g.agent_sock.clone();
        backup::backup_running_vm(
            &mut g.vm.qmp,
            Some(&sock),
            &store,
            "VirtualMachine/guest",
            &json!({}),
            &images,
            None,
            BackupOptions::default(),
        )
        .expect("backup")
    };
    let first = backup(&mut g);
    eprintln!(
        "first: read {} MiB, {:?}",
        read(&first) / MIB,
        first.consistency
    );
    let hash = g.sh(
        "dd if=/dev/urandom of=/root/ten bs=1M count=10 status=none && sync && sha256sum /root/ten",
    );
    let second = backup(&mut g);
    let c = second.consistency.clone().unwrap_or_default();
    eprintln!("second: read {} MiB, {c}", read(&second) / MIB);
    assert!(c.contains("guest agent froze"), "{c}");
    assert!(c.contains("disk0 incremental"), "{c}");
    assert!(read(&second) >= 10 * MIB);
    assert!(
        read(&second) < read(&first) / 4 && read(&second) < 64 * MIB,
        "the re-backup reads about the changed data"
    );
    drop(g);

    let restored = dir.join("restored.qcow2");
    backup::restore_disk(&store, &second.id, "disk0", &restored, DiskFormat::Qcow2)
        .expect("restore");
    let mut g = boot(dir, &restored, "restored");
    assert_eq!(g.sh("sha256sum /root/ten"), hash);
}

#[test]
fn a_raw_disk_is_incremental_while_its_qemu_runs() {
    let t = "a_raw_disk_is_incremental_while_its_qemu_runs";
    if !qemu_present(t) {
        return;
    }
    let f = fixture(16);
    let raw = f.dir.join("disk0.raw");
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        &raw.to_string_lossy(),
        "64M"
    ]));
    let mut q = Qemu::start(&f.dir).expect("start qemu");
    q.execute(
        "blockdev-add",
        json!({"node-name": "disk0", "driver": "raw",
               "file": {"driver": "file", "filename": raw}}),
    )
    .expect("blockdev-add");
    let disks = disk0(&raw);
    let run = |q: &mut Qemu| f.backup_with(q, None, &disks, &f.vm_opts());
    q.io("disk0", "write -P 0x10 0 8M");
    run(&mut q);
    q.io("disk0", "write -P 0x20 32M 4M");
    let second = run(&mut q);
    let c = second.consistency.clone().unwrap_or_default();
    assert!(c.contains("disk0 incremental"), "{c}");
    assert_eq!(read(&second), 4 * MIB);
    q.quit();
    let out = f.dir.join("restored.raw");
    backup::restore_disk(&f.store, &second.id, "disk0", &out, DiskFormat::Raw).expect("restore");
    assert_eq!(
        std::fs::read(&out).expect("restored"),
        std::fs::read(&raw).expect("live")
    );
}

//! Tests of the cgroup layer: against temp roots that imitate a v1 and a v2 layout (any
//! user), and against the host's own hierarchies inside a private parent (root only).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::mounts::MountTable;

/// A temp dir imitating a v1 layout: one mount point per controller group, and the
/// mountinfo text that describes it.
struct V1Root {
    dir: tempfile::TempDir,
}

impl V1Root {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for c in ["cpu,cpuacct", "memory", "pids", "freezer", "devices"] {
            fs::create_dir(dir.path().join(c)).expect("mount point");
        }
        Self { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn mountinfo(&self) -> String {
        let r = self.root().display();
        format!(
            "30 25 0:26 / {r}/cpu,cpuacct rw,relatime shared:8 - cgroup cgroup rw,cpu,cpuacct\n\
             32 25 0:28 / {r}/memory rw - cgroup cgroup rw,memory\n\
             33 25 0:29 / {r}/pids rw - cgroup cgroup rw,pids\n\
             34 25 0:31 / {r}/freezer rw - cgroup cgroup rw,freezer\n\
             35 25 0:32 / {r}/devices rw - cgroup cgroup rw,devices\n\
             36 25 0:30 / {r}/unified rw - cgroup2 cgroup2 rw\n\
             37 25 0:28 /sub {r}/bind rw - cgroup cgroup rw,memory\n\
             38 25 0:33 / /elsewhere/blkio rw - cgroup cgroup rw,blkio,pids\n"
        )
    }

    fn hierarchy(&self) -> Hierarchy {
        Hierarchy::detect_in(self.root(), &MountTable::parse(&self.mountinfo())).expect("v1")
    }

    fn file(&self, ctrl: &str, rel: &str, name: &str) -> PathBuf {
        self.root().join(ctrl).join(rel).join(name)
    }
}

/// A temp dir imitating a cgroup2 root that offers `cpu memory pids`.
fn v2_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(
        dir.path().join("cgroup.controllers"),
        "cpuset cpu io memory pids\n",
    )
    .expect("controllers");
    dir
}

fn read(p: &Path) -> String {
    fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_string()
}

fn touch(dir: &Path, files: &[&str]) {
    for f in files {
        fs::write(dir.join(f), "").expect("control file");
    }
}

#[test]
fn v1_is_detected_from_the_mounts_below_the_root() {
    let r = V1Root::new();
    let h = r.hierarchy();
    assert!(!h.is_v2());
    let dirs = h.manager().dirs(Path::new("p/c"));
    let root = r.root();
    assert_eq!(
        dirs,
        vec![
            ("cpu".to_string(), root.join("cpu,cpuacct/p/c")),
            ("cpuacct".to_string(), root.join("cpu,cpuacct/p/c")),
            ("memory".to_string(), root.join("memory/p/c")),
            ("pids".to_string(), root.join("pids/p/c")),
            ("freezer".to_string(), root.join("freezer/p/c")),
            ("devices".to_string(), root.join("devices/p/c")),
        ],
        "the cgroup2 mount, a bind of a sub-cgroup and mounts outside the root are ignored"
    );
}

#[test]
fn v1_split_mounts_are_found_too() {
    let text = "\
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:8 - cgroup cgroup rw,cpu
31 25 0:27 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct
32 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 25 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
";
    let v1 = v1::V1::from_mounts(
        &crate::SysFs::host().cgroup_root(),
        &MountTable::parse(text),
    )
    .expect("v1");
    let names: Vec<&str> = v1.mounts().iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(names, ["cpu", "cpuacct", "memory", "pids"]);
    assert_eq!(v1.mounts()[1].1, Path::new("/sys/fs/cgroup/cpuacct"));
}

#[test]
fn a_root_without_cgroup2_or_the_v1_controllers_is_unsupported() {
    let r = V1Root::new();
    let text = format!(
        "32 25 0:28 / {}/memory rw - cgroup cgroup rw,memory\n",
        r.root().display()
    );
    let err = Hierarchy::detect_in(r.root(), &MountTable::parse(&text)).expect_err("no cpu");
    assert!(matches!(err, CgroupError::Unsupported(_)), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "cgroup v1 controller cpu is not mounted and {} is not cgroup2",
            r.root().display()
        )
    );
}

#[test]
fn v2_is_detected_from_the_roots_controllers_file() {
    let root = v2_root();
    let h = Hierarchy::detect_in(root.path(), &MountTable::parse("")).expect("v2");
    assert!(h.is_v2());
    assert_eq!(
        h.manager().dirs(Path::new("p/c")),
        vec![(String::new(), root.path().join("p/c"))]
    );
    // detect_at does not need the mount table for v2.
    assert!(Hierarchy::detect_at(root.path()).expect("v2").is_v2());
}

#[test]
fn v1_limits_are_written_to_each_controllers_files() {
    let r = V1Root::new();
    let cg = r.hierarchy().cgroup("stead/env-a", "c1");
    cg.create().expect("create");
    assert!(cg.exists());
    assert_eq!(
        read(&r.file("memory", "stead/env-a/c1", "memory.use_hierarchy")),
        "1"
    );
    touch(
        &r.root().join("memory/stead/env-a/c1"),
        &["memory.memsw.limit_in_bytes"],
    );
    let l = Limits {
        cpus: Some(0.5),
        memory: Some(64 << 20),
        pids: Some(20),
    };
    cg.set_limits(&l).expect("limits");
    let rel = "stead/env-a/c1";
    assert_eq!(
        read(&r.file("cpu,cpuacct", rel, "cpu.cfs_period_us")),
        "100000"
    );
    assert_eq!(
        read(&r.file("cpu,cpuacct", rel, "cpu.cfs_quota_us")),
        "50000"
    );
    assert_eq!(
        read(&r.file("memory", rel, "memory.limit_in_bytes")),
        "67108864"
    );
    assert_eq!(
        read(&r.file("memory", rel, "memory.memsw.limit_in_bytes")),
        "67108864"
    );
    assert_eq!(read(&r.file("pids", rel, "pids.max")), "20");
    assert_eq!(cg.limits().expect("read back"), l);

    cg.set_limits(&Limits::default()).expect("unlimited");
    assert_eq!(read(&r.file("cpu,cpuacct", rel, "cpu.cfs_quota_us")), "-1");
    assert_eq!(read(&r.file("memory", rel, "memory.limit_in_bytes")), "-1");
    assert_eq!(read(&r.file("pids", rel, "pids.max")), "max");
}

/// A v1 cgroup is removed one hierarchy after another: while the cpu directory is gone
/// and the memory one (which `exists` looks at) is still there, reading the limits says
/// "gone", not an error. A file missing from a complete cgroup stays an error.
/// What `limits_if_present` reads as "gone": `ENODEV` (a file read after its cgroup was
/// removed under it) even while every directory still shows, `ENOENT` only once a
/// hierarchy's directory is gone; other errors never.
#[test]
fn errors_of_a_removed_cgroup_read_as_gone() {
    let r = V1Root::new();
    let cg = r.hierarchy().cgroup("stead/env-a", "c3");
    cg.create().expect("create");
    let err = io::Error::from_raw_os_error;
    assert!(cg.removed_while_read(&err(libc::ENODEV)));
    assert!(
        !cg.removed_while_read(&err(libc::ENOENT)),
        "complete cgroup"
    );
    assert!(!cg.removed_while_read(&err(libc::EACCES)));
    fs::remove_dir_all(r.root().join("cpu,cpuacct/stead/env-a/c3")).expect("rmdir cpu");
    assert!(
        cg.removed_while_read(&err(libc::ENOENT)),
        "a hierarchy gone"
    );
    assert!(!cg.removed_while_read(&err(libc::EIO)));
}

#[test]
fn v1_limits_of_a_cgroup_being_removed_read_as_gone() {
    let r = V1Root::new();
    let cg = r.hierarchy().cgroup("stead/env-a", "c2");
    cg.create().expect("create");
    cg.set_limits(&Limits::default()).expect("limits");
    assert!(cg.limits_if_present().expect("complete").is_some());

    fs::remove_file(r.file("cpu,cpuacct", "stead/env-a/c2", "cpu.cfs_quota_us")).expect("rm");
    let err = cg
        .limits_if_present()
        .expect_err("a file missing from a complete cgroup");
    assert!(err.to_string().contains("cpu.cfs_quota_us"), "{err}");

    fs::remove_dir_all(r.root().join("cpu,cpuacct/stead/env-a/c2")).expect("rmdir cpu");
    assert!(cg.exists(), "the memory hierarchy still has it");
    assert_eq!(cg.limits_if_present().expect("being removed"), None);
}

#[test]
fn v2_limits_are_written_to_the_unified_files() {
    let root = v2_root();
    let cg = Hierarchy::v2(root.path()).cgroup("stead", "c1");
    cg.create().expect("create");
    assert!(cg.exists());
    assert_eq!(
        read(&root.path().join("cgroup.subtree_control")),
        "+cpu +memory +pids",
        "the root's controllers are enabled for the children"
    );
    let d = root.path().join("stead/c1");
    let l = Limits {
        cpus: Some(1.5),
        memory: Some(64 << 20),
        pids: Some(20),
    };
    let err = cg.set_limits(&l).expect_err("no controller files yet");
    assert!(matches!(err, CgroupError::Unsupported(_)), "{err}");
    cg.set_limits(&Limits::default())
        .expect("unlimited needs no controller");

    touch(
        &d,
        &["cpu.max", "memory.max", "memory.swap.max", "pids.max"],
    );
    cg.set_limits(&l).expect("limits");
    assert_eq!(read(&d.join("cpu.max")), "150000 100000");
    assert_eq!(read(&d.join("memory.max")), "67108864");
    assert_eq!(read(&d.join("memory.swap.max")), "0");
    assert_eq!(read(&d.join("pids.max")), "20");
    assert_eq!(cg.limits().expect("read back"), l);

    cg.set_limits(&Limits::default()).expect("unlimited");
    assert_eq!(read(&d.join("cpu.max")), "max 100000");
    assert_eq!(read(&d.join("memory.max")), "max");
    assert_eq!(read(&d.join("memory.swap.max")), "max");
    assert_eq!(cg.limits().expect("read back"), Limits::default());
}

#[test]
fn usage_is_read_from_each_versions_files() {
    let r = V1Root::new();
    let cg = r.hierarchy().cgroup("p", "c");
    cg.create().expect("create");
    for (ctrl, file, value) in [
        ("cpu,cpuacct", "cpuacct.usage", "2500000000"),
        ("memory", "memory.usage_in_bytes", "4096"),
        (
            "memory",
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        ),
        ("pids", "pids.current", "3"),
    ] {
        fs::write(r.file(ctrl, "p/c", file), value).expect("counter");
    }
    let want = Usage {
        cpu_seconds: 2.5,
        memory_bytes: 4096,
        pids: 3,
        oom_kills: 2,
    };
    assert_eq!(cg.usage().expect("v1 usage"), want);

    let root = v2_root();
    let cg = Hierarchy::v2(root.path()).cgroup("p", "c");
    cg.create().expect("create");
    let d = root.path().join("p/c");
    for (file, value) in [
        ("cpu.stat", "usage_usec 2500000\nuser_usec 1\n"),
        ("memory.current", "4096"),
        ("memory.events", "low 0\noom 2\noom_kill 2\n"),
        ("pids.current", "3"),
    ] {
        fs::write(d.join(file), value).expect("counter");
    }
    assert_eq!(cg.usage().expect("v2 usage"), want);
}

#[test]
fn freeze_and_thaw_use_each_versions_files() {
    let root = v2_root();
    let cg = Hierarchy::v2(root.path()).cgroup("p", "c");
    cg.create().expect("create");
    let d = root.path().join("p/c");
    fs::write(d.join("cgroup.events"), "populated 1\nfrozen 1\n").expect("events");
    cg.freeze(Duration::from_secs(1)).expect("freeze");
    assert_eq!(read(&d.join("cgroup.freeze")), "1");
    assert!(cg.is_frozen());
    cg.thaw().expect("thaw");
    assert_eq!(read(&d.join("cgroup.freeze")), "0");
    assert!(!cg.is_frozen());
    fs::write(d.join("cgroup.events"), "populated 1\nfrozen 0\n").expect("events");
    let err = cg
        .freeze(Duration::from_millis(20))
        .expect_err("never reports frozen");
    assert!(err.to_string().contains("did not freeze"), "{err}");
    assert_eq!(read(&d.join("cgroup.freeze")), "0", "thawed again");

    let r = V1Root::new();
    let cg = r.hierarchy().cgroup("p", "c");
    cg.create().expect("create");
    cg.freeze(Duration::from_secs(1)).expect("freeze");
    assert_eq!(read(&r.file("freezer", "p/c", "freezer.state")), "FROZEN");
    assert!(cg.is_frozen());
    cg.thaw().expect("thaw");
    assert_eq!(read(&r.file("freezer", "p/c", "freezer.state")), "THAWED");
}

#[test]
fn v1_devices_are_denied_then_allowed() {
    struct Unused;
    impl DeviceProgram for Unused {
        fn attach(&self, _: &Path, _: &[&str]) -> Result<(), CgroupError> {
            unreachable!("v1 has no device program")
        }
    }
    let r = V1Root::new();
    let cg = r.hierarchy().cgroup("p", "c");
    cg.create().expect("create");
    cg.restrict_devices(&["c 1:3 rwm", "c 1:5 rwm"], &Unused)
        .expect("restrict");
    assert_eq!(read(&r.file("devices", "p/c", "devices.deny")), "a");
    // A plain file keeps the last write; the kernel's file appends each rule.
    assert_eq!(
        read(&r.file("devices", "p/c", "devices.allow")),
        "c 1:5 rwm"
    );
}

#[test]
fn v2_devices_go_through_the_program_and_a_refusal_is_unsupported() {
    struct Refuse(std::sync::Mutex<Vec<PathBuf>>);
    impl DeviceProgram for Refuse {
        fn attach(&self, dir: &Path, allow: &[&str]) -> Result<(), CgroupError> {
            assert_eq!(allow, ["c 1:3 rwm"]);
            self.0.lock().expect("lock").push(dir.to_path_buf());
            Err(CgroupError::io(
                "load",
                io::Error::from_raw_os_error(libc::EPERM),
            ))
        }
    }
    let root = v2_root();
    let cg = Hierarchy::v2(root.path()).cgroup("p", "c");
    let prog = Refuse(Default::default());
    let err = cg
        .restrict_devices(&["c 1:3 rwm"], &prog)
        .expect_err("refused");
    assert!(matches!(err, CgroupError::Unsupported(_)), "{err}");
    assert_eq!(*prog.0.lock().expect("lock"), [root.path().join("p/c")]);
}

#[test]
fn destroy_removes_the_cgroup_and_its_empty_parents() {
    let root = v2_root();
    let h = Hierarchy::v2(root.path());
    let a = h.cgroup("p/q", "a");
    let b = h.cgroup("p/q", "b");
    a.create().expect("create a");
    b.create().expect("create b");
    a.destroy().expect("destroy a");
    assert!(!a.exists());
    assert!(root.path().join("p/q").is_dir(), "b still lives there");
    b.destroy().expect("destroy b");
    assert!(!root.path().join("p").exists(), "empty parents go");
    b.destroy().expect("idempotent");
}

#[test]
fn remove_parent_removes_children_first_and_reports_processes() {
    let r = V1Root::new();
    let h = r.hierarchy();
    for rel in ["env-a/c1/sub", "env-a/c2"] {
        h.cgroup("", rel).create().expect("create");
    }
    // The memory copy holds a process: it stays, and is reported.
    let mem = r.root().join("memory/env-a");
    fs::write(mem.join("cgroup.procs"), "123\n456\n").expect("procs");
    let _ = fs::remove_file(mem.join("memory.use_hierarchy"));
    for c in ["c1/sub", "c1", "c2"] {
        let _ = fs::remove_file(mem.join(c).join("memory.use_hierarchy"));
    }
    let problems = h.remove_parent("/env-a/");
    let msgs: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(msgs, [format!("processes 123,456 in {}", mem.display())]);
    assert!(
        mem.join("c1/sub").is_dir(),
        "a populated parent is not touched"
    );
    for ctrl in ["cpu,cpuacct", "pids", "freezer", "devices"] {
        assert!(!r.root().join(ctrl).join("env-a").exists(), "{ctrl}");
    }
    fs::remove_file(mem.join("cgroup.procs")).expect("empty");
    assert!(h.remove_parent("env-a").is_empty());
    assert!(!mem.exists());
    assert!(
        h.remove_parent("env-a").is_empty(),
        "nothing there: nothing to report"
    );
}

#[test]
fn the_parent_cgroup_reads_the_parents_own_files() {
    let root = v2_root();
    let h = Hierarchy::v2(root.path());
    h.cgroup("env-a", "c").create().expect("create");
    fs::write(root.path().join("env-a/cpu.stat"), "usage_usec 1000000\n").expect("stat");
    let p = h.parent("env-a");
    assert_eq!(p.relative(), Path::new("env-a"));
    assert_eq!(p.usage().expect("usage").cpu_seconds, 1.0);
}

#[test]
fn quota_math() {
    assert_eq!(quota_us(1.5), 150_000);
    assert_eq!(quota_us(0.001), 1000);
    assert_eq!(round_cpus(150_000.0 / 100_000.0), 1.5);
    assert_eq!(normalize_cpus(0.33333), 0.333);
    assert_eq!(normalize_cpus(2.0), 2.0);
    assert_eq!(normalize_memory(100_000_000), 99_999_744);
    assert_eq!(normalize_memory(64 << 20), 64 << 20);
    assert_eq!(kv("usage_usec 1234\nuser_usec 1", "usage_usec"), 1234);
    assert_eq!(
        kv("oom_kill_disable 0\nunder_oom 0\noom_kill 3", "oom_kill"),
        3
    );
}

#[test]
fn no_device_filter_is_an_error() {
    let hier = Hierarchy::v1(vec![("memory".into(), PathBuf::from("/nonexistent"))]);
    struct Unused;
    impl DeviceProgram for Unused {
        fn attach(&self, _: &Path, _: &[&str]) -> Result<(), CgroupError> {
            unreachable!("v1 has no device program")
        }
    }
    let err = hier
        .cgroup("p", "c")
        .restrict_devices(&["c 1:3 rwm"], &Unused)
        .expect_err("no devices controller: refused");
    assert!(matches!(err, CgroupError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("devices controller"), "{err}");
}

/// Whether the privileged test `test` runs as root; prints its SKIP line when not.
fn running_as_root(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("SKIP {test}: needs root");
    }
    root
}

/// The host's hierarchy for the privileged test `test`, or `None` (after its SKIP line)
/// when not root or none is found.
fn host_hierarchy(test: &str) -> Option<Hierarchy> {
    if !running_as_root(test) {
        return None;
    }
    Hierarchy::detect()
        .inspect_err(|e| eprintln!("SKIP {test}: {e}"))
        .ok()
}

/// Destroys the test cgroup on drop, so a failed assertion leaves nothing behind.
struct DestroyOnDrop(Cgroup);

impl Drop for DestroyOnDrop {
    fn drop(&mut self) {
        let _ = self.0.destroy();
    }
}

/// A `sleep 30` to attach to a test cgroup.
fn sleeper() -> std::process::Child {
    std::process::Command::new("/bin/sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep")
}

/// Asserts the top test parent of `cg` is gone from every hierarchy.
fn assert_parents_gone(cg: &Cgroup) {
    for d in cg.procs_dirs() {
        let top = d.parent().and_then(Path::parent).expect("top");
        assert!(!top.exists(), "{} left behind", top.display());
    }
}

/// Freezes `cg` (holding `pid`), checks the kernel reports the task frozen, thaws.
fn freeze_thaw(cg: &Cgroup, pid: i32) {
    cg.freeze(Duration::from_secs(5)).expect("freeze");
    assert!(cg.is_frozen());
    // v1 reports the frozen task in the refrigerator (state D); v2 keeps it in S, so
    // the cgroup's own report (checked by `freeze`) is the witness there.
    if !cg.manager.is_v2() {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let state = st
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        assert_eq!(state, Some("D"), "{st}");
    }
    cg.freeze(Duration::from_secs(5))
        .expect("freezing twice is fine");
    cg.thaw().expect("thaw");
    assert!(!cg.is_frozen());
    cg.thaw().expect("thawing twice is fine");
}

/// The v2 code paths on a real cgroup2 mount: the unified hierarchy of a v1-hybrid
/// host (no controllers there: limits are refused, unlimited is accepted), or the host's
/// own when it is v2.
#[test]
fn v2_create_attach_kill_destroy() {
    if !running_as_root("v2_create_attach_kill_destroy") {
        return;
    }
    let host = crate::SysFs::host().cgroup_root();
    let host = host.as_path();
    let root = [host.to_path_buf(), host.join("unified")]
        .into_iter()
        .find(|r| v2::is_unified_root(r));
    let Some(root) = root else {
        eprintln!("SKIP v2_create_attach_kill_destroy: no cgroup2 mount");
        return;
    };
    let hier = Hierarchy::v2(root.clone());
    let parent = format!("stead-test-{}-v2/nested", std::process::id());
    let cg = hier.cgroup(&parent, "c1");
    let _guard = DestroyOnDrop(cg.clone());
    cg.create().expect("create");
    assert!(cg.exists());
    cg.set_limits(&Limits::default())
        .expect("unlimited always works");
    let has_pids = root.join("cgroup.controllers").exists()
        && read_opt(&root.join("cgroup.controllers")).contains("pids");
    let r = cg.set_limits(&Limits {
        pids: Some(10),
        ..Default::default()
    });
    assert_eq!(r.is_ok(), has_pids, "{r:?}");
    let mut child = sleeper();
    let pid = child.id() as i32;
    cg.add_pid(pid).expect("attach");
    assert_eq!(cg.pids(), vec![pid]);
    assert!(cg.usage().is_ok());
    freeze_thaw(&cg, pid);
    cg.destroy().expect("destroy");
    assert!(!child.wait().expect("wait").success());
    assert!(
        !root
            .join(format!("stead-test-{}-v2", std::process::id()))
            .exists()
    );
}

/// Real test against the host's hierarchy, inside a private test parent.
#[test]
fn create_limit_attach_destroy() {
    let Some(hier) = host_hierarchy("create_limit_attach_destroy") else {
        return;
    };
    let parent = format!("stead-test-{}-unit/nested", std::process::id());
    let cg = hier.cgroup(&parent, "c1");
    let _guard = DestroyOnDrop(cg.clone());
    cg.create().expect("create");
    assert!(cg.exists());
    let l = Limits {
        cpus: Some(0.5),
        memory: Some(64 << 20),
        pids: Some(20),
    };
    cg.set_limits(&l).expect("limits");
    assert_eq!(cg.limits().expect("read"), l);
    cg.set_limits(&Limits::default()).expect("unlimit");
    assert_eq!(cg.limits().expect("read"), Limits::default());
    cg.set_limits(&l).expect("limits again");

    let mut child = sleeper();
    let pid = child.id() as i32;
    cg.add_pid(pid).expect("attach");
    assert_eq!(cg.pids(), vec![pid]);
    let u = cg.usage().expect("usage");
    assert_eq!(u.pids, 1);
    if hier.is_v2() || cg.manager.dir(&cg.rel, "freezer").is_some() {
        freeze_thaw(&cg, pid);
    } else {
        eprintln!("SKIP create_limit_attach_destroy (freeze part): no v1 freezer mounted");
    }
    cg.destroy().expect("destroy");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "sleep was killed");
    assert!(!cg.exists());
    assert_parents_gone(&hier.cgroup(&parent, "c1"));
}

/// `remove_parent` on the host's hierarchy: a parent whose child holds a process stays
/// (and is reported); once the process is gone, the whole parent goes in every hierarchy.
#[test]
fn remove_parent_on_the_host() {
    let Some(hier) = host_hierarchy("remove_parent_on_the_host") else {
        return;
    };
    let parent = format!("stead-test-{}-rmparent", std::process::id());
    let cg = hier.cgroup(&format!("{parent}/env-a"), "c1");
    let _guard = DestroyOnDrop(cg.clone());
    cg.create().expect("create");
    let mut child = sleeper();
    cg.add_pid(child.id() as i32).expect("attach");
    let problems = hier.remove_parent(&parent);
    assert!(!problems.is_empty(), "a populated tree is reported");
    assert!(cg.exists(), "and left alone");
    cg.kill_all().expect("kill");
    let _ = child.wait();
    let problems = hier.remove_parent(&parent);
    assert!(problems.is_empty(), "{problems:?}");
    assert_parents_gone(&cg);
}

/// Forks a child that starts `threads` extra threads, calls `add_self` on `cg` and
/// reports the result; the child then waits to be killed. Returns its pid and the result.
fn child_adding_itself(cg: &Cgroup, threads: usize) -> (nix::unistd::Pid, Result<(), String>) {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the child only starts threads, writes to the cgroup files and the pipe,
    // then sleeps until the parent kills it; it never returns into the test harness.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            for _ in 0..threads {
                std::thread::spawn(|| std::thread::sleep(Duration::from_secs(60)));
            }
            let msg = match cg.add_self() {
                Ok(()) => "ok".to_string(),
                Err(e) => e.to_string(),
            };
            let _ = nix::unistd::write(&w, msg.as_bytes());
            drop(w);
            std::thread::sleep(Duration::from_secs(60));
            // SAFETY: ends the forked child without running the harness's exit path.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut f = fs::File::from(r);
            let mut msg = String::new();
            io::Read::read_to_string(&mut f, &mut msg).expect("read result");
            (child, if msg == "ok" { Ok(()) } else { Err(msg) })
        }
    }
}

/// `add_self` moves the whole calling process, with every thread, into the cgroup in
/// every hierarchy: a single-threaded process through v1's `tasks` (its one thread), a
/// threaded one by pid.
#[test]
fn add_self_moves_the_whole_process() {
    let Some(hier) = host_hierarchy("add_self_moves_the_whole_process") else {
        return;
    };
    let parent = format!("stead-test-{}-self", std::process::id());
    for threads in [0, 2] {
        let cg = hier.cgroup(&parent, &format!("t{threads}"));
        let _guard = DestroyOnDrop(cg.clone());
        cg.create().expect("create");
        let (pid, r) = child_adding_itself(&cg, threads);
        let tids: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
            .expect("tasks of the child")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let checked = r.map(|()| {
            for d in cg.procs_dirs() {
                let procs = read(&d.join("cgroup.procs"));
                assert_eq!(procs.trim(), pid.to_string(), "{}", d.display());
                if !hier.is_v2() {
                    let listed = read(&d.join("tasks"));
                    let mut tasks: Vec<&str> = listed.lines().collect();
                    tasks.sort();
                    let mut want: Vec<&str> = tids.iter().map(String::as_str).collect();
                    want.sort();
                    assert_eq!(tasks, want, "{}", d.display());
                }
            }
        });
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        checked.expect("add_self");
        assert_eq!(tids.len(), threads + 1);
        cg.destroy().expect("destroy");
    }
    let _ = hier.remove_parent(&parent);
}

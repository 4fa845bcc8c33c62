//! A backup's hold on a workload, seen from another process: `apply` — what a controller
//! healing drift calls, e.g. to resume a VM the backup paused — waits instead of acting.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use stead_drivers::container::ContainerDriver;
use stead_drivers::vm::VmDriver;
use stead_reconciler::driver::{Driver, HostEnv, Observed};
use stead_schema::{Kind, Resource, ResourceId, Spec};

/// A child process that holds an exclusive flock on the hold file of `kind/name`, as a
/// backup does while it has the workload paused, frozen or stopped.
struct OtherBackup(Child);

impl OtherBackup {
    fn hold(run_dir: &std::path::Path, kind: &str, name: &str) -> Self {
        let p = run_dir.join("holds").join(format!("{kind}-{name}"));
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        let me = OtherBackup(
            Command::new("sh")
                .arg("-c")
                // Lock a temp file, then rename it into place: the hold is never seen unlocked.
                .arg(r#"exec 9>>"$0.tmp" && flock -x 9 && echo $$ > "$0.tmp" && mv "$0.tmp" "$0" && exec sleep 30"#)
                .arg(&p)
                .spawn()
                .expect("sh"),
        );
        // Wait until the lock is taken (a shared lock from here is refused); up to 30 s
        // on a loaded machine.
        for _ in 0..1500 {
            let free = Command::new("flock")
                .args(["-n", "-s"])
                .arg(&p)
                .arg("true")
                .status()
                .expect("flock");
            if !free.success() {
                return me;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(me);
        panic!("the child never took the hold");
    }
}

impl Drop for OtherBackup {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env(dir: &std::path::Path) -> HostEnv {
    HostEnv {
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        cgroup_parent: format!("stead-holds-{}", std::process::id()),
        netns: None,
        self_exe: PathBuf::from("/bin/true"),
        fence_file: None,
    }
}

fn resource(kind: Kind, spec: serde_json::Value) -> Resource {
    Resource {
        id: ResourceId::new(kind, "held"),
        metadata: stead_schema::Metadata {
            name: "held".parse().expect("name"),
            ..Default::default()
        },
        spec: Spec::from_value(kind, spec).expect("spec"),
        origin: Default::default(),
    }
}

#[test]
fn apply_waits_while_another_process_holds_the_workload() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = env(tmp.path());
    let world: BTreeMap<ResourceId, Resource> = BTreeMap::new();
    let cases: Vec<(Kind, serde_json::Value)> = vec![
        (
            Kind::VirtualMachine,
            serde_json::json!({"cpus": 1, "memory": "32Mi", "boot": {"kernel": "/k"}}),
        ),
        (
            Kind::Container,
            serde_json::json!({"rootfs": {"template": "/t.tar"}}),
        ),
    ];
    for (kind, spec) in cases {
        let driver: Box<dyn Driver> = match kind {
            Kind::VirtualMachine => match VmDriver::new(&env) {
                Ok(d) => Box::new(d),
                Err(e) => {
                    eprintln!("SKIP apply_waits_while_another_process_holds_the_workload: {e}");
                    return;
                }
            },
            _ => match ContainerDriver::new(&env) {
                Ok(d) => Box::new(d),
                Err(e) => {
                    eprintln!("SKIP apply_waits_while_another_process_holds_the_workload: {e}");
                    return;
                }
            },
        };
        let r = resource(kind, spec);
        let other = OtherBackup::hold(&env.run_dir, &kind.to_string(), "held");
        let e = driver
            .apply(&r, &Observed::absent(), &world)
            .expect_err("held by another process");
        assert!(e.retryable(), "{kind}: {e}");
        assert!(
            e.to_string().contains("held by a running backup"),
            "{kind}: {e}"
        );
        drop(other);
        // The backup is gone: its hold is stale, whatever process gets its pid next. The
        // lock goes with the last process holding its file: a short-lived child of the
        // shell (`mv`) may still be exiting, so allow it a moment.
        let k = kind.to_string();
        let released = (0..500).any(|_| {
            let ok = stead_drivers::supervise::hold::check(&env.run_dir, &k, "held").is_ok();
            if !ok {
                std::thread::sleep(Duration::from_millis(20));
            }
            ok
        });
        assert!(released, "{kind}: released");
    }
}

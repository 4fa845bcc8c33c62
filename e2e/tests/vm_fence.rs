//! A vmm-engine VM with HA placement on a cluster node: once the node's fence deadline
//! passes, its `stead vmm` supervisor kills the VM at once, records `fenced` and does not
//! restart it; a start while the node is fenced is refused (retryable). Driven through the
//! VM driver with the real `stead vmm` supervisor and stead's tiny demo guest under KVM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use stead_drivers::vm::VmDriver;
use stead_e2e::{Sandbox, kvm_ok, stead_bin};
use stead_host::fence::{FENCED, boottime_now, deadline_content};
use stead_reconciler::driver::{Driver, DriverError, HostEnv, Observed};
use stead_schema::{Resource, ResourceId};

/// The HA VM `fv` booting the demo guest at `kernel`.
fn ha_vm(kernel: &Path) -> Resource {
    let yaml = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: fv}}\nspec:\n  cpus: 1\n  memory: 32Mi\n  boot: {{kernel: {}, cmdline: \"mode=idle\"}}\n  restartPolicy: always\n  placement: {{ha: true}}\n",
        kernel.display()
    );
    let mut out = Vec::new();
    let mut errors = Vec::new();
    stead_schema::load::load_str(Path::new("fv.yaml"), &yaml, &mut out, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    out.pop().expect("one resource")
}

struct Rig {
    sb: Sandbox,
    driver: VmDriver,
    world: BTreeMap<ResourceId, Resource>,
    vm: Resource,
    fence: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let sb = Sandbox::new();
        let kernel = sb.path("images/tiny-guest.bin");
        sb.run(&["vmm", "--write-demo-guest", kernel.to_str().expect("utf-8")])
            .expect_code(0);
        let fence = sb.path("run/cluster/fence-deadline");
        std::fs::create_dir_all(fence.parent().expect("parent")).expect("mkdir");
        let env = HostEnv {
            state_dir: sb.path("state"),
            run_dir: sb.path("run"),
            cgroup_parent: sb.cgroup_parent.clone(),
            netns: None,
            self_exe: stead_bin(),
            fence_file: Some(fence.clone()),
        };
        let driver = VmDriver::new(&env).expect("VM driver");
        let vm = ha_vm(&kernel);
        let world = BTreeMap::from([(vm.id.clone(), vm.clone())]);
        Rig {
            sb,
            driver,
            world,
            vm,
            fence,
        }
    }

    fn observe(&self) -> Observed {
        let mut m = self
            .driver
            .observe(&[&self.vm], &self.world)
            .expect("observe");
        m.remove(&self.vm.id).expect("observed entry")
    }

    fn apply(&self) -> Result<(), DriverError> {
        self.driver.apply(&self.vm, &self.observe(), &self.world)
    }

    /// `supervisor.json` of the VM.
    fn supervisor_state(&self) -> Value {
        let p = self.sb.path("run/vms/fv/supervisor.json");
        serde_json::from_slice(&std::fs::read(&p).expect("supervisor.json")).expect("json")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Whatever happened: no VM, supervisor or cgroup left behind.
        let _ = std::fs::write(&self.fence, FENCED);
        if let Ok(mut m) = self.driver.observe(&[&self.vm], &self.world)
            && let Some(o) = m.remove(&self.vm.id)
        {
            let _ = self.driver.delete(&self.vm, &o, &self.world);
        }
    }
}

fn pid_alive(pid: i64) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[test]
fn an_ha_vmm_vm_is_killed_at_the_fence_deadline_and_not_started_while_fenced() {
    let test = "an_ha_vmm_vm_is_killed_at_the_fence_deadline_and_not_started_while_fenced";
    if !kvm_ok(test) {
        return;
    }
    let rig = Rig::new();
    let deadline = boottime_now() + Duration::from_secs(3);
    std::fs::write(&rig.fence, deadline_content(deadline)).expect("deadline");
    rig.apply().expect("apply");
    let t = Instant::now();
    let vmm = loop {
        if let Some(p) = rig.supervisor_state()["vmmPid"].as_i64() {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no VMM pid");
        std::thread::sleep(Duration::from_millis(20));
    };
    while pid_alive(vmm) {
        assert!(t.elapsed() < Duration::from_secs(10), "VMM still runs");
        std::thread::sleep(Duration::from_millis(5));
    }
    let gone = boottime_now();
    assert!(gone >= deadline, "killed before the deadline");
    let late = gone - deadline;
    println!("fence: VMM gone {} ms after the deadline", late.as_millis());
    assert!(late <= Duration::from_millis(500), "{late:?}");
    let t = Instant::now();
    while rig.supervisor_state()["phase"] != "fenced" {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{}",
            rig.supervisor_state()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = rig.supervisor_state();
    assert_eq!(st["restarts"], 0, "{st}");
    assert!(st["vmmPid"].is_null(), "{st}");
    // Fenced now: applying again is refused, retryable, and starts nothing.
    std::fs::write(&rig.fence, FENCED).expect("fenced");
    let err = rig.apply().expect_err("refused while fenced");
    assert!(err.to_string().contains("fenced"), "{err}");
    assert!(!err.is_terminal(), "{err}");
    assert!(rig.supervisor_state()["vmmPid"].is_null());
}

//! Shared by the container e2e tests and the container benchmark (examples/container_bench.rs,
//! which includes this file by path): both run as root in a private network namespace and
//! double as the shim binary.
#![allow(dead_code)]

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use stead_drivers::container::shim::{self, ShimArgs};
use stead_schema::{Kind, Metadata, Origin, Resource, ResourceId, Spec};

/// When started as `<this-binary> shim ...` (the ContainerDriver spawns
/// `HostEnv::self_exe shim ...`), runs the shim as `stead shim` does and exits with its code;
/// otherwise returns.
pub fn run_as_shim_if_asked(args: &[String]) {
    if args.get(1).map(String::as_str) == Some("shim") {
        let code = match ShimArgs::parse(args[2..].iter().cloned()) {
            Ok(a) => shim::main(&a),
            Err(e) => {
                eprintln!("shim: {e}");
                2
            }
        };
        std::process::exit(code);
    }
}

/// Creates `file` and bind-mounts a new, empty network namespace on it.
pub fn new_netns_on(file: &Path) {
    fs::File::create(file).expect("netns file");
    let target = file.to_path_buf();
    // unshare(CLONE_NEWNET) changes only the calling thread: do it on a thread that ends
    // right after, once the namespace is pinned by the bind mount.
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare net");
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind netns");
    })
    .join()
    .expect("netns thread");
}

/// Runs `args` inside the network namespace `netns`; must succeed. Returns stdout.
pub fn nsenter(netns: &Path, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .expect("nsenter");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A resource of `kind` named `name` with `spec` (JSON, as in a manifest).
pub fn resource(kind: Kind, name: &str, spec: Value) -> Resource {
    Resource {
        id: ResourceId::new(kind, name),
        metadata: Metadata {
            name: name.parse().expect("name"),
            ..Default::default()
        },
        spec: Spec::from_value(kind, spec).expect("spec"),
        origin: Origin::default(),
    }
}

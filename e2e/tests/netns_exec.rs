//! `ip netns exec NS stead …` (issue 12, item 7): `ip netns exec` remounts /sys, which
//! hides the cgroup file systems. Commands that only touch networks still work; one
//! that needs cgroups says why it cannot and what to run instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use stead_e2e::{Sandbox, is_root, skip_unless, stead_bin};

/// `ip netns exec <ns> stead <sandbox globals, no --netns> <args>`.
fn netns_exec(sb: &Sandbox, args: &[&str]) -> Output {
    let ns = sb.netns.as_deref().unwrap();
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(stead_bin())
        .arg("--state-dir")
        .arg(sb.path("state"))
        .arg("--run-dir")
        .arg(sb.path("run"))
        .args(["--cgroup-parent", &sb.cgroup_parent, "--color", "never"])
        .args(args)
        .output()
        .unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn show(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn link_exists(ns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", name])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn ip_netns_exec_manages_networks_and_explains_cgroups() {
    if skip_unless(
        is_root(),
        "ip_netns_exec_manages_networks_and_explains_cgroups",
        "needs root for a network namespace",
    ) {
        return;
    }
    let sb = Sandbox::with_netns();
    let ns = sb.netns.clone().unwrap();
    let net = sb.write(
        "net/n.yaml",
        "apiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {name: nxbr0}\nspec: {type: bridge, addresses: [10.79.0.1/24]}\n",
    );
    let net = net.parent().unwrap().to_str().unwrap();

    let o = netns_exec(&sb, &["validate", net]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    let o = netns_exec(&sb, &["diff", net]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    let o = netns_exec(&sb, &["apply", "--yes", net]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert!(link_exists(&ns, "nxbr0"), "bridge not created in {ns}");
    let o = netns_exec(&sb, &["diff", net]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    let o = netns_exec(&sb, &["get", "network"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("nxbr0"),
        "{}",
        show(&o)
    );

    // A container needs cgroups: a clear error naming the cause and the fix.
    let ct = sb.write(
        "ct/c.yaml",
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: Container\nmetadata: {{name: nxc}}\nspec:\n  rootfs: {{path: {}}}\n  command: [/bin/true]\n",
            sb.path("rootfs").display()
        ),
    );
    std::fs::create_dir_all(sb.path("rootfs")).unwrap();
    let o = netns_exec(&sb, &["diff", ct.parent().unwrap().to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ip netns exec") && err.contains("--netns") && err.contains("Container"),
        "{}",
        show(&o)
    );

    let o = netns_exec(&sb, &["destroy", "--yes", net]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert!(!link_exists(&ns, "nxbr0"));
}

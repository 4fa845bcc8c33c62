//! Issues 7 and 8: the controller exports environment metrics and tears down expired
//! environments (TTL) by itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;

use std::time::Duration;

use controller_util::*;
use stead_e2e::{Sandbox, is_root, skip_unless};

#[test]
fn controller_collects_expired_environments_and_exports_their_metrics() {
    let name = "controller_collects_expired_environments_and_exports_their_metrics";
    if skip_unless(is_root(), name, "needs root (network namespaces)") {
        return;
    }
    let sb = Sandbox::new();
    // The controller's own source: one volume.
    sb.write("m/all.yaml", &storage_yaml(&sb, &[("a", "1Mi")]));
    // The environment's manifests: a bridge and a volume.
    let env_yaml = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: ep}}\nspec: {{type: dir, path: {}}}\n---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: d}}\nspec: {{pool: ep, size: 1Mi}}\n---\napiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: lan0}}\nspec: {{addresses: [10.98.0.1/24]}}\n",
        sb.path("envpool").display()
    );
    sb.write("e/env.yaml", &env_yaml);
    let (short, long) = (
        format!("c{}s", std::process::id()),
        format!("c{}l", std::process::id()),
    );
    let e = sb.path("e");
    sb.run(&["env", "up", &short, e.to_str().unwrap(), "--ttl", "2s"])
        .expect_code(0);
    sb.run(&["env", "up", &long, e.to_str().unwrap(), "--ttl", "1h"])
        .expect_code(0);

    let m = sb.path("m");
    let ctl = Controller::start(&sb, &["--source", m.to_str().unwrap(), "--resync", "1s"]);
    within!(ctl, 20, ctl.metric("stead_environments") >= 1.0);
    let series = format!("stead_environment_age_seconds{{name=\"{long}\"}}");
    assert!(
        wait_until(Duration::from_secs(10), || metric(&ctl.scrape(), &series)
            .is_some())
        .is_some(),
        "{}",
        ctl.scrape()
    );
    // The short-lived environment is collected by the controller without any CLI call.
    let short_ns = std::path::Path::new("/run/netns").join(format!("stead-env-{short}"));
    ctl.expect(40, "expired environment not collected", || {
        !short_ns.exists()
    });
    assert!(
        wait_until(Duration::from_secs(40), || ctl.metric("stead_environments")
            == 1.0)
        .is_some(),
        "{}",
        ctl.scrape()
    );
    assert!(
        std::path::Path::new("/run/netns")
            .join(format!("stead-env-{long}"))
            .exists()
    );
    drop(ctl);
    sb.run(&["env", "down", &long]).expect_code(0);
}

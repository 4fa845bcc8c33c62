//! The screen page (noVNC) in a real browser against a controller that runs a QEMU VM
//! (TCG) with a blank disk: the VM's firmware screen (SeaBIOS on the VGA adapter) is
//! enough. The page connects through the controller's websocket to the VM's VNC unix
//! socket and its canvas draws the firmware's text (more lit pixels than QEMU's "no
//! graphic display device" notice, about 940); a viewer may not open the websocket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;
mod qemu_util;
mod ui_util;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use controller_util::*;
use qemu_util::QemuSandbox;
use stead_e2e::Sandbox;
use stead_e2e::browser::Browser;
use ui_util::*;

const TEST: &str = "ui_screen_novnc_draws_a_qemu_vms_display";

/// Stops what the manifests own when the test ends (after the controller).
struct Destroy<'a>(&'a Sandbox, PathBuf);

impl Drop for Destroy<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .cmd()
            .args(["destroy", "--yes", "--allow-data-loss"])
            .arg(&self.1)
            .output();
    }
}

/// How many pixels of the screen's canvas are not black (-1: no canvas yet).
fn lit_pixels(b: &Browser) -> i64 {
    b.js(
        "var c = document.querySelector('#screen canvas');
         if (!c || !c.width || !c.height) { return -1; }
         var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
         var n = 0;
         for (var i = 0; i < d.length; i += 4) { if (d[i] + d[i + 1] + d[i + 2] > 60) { n++; } }
         return n;",
        vec![],
    )
    .as_i64()
    .unwrap_or(-1)
}

#[test]
fn ui_screen_novnc_draws_a_qemu_vms_display() {
    if !stead_e2e::is_root() {
        eprintln!("SKIP {TEST}: needs root");
        println!("SKIP {TEST}: needs root");
        return;
    }
    if !stead_e2e::qemu_ok(TEST) {
        return;
    }
    let Some(b) = Browser::start(TEST) else {
        return;
    };
    let q = QemuSandbox::new();
    let sb = &q.sb;
    let repo = Repo::new(sb);
    let _destroy = Destroy(sb, repo.work.clone());
    let manifest = format!(
        "{}---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: blank}}\n\
         spec: {{pool: vms, size: 64Mi, format: qcow2}}\n\
         ---\napiVersion: stead.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: q1}}\n\
         spec:\n  engine: qemu\n  accel: tcg\n  firmware: bios\n  cpus: 1\n  memory: 128Mi\n  \
         disks: [{{volume: blank, boot: 1}}]\n  restartPolicy: never\n",
        qemu_util::pool(sb)
    );
    let c1 = repo.commit("a QEMU VM", &[("all.yaml", &manifest)]);
    let mut args: Vec<String> = ["--source", &repo.source(), "--interval", "1s"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(ui_flags(sb));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ctl = Controller::start(sb, &args);
    ctl.expect_revision(60, &c1);
    let vnc = q.paths("q1").vnc_socket();
    within!(ctl, 120, vnc.exists());
    let port = ctl.port;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
        let dir = vnc.parent().unwrap();
        eprintln!(
            "{TEST}: VNC socket {:o}, its dir {:o}",
            mode(&vnc).unwrap_or(0),
            mode(dir).unwrap_or(0)
        );
        assert!(
            mode(dir).is_ok_and(|m| m & 0o007 == 0),
            "others may not reach the VNC socket"
        );
    }

    // A viewer may not open the VM's screen.
    let (cookie, _) = api_login(port, "vic");
    let a = request(
        port,
        "GET",
        "/screen/VirtualMachine/q1/ws",
        &[
            ("Cookie", &cookie),
            ("Origin", &format!("http://127.0.0.1:{port}")),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        "",
    );
    assert_eq!(a.status, 403, "{a:?}");

    browser_login(&b, port, "ann");
    b.goto(&format!(
        "http://127.0.0.1:{port}/resources/VirtualMachine/q1"
    ));
    b.click("a[href='/screen/VirtualMachine/q1']");
    let t0 = Instant::now();
    b.wait(Duration::from_secs(30), |b| {
        b.text("#screen-state").as_deref() == Some("connected")
    })
    .unwrap_or_else(|| {
        panic!(
            "not connected: {:?}\n{}",
            b.text("#screen-state"),
            ctl.logs()
        )
    });
    b.wait(Duration::from_secs(60), |b| lit_pixels(b) > 1500)
        .unwrap_or_else(|| {
            panic!(
                "the screen stayed blank ({} lit pixels)\n{}",
                lit_pixels(&b),
                ctl.logs()
            )
        });
    eprintln!(
        "{TEST}: firmware screen drawn {:?} after the page connected ({} lit pixels)",
        t0.elapsed(),
        lit_pixels(&b)
    );
    let shot = b.screenshot("screen");
    axe_check(&b, TEST, "screen");

    // Disconnect leaves the VM running; connect again draws again.
    b.click("#screen-detach");
    b.wait_text("#screen-state", "disconnected", Duration::from_secs(10));
    b.click("#screen-detach");
    b.wait(Duration::from_secs(15), |b| {
        b.text("#screen-state").as_deref() == Some("connected")
    })
    .expect("connected again");
    assert!(vnc.exists(), "the VM still runs");
    let _ = std::fs::copy(&ctl.log, b.out_dir().join("controller.log"));
    maybe_update_doc_image(&shot, "ui-screen.png");
}

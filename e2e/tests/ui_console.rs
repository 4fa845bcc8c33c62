//! The console page's terminal (xterm.js) in a real browser: a busybox container's
//! shell on its console shows its output, takes keys typed into the terminal, and the
//! terminal fits a wider window. The page keeps its plain fallback for browsers without
//! the script.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;
mod ui_util;

use std::path::PathBuf;
use std::time::Duration;

use controller_util::*;
use stead_e2e::browser::Browser;
use stead_e2e::{Sandbox, busybox_ok};
use ui_util::*;

const TEST: &str = "ui_console_xterm_shows_output_and_takes_keys";

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

#[test]
fn ui_console_xterm_shows_output_and_takes_keys() {
    if !busybox_ok(TEST) {
        return;
    }
    let Some(b) = Browser::start(TEST) else {
        return;
    };
    let sb = Sandbox::with_netns();
    let root = sb.busybox_rootfs();
    let repo = Repo::new(&sb);
    let _destroy = Destroy(&sb, repo.work.clone());
    let manifest = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: Container\nmetadata: {{name: sh1}}\nspec:\n  \
         rootfs: {{path: {root}}}\n  unprivileged: false\n  command: [/bin/sh, -i]\n",
        root = root.display()
    );
    let c1 = repo.commit("a shell", &[("all.yaml", &manifest)]);
    let mut args: Vec<String> = ["--source", &repo.source(), "--interval", "1s"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(ui_flags(&sb));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ctl = Controller::start(&sb, &args);
    ctl.expect_revision(30, &c1);
    within!(ctl, 30, ctl.status()["lastResult"] == "success");
    let port = ctl.port;

    browser_login(&b, port, "ann");
    b.goto(&format!("http://127.0.0.1:{port}/console/Container/sh1"));
    b.wait_text("#console-state", "attached", Duration::from_secs(15));
    assert_eq!(
        b.attr("#console-term", "data-ready").as_deref(),
        Some("true"),
        "xterm.js did not start\n{}",
        b.source()
    );
    assert!(
        b.attr("#console-screen", "class")
            .is_some_and(|c| c.contains("hidden")),
        "the plain view is hidden under the terminal"
    );

    // Keys typed into the terminal reach the shell (Enter is a carriage return, which
    // the container's tty turns into a newline); its answer shows in the terminal.
    b.type_into(".xterm-helper-textarea", "echo $((6*7))-from-xterm\n");
    wait_terminal(&b, "42-from-xterm", Duration::from_secs(10));
    // The line field still sends whole lines.
    b.type_into("#console-line", "echo field-$((2+3))");
    b.click("form.console-input button[type=submit]");
    wait_terminal(&b, "field-5", Duration::from_secs(10));
    let shot = b.screenshot("console-xterm");
    axe_check(&b, TEST, "console");

    // The terminal fits a wider window.
    let width = |b: &Browser| {
        b.js(
            "return document.querySelector('#console-term .xterm-screen').clientWidth;",
            vec![],
        )
        .as_f64()
        .unwrap_or(0.0)
    };
    b.window_size(900, 800);
    std::thread::sleep(Duration::from_millis(300));
    let narrow = width(&b);
    b.window_size(1500, 800);
    b.wait(Duration::from_secs(5), |b| width(b) > narrow + 200.0)
        .unwrap_or_else(|| panic!("the terminal stayed {narrow} px wide"));

    // Detach and attach again: the shell is still there.
    b.click("#console-detach");
    b.wait_text("#console-state", "detached", Duration::from_secs(5));
    b.click("#console-detach");
    b.wait_text("#console-state", "attached", Duration::from_secs(10));
    b.type_into(".xterm-helper-textarea", "echo again-$((1+1))\n");
    wait_terminal(&b, "again-2", Duration::from_secs(10));
    let _ = std::fs::copy(&ctl.log, b.out_dir().join("controller.log"));
    maybe_update_doc_image(&shot, "ui-console.png");
}

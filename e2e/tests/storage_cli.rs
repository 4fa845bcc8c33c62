//! Issue 2 acceptance: the real `stead` binary converging dir pools and raw volumes.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;

use stead_e2e::Sandbox;

fn manifest(sb: &Sandbox, volumes: &[(&str, &str, &str)]) -> std::path::PathBuf {
    let mut text = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\nspec: {{type: dir, path: {}}}\n",
        sb.path("pools/local").display()
    );
    for (name, size, policy) in volumes {
        text.push_str(&format!(
            "---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec: {{pool: local, size: {size}, deletionPolicy: {policy}}}\n"
        ));
    }
    sb.write("m/storage.yaml", &text);
    sb.path("m")
}

fn image(sb: &Sandbox, name: &str) -> std::path::PathBuf {
    sb.path(&format!("pools/local/images/{name}.raw"))
}

#[test]
fn apply_diff_grow_prune_and_refuse_shrink() {
    let sb = Sandbox::new();
    let m = manifest(&sb, &[("a", "16Mi", "Delete"), ("b", "16Mi", "Retain")]);
    let m = m.to_str().unwrap();

    let out = sb.run(&["diff", m]).expect_code(2);
    assert!(out.stdout().contains("+ Volume/a"), "{}", out.stdout());

    sb.run(&["apply", "--yes", m]).expect_code(0);
    let meta = std::fs::metadata(image(&sb, "a")).unwrap();
    assert_eq!(meta.len(), 16 << 20);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "volume must be sparse, uses {} blocks",
        meta.blocks()
    );

    let out = sb.run(&["diff", m]).expect_code(0);
    assert!(out.stdout().contains("No changes"), "{}", out.stdout());
    // A second apply is a no-op.
    sb.run(&["apply", "--yes", m]).expect_code(0);

    let m2 = manifest(&sb, &[("a", "32Mi", "Delete"), ("b", "16Mi", "Retain")]);
    let m2 = m2.to_str().unwrap();
    let out = sb.run(&["diff", m2]).expect_code(2);
    assert!(out.stdout().contains("~ Volume/a"), "{}", out.stdout());
    assert!(
        out.stdout().contains("size: 16Mi -> 32Mi"),
        "{}",
        out.stdout()
    );
    let json = sb.run(&["diff", "-o", "json", m2]).expect_code(2);
    let v: serde_json::Value = serde_json::from_str(&json.stdout()).unwrap();
    assert_eq!(v["summary"]["update"], 1);
    assert_eq!(v["changes"][0]["impact"], "hot");

    sb.run(&["apply", "--yes", m2]).expect_code(0);
    assert_eq!(std::fs::metadata(image(&sb, "a")).unwrap().len(), 32 << 20);

    let out = sb.run(&["get", "volume", "-o", "json"]).expect_code(0);
    let v: serde_json::Value = serde_json::from_str(&out.stdout()).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    let out = sb.run(&["get"]).expect_code(0);
    assert!(
        out.stdout().contains("Volume") && out.stdout().contains("Ready"),
        "{}",
        out.stdout()
    );
    // One resource: its events too (created, then updated by the grow).
    let out = sb.run(&["get", "volume/a"]).expect_code(0);
    let text = out.stdout();
    let events = text.split("Events (newest last):").nth(1).unwrap_or("");
    assert!(
        events.contains("Created") && events.contains("Updated"),
        "{text}"
    );
    let out = sb.run(&["get", "volume/a", "-o", "json"]).expect_code(0);
    let v: serde_json::Value = serde_json::from_str(&out.stdout()).unwrap();
    let reasons: Vec<&str> = v["items"][0]["status"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert_eq!(reasons, ["Created", "Updated"], "{v}");

    // Remove both volumes: the Delete one goes, the Retain one stays on disk.
    let m3 = manifest(&sb, &[]);
    let m3 = m3.to_str().unwrap();
    let out = sb.run(&["apply", "--yes", m3]).expect_code(0);
    assert!(out.stdout().contains("- Volume/a"), "{}", out.stdout());
    assert!(out.stdout().contains("= Volume/b"), "{}", out.stdout());
    assert!(!image(&sb, "a").exists(), "Delete volume removed");
    assert!(image(&sb, "b").exists(), "Retain volume kept");
    sb.run(&["diff", m3]).expect_code(0);

    // Shrink is refused.
    let m4 = manifest(&sb, &[("c", "32Mi", "Delete")]);
    sb.run(&["apply", "--yes", m4.to_str().unwrap()])
        .expect_code(0);
    let m5 = manifest(&sb, &[("c", "16Mi", "Delete")]);
    let out = sb
        .run(&["apply", "--yes", m5.to_str().unwrap()])
        .expect_code(1);
    let text = out.stdout() + &out.stderr();
    assert!(text.contains("shrink"), "{text}");
    assert_eq!(
        std::fs::metadata(image(&sb, "c")).unwrap().len(),
        32 << 20,
        "nothing changed"
    );

    // destroy removes what the manifests own; the Delete volume goes.
    sb.run(&["destroy", "--yes", m4.to_str().unwrap()])
        .expect_code(0);
    assert!(!image(&sb, "c").exists());
}

#[test]
fn unowned_directory_is_a_plan_error() {
    let sb = Sandbox::new();
    sb.write("pools/local/precious.txt", "user data");
    let m = manifest(&sb, &[]);
    let out = sb.run(&["diff", m.to_str().unwrap()]).expect_code(1);
    assert!(
        out.stdout().contains("not owned by stead"),
        "{}",
        out.stdout()
    );
    sb.run(&["apply", "--yes", m.to_str().unwrap()])
        .expect_code(1);
    assert_eq!(
        std::fs::read_to_string(sb.path("pools/local/precious.txt")).unwrap(),
        "user data"
    );
}

#[test]
fn validate_reports_all_errors_with_locations() {
    let sb = Sandbox::new();
    let p = sb.write(
        "bad.yaml",
        "apiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {name: v}\nspec: {pool: nowhere, size: 1Zi}\n---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {name: w}\nspec: {pool: nowhere, size: 1Mi, colour: red}\n",
    );
    let out = sb.run(&["validate", p.to_str().unwrap()]).expect_code(1);
    let err = out.stderr();
    assert!(err.contains("bad.yaml:4:29: spec.size"), "{err}");
    assert!(
        err.contains("bad.yaml:9:34: spec.colour: unknown field"),
        "{err}"
    );
    // Both volumes failed to load and are still checked: their pool is not defined.
    assert!(
        err.contains("bad.yaml:4:14: Volume/v spec.pool: Volume/v references StoragePool/nowhere"),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml:9:14: Volume/w spec.pool: Volume/w references StoragePool/nowhere"),
        "{err}"
    );
    assert!(err.contains("4 error(s)"), "{err}");
}

#[test]
fn crash_mid_apply_then_reapply_converges() {
    let sb = Sandbox::new();
    let vols: Vec<(String, &str, &str)> = (0..24)
        .map(|i| (format!("v{i:02}"), "4Mi", "Delete"))
        .collect();
    let refs: Vec<(&str, &str, &str)> = vols.iter().map(|(n, s, p)| (n.as_str(), *s, *p)).collect();
    let m = manifest(&sb, &refs);
    let mut child = sb
        .cmd()
        .args(["apply", "--yes", "--parallelism", "2", m.to_str().unwrap()])
        .env("STEAD_TEST_PAUSE_AFTER_STEPS", "9")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut paused = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if line.contains("pausing after") {
            paused = true;
            break;
        }
    }
    assert!(paused, "the test hook did not pause the apply");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let made = std::fs::read_dir(sb.path("pools/local/images"))
        .unwrap()
        .count();
    assert!(made < 24, "the crash must happen mid-apply ({made} files)");

    sb.run(&["apply", "--yes", m.to_str().unwrap()])
        .expect_code(0);
    sb.run(&["diff", m.to_str().unwrap()]).expect_code(0);
    let mut names: Vec<String> = std::fs::read_dir(sb.path("pools/local/images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".stead"))
        .collect();
    names.sort();
    let want: Vec<String> = (0..24).map(|i| format!("v{i:02}.raw")).collect();
    assert_eq!(names, want, "exactly the declared volumes, no stray files");
}

#[test]
fn second_apply_waits_for_the_lock() {
    let sb = Sandbox::new();
    let m = manifest(&sb, &[("a", "1Mi", "Delete")]);
    let mut child = sb
        .cmd()
        .args(["apply", "--yes", m.to_str().unwrap()])
        .env("STEAD_TEST_PAUSE_AFTER_STEPS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    for line in BufReader::new(stderr).lines() {
        if line.unwrap().contains("pausing after") {
            break;
        }
    }
    let out = sb
        .run(&[
            "apply",
            "--yes",
            "--lock-timeout",
            "500ms",
            m.to_str().unwrap(),
        ])
        .expect_code(1);
    assert!(out.stderr().contains("holds the lock"), "{}", out.stderr());
    child.kill().unwrap();
    child.wait().unwrap();
    sb.run(&["apply", "--yes", m.to_str().unwrap()])
        .expect_code(0);
}

/// Fault matrix: SIGKILL at every step of a small mixed manifest (a bridge, a pool, three
/// volumes), both after a step finished and in the middle of one (after the host change,
/// before the state update). Each time the next apply converges: exit 0, `diff` clean,
/// exactly the declared objects (no duplicate, no stray or temp file, no extra link), and
/// the inventory knows all of them.
#[test]
fn sigkill_at_every_step_then_reapply_converges() {
    if stead_e2e::skip_unless(
        stead_e2e::is_root(),
        "sigkill_at_every_step_then_reapply_converges",
        "needs root (netns)",
    ) {
        return;
    }
    for step in 1..=STEPS_IN_MANIFEST {
        for hook in ["STEAD_TEST_PAUSE_AFTER_STEPS", "STEAD_TEST_PAUSE_MID_STEP"] {
            kill_at_then_converge(hook, step);
        }
    }
}

fn mixed_manifest(sb: &Sandbox) -> std::path::PathBuf {
    let m = manifest(
        sb,
        &[
            ("v0", "1Mi", "Delete"),
            ("v1", "2Mi", "Delete"),
            ("v2", "1Mi", "Delete"),
        ],
    );
    sb.write(
        "m/net.yaml",
        "apiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {name: fm0}\nspec: {type: bridge, addresses: [10.231.7.1/24]}\n",
    );
    m
}

fn kill_at_then_converge(hook: &str, step: usize) {
    let sb = Sandbox::with_netns();
    let ns = sb.netns.clone().unwrap();
    let m = mixed_manifest(&sb);
    let mut child = sb
        .cmd()
        .args(["apply", "--yes", "--parallelism", "1", m.to_str().unwrap()])
        .env(hook, step.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let paused = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("test hook: pausing"));
    assert!(paused, "{hook}={step}: the hook did not pause the apply");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let what = format!("{hook}={step}");
    sb.run(&["apply", "--yes", m.to_str().unwrap()])
        .expect_code(0);
    sb.run(&["diff", m.to_str().unwrap()]).expect_code(0);
    let mut files: Vec<String> = std::fs::read_dir(sb.path("pools/local/images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".stead"))
        .collect();
    files.sort();
    assert_eq!(files, ["v0.raw", "v1.raw", "v2.raw"], "{what}: pool files");
    assert_eq!(
        std::fs::metadata(image(&sb, "v1")).unwrap().len(),
        2 << 20,
        "{what}"
    );
    let links = std::process::Command::new("ip")
        .args(["-n", &ns, "-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    let ours: Vec<&str> = links
        .lines()
        .filter(|l| l.contains("alias stead:"))
        .collect();
    assert_eq!(ours.len(), 1, "{what}: one stead link\n{links}");
    assert!(ours[0].contains(": fm0:"), "{what}: {links}");
    let get = sb.run(&["get", "-o", "json"]).expect_code(0);
    let v: serde_json::Value = serde_json::from_str(&get.stdout()).unwrap();
    assert_eq!(
        v["items"].as_array().unwrap().len(),
        STEPS_IN_MANIFEST,
        "{what}: inventory"
    );
}

const STEPS_IN_MANIFEST: usize = 5;

/// A driver whose observe panics (test hook) makes `diff` and `apply` exit 1 with an error
/// naming each of its resources, and nothing of that kind is created or deleted.
#[test]
fn panicking_observe_fails_the_plan_and_touches_nothing() {
    let sb = Sandbox::new();
    let m = manifest(&sb, &[("a", "1Mi", "Delete")]);
    sb.run(&["apply", "--yes", m.to_str().unwrap()])
        .expect_code(0);
    // `a` left the manifests and `b` joined: a delete and a create, were Volume observed.
    let m2 = manifest(&sb, &[("b", "1Mi", "Delete")]);
    for args in [vec!["diff"], vec!["apply", "--yes"]] {
        let out = sb
            .cmd()
            .args(&args)
            .arg(&m2)
            .env("STEAD_TEST_PANIC_OBSERVE", "Volume")
            .output()
            .unwrap();
        let out = stead_e2e::Run(out).expect_code(1);
        let text = out.stdout() + &out.stderr();
        for v in ["Volume/a", "Volume/b"] {
            assert!(
                text.contains(&format!("{v}: cannot observe Volume: observe panicked")),
                "{args:?}: {v}\n{text}"
            );
        }
        assert!(
            !text.contains("(create") && !text.contains("(delete"),
            "{text}"
        );
    }
    assert!(image(&sb, "a").exists(), "a is not deleted");
    assert!(!image(&sb, "b").exists(), "b is not created");
}

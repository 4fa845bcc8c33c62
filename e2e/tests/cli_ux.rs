//! The CLI habits of issue 19 part 3: the CI examples that post `stead diff -o markdown`
//! on pull requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use stead_e2e::{Sandbox, skip_unless, stead_bin};

/// The repository root (the e2e crate's parent).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Whether `prog --version` runs.
fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether python3 with PyYAML is there; prints the SKIP line when not.
fn pyyaml_ok(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import yaml"])
        .status()
        .is_ok_and(|s| s.success());
    !skip_unless(ok, test, "needs python3 with PyYAML")
}

/// Python that prints the shell of one CI file's job: the `run:` of its steps (GitHub,
/// Forgejo) or its `script:` lines (GitLab), joined.
const EXTRACT_SHELL: &str = r#"
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
parts = []
for name, job in (doc.get("jobs") or {}).items():
    for step in job.get("steps", []):
        if "run" in step:
            parts.append(step["run"])
for name, job in doc.items():
    if isinstance(job, dict) and "script" in job:
        parts.extend(job["script"])
print("\n".join(parts))
"#;

/// The shell a CI file runs (see [`EXTRACT_SHELL`]).
fn ci_shell(file: &Path) -> String {
    let out = Command::new("python3")
        .args(["-c", EXTRACT_SHELL])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn ci_examples_parse_and_their_shell_is_valid() {
    if !pyyaml_ok("ci_examples_parse_and_their_shell_is_valid") {
        return;
    }
    let dir = repo_root().join("examples/ci");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    for name in [
        "github-pr-plan.yml",
        "gitlab-mr-plan.yml",
        "forgejo-pr-plan.yml",
    ] {
        assert!(
            files.contains(&dir.join(name)),
            "{name} missing in {files:?}"
        );
    }
    for f in &files {
        let shell = ci_shell(f);
        assert!(!shell.trim().is_empty(), "{}: no shell found", f.display());
        let st = Command::new("bash")
            .args(["-n", "-c", &shell])
            .status()
            .unwrap();
        assert!(st.success(), "{}: bash -n failed on\n{shell}", f.display());
        let text = std::fs::read_to_string(f).unwrap();
        assert!(text.starts_with('#'), "{}: no header comment", f.display());
        if f.file_name().unwrap().to_str().unwrap().contains("-plan") {
            assert!(shell.contains("stead diff -o markdown"), "{}", f.display());
            assert!(shell.contains("<!-- stead-plan -->"), "{}", f.display());
        }
    }
}

/// The fake forge API (`cli_ux_util/fake_forge.py`), killed on drop.
struct FakeForge {
    child: Child,
    port: u16,
    state: PathBuf,
}

impl FakeForge {
    fn start(sb: &Sandbox, auth_header: &str, auth_value: &str) -> FakeForge {
        let state = sb.path("forge.json");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli_ux_util/fake_forge.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(&state)
            .args([auth_header, auth_value])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("fake forge port");
        FakeForge { child, port, state }
    }

    /// The comments it holds: `(id, body)`.
    fn comments(&self) -> Vec<(u64, String)> {
        let text = std::fs::read_to_string(&self.state).unwrap_or_else(|_| "[]".into());
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["id"].as_u64().unwrap(),
                    c["body"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

impl Drop for FakeForge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A checkout with `deploy/` holding a dir pool and a volume in the sandbox, and a
/// `bin/stead` that runs the binary under test with the sandbox's state.
fn checkout(sb: &Sandbox) -> PathBuf {
    let work = sb.path("checkout");
    sb.write(
        "checkout/deploy/storage.yaml",
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\nspec: {{type: dir, path: {}}}\n---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: data}}\nspec: {{pool: local, size: 1Mi}}\n",
            sb.path("pools/local").display()
        ),
    );
    let wrapper = sb.write(
        "bin/stead",
        &format!(
            "#!/bin/sh\nexec '{}' --state-dir '{}' --run-dir '{}' --color never \"$@\"\n",
            stead_bin().display(),
            sb.path("state").display(),
            sb.path("run").display()
        ),
    );
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    work
}

/// Runs `shell` as a CI job would (`bash -eo pipefail`) in `dir` with `env` and the
/// sandbox's `bin/` first on PATH; returns (success, stderr).
fn run_job(sb: &Sandbox, dir: &Path, shell: &str, env: &[(&str, String)]) -> (bool, String) {
    let path = format!(
        "{}:{}",
        sb.path("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-eo", "pipefail", "-c", shell])
        .current_dir(dir)
        .env("PATH", path)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs one forge's example job twice against the fake API and checks it left one
/// comment with the plan (posted, then updated in place).
fn one_sticky_comment(
    test: &str,
    file: &str,
    auth: (&str, &str),
    env: impl Fn(u16) -> Vec<(&'static str, String)>,
) {
    if !pyyaml_ok(test) || skip_unless(have("jq") && have("curl"), test, "needs jq and curl") {
        return;
    }
    let sb = Sandbox::new();
    let dir = checkout(&sb);
    let forge = FakeForge::start(&sb, auth.0, auth.1);
    let shell = ci_shell(&repo_root().join("examples/ci").join(file));
    let (ok, err) = run_job(&sb, &dir, &shell, &env(forge.port));
    assert!(ok, "{file}: first run failed: {err}");
    let first = forge.comments();
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(
        first[0]
            .1
            .starts_with("<!-- stead-plan -->\n### stead plan: 2 to create"),
        "{}",
        first[0].1
    );
    assert!(
        first[0].1.contains("<code>+ Volume/data</code>"),
        "{}",
        first[0].1
    );

    // A second push: the same comment is updated, none is added.
    sb.write("checkout/deploy/broken.yaml", "apiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {name: bad}\nspec: {pool: nowhere}\n");
    let (ok, _) = run_job(&sb, &dir, &shell, &env(forge.port));
    assert!(!ok, "{file}: invalid manifests must fail the job");
    let second = forge.comments();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(second[0].0, first[0].0);
    assert!(
        second[0].1.contains("the manifests do not validate"),
        "{}",
        second[0].1
    );
    assert!(second[0].1.contains("broken.yaml"), "{}", second[0].1);
}

#[test]
fn gitlab_example_keeps_one_merge_request_note_with_the_plan() {
    one_sticky_comment(
        "gitlab_example_keeps_one_merge_request_note_with_the_plan",
        "gitlab-mr-plan.yml",
        ("PRIVATE-TOKEN", "glpat-test"),
        |port| {
            vec![
                ("CI_API_V4_URL", format!("http://127.0.0.1:{port}/api/v4")),
                ("CI_PROJECT_ID", "42".into()),
                ("CI_MERGE_REQUEST_IID", "7".into()),
                ("STEAD_PLAN_TOKEN", "glpat-test".into()),
            ]
        },
    );
}

#[test]
fn forgejo_example_keeps_one_pull_request_comment_with_the_plan() {
    one_sticky_comment(
        "forgejo_example_keeps_one_pull_request_comment_with_the_plan",
        "forgejo-pr-plan.yml",
        ("Authorization", "token fj-test"),
        |port| {
            vec![
                (
                    "REPO_API",
                    format!("http://127.0.0.1:{port}/api/v1/repos/o/r"),
                ),
                ("PR", "7".into()),
                ("TOKEN", "fj-test".into()),
            ]
        },
    );
}

/// A sandbox whose state owns a dir pool and two volumes (applied for real).
fn sandbox_with_resources() -> Sandbox {
    let sb = Sandbox::new();
    let m = sb.write(
        "m/storage.yaml",
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\nspec: {{type: dir, path: {}}}\n---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: web-data}}\nspec: {{pool: local, size: 1Mi, deletionPolicy: Delete}}\n---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: db-data}}\nspec: {{pool: local, size: 1Mi, deletionPolicy: Delete}}\n",
            sb.path("pools/local").display()
        ),
    );
    sb.run(&["apply", "--yes", m.to_str().unwrap()])
        .expect_code(0);
    sb
}

/// The candidates `stead` offers for the last of `words` (`stead get Vol` …), asked the
/// way the bash script asks, with the sandbox's state dir in the environment.
fn candidates(sb: &Sandbox, words: &[&str]) -> (Vec<String>, String) {
    let out = Command::new(stead_bin())
        .arg("--")
        .args(words)
        .env("STEAD_COMPLETE", "bash")
        .env("_CLAP_COMPLETE_INDEX", (words.len() - 1).to_string())
        .env("_CLAP_IFS", "\n")
        .env("STEAD_STATE_DIR", sb.path("state"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('-'))
        .map(str::to_string)
        .collect();
    (list, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn resource_arguments_complete_kind_and_name_from_the_state_dir() {
    let sb = sandbox_with_resources();
    let (all, err) = candidates(&sb, &["stead", "get", ""]);
    assert_eq!(
        all,
        ["StoragePool/local", "Volume/db-data", "Volume/web-data"]
    );
    assert_eq!(err, "");
    let (vols, _) = candidates(&sb, &["stead", "get", "vol"]);
    assert_eq!(vols, ["Volume/db-data", "Volume/web-data"]);
    let (one, _) = candidates(&sb, &["stead", "snapshot", "create", "Volume/w"]);
    assert_eq!(one, ["Volume/web-data"]);
    // Second positional of `snapshot create` is the snapshot name: no resources there.
    let (snap, _) = candidates(&sb, &["stead", "snapshot", "create", "Volume/web-data", ""]);
    assert_eq!(snap, Vec::<String>::new());
    // Workload arguments offer workloads only.
    let (workloads, _) = candidates(&sb, &["stead", "console", ""]);
    assert_eq!(workloads, Vec::<String>::new());
    // Subcommands still complete.
    let (subs, _) = candidates(&sb, &["stead", "snaps"]);
    assert_eq!(subs, ["snapshot"]);
}

#[test]
fn completion_without_state_is_silent() {
    let sb = Sandbox::new();
    let (list, err) = candidates(&sb, &["stead", "get", ""]);
    assert_eq!(list, Vec::<String>::new());
    assert_eq!(err, "");
    assert!(
        !sb.path("state").exists(),
        "completion created the state dir"
    );
}

#[test]
fn the_bash_script_completes_resources_in_a_real_bash() {
    let test = "the_bash_script_completes_resources_in_a_real_bash";
    if skip_unless(have("bash"), test, "needs bash") {
        return;
    }
    let sb = sandbox_with_resources();
    let bin = sb.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(stead_bin(), bin.join("stead")).unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = sb.run(&["completions", shell]).expect_code(0);
        assert!(
            out.stdout().contains("STEAD_COMPLETE"),
            "{shell}: {}",
            out.stdout()
        );
    }
    let script = sb.run(&["completions", "bash"]).expect_code(0).stdout();
    sb.write("stead.bash", &script);
    let probe = format!(
        "source '{}'\nCOMP_WORDS=(stead snapshot list Vol)\nCOMP_CWORD=3\nCOMP_TYPE=9\n_clap_complete_stead stead Vol stead\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        sb.path("stead.bash").display()
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &probe])
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("STEAD_STATE_DIR", sb.path("state"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["Volume/db-data", "Volume/web-data"],
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn man_writes_a_page_per_subcommand_with_header_and_name() {
    let sb = Sandbox::new();
    let dir = sb.path("man");
    let run = sb
        .run(&["man", "--out", dir.to_str().unwrap()])
        .expect_code(0);
    assert!(
        run.stderr().contains("manual pages written"),
        "{}",
        run.stderr()
    );
    for cmd in [
        "stead",
        "stead-apply",
        "stead-diff",
        "stead-snapshot-rollback",
        "stead-completions",
    ] {
        let page = std::fs::read_to_string(dir.join(format!("{cmd}.1")))
            .unwrap_or_else(|e| panic!("{cmd}.1: {e}"));
        let th = page
            .lines()
            .find(|l| l.starts_with(".TH "))
            .unwrap_or_else(|| panic!("{cmd}.1 has no .TH"));
        assert!(th.starts_with(&format!(".TH {cmd} 1 ")), "{th}");
        assert!(th.contains("\"stead manual\""), "{th}");
        let name = page
            .split(".SH NAME\n")
            .nth(1)
            .unwrap_or_else(|| panic!("{cmd}.1 has no NAME"));
        assert!(
            name.starts_with(&cmd.replace('-', "\\-")),
            "{cmd}.1 NAME: {name:.60}"
        );
        assert!(page.contains(".SH SYNOPSIS"), "{cmd}.1");
    }
    assert!(
        !dir.join("stead-shim.1").exists(),
        "hidden subcommands get no page"
    );
    // Without --out: stead.1 on stdout.
    let top = sb.run(&["man"]).expect_code(0).stdout();
    assert!(top.contains(".TH stead 1 "), "{top:.200}");
    if have("man") {
        let out = Command::new("man")
            .args(["-l", "-P", "cat"])
            .arg(dir.join("stead-diff.1"))
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("markdown"), "{text}");
    }
}

/// Every file under `root` with its mode and a digest of its content, sorted.
fn tree(root: &Path) -> Vec<(String, u32, u64)> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
                continue;
            }
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(&p).unwrap().hash(&mut h);
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            out.push((rel, mode, h.finish()));
        }
    }
    out.sort();
    out
}

#[test]
fn the_installer_stages_binaries_pages_completions_and_unit_under_destdir() {
    let test = "the_installer_stages_binaries_pages_completions_and_unit_under_destdir";
    let from = stead_bin().parent().unwrap().to_path_buf();
    if skip_unless(
        from.join("stead-supervise").exists(),
        test,
        "stead-supervise is not built (cargo build --bin stead-supervise)",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let dest = sb.path("pkg");
    let install = || {
        let out = Command::new(repo_root().join("scripts/install.sh"))
            .args(["--prefix", "/usr", "--systemd", "--destdir"])
            .arg(&dest)
            .arg("--from")
            .arg(&from)
            .env("SOURCE_DATE_EPOCH", "1780000000")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    install();
    let first = tree(&dest);
    let files: Vec<&str> = first.iter().map(|(p, _, _)| p.as_str()).collect();
    for (want, mode) in [
        ("usr/bin/stead", 0o755),
        ("usr/bin/stead-supervise", 0o755),
        ("usr/share/man/man1/stead.1", 0o644),
        ("usr/share/man/man1/stead-apply.1", 0o644),
        ("usr/share/bash-completion/completions/stead", 0o644),
        ("usr/share/zsh/site-functions/_stead", 0o644),
        ("usr/share/fish/vendor_completions.d/stead.fish", 0o644),
        ("usr/lib/systemd/system/stead-controller.service", 0o644),
    ] {
        let got = first.iter().find(|(p, _, _)| p == want);
        assert_eq!(got.map(|g| g.1), Some(mode), "{want} in {files:?}");
    }
    assert!(
        files.iter().all(|f| f.starts_with("usr/")),
        "outside the prefix: {files:?}"
    );
    let unit =
        std::fs::read_to_string(dest.join("usr/lib/systemd/system/stead-controller.service"))
            .unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/stead "), "{unit}");
    let zsh = std::fs::read_to_string(dest.join("usr/share/zsh/site-functions/_stead")).unwrap();
    assert!(zsh.starts_with("#compdef stead"), "{zsh:.80}");
    // The installed binary runs.
    let v = Command::new(dest.join("usr/bin/stead"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("stead "));

    // Idempotent: a second run gives the same tree, a stale page is removed.
    std::fs::write(dest.join("usr/share/man/man1/stead-gone.1"), "old").unwrap();
    install();
    assert_eq!(tree(&dest), first);
}

#[test]
fn the_fish_script_completes_resources_in_a_real_fish() {
    let test = "the_fish_script_completes_resources_in_a_real_fish";
    if skip_unless(have("fish"), test, "needs fish (scripts/install-deps.sh)") {
        return;
    }
    let sb = sandbox_with_resources();
    let bin = sb.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(stead_bin(), bin.join("stead")).unwrap();
    let script = sb.write(
        "stead.fish",
        &sb.run(&["completions", "fish"]).expect_code(0).stdout(),
    );
    let out = Command::new("fish")
        .args(["--no-config", "-c"])
        .arg(format!(
            "source '{}'; complete --do-complete 'stead snapshot list Vol'",
            script.display()
        ))
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("STEAD_STATE_DIR", sb.path("state"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        ["Volume/db-data", "Volume/web-data"],
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The binaries under test are linked as fixed-address executables (`build.rs`: no PIE,
/// for start-up), unless the build asked for a PIE with `STEAD_LINK_PIE=1`.
#[test]
fn the_binaries_are_linked_without_pie_unless_asked() {
    // e_type, the 16-bit field after the 16-byte identification: 2 = EXEC, 3 = DYN (PIE).
    let e_type = |p: &Path| {
        let b = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        assert_eq!(&b[..4], b"\x7fELF", "{} is not ELF", p.display());
        u16::from_le_bytes([b[16], b[17]])
    };
    let want = if std::env::var("STEAD_LINK_PIE").is_ok_and(|v| v == "1") {
        3
    } else {
        2
    };
    let stead = stead_bin();
    let supervise = stead.with_file_name("stead-supervise");
    for bin in [stead, supervise] {
        assert_eq!(e_type(&bin), want, "ELF type of {}", bin.display());
    }
}

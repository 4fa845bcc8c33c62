//! Files stead creates are private whatever the caller's umask (issue 12, item 4).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use controller_util::{free_port, http, wait_until};
use stead_e2e::Sandbox;

/// `stead <sandbox globals> <args>` under `sh -c 'umask 022; exec …'`.
fn under_umask_022(sb: &Sandbox, args: &[&str]) -> Command {
    let stead = sb.cmd();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("umask 022; exec \"$0\" \"$@\"")
        .arg(stead.get_program())
        .args(stead.get_args())
        .args(args);
    c
}

/// Every path under `root` (and `root`) whose mode lets group or other read or write it
/// (search permission alone, as on the state dir and `rootfs/`, lists nothing).
fn shared_paths(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o066 != 0 || (!meta.is_dir() && mode & 0o011 != 0) {
            out.push(format!("{} {mode:o}", p.display()));
        }
        if meta.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

#[test]
fn apply_under_umask_022_creates_private_state_and_run_files() {
    let sb = Sandbox::new();
    let m = sb.write(
        "m/storage.yaml",
        &format!(
            "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\nspec: {{type: dir, path: {}}}\n---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: a}}\nspec: {{pool: local, size: 1Mi, deletionPolicy: Delete}}\n",
            sb.path("pools/local").display()
        ),
    );
    let out = under_umask_022(&sb, &["apply", "--yes", m.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = sb.path("state");
    let db = state.join("stead.db");
    assert!(db.exists());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&db), 0o600, "{}", db.display());
    // Traversable, not listable: an unprivileged container's root must reach its rootfs.
    assert_eq!(mode(&state), 0o711);
    assert_eq!(shared_paths(&state), Vec::<String>::new());

    // The controller makes the run dir and its status socket.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = under_umask_022(
        &sb,
        &[
            "controller",
            "--listen",
            &listen,
            "--resync",
            "1h",
            "--source",
            m.parent().unwrap().to_str().unwrap(),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let up = wait_until(Duration::from_secs(20), || {
        http(port, "GET", "/readyz", &[], "").0 == 200
    });
    let run = sb.path("run");
    let shared = shared_paths(&run);
    let sock = run.join("controller.sock").exists();
    let _ = child.kill();
    let _ = child.wait();
    assert!(up.is_some(), "controller did not become ready");
    assert!(sock, "no status socket in {}", run.display());
    assert_eq!(mode(&run), 0o700);
    assert_eq!(shared, Vec::<String>::new());
    assert_eq!(shared_paths(&state), Vec::<String>::new());
}

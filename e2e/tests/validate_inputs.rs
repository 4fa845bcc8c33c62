//! `stead validate` on hostile inputs: a FIFO and a link to /dev/zero must not block
//! or read without end. Each run has a deadline, so a regression fails instead of
//! hanging the suite.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stead_e2e::Sandbox;

/// Runs `stead validate <path>`, killing it after `limit`. Returns (exit code, stderr).
fn validate_within(sb: &Sandbox, path: &Path, limit: Duration) -> (i32, String) {
    let mut child = sb
        .cmd()
        .arg("validate")
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stead");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                std::io::Read::read_to_string(&mut s, &mut err).expect("read stderr");
            }
            return (status.code().unwrap_or(-1), err);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "stead validate {} still running after {limit:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mkfifo(p: &Path) {
    let ok = Command::new("mkfifo").arg(p).status().expect("mkfifo");
    assert!(ok.success(), "mkfifo {}", p.display());
}

#[test]
fn validate_refuses_a_fifo_and_a_link_to_dev_zero() {
    let sb = Sandbox::new();
    let dir = sb.path("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    mkfifo(&dir.join("pipe.yaml"));
    std::os::unix::fs::symlink("/dev/zero", dir.join("x.yaml")).unwrap();
    sb.write(
        "manifests/ok.yaml",
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {name: local}\nspec: {type: dir, path: /var/lib/stead/pools/local}\n",
    );
    let limit = Duration::from_secs(20);
    let (code, err) = validate_within(&sb, &dir, limit);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("pipe.yaml:0:0: skipped: not a regular file (FIFO)"),
        "{err}"
    );
    assert!(
        err.contains("x.yaml:0:0: skipped: not a regular file (character device)"),
        "{err}"
    );
    assert!(err.contains("2 error(s) found"), "{err}");
    // Named directly: the FIFO is refused, not opened for a blocking read.
    let (code, err) = validate_within(&sb, &dir.join("pipe.yaml"), limit);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("pipe.yaml"), "{err}");
    assert!(err.contains("not a regular file (FIFO)"), "{err}");
    let (code, err) = validate_within(&sb, &dir.join("x.yaml"), limit);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("x.yaml:0:0: skipped: not a regular file (character device)"),
        "{err}"
    );
}

#[test]
fn validate_refuses_a_file_over_the_size_cap() {
    let sb = Sandbox::new();
    let big = sb.path("big.yaml");
    let line = "# ".to_string() + &"x".repeat(1021) + "\n"; // 1 KiB
    std::fs::write(&big, line.repeat(5 * 1024)).unwrap();
    let (code, err) = validate_within(&sb, &big, Duration::from_secs(20));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("big.yaml:4097:1: file is larger than the manifest size limit of 4 MiB"),
        "{err}"
    );
}

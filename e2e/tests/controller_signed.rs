//! Issue 7: `--verify-commits`: only heads signed by a trusted SSH key are applied.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod controller_util;

use std::path::Path;
use std::process::Command;

use controller_util::*;
use stead_e2e::{Sandbox, skip_unless};

const MI: u64 = 1 << 20;
const TOKEN: &str = "signed-token";

/// Whether `test` is skipped for want of ssh-keygen.
fn skip_without_ssh_keygen(test: &str) -> bool {
    let have = Command::new("ssh-keygen").arg("-?").output().is_ok();
    skip_unless(have, test, "ssh-keygen not installed")
}

/// The allowed-signers file that trusts the SSH public key `public` for git.
fn allowed_signers(sb: &Sandbox, public: &str) -> std::path::PathBuf {
    sb.write(
        "allowed_signers",
        &format!("test@example.com namespaces=\"git\" {public}\n"),
    )
}

/// Starts a controller on `repo`'s webhook that verifies commits against `trusted`
/// (`--verify-commits`), and waits for its first revision `c1` (volume a of 1 MiB).
fn start_verifying(
    sb: &Sandbox,
    repo: &Repo,
    token: &Path,
    trusted: &Path,
    c1: &str,
) -> Controller {
    let source = repo.source();
    let ctl = Controller::on_webhook(
        sb,
        &source,
        token,
        &["--verify-commits", trusted.to_str().unwrap()],
    );
    within!(ctl, 20, size(&image(sb, "a")) == MI);
    ctl.expect_revision(5, c1);
    ctl
}

/// Calls the webhook and waits for the `n`th head refused as unsigned.
fn hook_expect_unsigned(ctl: &Controller, n: f64) {
    assert_eq!(ctl.hook(TOKEN), 202);
    within!(
        ctl,
        10,
        ctl.metric("stead_reconcile_total{result=\"unsigned\"}") == n,
    );
}

fn keygen(sb: &Sandbox, name: &str) -> (String, String) {
    let key = sb.path(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let public = std::fs::read_to_string(sb.path(&format!("{name}.pub"))).unwrap();
    (key.to_str().unwrap().to_string(), public.trim().to_string())
}

fn commit(
    repo: &Repo,
    sb: &Sandbox,
    msg: &str,
    vols: &[(&str, &str)],
    key: Option<&str>,
) -> String {
    std::fs::write(repo.work.join("storage.yaml"), storage_yaml(sb, vols)).unwrap();
    git(&repo.work, &["add", "-A"]);
    match key {
        Some(k) => git(
            &repo.work,
            &[
                "-c",
                "gpg.format=ssh",
                "-c",
                &format!("user.signingkey={k}"),
                "commit",
                "-q",
                "-S",
                "-m",
                msg,
            ],
        ),
        None => git(&repo.work, &["commit", "-q", "-m", msg]),
    }
    repo.push()
}

#[test]
fn only_signed_commits_from_trusted_keys_are_applied() {
    if skip_without_ssh_keygen("only_signed_commits_from_trusted_keys_are_applied") {
        return;
    }
    let sb = Sandbox::new();
    let (trusted, trusted_pub) = keygen(&sb, "trusted");
    let (stranger, _) = keygen(&sb, "stranger");
    let signers = allowed_signers(&sb, &trusted_pub);
    let tok = sb.write("token", TOKEN);
    let repo = Repo::new(&sb);
    let c1 = commit(&repo, &sb, "one", &[("a", "1Mi")], Some(&trusted));
    let ctl = start_verifying(&sb, &repo, &tok, &signers, &c1);

    // Unsigned head: refused, reported, the signed revision stays applied.
    let c2 = commit(&repo, &sb, "unsigned", &[("a", "2Mi")], None);
    hook_expect_unsigned(&ctl, 1.0);
    let st = ctl.status();
    assert_eq!(st["headRevision"], c2.as_str(), "{st}");
    assert_eq!(st["revision"], c1.as_str(), "{st}");
    assert!(
        st["headError"].as_str().unwrap().contains("not signed"),
        "{st}"
    );
    assert_eq!(size(&image(&sb, "a")), MI);

    // Signed by a key that is not trusted: refused too.
    commit(&repo, &sb, "stranger", &[("a", "3Mi")], Some(&stranger));
    hook_expect_unsigned(&ctl, 2.0);
    assert_eq!(size(&image(&sb, "a")), MI);

    // Signed by the trusted key: applied.
    let c4 = commit(&repo, &sb, "signed again", &[("a", "4Mi")], Some(&trusted));
    assert_eq!(ctl.hook(TOKEN), 202);
    within!(ctl, 10, size(&image(&sb, "a")) == 4 * MI);
    ctl.expect_revision(5, &c4);
    assert!(ctl.status()["headError"].is_null());
}

/// Kills the sandbox's gpg-agent on drop.
struct GpgHome(std::path::PathBuf);

impl Drop for GpgHome {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .args(["--kill", "all"])
            .env("GNUPGHOME", &self.0)
            .status();
    }
}

#[test]
fn openpgp_signed_commits_are_verified_with_gpgv() {
    let have = Command::new("gpg").arg("--version").output().is_ok()
        && Command::new("gpgv").arg("--version").output().is_ok();
    if skip_unless(
        have,
        "openpgp_signed_commits_are_verified_with_gpgv",
        "gpg/gpgv not installed",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let home = GpgHome(sb.path("gnupg"));
    std::fs::create_dir_all(&home.0).unwrap();
    std::fs::set_permissions(&home.0, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let gpg = |args: &[&str]| {
        let out = Command::new("gpg")
            .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
            .args(args)
            .env("GNUPGHOME", &home.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    gpg(&[
        "--quick-gen-key",
        "stead test <test@example.com>",
        "ed25519",
        "sign",
        "never",
    ]);
    let keyring = sb.path("trusted.gpg");
    std::fs::write(&keyring, gpg(&["--export", "test@example.com"])).unwrap();
    let tok = sb.write("token", TOKEN);
    let repo = Repo::new(&sb);
    let commit_pgp = |msg: &str, vols: &[(&str, &str)], sign: bool| {
        std::fs::write(repo.work.join("storage.yaml"), storage_yaml(&sb, vols)).unwrap();
        git(&repo.work, &["add", "-A"]);
        let mut c = Command::new("git");
        c.current_dir(&repo.work)
            .env("GNUPGHOME", &home.0)
            .env("GIT_AUTHOR_NAME", "stead test")
            .env("GIT_AUTHOR_EMAIL", "test@example.com")
            .env("GIT_COMMITTER_NAME", "stead test")
            .env("GIT_COMMITTER_EMAIL", "test@example.com")
            .args([
                "-c",
                "user.signingkey=test@example.com",
                "commit",
                "-q",
                "-m",
                msg,
            ]);
        if sign {
            c.arg("-S");
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        repo.push()
    };
    let c1 = commit_pgp("one", &[("a", "1Mi")], true);
    let ctl = start_verifying(&sb, &repo, &tok, &keyring, &c1);
    commit_pgp("unsigned", &[("a", "2Mi")], false);
    hook_expect_unsigned(&ctl, 1.0);
    assert_eq!(size(&image(&sb, "a")), MI);
    commit_pgp("signed", &[("a", "3Mi")], true);
    assert_eq!(ctl.hook(TOKEN), 202);
    within!(ctl, 10, size(&image(&sb, "a")) == 3 * MI);
}

#[test]
fn force_push_of_an_older_signed_commit_is_refused() {
    if skip_without_ssh_keygen("force_push_of_an_older_signed_commit_is_refused") {
        return;
    }
    let sb = Sandbox::new();
    let (trusted, trusted_pub) = keygen(&sb, "trusted");
    let signers = allowed_signers(&sb, &trusted_pub);
    let tok = sb.write("token", TOKEN);
    let repo = Repo::new(&sb);
    let c1 = commit(&repo, &sb, "one", &[("a", "1Mi")], Some(&trusted));
    let c2 = commit(
        &repo,
        &sb,
        "two",
        &[("a", "1Mi"), ("b", "1Mi")],
        Some(&trusted),
    );
    let source = repo.source();
    let ctl = Controller::on_webhook(
        &sb,
        &source,
        &tok,
        &["--verify-commits", signers.to_str().unwrap()],
    );
    ctl.expect_revision(20, &c2);
    assert_eq!(size(&image(&sb, "b")), MI);

    // The branch is forced back to the older, validly signed c1: refused, c2 stays.
    repo.force_push(&c1);
    assert_eq!(ctl.hook(TOKEN), 202);
    ctl.expect_invalid(10, 1.0);
    let st = ctl.status();
    assert_eq!(st["headRevision"], c1.as_str(), "{st}");
    assert_eq!(st["revision"], c2.as_str(), "{st}");
    let err = st["headError"].as_str().unwrap();
    assert!(
        err.contains("not a fast-forward") && err.contains("--allow-rewind"),
        "{st}"
    );
    assert_eq!(size(&image(&sb, "b")), MI, "the rewind pruned b");
    assert!(ctl.logs().contains("not a fast-forward"), "not logged");

    // A signed commit on top of c2 is a fast-forward: taken.
    git(&repo.work, &["reset", "-q", "--hard", &c2]);
    let c3 = commit(
        &repo,
        &sb,
        "three",
        &[("a", "1Mi"), ("b", "2Mi")],
        Some(&trusted),
    );
    repo.force_push(&c3);
    assert_eq!(ctl.hook(TOKEN), 202);
    within!(ctl, 10, size(&image(&sb, "b")) == 2 * MI);
    ctl.expect_revision(5, &c3);
}

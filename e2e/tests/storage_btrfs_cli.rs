//! Issue 6 acceptance through the CLI, on a loop-mounted btrfs made by the test: volume
//! snapshot and rollback, and the safety snapshot taken before a data-loss delete.

use std::process::Command;

use stead_e2e::{LoopBtrfs, Sandbox};

fn manifest(sb: &Sandbox, pool: &std::path::Path, with_volume: bool) -> String {
    let mut t = format!(
        "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: fast}}\nspec: {{type: btrfs, path: {}}}\n",
        pool.display()
    );
    if with_volume {
        t.push_str("---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {name: v}\nspec: {pool: fast, size: 16Mi, deletionPolicy: Delete}\n");
    }
    sb.write("m/m.yaml", &t).to_string_lossy().into_owned()
}

#[test]
fn btrfs_snapshot_rollback_and_safety_snapshot() {
    let name = "btrfs_snapshot_rollback_and_safety_snapshot";
    let sb = Sandbox::new();
    let Some(fs) = LoopBtrfs::for_test(&sb, name) else {
        return;
    };
    let pool = fs.mnt.join("pool");
    let m = manifest(&sb, &pool, true);
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    let disk = pool.join("images/v/disk.raw");
    std::fs::write(&disk, vec![0xAB; 4096]).expect("write pattern");
    std::fs::File::options()
        .write(true)
        .open(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("size");
    sb.run(&["snapshot", "create", "Volume/v", "s1"])
        .expect_code(0);
    let list = sb.run(&["snapshot", "list", "Volume/v"]).expect_code(0);
    assert!(list.stdout().contains("s1"), "{}", list.stdout());
    std::fs::write(&disk, vec![0x00; 4096]).expect("overwrite");
    sb.run(&["snapshot", "rollback", "Volume/v", "s1"])
        .expect_code(0);
    let back = std::fs::read(&disk).expect("read");
    assert_eq!(
        &back[..4096],
        &[0xAB; 4096][..],
        "rollback restored the snapshot's content"
    );
    sb.run(&["diff", &m]).expect_code(0);

    // Deleting the volume (deletionPolicy: Delete) takes a safety snapshot first.
    let m2 = manifest(&sb, &pool, false);
    let diff = sb.run(&["diff", &m2]).expect_code(2);
    assert!(
        diff.stdout().contains("safety snapshot pre-delete-"),
        "{}",
        diff.stdout()
    );
    sb.run(&["apply", "--yes", &m2]).expect_code(0);
    assert!(!disk.exists(), "volume deleted");
    let snaps: Vec<String> = std::fs::read_dir(pool.join("snapshots/v"))
        .expect("snapshots dir kept")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        snaps.iter().any(|s| s.starts_with("pre-delete-")),
        "safety snapshot kept: {snaps:?}"
    );
    let content = std::fs::read(
        pool.join("snapshots/v")
            .join(
                snaps
                    .iter()
                    .find(|s| s.starts_with("pre-delete-"))
                    .expect("snap"),
            )
            .join("disk.raw"),
    )
    .expect("snapshot disk");
    assert_eq!(
        &content[..4096],
        &[0xAB; 4096][..],
        "the safety snapshot holds the data"
    );
    // Clean the btrfs before unmounting (subvolumes go with the file system anyway).
    drop(fs);
}

/// Issue 6 acceptance, backups through the CLI on a loop-mounted btrfs: a backup restores
/// bit-identical (sha256); a second backup of unchanged data adds < 1 % new bytes (also
/// when every byte is read again); one corrupted byte in the store makes `verify` fail and
/// name the file.
#[test]
fn btrfs_backup_restore_dedup_and_verify_corruption() {
    let name = "btrfs_backup_restore_dedup_and_verify_corruption";
    let sb = Sandbox::new();
    let Some(fs) = LoopBtrfs::for_test(&sb, name) else {
        return;
    };
    let pool = fs.mnt.join("pool");
    let m = sb
        .write(
            "m/m.yaml",
            &format!(
                "apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: fast}}\nspec: {{type: btrfs, path: {}, content: [images, backup]}}\n\
                 ---\napiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: v}}\nspec: {{pool: fast, size: 48Mi, deletionPolicy: Delete}}\n",
                pool.display()
            ),
        )
        .to_string_lossy()
        .into_owned();
    sb.run(&["apply", "--yes", &m]).expect_code(0);
    let disk = pool.join("images/v/disk.raw");
    // 16 MiB of random data, 8 MiB of text, the rest a hole.
    {
        use std::io::Read;
        use std::os::unix::fs::FileExt;
        let mut random = vec![0u8; 16 << 20];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .expect("urandom");
        let text = "stead backs up volumes, ".repeat((8 << 20) / 24);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open disk");
        f.write_all_at(&random, 0).expect("write");
        f.write_all_at(text.as_bytes(), 16 << 20).expect("write");
    }
    let sha = |p: &std::path::Path| {
        let out = Command::new("sha256sum")
            .arg(p)
            .output()
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    };
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "backup", "run", "Volume/v", "-f", &m, "-s", "fast", "-o", "json",
        ];
        args.extend_from_slice(extra);
        let out = sb.run(&args).expect_code(0);
        let v: serde_json::Value = serde_json::from_str(&out.stdout()).expect("json");
        v[0].clone()
    };
    let first = run(&[]);
    assert_eq!(first["stats"]["bytes"], 48 << 20, "{first}");
    assert!(
        first["stats"]["storedBytes"].as_u64().unwrap() > 16 << 20,
        "{first}"
    );

    let restored = sb.path("restore");
    sb.run(&[
        "backup",
        "restore",
        "Volume/v",
        "-f",
        &m,
        "-s",
        "fast",
        "--to",
        restored.to_str().unwrap(),
    ])
    .expect_code(0);
    assert_eq!(
        sha(&restored.join("v")),
        sha(&disk),
        "bit-identical restore"
    );

    for extra in [&[][..], &["--reread"][..]] {
        let again = run(extra);
        let manifest = std::fs::metadata(again["manifest"].as_str().expect("manifest path"))
            .expect("manifest")
            .len();
        let added = again["stats"]["storedBytes"].as_u64().unwrap() + manifest;
        assert!(
            (added as f64) < 0.01 * (48u64 << 20) as f64,
            "second backup {extra:?} added {added} bytes: {again}"
        );
    }

    // Flip one byte in the middle of a stored chunk.
    let chunks = pool.join("backups/.chunks");
    let mut biggest: Option<(u64, std::path::PathBuf)> = None;
    for d in std::fs::read_dir(&chunks).expect("chunks").flatten() {
        for f in std::fs::read_dir(d.path()).expect("sub").flatten() {
            let len = f.metadata().expect("stat").len();
            if biggest.as_ref().is_none_or(|(l, _)| len > *l) {
                biggest = Some((len, f.path()));
            }
        }
    }
    let (len, chunk) = biggest.expect("a chunk");
    let mut bytes = std::fs::read(&chunk).expect("read chunk");
    bytes[(len / 2) as usize] ^= 0x01;
    std::fs::write(&chunk, &bytes).expect("write chunk");
    let out = sb
        .run(&["backup", "verify", "Volume/v", "-f", &m, "-s", "fast"])
        .expect_code(1);
    let digest = chunk
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("?")
        .to_string();
    assert!(
        out.stdout().contains("Volume/v/") && out.stdout().contains(&digest),
        "verify names the backup, the file and the chunk:\n{}",
        out.stdout()
    );
    eprintln!("{}", out.stdout());
    drop(fs);
}

/// `stead backup run` into a full store (a 20 MiB tmpfs, a 30 MiB volume): exits 1 within
/// seconds saying `No space left on device`, leaves no temp chunk, and `backup gc` (which
/// takes the store lock exclusively) runs at once afterwards. Needs no btrfs.
#[test]
fn backup_into_a_full_store_exits_1_and_releases_the_lock() {
    let name = "backup_into_a_full_store_exits_1_and_releases_the_lock";
    let sb = Sandbox::new();
    if stead_e2e::skip_unless(stead_e2e::is_root(), name, "needs root to mount a tmpfs") {
        return;
    }
    let pool = sb.path("pool");
    std::fs::create_dir_all(&pool).expect("mkdir");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=20m", "tmpfs"])
        .arg(&pool)
        .status()
        .expect("mount");
    assert!(st.success(), "mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(pool.clone());
    let vol = sb.path("vol.raw");
    {
        use std::io::Read;
        let mut random = vec![0u8; 30 << 20];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .expect("urandom");
        std::fs::write(&vol, &random).expect("write volume");
    }
    // Runs stead with a watchdog: a hang fails the test instead of blocking it.
    let run = |args: &[&str], secs: u64| -> (i32, String) {
        let mut child = sb
            .cmd()
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn stead");
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                return (status.code().unwrap_or(-1), err);
            }
            if start.elapsed().as_secs() > secs {
                let _ = child.kill();
                let _ = child.wait();
                panic!("stead {args:?} hung for more than {secs} s");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let pool_s = pool.to_str().expect("utf-8");
    let input = format!("disk={}", vol.display());
    for threads in ["1", "4"] {
        let (code, err) = run(
            &[
                "backup",
                "run",
                "--path",
                &input,
                "--name",
                "Volume/full",
                "-s",
                pool_s,
                "--threads",
                threads,
            ],
            90,
        );
        assert_eq!(code, 1, "{threads} threads: {err}");
        assert!(
            err.contains("No space left on device"),
            "{threads} threads: {err}"
        );
        let temps: Vec<_> = walk(&pool.join("backups"))
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".tmp"))
            .collect();
        assert!(temps.is_empty(), "temp chunks left: {temps:?}");
        let (code, err) = run(&["backup", "gc", "-s", pool_s], 30);
        assert_eq!(code, 0, "gc after the failed run: {err}");
    }
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

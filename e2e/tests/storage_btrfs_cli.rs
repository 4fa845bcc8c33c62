//! Issue 6 acceptance through the CLI, on a loop-mounted btrfs made by the test: volume
//! snapshot and rollback, and the safety snapshot taken before a data-loss delete.

use std::process::Command;

use stead_e2e::{LoopBtrfs, Sandbox, is_root, skip_unless};

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
    if skip_unless(is_root(), name, "needs root for loop devices and mounts") {
        return;
    }
    let has_btrfs = std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("btrfs"))
        || Command::new("modprobe")
            .arg("btrfs")
            .status()
            .is_ok_and(|s| s.success());
    if skip_unless(has_btrfs, name, "kernel lacks btrfs") {
        return;
    }
    let sb = Sandbox::new();
    let Some(fs) = LoopBtrfs::new(&sb) else {
        panic!("could not make a loop-mounted btrfs (mkfs.btrfs from btrfs-progs, losetup)");
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

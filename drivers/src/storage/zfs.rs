//! ZFS volumes (zvols) through the `zfs` command-line tool (`zfs create -V`,
//! `zfs set volsize=`, `zfs snapshot`, `zfs rollback`, `zfs list -Hp`). Ownership is
//! the user property `stead:owner=Volume/<name>`.

use std::path::{Path, PathBuf};

use stead_reconciler::driver::DriverError;
use stead_schema::ZfsSpec;

/// User property marking a dataset as stead's.
pub const OWNER_PROP: &str = "stead:owner";

fn s(v: &str) -> String {
    v.to_string()
}

/// Dataset name of a volume's zvol.
pub fn zvol_name(z: &ZfsSpec, volume: &str) -> String {
    format!("{}/{volume}", z.dataset)
}

/// Device path of a volume's zvol.
pub fn zvol_path(z: &ZfsSpec, volume: &str) -> PathBuf {
    PathBuf::from(format!("/dev/zvol/{}", zvol_name(z, volume)))
}

/// `zfs create` of a sparse zvol of `size` bytes.
pub fn cmd_create(z: &ZfsSpec, volume: &str, size: u64) -> Vec<String> {
    vec![
        s("zfs"),
        s("create"),
        s("-s"),
        s("-V"),
        size.to_string(),
        s("-o"),
        format!("{OWNER_PROP}={}", super::volume::owner_of(volume)),
        s("--"),
        zvol_name(z, volume),
    ]
}

/// `zfs set volsize=` (grow).
pub fn cmd_grow(z: &ZfsSpec, volume: &str, size: u64) -> Vec<String> {
    vec![
        s("zfs"),
        s("set"),
        s("--"),
        format!("volsize={size}"),
        zvol_name(z, volume),
    ]
}

/// `zfs destroy -r` of a volume and its snapshots.
pub fn cmd_destroy(z: &ZfsSpec, volume: &str) -> Vec<String> {
    vec![
        s("zfs"),
        s("destroy"),
        s("-r"),
        s("--"),
        zvol_name(z, volume),
    ]
}

/// Where a deleted zvol that has safety snapshots goes: ZFS snapshots belong to their
/// zvol (`zfs destroy -r` would take them along), so the zvol itself leaves the live path
/// with them, under `<dataset>/stead-deleted/`.
pub const DELETED_PARENT: &str = "stead-deleted";

/// The name a deleted zvol of `volume` keeps its safety snapshots under:
/// `<dataset>/stead-deleted/<volume>-<unix seconds>`.
pub fn deleted_name(z: &ZfsSpec, volume: &str, now: u64) -> String {
    format!("{}/{DELETED_PARENT}/{volume}-{now}", z.dataset)
}

/// The commands that delete `volume`'s zvol, given the names of its snapshots (after the
/// `@`). Without a safety snapshot (`pre-…`) among them: `zfs destroy -r`. With one: the
/// zvol is moved out of the live path to [`deleted_name`] with every snapshot, and its owner
/// property cleared, so the name is free for a new volume and nothing of it is destroyed
/// (`stead snapshot list/delete` still reach those snapshots).
pub fn cmds_delete(
    z: &ZfsSpec,
    volume: &str,
    snapshots: &[String],
    now: u64,
) -> (Option<String>, Vec<Vec<String>>) {
    let keeps = snapshots
        .iter()
        .any(|n| n.starts_with(super::snapshot::SAFETY_PREFIX));
    if !keeps {
        return (None, vec![cmd_destroy(z, volume)]);
    }
    let to = deleted_name(z, volume, now);
    let cmds = cmds_move_aside(
        &zvol_name(z, volume),
        &format!("{}/{DELETED_PARENT}", z.dataset),
        &to,
    );
    (Some(to), cmds)
}

/// The commands that move dataset `from` to `to` under `parent` (created if missing) and
/// clear its owner property, so no volume driver takes it for its own: how a zvol leaves
/// the live path whole (a deleted one with its safety snapshots, a stale copy before a
/// replica is received).
pub fn cmds_move_aside(from: &str, parent: &str, to: &str) -> Vec<Vec<String>> {
    vec![
        vec![s("zfs"), s("create"), s("-p"), s("--"), s(parent)],
        vec![s("zfs"), s("rename"), s("--"), s(from), s(to)],
        vec![s("zfs"), s("inherit"), s("--"), s(OWNER_PROP), s(to)],
    ]
}

/// The snapshot names (after the `@`) of dataset `of` in `zfs list -Hp -o name,creation`
/// output; other datasets' lines are skipped.
pub fn snapshot_names(text: &str, of: &str) -> Vec<String> {
    let prefix = format!("{of}@");
    text.lines()
        .filter_map(|l| l.split('\t').next()?.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

/// Deletes `volume`'s zvol, keeping its safety snapshots ([`cmds_delete`]); absent is
/// success. Returns where the snapshots were kept, if they were.
pub fn delete_volume(z: &ZfsSpec, volume: &str, now: u64) -> Result<Option<String>, DriverError> {
    let Some(listed) = run_if_exists(&cmd_snapshot_list(z, volume))? else {
        return Ok(None);
    };
    let names = snapshot_names(&listed, &zvol_name(z, volume));
    let (kept, cmds) = cmds_delete(z, volume, &names, now);
    for argv in &cmds {
        run(argv)?;
    }
    if let Some(k) = &kept {
        tracing::warn!(volume, kept = %k, "zvol deleted from the live path; kept with its safety snapshots");
    }
    Ok(kept)
}

/// `zfs list -Hp -t snapshot` of the zvols deleted with safety snapshots
/// ([`DELETED_PARENT`]): name, creation.
pub fn cmd_deleted_snapshot_list(z: &ZfsSpec) -> Vec<String> {
    cmd_snapshots_under(format!("{}/{DELETED_PARENT}", z.dataset))
}

/// The lines of `zfs list -Hp -o name,creation` output that are snapshots of a deleted
/// zvol of `volume` (`<dataset>/stead-deleted/<volume>-<digits>@…`), as
/// `(zvol, snapshot, creation line field)`.
pub fn deleted_snapshots<'a>(
    z: &ZfsSpec,
    volume: &str,
    text: &'a str,
) -> Vec<(&'a str, &'a str, Option<&'a str>)> {
    let prefix = format!("{}/{DELETED_PARENT}/{volume}-", z.dataset);
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let full = f.next()?;
            let (zvol, snap) = full.split_once('@')?;
            let stamp = zvol.strip_prefix(&prefix)?;
            if stamp.is_empty() || !stamp.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some((zvol, snap, f.next()))
        })
        .collect()
}

/// Runs a zfs command on a dataset; `None` when zfs says the dataset does not exist.
pub fn run_if_exists(argv: &[String]) -> Result<Option<String>, DriverError> {
    match run(argv) {
        Ok(out) => Ok(Some(out)),
        Err(DriverError::Command { stderr, .. }) if stderr.contains("does not exist") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether dataset `name` exists.
pub fn exists(name: &str) -> Result<bool, DriverError> {
    let argv = [
        s("zfs"),
        s("list"),
        s("-H"),
        s("-o"),
        s("name"),
        s("--"),
        s(name),
    ];
    Ok(run_if_exists(&argv)?.is_some())
}

/// `zfs list -Hp` of the zvols under the dataset: name, volsize, owner.
pub fn cmd_list(z: &ZfsSpec) -> Vec<String> {
    vec![
        s("zfs"),
        s("list"),
        s("-Hp"),
        s("-t"),
        s("volume"),
        s("-o"),
        format!("name,volsize,{OWNER_PROP}"),
        s("-r"),
        s("--"),
        z.dataset.clone(),
    ]
}

/// `zfs snapshot`.
pub fn cmd_snapshot(z: &ZfsSpec, volume: &str, snap: &str) -> Vec<String> {
    vec![
        s("zfs"),
        s("snapshot"),
        s("--"),
        format!("{}@{snap}", zvol_name(z, volume)),
    ]
}

/// `zfs rollback -r` (destroys later snapshots, as ZFS requires).
pub fn cmd_rollback(z: &ZfsSpec, volume: &str, snap: &str) -> Vec<String> {
    vec![
        s("zfs"),
        s("rollback"),
        s("-r"),
        s("--"),
        format!("{}@{snap}", zvol_name(z, volume)),
    ]
}

/// `zfs destroy` of one snapshot.
pub fn cmd_snapshot_destroy(z: &ZfsSpec, volume: &str, snap: &str) -> Vec<String> {
    vec![
        s("zfs"),
        s("destroy"),
        s("--"),
        format!("{}@{snap}", zvol_name(z, volume)),
    ]
}

/// `zfs list -Hp -t snapshot` of a volume: name, creation (epoch seconds).
pub fn cmd_snapshot_list(z: &ZfsSpec, volume: &str) -> Vec<String> {
    cmd_snapshots_under(zvol_name(z, volume))
}

/// `zfs list -Hp -t snapshot -o name,creation -r` of dataset `name` and what is below it.
fn cmd_snapshots_under(name: String) -> Vec<String> {
    vec![
        s("zfs"),
        s("list"),
        s("-Hp"),
        s("-t"),
        s("snapshot"),
        s("-o"),
        s("name,creation"),
        s("-r"),
        s("--"),
        name,
    ]
}

/// One zvol from `zfs list -Hp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zvol {
    /// Full dataset name.
    pub name: String,
    /// Size in bytes.
    pub volsize: u64,
    /// Owner property (`-` when unset).
    pub owner: Option<String>,
}

/// Parses `zfs list -Hp -o name,volsize,stead:owner` output (tab-separated).
pub fn parse_list(text: &str) -> Vec<Zvol> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let name = f.next()?.to_string();
            let volsize = f.next()?.trim().parse().ok()?;
            let owner = f
                .next()
                .map(str::trim)
                .filter(|o| *o != "-" && !o.is_empty());
            Some(Zvol {
                name,
                volsize,
                owner: owner.map(str::to_string),
            })
        })
        .collect()
}

/// Whether the kernel has ZFS loaded.
pub fn have_zfs() -> bool {
    Path::new("/dev/zfs").exists() || stead_host::SysFs::host().has_module("zfs")
}

/// Runs a zfs command, returning stdout.
pub fn run(argv: &[String]) -> Result<String, DriverError> {
    super::check_operands(argv)?;
    if !have_zfs() {
        return Err(DriverError::Unsupported("kernel lacks ZFS".into()));
    }
    super::run_tool(argv, "zfsutils-linux")
}

/// Checks that the parent dataset exists.
pub fn check_dataset(z: &ZfsSpec) -> Result<(), DriverError> {
    run(&[
        s("zfs"),
        s("list"),
        s("-Hp"),
        s("-o"),
        s("name"),
        s("--"),
        z.dataset.clone(),
    ])
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ZfsSpec {
        ZfsSpec {
            dataset: "rpool/data".into(),
        }
    }

    #[test]
    fn builds_commands() {
        assert_eq!(
            cmd_create(&spec(), "web", 1 << 30).join(" "),
            "zfs create -s -V 1073741824 -o stead:owner=Volume/web -- rpool/data/web"
        );
        assert_eq!(
            cmd_grow(&spec(), "web", 2 << 30).join(" "),
            "zfs set -- volsize=2147483648 rpool/data/web"
        );
        assert_eq!(
            cmd_destroy(&spec(), "web"),
            ["zfs", "destroy", "-r", "--", "rpool/data/web"]
        );
        assert_eq!(
            cmd_list(&spec()).join(" "),
            "zfs list -Hp -t volume -o name,volsize,stead:owner -r -- rpool/data"
        );
        assert_eq!(
            cmd_snapshot(&spec(), "web", "s1"),
            ["zfs", "snapshot", "--", "rpool/data/web@s1"]
        );
        assert_eq!(
            cmd_rollback(&spec(), "web", "s1"),
            ["zfs", "rollback", "-r", "--", "rpool/data/web@s1"]
        );
        assert_eq!(
            cmd_snapshot_destroy(&spec(), "web", "s1"),
            ["zfs", "destroy", "--", "rpool/data/web@s1"]
        );
        assert_eq!(
            cmd_snapshot_list(&spec(), "web").join(" "),
            "zfs list -Hp -t snapshot -o name,creation -r -- rpool/data/web"
        );
        assert_eq!(
            zvol_path(&spec(), "web"),
            PathBuf::from("/dev/zvol/rpool/data/web")
        );
    }

    #[test]
    fn a_dataset_that_looks_like_an_option_is_refused_before_running() {
        let z = ZfsSpec {
            dataset: "-r".into(),
        };
        match check_dataset(&z) {
            Err(DriverError::Refused(m)) => assert_eq!(
                m,
                "argument \"-r\" starts with '-' and would be read as an option"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
        match super::super::check_operands(&cmd_list(&z)) {
            Err(DriverError::Refused(m)) => assert_eq!(
                m,
                "argument \"-r\" starts with '-' and would be read as an option"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(super::super::check_operands(&cmd_list(&spec())).is_ok());
    }

    #[test]
    fn a_zvol_with_safety_snapshots_leaves_the_live_path_with_them() {
        let z = spec();
        let plain = cmds_delete(&z, "web", &["s1".into(), "stead-repl-3".into()], 7);
        assert_eq!(
            plain,
            (None, vec![cmd_destroy(&z, "web")]),
            "nothing to keep: destroyed"
        );
        let (to, kept) = cmds_delete(
            &z,
            "web",
            &["s1".into(), "pre-20261207T101010_000Z".into()],
            7,
        );
        assert_eq!(to.as_deref(), Some("rpool/data/stead-deleted/web-7"));
        let joined: Vec<String> = kept.iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            joined,
            [
                "zfs create -p -- rpool/data/stead-deleted",
                "zfs rename -- rpool/data/web rpool/data/stead-deleted/web-7",
                "zfs inherit -- stead:owner rpool/data/stead-deleted/web-7",
            ]
        );
        assert!(
            !kept.iter().flatten().any(|a| a == "destroy"),
            "nothing is destroyed: {joined:?}"
        );
    }

    #[test]
    fn snapshot_names_and_deleted_snapshots_are_read_from_listings() {
        let text = "rpool/data/web@s1\t100\nrpool/data/web@pre-x\t101\nrpool/data/webby@s2\t102\n";
        assert_eq!(snapshot_names(text, "rpool/data/web"), ["s1", "pre-x"]);
        let z = spec();
        let deleted = "rpool/data/stead-deleted/web-7@pre-a\t100\n\
                       rpool/data/stead-deleted/web-x-9@pre-b\t101\n\
                       rpool/data/stead-deleted/webby-8@pre-c\t102\n\
                       rpool/data/stead-deleted/web-@pre-d\t103\n";
        assert_eq!(
            deleted_snapshots(&z, "web", deleted),
            [("rpool/data/stead-deleted/web-7", "pre-a", Some("100"))],
            "only web's own deleted zvols (web-x and webby are other volumes)"
        );
        assert_eq!(deleted_snapshots(&z, "web-x", deleted).len(), 1);
    }

    #[test]
    fn parses_list() {
        let z = parse_list("rpool/data/web\t1073741824\tVolume/web\nrpool/data/x\t4096\t-\n");
        assert_eq!(z.len(), 2);
        assert_eq!(z[0].owner.as_deref(), Some("Volume/web"));
        assert_eq!(z[1].owner, None);
        assert_eq!(z[1].volsize, 4096);
    }

    #[test]
    fn real_zfs_or_skip() {
        let dataset = format!("stead-test-missing-{}", std::process::id());
        let r = check_dataset(&ZfsSpec {
            dataset: dataset.clone(),
        });
        if !have_zfs() {
            match r {
                Err(DriverError::Unsupported(m)) => assert_eq!(m, "kernel lacks ZFS"),
                other => panic!("expected Unsupported, got {other:?}"),
            }
            eprintln!("SKIP real_zfs_or_skip: kernel lacks ZFS");
            return;
        }
        // With ZFS loaded, a missing dataset is zfs's failure, naming the dataset.
        match r {
            Err(DriverError::Command {
                command, stderr, ..
            }) => {
                assert_eq!(command, format!("zfs list -Hp -o name -- {dataset}"));
                assert!(
                    stderr.contains(&format!("cannot open '{dataset}': dataset does not exist")),
                    "{stderr}"
                );
            }
            Err(DriverError::Unsupported(m)) => {
                assert_eq!(m, "zfs not found (install zfsutils-linux)");
                eprintln!("SKIP real_zfs_or_skip (zfs part): zfsutils-linux is not installed");
            }
            other => panic!("expected zfs to fail on the missing dataset, got {other:?}"),
        }
    }
}

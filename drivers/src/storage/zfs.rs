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
        zvol_name(z, volume),
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

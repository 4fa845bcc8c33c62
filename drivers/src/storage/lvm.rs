//! LVM thin volumes through the LVM command-line tools (`lvcreate -V -T`, `lvextend`,
//! `lvremove`, `lvs --reportformat json`). Ownership is the LV tag
//! `stead-owner=Volume/<name>`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use stead_reconciler::driver::DriverError;
use stead_schema::LvmSpec;

/// Tag prefix marking an LV as stead's.
pub const OWNER_TAG_PREFIX: &str = "stead-owner=";

/// The owner tag for a volume (scoped to the environment, see
/// [`super::set_owner_scope`]).
pub fn owner_tag(volume: &str) -> String {
    format!("{OWNER_TAG_PREFIX}{}", super::volume::owner_of(volume))
}

/// The LV name of a volume: the volume name, prefixed `env-<env>-` inside an
/// environment (see [`super::set_owner_scope`]).
pub fn lv_name(volume: &str) -> String {
    format!("{}{volume}", super::lv_prefix())
}

/// The volume an LV of this scope holds (`None` for an LV of another scope).
pub fn volume_of_lv(lv: &str) -> Option<&str> {
    lv.strip_prefix(super::lv_prefix().as_str())
}

/// Device path of a volume's LV.
pub fn lv_path(l: &LvmSpec, volume: &str) -> PathBuf {
    PathBuf::from(format!("/dev/{}/{}", l.volume_group, lv_name(volume)))
}

fn s(v: &str) -> String {
    v.to_string()
}

/// `lvcreate` of a thin volume of `size` bytes in the thin pool.
pub fn cmd_create(l: &LvmSpec, volume: &str, size: u64) -> Vec<String> {
    vec![
        s("lvcreate"),
        s("--yes"),
        s("-V"),
        format!("{size}b"),
        s("--thin"),
        s("-n"),
        lv_name(volume),
        s("--addtag"),
        owner_tag(volume),
        s("--"),
        format!("{}/{}", l.volume_group, l.thin_pool),
    ]
}

/// `lvextend` to `size` bytes.
pub fn cmd_extend(l: &LvmSpec, volume: &str, size: u64) -> Vec<String> {
    vec![
        s("lvextend"),
        s("-L"),
        format!("{size}b"),
        s("--"),
        format!("{}/{}", l.volume_group, lv_name(volume)),
    ]
}

/// `lvremove` of a volume (or a snapshot LV).
pub fn cmd_remove(l: &LvmSpec, lv: &str) -> Vec<String> {
    vec![
        s("lvremove"),
        s("--yes"),
        s("--"),
        format!("{}/{lv}", l.volume_group),
    ]
}

/// `lvs` listing of the volume group as JSON, sizes in bytes.
pub fn cmd_list(l: &LvmSpec) -> Vec<String> {
    vec![
        s("lvs"),
        s("--reportformat"),
        s("json"),
        s("--units"),
        s("b"),
        s("--nosuffix"),
        s("-o"),
        s("lv_name,lv_size,pool_lv,origin,lv_tags,lv_time"),
        s("--"),
        l.volume_group.clone(),
    ]
}

/// Name of the LV holding snapshot `snap` of `volume`.
pub fn snapshot_lv(volume: &str, snap: &str) -> String {
    format!("{}--snap--{snap}", lv_name(volume))
}

/// `lvcreate -s` thin snapshot of a volume.
pub fn cmd_snapshot(l: &LvmSpec, volume: &str, snap: &str) -> Vec<String> {
    vec![
        s("lvcreate"),
        s("--yes"),
        s("-s"),
        s("-n"),
        snapshot_lv(volume, snap),
        s("--addtag"),
        owner_tag(volume),
        s("--"),
        format!("{}/{}", l.volume_group, lv_name(volume)),
    ]
}

/// `lvconvert --merge` of a snapshot back into its origin (rollback).
pub fn cmd_rollback(l: &LvmSpec, volume: &str, snap: &str) -> Vec<String> {
    vec![
        s("lvconvert"),
        s("--merge"),
        s("--"),
        format!("{}/{}", l.volume_group, snapshot_lv(volume, snap)),
    ]
}

/// One LV as `lvs` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Lv {
    /// LV name.
    pub lv_name: String,
    /// Size in bytes.
    #[serde(deserialize_with = "de_u64")]
    pub lv_size: u64,
    /// Thin pool.
    #[serde(default)]
    pub pool_lv: String,
    /// Origin (snapshots).
    #[serde(default)]
    pub origin: String,
    /// Comma-separated tags.
    #[serde(default)]
    pub lv_tags: String,
    /// Creation time.
    #[serde(default)]
    pub lv_time: String,
}

fn de_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let t = String::deserialize(d)?;
    t.trim().parse().map_err(serde::de::Error::custom)
}

#[derive(Deserialize)]
struct Report {
    report: Vec<ReportEntry>,
}
#[derive(Deserialize)]
struct ReportEntry {
    #[serde(default)]
    lv: Vec<Lv>,
}

/// Parses `lvs --reportformat json` output.
pub fn parse_lvs(text: &str) -> Result<Vec<Lv>, DriverError> {
    let r: Report = serde_json::from_str(text)
        .map_err(|e| DriverError::Other(format!("unexpected lvs output: {e}")))?;
    Ok(r.report.into_iter().flat_map(|e| e.lv).collect())
}

impl Lv {
    /// The volume owning this LV, from its tag.
    pub fn owner(&self) -> Option<&str> {
        self.lv_tags
            .split(',')
            .find_map(|t| t.strip_prefix(OWNER_TAG_PREFIX))
    }
}

/// Whether the kernel has device-mapper (needed for any LVM volume).
pub fn have_device_mapper() -> bool {
    Path::new("/dev/mapper/control").exists()
        || stead_host::ProcFs::host().has_misc_device("device-mapper")
}

/// Runs an LVM command, returning stdout.
pub fn run(argv: &[String]) -> Result<String, DriverError> {
    super::check_operands(argv)?;
    if !have_device_mapper() {
        return Err(DriverError::Unsupported(
            "kernel lacks device-mapper".into(),
        ));
    }
    super::run_tool(argv, "lvm2")
}

/// Checks that the thin pool exists.
pub fn check_thin_pool(l: &LvmSpec) -> Result<(), DriverError> {
    let lvs = parse_lvs(&run(&cmd_list(l))?)?;
    if lvs.iter().any(|lv| lv.lv_name == l.thin_pool) {
        Ok(())
    } else {
        Err(DriverError::NotReady(format!(
            "thin pool {}/{} does not exist",
            l.volume_group, l.thin_pool
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LvmSpec {
        LvmSpec {
            volume_group: "vg0".into(),
            thin_pool: "data".into(),
        }
    }

    #[test]
    fn builds_commands() {
        assert_eq!(
            cmd_create(&spec(), "web", 1 << 30),
            [
                "lvcreate",
                "--yes",
                "-V",
                "1073741824b",
                "--thin",
                "-n",
                "web",
                "--addtag",
                "stead-owner=Volume/web",
                "--",
                "vg0/data"
            ]
        );
        assert_eq!(
            cmd_extend(&spec(), "web", 2 << 30),
            ["lvextend", "-L", "2147483648b", "--", "vg0/web"]
        );
        assert_eq!(
            cmd_remove(&spec(), "web"),
            ["lvremove", "--yes", "--", "vg0/web"]
        );
        assert_eq!(
            cmd_list(&spec()).join(" "),
            "lvs --reportformat json --units b --nosuffix -o lv_name,lv_size,pool_lv,origin,lv_tags,lv_time -- vg0"
        );
        assert_eq!(
            cmd_snapshot(&spec(), "web", "s1"),
            [
                "lvcreate",
                "--yes",
                "-s",
                "-n",
                "web--snap--s1",
                "--addtag",
                "stead-owner=Volume/web",
                "--",
                "vg0/web"
            ]
        );
        assert_eq!(
            cmd_rollback(&spec(), "web", "s1"),
            ["lvconvert", "--merge", "--", "vg0/web--snap--s1"]
        );
        assert_eq!(lv_path(&spec(), "web"), PathBuf::from("/dev/vg0/web"));
    }

    #[test]
    fn a_volume_group_that_looks_like_an_option_is_refused_before_running() {
        let l = LvmSpec {
            volume_group: "--config=x".into(),
            thin_pool: "data".into(),
        };
        let argv = cmd_list(&l);
        assert_eq!(argv.last().map(String::as_str), Some("--config=x"));
        match super::super::check_operands(&argv) {
            Err(DriverError::Refused(m)) => assert_eq!(
                m,
                "argument \"--config=x\" starts with '-' and would be read as an option"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
        match run(&argv) {
            Err(DriverError::Refused(m)) => assert_eq!(
                m,
                "argument \"--config=x\" starts with '-' and would be read as an option"
            ),
            other => panic!("must not run: {other:?}"),
        }
        assert!(super::super::check_operands(&cmd_list(&spec())).is_ok());
    }

    #[test]
    fn parses_lvs_json() {
        let t = r#"{"report":[{"lv":[
            {"lv_name":"data","lv_size":"10737418240","pool_lv":"","origin":"","lv_tags":"","lv_time":"2026-01-01 00:00:00 +0000"},
            {"lv_name":"web","lv_size":"1073741824","pool_lv":"data","origin":"","lv_tags":"stead-owner=Volume/web,x","lv_time":""}
        ]}]}"#;
        let lvs = parse_lvs(t).unwrap_or_default();
        assert_eq!(lvs.len(), 2);
        assert_eq!(lvs[1].lv_size, 1 << 30);
        assert_eq!(lvs[1].owner(), Some("Volume/web"));
        assert_eq!(lvs[0].owner(), None);
    }

    #[test]
    fn real_lvm_or_skip() {
        let vg = format!("stead-test-missing-{}", std::process::id());
        let l = LvmSpec {
            volume_group: vg.clone(),
            thin_pool: "none".into(),
        };
        let r = check_thin_pool(&l);
        if !have_device_mapper() {
            match r {
                Err(DriverError::Unsupported(m)) => assert_eq!(m, "kernel lacks device-mapper"),
                other => panic!("expected Unsupported, got {other:?}"),
            }
            eprintln!("SKIP real_lvm_or_skip: kernel lacks device-mapper");
            return;
        }
        // With device-mapper present, a missing VG is lvs's failure, naming the VG.
        match r {
            Err(DriverError::Command {
                command, stderr, ..
            }) => {
                assert_eq!(command, cmd_list(&l).join(" "));
                assert!(
                    stderr.contains(&format!("Volume group \"{vg}\" not found")),
                    "{stderr}"
                );
            }
            Err(DriverError::Unsupported(m)) => {
                assert_eq!(m, "lvs not found (install lvm2)");
                eprintln!("SKIP real_lvm_or_skip (lvs part): lvm2 is not installed");
            }
            other => panic!("expected lvs to fail on the missing VG, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_or_failing_tool_is_reported_exactly() {
        let missing = vec![format!("stead-no-such-tool-{}", std::process::id())];
        match super::super::run_tool(&missing, "lvm2") {
            Err(DriverError::Unsupported(m)) => {
                assert_eq!(m, format!("{} not found (install lvm2)", missing[0]));
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        let failing: Vec<String> = ["sh", "-c", "echo ' no such VG ' >&2; exit 5"]
            .map(String::from)
            .to_vec();
        match super::super::run_tool(&failing, "lvm2") {
            Err(DriverError::Command {
                command,
                status,
                stderr,
            }) => {
                assert_eq!(command, "sh -c echo ' no such VG ' >&2; exit 5");
                assert_eq!(status, "exit status: 5");
                assert_eq!(stderr, "no such VG");
            }
            other => panic!("expected a command failure, got {other:?}"),
        }
    }
}

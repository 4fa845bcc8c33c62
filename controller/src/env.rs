//! Environments' records (`<state-dir>/envs/<name>/env.json`): what `stead env up` writes
//! before it touches the host, so that `env down`, `env gc` and the controller's
//! housekeeping can always find an environment again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading or writing an environment record.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The record file or its directory could not be read or written.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done ("read", "create").
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The record (or the failure count) could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: stead_host::HostError,
    },
    /// The record is not valid JSON of the expected shape.
    #[error("corrupt {path}")]
    Corrupt {
        /// The record file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// What `env up` records before touching the host, so `down` can always find it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvRecord {
    /// Name.
    pub name: String,
    /// Seconds since the epoch.
    pub created_at: f64,
    /// TTL in seconds.
    pub ttl_seconds: Option<u64>,
    /// Manifest paths it was made from.
    pub manifests: Vec<PathBuf>,
    /// Network namespace name.
    pub netns: String,
    /// Pool areas created for it.
    pub pool_areas: Vec<PathBuf>,
}

impl EnvRecord {
    /// When its TTL runs out (seconds since the epoch), if it has one.
    pub fn expires_at(&self) -> Option<f64> {
        self.ttl_seconds.map(|t| self.created_at + t as f64)
    }

    /// Whether its TTL has run out at `now` (seconds since the epoch).
    pub fn is_expired(&self, now: f64) -> bool {
        self.expires_at().is_some_and(|t| t <= now)
    }

    /// Its age at `now` in seconds (never negative).
    pub fn age(&self, now: f64) -> f64 {
        (now - self.created_at).max(0.0)
    }
}

/// The folder holding every environment: `<state-dir>/envs`.
pub fn envs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("envs")
}

/// The record file of environment `name`.
pub fn record_path(state_dir: &Path, name: &str) -> PathBuf {
    envs_dir(state_dir).join(name).join("env.json")
}

/// Reads the record of environment `name`; `None` if it has none.
pub fn read(state_dir: &Path, name: &str) -> Result<Option<EnvRecord>, EnvError> {
    let path = record_path(state_dir, name);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| EnvError::Corrupt { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(EnvError::Io {
            action: "read",
            path,
            source,
        }),
    }
}

/// Writes `rec` atomically to its record file, creating its folder.
pub fn write(state_dir: &Path, rec: &EnvRecord) -> Result<(), EnvError> {
    let path = record_path(state_dir, &rec.name);
    let dir = envs_dir(state_dir).join(&rec.name);
    std::fs::create_dir_all(&dir).map_err(|source| EnvError::Io {
        action: "create",
        path: dir,
        source,
    })?;
    let body = serde_json::to_vec_pretty(rec).map_err(|source| EnvError::Corrupt {
        path: path.clone(),
        source,
    })?;
    stead_host::write_atomic(&path, &body).map_err(|source| EnvError::Write { path, source })
}

/// Every environment's record, by name. A corrupt record is an error.
pub fn list(state_dir: &Path) -> Result<Vec<EnvRecord>, EnvError> {
    let mut out = Vec::new();
    for name in names(state_dir) {
        if let Some(rec) = read(state_dir, &name)? {
            out.push(rec);
        }
    }
    Ok(out)
}

/// Every environment's record that can be read, by name, with the errors of the others
/// (for reporting: one unreadable record must not hide the rest).
pub fn list_lenient(state_dir: &Path) -> (Vec<EnvRecord>, Vec<EnvError>) {
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    for name in names(state_dir) {
        match read(state_dir, &name) {
            Ok(Some(rec)) => out.push(rec),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    (out, errors)
}

/// The names of the folders under `<state-dir>/envs`, sorted (none if it is absent;
/// files such as `.teardown-failures` are not environments).
fn names(state_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(envs_dir(state_dir)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// The count of failed teardowns in `<state-dir>/envs/.teardown-failures` (0 if absent).
pub fn teardown_failures(state_dir: &Path) -> u64 {
    std::fs::read_to_string(envs_dir(state_dir).join(".teardown-failures"))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// Counts one more failed teardown in `<state-dir>/envs/.teardown-failures` (the
/// controller exports it as `stead_environment_teardown_failures_total`).
pub fn count_teardown_failure(state_dir: &Path) -> Result<(), EnvError> {
    let path = envs_dir(state_dir).join(".teardown-failures");
    let n = teardown_failures(state_dir);
    stead_host::write_atomic(&path, format!("{}\n", n + 1).as_bytes())
        .map_err(|source| EnvError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, created_at: f64, ttl: Option<u64>) -> EnvRecord {
        EnvRecord {
            name: name.into(),
            created_at,
            ttl_seconds: ttl,
            manifests: vec![PathBuf::from("m")],
            netns: format!("stead-env-{name}"),
            pool_areas: vec![],
        }
    }

    #[test]
    fn a_record_expires_when_its_ttl_has_run_out() {
        let r = rec("a", 100.0, Some(10));
        assert_eq!(r.expires_at(), Some(110.0));
        assert!(!r.is_expired(109.9));
        assert!(r.is_expired(110.0));
        assert!(!rec("b", 100.0, None).is_expired(1e12));
        assert_eq!(r.age(90.0), 0.0);
        assert_eq!(r.age(130.0), 30.0);
    }

    #[test]
    fn the_record_keeps_its_camel_case_file_format() {
        let json = serde_json::to_value(rec("a", 1.5, Some(2))).expect("json");
        assert_eq!(json["createdAt"], 1.5);
        assert_eq!(json["ttlSeconds"], 2);
        assert_eq!(json["poolAreas"], serde_json::json!([]));
        let back: EnvRecord = serde_json::from_value(json).expect("parse");
        assert_eq!(back, rec("a", 1.5, Some(2)));
    }

    #[test]
    fn records_round_trip_and_list_by_name() {
        let t = tempfile::tempdir().expect("tmp");
        assert!(list(t.path()).expect("empty").is_empty());
        write(t.path(), &rec("b", 2.0, None)).expect("write b");
        write(t.path(), &rec("a", 1.0, Some(5))).expect("write a");
        assert_eq!(
            read(t.path(), "a").expect("read"),
            Some(rec("a", 1.0, Some(5)))
        );
        assert_eq!(read(t.path(), "zz").expect("read"), None);
        let names: Vec<String> = list(t.path())
            .expect("list")
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn a_corrupt_record_fails_the_strict_list_but_not_the_lenient_one() {
        let t = tempfile::tempdir().expect("tmp");
        write(t.path(), &rec("good", 1.0, None)).expect("write");
        let bad = record_path(t.path(), "bad");
        std::fs::create_dir_all(bad.parent().expect("parent")).expect("mkdir");
        std::fs::write(&bad, "{not json").expect("write bad");
        assert!(matches!(list(t.path()), Err(EnvError::Corrupt { .. })));
        let (ok, errors) = list_lenient(t.path());
        assert_eq!(ok.len(), 1);
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn teardown_failures_are_counted_in_a_file() {
        let t = tempfile::tempdir().expect("tmp");
        assert_eq!(teardown_failures(t.path()), 0);
        std::fs::create_dir_all(envs_dir(t.path())).expect("mkdir");
        count_teardown_failure(t.path()).expect("count");
        count_teardown_failure(t.path()).expect("count");
        assert_eq!(teardown_failures(t.path()), 2);
    }
}

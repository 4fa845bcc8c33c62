//! Durable, atomic file writes.

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// An error of the host layer: what was being done, to which path, and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}", path.display())]
pub struct HostError {
    /// What was being done ("write", "rename", "fsync", …).
    pub op: &'static str,
    /// The path it was done to.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl HostError {
    /// Builds an error for `op` on `path`.
    pub fn new(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self {
            op,
            path: path.into(),
            source,
        }
    }

    /// The raw OS error number, if there is one (ENOSPC, EIO, …).
    /// Looks through wrappers (tempfile wraps its errors with the path).
    pub fn raw_os_error(&self) -> Option<i32> {
        if let Some(n) = self.source.raw_os_error() {
            return Some(n);
        }
        let inner = self.source.get_ref()?;
        if let Some(io) = inner.downcast_ref::<io::Error>() {
            return io.raw_os_error();
        }
        std::error::Error::source(inner)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error)
    }

    /// The kind of the OS error (`StorageFull`, `NotFound`, …).
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

/// Writes `data` to `path` atomically and durably with mode 0600 (whatever the umask):
/// a uniquely named temp file in the same directory, fsync of the file, rename over
/// `path`, fsync of the directory. A reader sees the old content or the new, never a
/// mix; after a crash the new content is there once this returned. On any error the
/// temp file is removed and `path` is unchanged.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), HostError> {
    write_atomic_mode(path, data, 0o600)
}

/// [`write_atomic`] with an explicit permission `mode` (e.g. 0o644 for public files).
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> Result<(), HostError> {
    replace_file(path, data, mode, true)
}

/// [`write_atomic`] without the fsyncs: a reader still sees the old content or the new,
/// never a mix, but a crash of the host may lose the write. For runtime files (a
/// supervisor's state in the run dir) that describe live processes and mean nothing
/// once the host went down; they are rewritten on every change, and two fsyncs each time
/// would be most of the cost of a container start or stop.
pub fn write_atomic_volatile(path: &Path, data: &[u8]) -> Result<(), HostError> {
    replace_file(path, data, 0o600, false)
}

/// Temp file, write, optional fsync, rename over `path`, optional fsync of the directory.
fn replace_file(path: &Path, data: &[u8], mode: u32, durable: bool) -> Result<(), HostError> {
    let dir = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .map_err(|e| HostError::new("create temp file in", dir, e))?;
    tmp.as_file()
        .set_permissions(Permissions::from_mode(mode))
        .map_err(|e| HostError::new("chmod", tmp.path(), e))?;
    tmp.write_all(data)
        .map_err(|e| HostError::new("write", tmp.path().to_path_buf(), e))?;
    if durable {
        tmp.as_file()
            .sync_all()
            .map_err(|e| HostError::new("fsync", tmp.path().to_path_buf(), e))?;
    }
    // On error the NamedTempFile inside is dropped, which removes the temp file.
    tmp.persist(path)
        .map_err(|e| HostError::new("rename over", path, e.error))?;
    if durable {
        fsync_dir(dir)?;
    }
    Ok(())
}

const TEMP_PREFIX: &str = ".stead-";
const TEMP_SUFFIX: &str = ".tmp";

/// Whether `name` (a file name, not a path) is the name of a temp file that
/// [`write_atomic`] leaves behind when the process dies between creating and renaming it.
/// Directories that must look empty (a pool before its marker exists) ignore these.
pub fn is_atomic_temp_name(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| {
        n.len() > TEMP_PREFIX.len() + TEMP_SUFFIX.len()
            && n.starts_with(TEMP_PREFIX)
            && n.ends_with(TEMP_SUFFIX)
    })
}

/// Fsyncs a directory so that renames and creations in it survive a crash.
pub fn fsync_dir(dir: &Path) -> Result<(), HostError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| HostError::new("fsync directory", dir, e))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates `dir` (and missing parents) and sets its mode to `mode` (e.g. 0o700), whatever
/// the umask. An existing directory gets its mode set too.
pub fn create_dir_mode(dir: &Path, mode: u32) -> Result<(), HostError> {
    fs::create_dir_all(dir).map_err(|e| HostError::new("create directory", dir, e))?;
    fs::set_permissions(dir, Permissions::from_mode(mode))
        .map_err(|e| HostError::new("chmod", dir, e))
}

/// Creates `dir` and every missing parent with exactly `mode` (e.g. 0o711: others may
/// traverse, not list), whatever the umask. Directories that already exist keep their
/// mode: stead never loosens or tightens a directory it did not create.
pub fn create_missing_dirs(dir: &Path, mode: u32) -> Result<(), HostError> {
    use std::os::unix::fs::DirBuilderExt;
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        .collect();
    for d in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(mode).create(d) {
            Ok(()) => fs::set_permissions(d, Permissions::from_mode(mode))
                .map_err(|e| HostError::new("chmod", d, e))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(HostError::new("create directory", d, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn write_atomic_replaces_content_with_private_mode_and_leaves_no_temp() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a.json");
        write_atomic(&p, b"one").expect("first write");
        write_atomic_volatile(&p, b"half").expect("volatile write");
        assert_eq!(fs::read(&p).expect("read"), b"half");
        write_atomic(&p, b"two").expect("second write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(fs::metadata(&p).expect("stat").mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(d.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
    }

    #[test]
    fn write_atomic_siblings_do_not_share_a_temp_name() {
        // a.json and a.yaml used to share a.tmp; with unique temp names both survive.
        let d = tempfile::tempdir().expect("tempdir");
        write_atomic(&d.path().join("a.json"), b"j").expect("json");
        write_atomic(&d.path().join("a.yaml"), b"y").expect("yaml");
        assert_eq!(fs::read(d.path().join("a.json")).expect("read"), b"j");
        assert_eq!(fs::read(d.path().join("a.yaml")).expect("read"), b"y");
    }

    #[test]
    fn temp_names_of_write_atomic_are_recognised() {
        let d = tempfile::tempdir().expect("tempdir");
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(TEMP_SUFFIX)
            .tempfile_in(d.path())
            .expect("temp");
        let name = tmp.path().file_name().expect("name");
        assert!(is_atomic_temp_name(name), "{name:?}");
        for other in [
            ".stead-pool",
            ".stead-.tmp",
            "a.tmp",
            ".x.raw.tmp",
            "stead-a.tmp",
        ] {
            assert!(!is_atomic_temp_name(other.as_ref()), "{other}");
        }
    }

    #[test]
    fn write_atomic_into_missing_dir_fails_and_names_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let err = write_atomic(&d.path().join("nope/x"), b"x").expect_err("must fail");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn create_dir_mode_ignores_umask() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("x/y");
        create_dir_mode(&p, 0o700).expect("mkdir");
        assert_eq!(fs::metadata(&p).expect("stat").mode() & 0o777, 0o700);
    }

    #[test]
    fn create_missing_dirs_sets_the_mode_of_what_it_creates_only() {
        let d = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(d.path(), Permissions::from_mode(0o750)).expect("chmod");
        let leaf = d.path().join("a/b");
        create_missing_dirs(&leaf, 0o711).expect("create");
        for p in [d.path().join("a"), leaf.clone()] {
            assert_eq!(
                fs::metadata(&p).expect("stat").mode() & 0o777,
                0o711,
                "{}",
                p.display()
            );
        }
        assert_eq!(fs::metadata(d.path()).expect("stat").mode() & 0o777, 0o750);
        create_missing_dirs(&leaf, 0o700).expect("again");
        assert_eq!(fs::metadata(&leaf).expect("stat").mode() & 0o777, 0o711);
    }
}

//! Extended attributes: the one place stead reads or writes them. Path functions never
//! follow a symlink at the path (`llistxattr`, `lgetxattr`, `lsetxattr`); [`set_on`]
//! works on an open file (`fsetxattr`).

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::Path;

use rustix::io::Errno;
use xattr::FileExt as _;

/// The names of the extended attributes of `path` (a symlink itself, not its target).
pub fn list(path: &Path) -> io::Result<Vec<OsString>> {
    Ok(xattr::list(path)?.collect())
}

/// The value of the attribute `name` of `path`, or `None` if it has none of that name.
pub fn get(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    xattr::get(path, name)
}

/// Sets the attribute `name` of `path` (a symlink itself, not its target) to `value`.
pub fn set(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    xattr::set(path, name, value)
}

/// Sets the attribute `name` of the open `file` to `value`.
pub fn set_on(file: &File, name: &str, value: &[u8]) -> io::Result<()> {
    file.set_xattr(name, value)
}

/// Whether `e` says the file system (or kernel) has no extended attributes of that kind
/// (`EOPNOTSUPP`, `ENOSYS`), as opposed to a real failure.
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(Errno::from_io_error(e), Some(Errno::NOTSUP | Errno::NOSYS))
        || e.kind() == io::ErrorKind::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in a temp dir; `None` (with a SKIP line) if its file system has no user
    /// xattrs.
    fn file_with_user_xattrs(t: &tempfile::TempDir, test: &str) -> Option<std::path::PathBuf> {
        let p = t.path().join("f");
        std::fs::write(&p, b"x").expect("write");
        match set(&p, "user.probe", b"1") {
            Ok(()) => Some(p),
            Err(e) if is_unsupported(&e) => {
                eprintln!("SKIP {test}: the temp file system has no user xattrs");
                None
            }
            Err(e) => panic!("set user.probe: {e}"),
        }
    }

    #[test]
    fn values_round_trip_by_path_and_by_open_file() {
        let t = tempfile::tempdir().expect("tmp");
        let Some(p) = file_with_user_xattrs(&t, "xattr round trip") else {
            return;
        };
        set(&p, "user.big", &[7u8; 3000]).expect("set");
        let f = File::options().write(true).open(&p).expect("open");
        set_on(&f, "user.fd", b"via fd").expect("set on fd");
        assert_eq!(get(&p, "user.big").expect("get"), Some(vec![7u8; 3000]));
        assert_eq!(get(&p, "user.fd").expect("get"), Some(b"via fd".to_vec()));
        assert_eq!(get(&p, "user.absent").expect("get"), None);
        let mut names = list(&p).expect("list");
        names.sort();
        assert_eq!(names, ["user.big", "user.fd", "user.probe"]);
    }

    #[test]
    fn a_symlink_is_not_followed() {
        let t = tempfile::tempdir().expect("tmp");
        let Some(p) = file_with_user_xattrs(&t, "xattr symlink") else {
            return;
        };
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&p, &link).expect("symlink");
        assert!(list(&link).expect("list").is_empty());
        assert_eq!(get(&link, "user.probe").expect("get"), None);
        // user.* on a symlink itself is refused by the kernel.
        assert!(set(&link, "user.other", b"x").is_err());
        assert_eq!(get(&p, "user.other").expect("get"), None);
    }

    #[test]
    fn unsupported_errors_are_told_apart() {
        let os = |e: Errno| io::Error::from_raw_os_error(e.raw_os_error());
        assert!(is_unsupported(&os(Errno::NOTSUP)));
        assert!(is_unsupported(&os(Errno::NOSYS)));
        assert!(!is_unsupported(&os(Errno::PERM)));
        assert!(!is_unsupported(&os(Errno::NOENT)));
    }
}

//! Extended attributes of backed-up entries: read with `llistxattr`/`lgetxattr`, restored
//! with `lsetxattr` (never following symlinks). All namespaces are kept: `user.*`,
//! `trusted.*` (an overlay upper layer's `trusted.overlay.opaque`), `security.*` (file
//! capabilities, SELinux labels) and `system.posix_acl_*` (POSIX ACLs). stead's own
//! ownership marks (`user.stead.*`) are not: they describe where a file lives in a pool,
//! not its content.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tracing::warn;

use super::BackupError;

const SKIP_PREFIX: &str = "user.stead.";

fn cpath(p: &Path) -> Result<CString, BackupError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| BackupError::Invalid(format!("{}: path contains NUL", p.display())))
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENOSYS))
}

/// Calls `f(buf)` with a growing buffer until the result fits; `f` returns the byte
/// count or -1 (errno set), as the xattr syscalls do.
fn sized(mut f: impl FnMut(&mut [u8]) -> isize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        let n = f(&mut buf);
        if n >= 0 {
            buf.truncate(usize::try_from(n).unwrap_or(0));
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 20) {
            let len = buf.len() * 4;
            buf.resize(len, 0);
            continue;
        }
        return Err(e);
    }
}

/// The extended attributes of `p` (not following a symlink), values hex-encoded.
pub fn read(p: &Path) -> Result<BTreeMap<String, String>, BackupError> {
    let c = cpath(p)?;
    // SAFETY: `c` is a valid NUL-terminated path; the buffer pointer and length describe
    // a writable slice that outlives the call.
    let names =
        match sized(|b| unsafe { libc::llistxattr(c.as_ptr(), b.as_mut_ptr().cast(), b.len()) }) {
            Ok(n) => n,
            Err(e) if unsupported(&e) => return Ok(BTreeMap::new()),
            Err(e) => return Err(BackupError::io("listxattr", p)(e)),
        };
    let mut out = BTreeMap::new();
    for raw in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::str::from_utf8(raw) else {
            warn!(path = %p.display(), "skipping an xattr with a non-UTF-8 name");
            continue;
        };
        if name.starts_with(SKIP_PREFIX) {
            continue;
        }
        let cname = CString::new(raw).map_err(|_| BackupError::Invalid("xattr name".into()))?;
        // SAFETY: as above; `cname` is a valid NUL-terminated attribute name.
        let value = sized(|b| unsafe {
            libc::lgetxattr(c.as_ptr(), cname.as_ptr(), b.as_mut_ptr().cast(), b.len())
        });
        match value {
            Ok(v) => {
                out.insert(name.to_string(), hex::encode(v));
            }
            // Removed between the list and the read.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(BackupError::io("getxattr", p)(e)),
        }
    }
    Ok(out)
}

/// Sets the attributes of `xattrs` (hex values) on `p`. Attributes the target file system
/// or this process cannot set (e.g. `trusted.*` without CAP_SYS_ADMIN, or no xattr
/// support) are skipped with a warning; other failures are errors.
pub fn restore(p: &Path, xattrs: &BTreeMap<String, String>) -> Result<(), BackupError> {
    if xattrs.is_empty() {
        return Ok(());
    }
    let c = cpath(p)?;
    for (name, hexval) in xattrs {
        let value = hex::decode(hexval).map_err(|e| {
            BackupError::Invalid(format!("{}: xattr {name}: bad hex value: {e}", p.display()))
        })?;
        let cname = CString::new(name.as_bytes())
            .map_err(|_| BackupError::Invalid(format!("xattr name {name:?} contains NUL")))?;
        // SAFETY: valid NUL-terminated path and name; the value pointer and length describe
        // `value`, which outlives the call.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if unsupported(&e) || e.raw_os_error() == Some(libc::EPERM) {
                warn!(path = %p.display(), xattr = %name, error = %e, "xattr not restored");
                continue;
            }
            return Err(BackupError::io("setxattr", p)(e));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_trusted_xattrs_round_trip_and_stead_marks_are_skipped() {
        let t = tempfile::tempdir().expect("tmp");
        let a = t.path().join("a");
        std::fs::write(&a, b"x").expect("write");
        let mut want = BTreeMap::new();
        want.insert("user.comment".to_string(), hex::encode(b"hello"));
        want.insert("user.big".to_string(), hex::encode(vec![7u8; 3000]));
        restore(&a, &want).expect("set");
        let mut mark = BTreeMap::new();
        mark.insert("user.stead.owner".to_string(), hex::encode(b"Volume/x"));
        restore(&a, &mark).expect("set mark");
        let got = read(&a).expect("read");
        if got.is_empty() {
            eprintln!("SKIP xattr round trip: the temp file system has no user xattrs");
            return;
        }
        assert_eq!(got, want, "values kept, user.stead.* skipped");
        let b = t.path().join("b");
        std::fs::write(&b, b"y").expect("write");
        restore(&b, &got).expect("restore");
        assert_eq!(read(&b).expect("read"), want);
    }
}

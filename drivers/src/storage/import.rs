//! Image import: fetching an http(s) URL and checking SHA-256 digests.
//!
//! A fetch writes into a temp file (never at the volume's final name) and hashes the bytes
//! as they arrive; the digest is compared before the image is used, and a mismatch names
//! both digests.
//!
//! Fetched images are kept in a download cache keyed by their SHA-256
//! ([`ImageCache`], `<state-dir>/cache/images/sha256/<digest>`): importing the same
//! `url` + `sha256` again reads the cached file, whose digest is checked again on every use
//! (a damaged entry is dropped and fetched anew). Entries not used for
//! [`CACHE_MAX_IDLE_DAYS`] days are removed at the next URL import. Imports take the
//! cache's lock one at a time, so volumes made from one image in one apply wait for a
//! single download.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use stead_host::progress::{self, Meter};
use stead_reconciler::driver::DriverError;
use tracing::{info, warn};

/// The longest a fetch may take, in seconds (the whole transfer, not one read).
pub const FETCH_TIMEOUT_SECS: u64 = 3600;

/// Redirects followed at most.
const MAX_REDIRECTS: usize = 5;

const BUF: usize = 1 << 20;

/// Checks that `digest` is 64 hex digits; returns it in lowercase.
pub fn normalize_sha256(digest: &str) -> Result<String, DriverError> {
    let d = digest.trim().to_ascii_lowercase();
    if d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(d)
    } else {
        Err(DriverError::Refused(format!(
            "sha256 {digest:?} is not 64 hex digits"
        )))
    }
}

/// Checks that `url` is http(s) with a host.
pub fn check_url(url: &str) -> Result<(), DriverError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| DriverError::Refused(format!("source.url {url:?} is not http(s)")))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(DriverError::Refused(format!(
            "source.url {url:?} has no host"
        )));
    }
    Ok(())
}

/// The refusal of an image whose digest is not the expected one.
pub fn mismatch(what: &str, expected: &str, actual: &str) -> DriverError {
    DriverError::Refused(format!(
        "{what}: sha256 mismatch: expected {expected}, got {actual}; nothing was kept"
    ))
}

/// Copies `from` into `to`, hashing and counting the bytes; progress under `label`
/// (its length `len`, when known). Returns the hex digest and the byte count.
fn copy_hashing(
    from: &mut dyn Read,
    to: Option<&mut File>,
    len: Option<u64>,
    label: &str,
) -> Result<(String, u64), DriverError> {
    let bar = progress::start(label, Meter::Transfer);
    if let Some(l) = len {
        bar.set_length(l);
    }
    let mut to = to;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut n_total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DriverError::io(format!("read {label}"), e)),
        };
        h.update(&buf[..n]);
        if let Some(f) = to.as_deref_mut() {
            f.write_all(&buf[..n])
                .map_err(|e| DriverError::io(format!("write {label}"), e))?;
        }
        n_total += n as u64;
        bar.set_position(n_total);
    }
    bar.finish();
    Ok((hex::encode(h.finalize()), n_total))
}

/// The SHA-256 (hex) of the file at `path`.
pub fn sha256_file(path: &Path) -> Result<String, DriverError> {
    let mut f =
        File::open(path).map_err(|e| DriverError::io(format!("open {}", path.display()), e))?;
    let len = f.metadata().ok().map(|m| m.len());
    copy_hashing(&mut f, None, len, &format!("sha256 {}", path.display())).map(|(d, _)| d)
}

/// The most bytes a fetch for a volume of `size` bytes may bring: an image larger than
/// that could not fit the volume (a qcow2 file holds at most its guest size plus about an
/// eighth for its tables), so a server sending more is cut off rather than filling the
/// pool.
pub fn fetch_limit(size: u64) -> u64 {
    size.saturating_add(size / 8).saturating_add(64 << 20)
}

/// Fetches `url` into the empty file `to` (at `to_path`), at most `limit` bytes, fsyncs
/// it and checks its SHA-256 against `sha256`. On any error the caller removes `to_path`.
pub fn fetch(
    url: &str,
    sha256: &str,
    limit: u64,
    to: &mut File,
    to_path: &Path,
) -> Result<(), DriverError> {
    check_url(url)?;
    let want = normalize_sha256(sha256)?;
    let _span = tracing::info_span!("image_fetch", url).entered();
    let resp = minreq::get(url)
        .with_timeout(FETCH_TIMEOUT_SECS)
        .with_max_redirects(MAX_REDIRECTS)
        .send_lazy()
        .map_err(|e| DriverError::Other(format!("fetch {url}: {e}")))?;
    if !(200..300).contains(&resp.status_code) {
        return Err(DriverError::Other(format!(
            "fetch {url}: HTTP {} {}",
            resp.status_code, resp.reason_phrase
        )));
    }
    let len = resp
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<u64>().ok());
    if let Some(l) = len
        && l > limit
    {
        return Err(too_large(url, l, limit));
    }
    // One byte past the limit tells a server that sends too much.
    let mut body = resp.take(limit.saturating_add(1));
    let (got, n) = copy_hashing(&mut body, Some(to), len, &format!("fetch {url}"))?;
    if n > limit {
        return Err(too_large(url, n, limit));
    }
    if let Some(l) = len
        && l != n
    {
        return Err(DriverError::Other(format!(
            "fetch {url}: got {n} bytes of {l}"
        )));
    }
    if got != want {
        return Err(mismatch(url, &want, &got));
    }
    to.sync_all()
        .map_err(|e| DriverError::io(format!("fsync {}", to_path.display()), e))?;
    info!(url, bytes = n, sha256 = %got, "image fetched and verified");
    Ok(())
}

/// Cache entries unused (by their mtime, set on every use) for this many days are pruned.
pub const CACHE_MAX_IDLE_DAYS: u64 = 14;

/// A temp file of a fetch into the cache older than this is a leftover of a crash.
const CACHE_TMP_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The download cache of fetched images, keyed by SHA-256 (see the module docs).
#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
}

impl ImageCache {
    /// The cache under state dir `state_dir`: `<state_dir>/cache/images/sha256`.
    pub fn in_state_dir(state_dir: &Path) -> Self {
        ImageCache {
            dir: state_dir.join("cache").join("images").join("sha256"),
        }
    }

    /// The directory holding the entries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image of `url` with digest `sha256`: the cached file when its digest still
    /// matches, else fetched (at most `limit` bytes) into the cache first. Returns the
    /// path of the verified entry, which the caller only reads.
    pub fn get(&self, url: &str, sha256: &str, limit: u64) -> Result<PathBuf, DriverError> {
        check_url(url)?;
        let want = normalize_sha256(sha256)?;
        fs::create_dir_all(&self.dir)
            .map_err(|e| DriverError::io(format!("create {}", self.dir.display()), e))?;
        // One import at a time reads or fills the cache (also across processes): two
        // volumes from one image wait for one download rather than making two.
        let _lock = self.lock()?;
        self.prune(SystemTime::now());
        let entry = self.dir.join(&want);
        if entry.is_file() {
            match sha256_file(&entry) {
                Ok(got) if got == want => {
                    touch(&entry);
                    info!(url, sha256 = %want, path = %entry.display(), "image taken from the download cache (digest checked again)");
                    return Ok(entry);
                }
                Ok(got) => {
                    warn!(path = %entry.display(), %got, "cached image is damaged: fetching it again")
                }
                Err(e) => {
                    warn!(path = %entry.display(), error = %e, "cached image unreadable: fetching it again")
                }
            }
            let _ = fs::remove_file(&entry);
        }
        let tmp = self.dir.join(format!(".{want}.{}.tmp", std::process::id()));
        let fetched = File::create_new(&tmp)
            .map_err(|e| DriverError::io(format!("create {}", tmp.display()), e))
            .and_then(|mut f| fetch(url, &want, limit, &mut f, &tmp));
        if let Err(e) = fetched {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &entry).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            DriverError::io(
                format!("rename {} -> {}", tmp.display(), entry.display()),
                e,
            )
        })?;
        let _ = stead_host::fs::fsync_dir(&self.dir);
        Ok(entry)
    }

    /// Takes the cache's lock file (`.lock`), waiting for another import to finish.
    fn lock(&self) -> Result<File, DriverError> {
        let p = self.dir.join(".lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| DriverError::io(format!("open {}", p.display()), e))?;
        f.lock()
            .map_err(|e| DriverError::io(format!("lock {}", p.display()), e))?;
        Ok(f)
    }

    /// Removes entries idle for more than [`CACHE_MAX_IDLE_DAYS`] at `now`, and temp files
    /// of fetches older than a day (a crash's). Errors are logged, not returned.
    pub fn prune(&self, now: SystemTime) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        let idle = Duration::from_secs(CACHE_MAX_IDLE_DAYS * 24 * 3600);
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let max = if name.starts_with('.') && name.ends_with(".tmp") {
                CACHE_TMP_MAX_AGE
            } else if normalize_sha256(&name).is_ok_and(|n| n == name) {
                idle
            } else {
                continue;
            };
            let Ok(m) = e.metadata().and_then(|m| m.modified()) else {
                continue;
            };
            if now.duration_since(m).is_ok_and(|age| age > max) {
                match fs::remove_file(e.path()) {
                    Ok(()) => info!(path = %e.path().display(), "pruned from the download cache"),
                    Err(err) => warn!(path = %e.path().display(), error = %err, "prune"),
                }
            }
        }
    }
}

/// Sets `p`'s mtime to now (the cache's "last used").
fn touch(p: &Path) {
    if let Ok(f) = File::options().write(true).open(p) {
        let _ = f.set_modified(SystemTime::now());
    }
}

fn too_large(url: &str, n: u64, limit: u64) -> DriverError {
    DriverError::Refused(format!(
        "fetch {url}: more than {} ({n} bytes or more), too large for the volume",
        stead_schema::ByteSize(limit)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_urls_are_checked() {
        let d = "AB".repeat(32);
        assert_eq!(normalize_sha256(&d).expect("ok"), "ab".repeat(32));
        assert!(normalize_sha256("abc").is_err());
        assert!(normalize_sha256(&"zz".repeat(32)).is_err());
        assert!(check_url("https://example.org/a.img").is_ok());
        assert!(check_url("http://127.0.0.1:8080/a").is_ok());
        assert!(check_url("ftp://example.org/a").is_err());
        assert!(check_url("file:///etc/passwd").is_err());
        assert!(check_url("http:///x").is_err());
    }

    #[test]
    fn the_cache_prunes_idle_entries_and_stale_temps_only() {
        let d = tempfile::tempdir().expect("tempdir");
        let c = ImageCache::in_state_dir(d.path());
        fs::create_dir_all(c.dir()).expect("mkdir");
        let (old, new) = ("aa".repeat(32), "bb".repeat(32));
        for n in [
            &old,
            &new,
            &format!(".{old}.1.tmp"),
            &"other".to_string(),
            &".lock".to_string(),
        ] {
            fs::write(c.dir().join(n), b"x").expect("write");
        }
        let day = Duration::from_secs(24 * 3600);
        // Two days on: only the temp is stale.
        c.prune(SystemTime::now() + 2 * day);
        let names = |c: &ImageCache| {
            let mut v: Vec<String> = fs::read_dir(c.dir())
                .expect("read")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&c), [".lock", old.as_str(), new.as_str(), "other"]);
        // Past the idle age: both entries go; what is not the cache's stays.
        touch(&c.dir().join(&new));
        c.prune(SystemTime::now() + day * (CACHE_MAX_IDLE_DAYS as u32 + 1));
        assert_eq!(names(&c), [".lock", "other"]);
    }

    #[test]
    fn the_fetch_limit_leaves_room_for_qcow2_tables() {
        assert_eq!(fetch_limit(8 << 30), (9 << 30) + (64 << 20));
        assert_eq!(fetch_limit(u64::MAX), u64::MAX);
    }

    #[test]
    fn a_mismatch_names_both_digests() {
        let e = mismatch("u", "aa", "bb").to_string();
        assert!(e.contains("expected aa") && e.contains("got bb"), "{e}");
    }

    #[test]
    fn a_file_digest() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        std::fs::write(&p, b"abc").expect("write");
        assert_eq!(
            sha256_file(&p).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

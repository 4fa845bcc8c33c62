//! Image import: fetching an http(s) URL and checking SHA-256 digests.
//!
//! A fetch writes into a temp file that the caller made (in the pool, never at the
//! volume's final name) and hashes the bytes as they arrive; the digest is compared
//! before the image is used, and a mismatch names both digests.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use stead_host::progress::{self, Meter};
use stead_reconciler::driver::DriverError;
use tracing::info;

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

/// Fetches `url` into the empty file `to` (at `to_path`), fsyncs it and checks its
/// SHA-256 against `sha256`. On any error the caller removes `to_path`.
pub fn fetch(url: &str, sha256: &str, to: &mut File, to_path: &Path) -> Result<(), DriverError> {
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
    let mut resp = resp;
    let (got, n) = copy_hashing(&mut resp, Some(to), len, &format!("fetch {url}"))?;
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

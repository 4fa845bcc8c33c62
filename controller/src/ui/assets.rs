//! The UI's stylesheets and scripts, embedded in the binary and served under a
//! content-hashed URL with a long cache lifetime: stead's own (`ui.css`, `ui.js`) and the
//! vendored third-party code (`controller/assets/vendor/`, reproduced by
//! `scripts/vendor-ui.sh`): xterm.js for the console, noVNC's core modules for a VM's
//! screen.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// The stylesheet.
pub const CSS: &str = include_str!("../../assets/ui.css");
/// The script (live updates, filters, confirmations, console).
pub const JS: &str = include_str!("../../assets/ui.js");
/// xterm.js (vendored, MIT).
pub const XTERM_JS: &str = include_str!("../../assets/vendor/xterm/xterm.js");
/// xterm.js's stylesheet followed by the console's fixed theme: xterm.js writes its
/// colours into `<style>` elements, which the CSP (`style-src 'self'`) refuses, so the
/// theme it would write is here instead.
pub const XTERM_CSS: &str = concat!(
    include_str!("../../assets/vendor/xterm/xterm.css"),
    include_str!("../../assets/console.css")
);
/// noVNC's core ES modules (vendored, MPL 2.0), by their path in the package.
pub const NOVNC: &[(&str, &str)] = include!("novnc_files.rs");

/// One embedded file: its name's stem and extension, its body and its media type.
struct Asset {
    stem: &'static str,
    ext: &'static str,
    body: &'static str,
    mime: &'static str,
}

const CSS_MIME: &str = "text/css; charset=utf-8";
const JS_MIME: &str = "text/javascript; charset=utf-8";

const ASSETS: &[Asset] = &[
    Asset {
        stem: "ui",
        ext: "css",
        body: CSS,
        mime: CSS_MIME,
    },
    Asset {
        stem: "ui",
        ext: "js",
        body: JS,
        mime: JS_MIME,
    },
    Asset {
        stem: "xterm",
        ext: "css",
        body: XTERM_CSS,
        mime: CSS_MIME,
    },
    Asset {
        stem: "xterm",
        ext: "js",
        body: XTERM_JS,
        mime: JS_MIME,
    },
];

/// The first 12 hex digits of the SHA-256 of `text`.
fn short_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))[..12].to_string()
}

static URLS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| format!("/assets/{}.{}.{}", a.stem, short_hash(a.body), a.ext))
        .collect()
});

/// The hash of all of noVNC's modules: their common URL prefix changes with any of them.
static NOVNC_PREFIX: LazyLock<String> = LazyLock::new(|| {
    let mut h = Sha256::new();
    for (path, body) in NOVNC {
        h.update(path.as_bytes());
        h.update(body.as_bytes());
    }
    format!("/assets/novnc.{}", &hex::encode(h.finalize())[..12])
});

fn url_of(stem: &str, ext: &str) -> &'static str {
    let i = ASSETS
        .iter()
        .position(|a| a.stem == stem && a.ext == ext)
        .unwrap_or(0);
    &URLS[i]
}

/// Where the pages link the stylesheet (its name carries its hash).
pub fn css_url() -> &'static str {
    url_of("ui", "css")
}

/// Where the pages load the script from (its name carries its hash).
pub fn js_url() -> &'static str {
    url_of("ui", "js")
}

/// Where the console page loads xterm.js from.
pub fn xterm_js_url() -> &'static str {
    url_of("xterm", "js")
}

/// Where the console page links xterm.js's stylesheet.
pub fn xterm_css_url() -> &'static str {
    url_of("xterm", "css")
}

/// Where noVNC's RFB module is (the others are imported relative to it).
pub fn novnc_rfb_url() -> String {
    format!("{}/core/rfb.js", *NOVNC_PREFIX)
}

/// The headers of an embedded file: its type, and a year's immutable cache when the
/// URL's hash is the current one (a stale hash gets the current content, not cached).
fn respond(body: &'static str, mime: &'static str, current: bool) -> Response {
    let cache = if current {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

/// `GET /assets/{*path}`: `STEM.HASH.EXT` for the files of [`ASSETS`], or
/// `novnc.HASH/PATH` for one of noVNC's modules.
pub async fn serve(Path(path): Path<String>) -> Response {
    if let Some((first, rest)) = path.split_once('/') {
        return serve_novnc(first, rest);
    }
    let (Some((stem, _)), Some((_, ext))) = (path.split_once('.'), path.rsplit_once('.')) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(i) = ASSETS.iter().position(|a| a.stem == stem && a.ext == ext) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let current = URLS[i].strip_prefix("/assets/") == Some(path.as_str());
    respond(ASSETS[i].body, ASSETS[i].mime, current)
}

fn serve_novnc(first: &str, rest: &str) -> Response {
    if !first.starts_with("novnc.") {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Some((_, body)) = NOVNC.iter().find(|(p, _)| *p == rest) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let current = NOVNC_PREFIX.strip_prefix("/assets/") == Some(first);
    respond(body, JS_MIME, current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_the_content_hash() {
        assert!(css_url().starts_with("/assets/ui.") && css_url().ends_with(".css"));
        assert_eq!(css_url().len(), "/assets/ui.".len() + 12 + ".css".len());
        assert!(xterm_js_url().starts_with("/assets/xterm.") && xterm_js_url().ends_with(".js"));
        assert_ne!(short_hash(CSS), short_hash(JS));
        assert!(novnc_rfb_url().starts_with("/assets/novnc."));
        assert!(novnc_rfb_url().ends_with("/core/rfb.js"));
    }

    #[test]
    fn assets_have_nothing_that_needs_unsafe_inline() {
        // The CSP allows scripts and styles from the controller only: no eval, no
        // inline handlers written by the script.
        assert!(!JS.contains("eval("));
        assert!(!JS.contains("innerHTML = \"<"));
        assert!(!JS.contains(".setAttribute(\"style\""));
        for (name, body) in NOVNC.iter().chain([&("xterm.js", XTERM_JS)]) {
            assert!(!body.contains("eval("), "{name}");
            assert!(!body.contains("new Function("), "{name}");
        }
    }

    #[test]
    fn novnc_has_its_modules_and_license() {
        for m in [
            "core/rfb.js",
            "core/websock.js",
            "vendor/pako/lib/zlib/inflate.js",
        ] {
            assert!(NOVNC.iter().any(|(p, _)| *p == m), "{m}");
        }
        let license = include_str!("../../assets/vendor/novnc/LICENSE.txt");
        assert!(license.contains("MPL"));
        let license = include_str!("../../assets/vendor/xterm/LICENSE");
        assert!(license.contains("Permission is hereby granted"));
    }
}

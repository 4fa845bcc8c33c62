//! The UI's stylesheet and script, embedded in the binary and served under a
//! content-hashed URL with a long cache lifetime.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// The stylesheet.
pub const CSS: &str = include_str!("../../assets/ui.css");
/// The script (live updates, filters, confirmations, console).
pub const JS: &str = include_str!("../../assets/ui.js");

/// The first 12 hex digits of the SHA-256 of `text`.
fn short_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))[..12].to_string()
}

static CSS_URL: LazyLock<String> = LazyLock::new(|| format!("/assets/ui.{}.css", short_hash(CSS)));
static JS_URL: LazyLock<String> = LazyLock::new(|| format!("/assets/ui.{}.js", short_hash(JS)));

/// Where the pages link the stylesheet (its name carries its hash).
pub fn css_url() -> &'static str {
    &CSS_URL
}

/// Where the pages load the script from (its name carries its hash).
pub fn js_url() -> &'static str {
    &JS_URL
}

/// The asset named `file` (`ui.<hash>.css` or `ui.<hash>.js`): the current one with a
/// year's immutable cache; a stale hash gets the current content, not cached.
pub async fn serve(Path(file): Path<String>) -> Response {
    let (body, mime, url) = if file.ends_with(".css") {
        (CSS, "text/css; charset=utf-8", css_url())
    } else if file.ends_with(".js") {
        (JS, "text/javascript; charset=utf-8", js_url())
    } else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !file.starts_with("ui.") {
        return StatusCode::NOT_FOUND.into_response();
    }
    let cache = if url.ends_with(&file) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_the_content_hash() {
        assert!(css_url().starts_with("/assets/ui.") && css_url().ends_with(".css"));
        assert_eq!(css_url().len(), "/assets/ui.".len() + 12 + ".css".len());
        assert_ne!(short_hash(CSS), short_hash(JS));
    }

    #[test]
    fn assets_have_nothing_that_needs_unsafe_inline() {
        // The CSP allows scripts and styles from the controller only: no eval, no
        // inline handlers written by the script.
        assert!(!JS.contains("eval("));
        assert!(!JS.contains("innerHTML = \"<"));
        assert!(!JS.contains(".setAttribute(\"style\""));
    }
}

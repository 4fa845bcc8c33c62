//! A small HTML builder that escapes by construction: tag and attribute names are
//! `&'static str` (written in this crate), every text and attribute value passes through
//! [`escape`]. The only way to add markup is [`Html::raw`], which takes `&'static str` too.

use std::fmt::Write as _;

/// `s` with `&`, `<`, `>`, `"` and `'` replaced by entities (safe in text and in quoted
/// attribute values).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` percent-encoded for one URL path segment or query value (unreserved characters
/// kept).
pub fn url_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Markup being built.
#[derive(Debug, Default, Clone)]
pub struct Html(String);

impl Html {
    /// Empty.
    pub fn new() -> Self {
        Html(String::new())
    }

    /// Opens `<tag attrs…>`; attributes with a `None` value are left out, `Some("")`
    /// gives a bare attribute value `""`.
    pub fn open(&mut self, tag: &'static str, attrs: &[(&'static str, &str)]) -> &mut Self {
        self.0.push('<');
        self.0.push_str(tag);
        for (k, v) in attrs {
            self.0.push(' ');
            self.0.push_str(k);
            self.0.push_str("=\"");
            self.0.push_str(&escape(v));
            self.0.push('"');
        }
        self.0.push('>');
        self
    }

    /// Closes `</tag>`.
    pub fn close(&mut self, tag: &'static str) -> &mut Self {
        self.0.push_str("</");
        self.0.push_str(tag);
        self.0.push('>');
        self
    }

    /// Escaped text.
    pub fn text(&mut self, s: &str) -> &mut Self {
        self.0.push_str(&escape(s));
        self
    }

    /// Markup written in this crate.
    pub fn raw(&mut self, s: &'static str) -> &mut Self {
        self.0.push_str(s);
        self
    }

    /// `<tag attrs>text</tag>`.
    pub fn el(
        &mut self,
        tag: &'static str,
        attrs: &[(&'static str, &str)],
        text: &str,
    ) -> &mut Self {
        self.open(tag, attrs).text(text).close(tag)
    }

    /// A link `<a href>text</a>`.
    pub fn link(&mut self, href: &str, text: &str) -> &mut Self {
        self.el("a", &[("href", href)], text)
    }

    /// Appends other markup.
    pub fn append(&mut self, other: Html) -> &mut Self {
        self.0.push_str(&other.0);
        self
    }

    /// The markup.
    pub fn into_string(self) -> String {
        self.0
    }

    /// The markup so far.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(escape("plain ü"), "plain ü");
    }

    #[test]
    fn text_and_attributes_are_escaped() {
        let mut h = Html::new();
        h.el(
            "a",
            &[("href", "/x?a=1&b=\"2\""), ("title", "<t>")],
            "<b>bold</b>",
        );
        assert_eq!(
            h.as_str(),
            r#"<a href="/x?a=1&amp;b=&quot;2&quot;" title="&lt;t&gt;">&lt;b&gt;bold&lt;/b&gt;</a>"#
        );
    }

    #[test]
    fn attribute_value_cannot_break_out() {
        let mut h = Html::new();
        h.open("div", &[("data-id", "\" onmouseover=\"alert(1)")])
            .close("div");
        assert!(!h.as_str().contains("\" onmouseover"), "{}", h.as_str());
    }

    #[test]
    fn url_part_encodes_reserved() {
        assert_eq!(url_part("a b/c?d#e&f"), "a%20b%2Fc%3Fd%23e%26f");
        assert_eq!(url_part("web-1.x_y~"), "web-1.x_y~");
        assert_eq!(url_part("ü"), "%C3%BC");
    }
}

//! The frame every page shares: head, navigation, who is logged in, the live flag.

use super::assets;
use super::html::Html;
use crate::auth::{Principal, Role};

/// Which navigation entry is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// `/`.
    Overview,
    /// `/resources`.
    Resources,
    /// `/pending`.
    Pending,
    /// `/events`.
    Events,
    /// `/cluster`.
    Cluster,
    /// Nothing (detail, console, login).
    None,
}

const ENTRIES: &[(Nav, &str, &str)] = &[
    (Nav::Overview, "/", "Overview"),
    (Nav::Resources, "/resources", "Resources"),
    (Nav::Pending, "/pending", "Pending change"),
    (Nav::Events, "/events", "Events"),
    (Nav::Cluster, "/cluster", "Cluster"),
];

/// What kind of host the controller runs on: the navigation offers the Cluster page
/// only on a node of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// A host on its own.
    Single,
    /// A node of a cluster (`stead cluster join` wrote its agent file).
    ClusterNode,
}

impl Host {
    /// Whether the navigation shows `entry`.
    fn shows(self, entry: Nav) -> bool {
        entry != Nav::Cluster || self == Host::ClusterNode
    }
}

/// How the page's main part is kept current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// Elements are updated in place (the tree).
    InPlace,
    /// The main part is fetched again after a reconcile.
    Swap,
    /// Not at all.
    Off,
}

/// Third-party files a page loads before `ui.js` (the console's xterm.js).
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra<'a> {
    /// Stylesheet URLs.
    pub styles: &'a [&'a str],
    /// Classic script URLs (deferred, in order, before `ui.js`).
    pub scripts: &'a [&'a str],
}

/// A full page: `title`, the navigation of `host` with `nav` current, the user `who`
/// (none on the login page) and `body` inside `<main>`.
pub fn page(
    title: &str,
    host: Host,
    nav: Nav,
    who: Option<&Principal>,
    live: Live,
    body: Html,
) -> String {
    page_with(title, host, nav, who, live, body, Extra::default())
}

/// [`page`] with `extra` files in its head.
pub fn page_with(
    title: &str,
    host: Host,
    nav: Nav,
    who: Option<&Principal>,
    live: Live,
    body: Html,
    extra: Extra<'_>,
) -> String {
    let mut h = Html::new();
    h.raw("<!doctype html>")
        .open("html", &[("lang", "en")])
        .open("head", &[])
        .raw("<meta charset=\"utf-8\">")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
        // As the server's header: `no-referrer` would make the browser send `Origin: null`
        // with the login and logout forms, which the origin check refuses; same-origin
        // keeps referrers off other sites and the Origin on our own POSTs.
        .raw("<meta name=\"referrer\" content=\"same-origin\">")
        .el("title", &[], &format!("{title} · stead"));
    if let Some(csrf) = who.and_then(|p| p.csrf.as_deref()) {
        h.open("meta", &[("name", "csrf-token"), ("content", csrf)]);
    }
    h.open(
        "link",
        &[("rel", "stylesheet"), ("href", assets::css_url())],
    );
    for href in extra.styles {
        h.open("link", &[("rel", "stylesheet"), ("href", href)]);
    }
    for src in extra.scripts {
        h.open("script", &[("src", src), ("defer", "defer")])
            .close("script");
    }
    h.open("script", &[("src", assets::js_url()), ("defer", "defer")])
        .close("script")
        .close("head")
        .open("body", &[])
        .raw("<a class=\"skip\" href=\"#main\">Skip to content</a>");
    header(&mut h, host, nav, who);
    let live_attr = match live {
        Live::InPlace => "in-place",
        Live::Swap => "swap",
        Live::Off => "off",
    };
    h.open("main", &[("id", "main"), ("data-live", live_attr)])
        .append(body)
        .close("main")
        .close("body")
        .close("html");
    h.into_string()
}

fn header(h: &mut Html, host: Host, nav: Nav, who: Option<&Principal>) {
    h.open("header", &[("class", "top")])
        .el("a", &[("class", "brand"), ("href", "/")], "stead");
    let Some(p) = who else {
        h.close("header");
        return;
    };
    h.open("nav", &[("aria-label", "Main")]).open("ul", &[]);
    for (entry, href, label) in ENTRIES.iter().filter(|(e, _, _)| host.shows(*e)) {
        h.open("li", &[]);
        if *entry == nav {
            h.el("a", &[("href", href), ("aria-current", "page")], label);
        } else {
            h.link(href, label);
        }
        h.close("li");
    }
    h.close("ul").close("nav");
    let role = match p.role {
        Role::Viewer => "viewer",
        Role::Operator => "operator",
    };
    h.open("div", &[("class", "who")])
        .el(
            "span",
            &[("id", "live"), ("class", "live"), ("role", "status")],
            "static",
        )
        .el("span", &[], &format!("{} ({role})", p.user));
    if let (Some(_), Some(csrf)) = (&p.session, &p.csrf) {
        h.open(
            "form",
            &[
                ("class", "logout"),
                ("method", "post"),
                ("action", "/logout"),
            ],
        )
        .open(
            "input",
            &[("type", "hidden"), ("name", "csrf"), ("value", csrf)],
        )
        .el("button", &[("type", "submit")], "Log out")
        .close("form");
    }
    h.close("div").close("header");
}

/// A status badge (`s-<word>` class).
pub fn status_badge(h: &mut Html, word: &str) {
    let class = format!("badge st s-{}", css_word(word));
    h.el("span", &[("class", &class)], word);
}

/// An impact badge (`i-<impact>` class).
pub fn impact_badge(h: &mut Html, impact: &str) {
    let class = format!("badge i-{}", css_word(impact));
    h.el("span", &[("class", &class)], impact);
}

/// `word` restricted to letters, digits and `-` (for class names).
pub fn css_word(word: &str) -> String {
    word.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect()
}

/// A time in Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn time(ts: f64) -> String {
    chrono::DateTime::from_timestamp(ts as i64, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// Bytes as `12.3 GiB`.
pub fn bytes(n: f64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Via;

    fn op() -> Principal {
        Principal {
            user: "ann<b>".into(),
            role: Role::Operator,
            via: Via::Session,
            csrf: Some("tok\"en".into()),
            session: Some("sid".into()),
        }
    }

    #[test]
    fn page_escapes_user_and_carries_csrf() {
        let p = page(
            "T<i>",
            Host::Single,
            Nav::Resources,
            Some(&op()),
            Live::Off,
            Html::new(),
        );
        assert!(p.contains("ann&lt;b&gt; (operator)"), "{p}");
        assert!(
            p.contains(r#"<meta name="csrf-token" content="tok&quot;en">"#),
            "{p}"
        );
        assert!(p.contains("<title>T&lt;i&gt; · stead</title>"), "{p}");
        assert!(
            p.contains(r#"<a href="/resources" aria-current="page">"#),
            "{p}"
        );
        assert!(!p.contains("<script>"), "no inline script: {p}");
        assert!(!p.contains("style="), "no inline style: {p}");
    }

    #[test]
    fn login_page_has_no_navigation() {
        let p = page(
            "Log in",
            Host::Single,
            Nav::None,
            None,
            Live::Off,
            Html::new(),
        );
        assert!(!p.contains("aria-label=\"Main\""));
        assert!(!p.contains("csrf-token"));
    }

    #[test]
    fn the_cluster_entry_shows_on_a_cluster_node_only() {
        let single = page(
            "T",
            Host::Single,
            Nav::Overview,
            Some(&op()),
            Live::Off,
            Html::new(),
        );
        assert!(!single.contains("href=\"/cluster\""), "{single}");
        assert!(single.contains("href=\"/events\""), "{single}");
        let node = page(
            "T",
            Host::ClusterNode,
            Nav::Cluster,
            Some(&op()),
            Live::Off,
            Html::new(),
        );
        assert!(
            node.contains(r#"<a href="/cluster" aria-current="page">Cluster</a>"#),
            "{node}"
        );
    }

    #[test]
    fn figures() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0 * 1024.0), "1.5 MiB");
        assert_eq!(css_word("data-loss\" x"), "data-lossx");
        assert_eq!(time(0.0), "1970-01-01 00:00:00 UTC");
    }
}

//! The line reader shared by every Proxmox file format: text checks (no NUL, valid
//! UTF-8, no control characters), then the three line grammars Proxmox uses — guest
//! configs (`key: value` with `[section]` headers), section configs (`type: id` headers
//! with indented `key value` lines: storage.cfg, jobs.cfg, sdn/*.cfg) and
//! `interfaces(5)` stanzas. Every value keeps its `FILE:LINE`; a duplicate key is an
//! error, never "the last one wins".

use std::fmt;
use std::path::{Path, PathBuf};

/// A malformed input line: `FILE:LINE: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number (0: the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

impl ParseError {
    /// An error at `file:line`.
    pub fn new(file: &Path, line: usize, message: impl Into<String>) -> Self {
        ParseError {
            file: file.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

/// One `key: value` (or `key value`) with the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value, trimmed (empty for a section config flag without a value).
    pub value: String,
    /// 1-based line.
    pub line: usize,
}

/// A group of entries: a guest config's main section (no name), a snapshot / pending
/// section, or a section config's `type: id` block.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Section {
    /// `[name]` of a guest section, or the `type` of a section config block.
    pub kind: String,
    /// The id of a section config block (empty for guest sections).
    pub id: String,
    /// Line of the header (0 for a guest's main section).
    pub line: usize,
    /// Entries in file order.
    pub entries: Vec<Entry>,
}

impl Section {
    /// The entry with `key`.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// The value of `key`.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(|e| e.value.as_str())
    }

    /// Adds an entry, refusing a key the section already has.
    fn push(&mut self, file: &Path, entry: Entry) -> Result<(), ParseError> {
        if let Some(first) = self.get(&entry.key) {
            return Err(ParseError::new(
                file,
                entry.line,
                format!(
                    "duplicate key `{}` (first at line {}): which one is meant is ambiguous",
                    entry.key, first.line
                ),
            ));
        }
        self.entries.push(entry);
        Ok(())
    }
}

/// Checks that `bytes` are text: valid UTF-8, no NUL, no control characters but tab
/// (and a `\r` before a line end). Returns the text, or an error per bad line.
pub fn decode(file: &Path, bytes: &[u8]) -> Result<String, Vec<ParseError>> {
    let mut errors = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = i + 1;
        match std::str::from_utf8(raw) {
            Err(e) => errors.push(ParseError::new(
                file,
                line,
                format!(
                    "binary data: invalid UTF-8 at byte {} of the line",
                    e.valid_up_to() + 1
                ),
            )),
            Ok(s) => {
                if let Some(c) = s.chars().find(|c| c.is_control() && *c != '\t') {
                    let what = if c == '\0' {
                        "a NUL byte".to_string()
                    } else {
                        format!("control character U+{:04X}", c as u32)
                    };
                    errors.push(ParseError::new(file, line, format!("binary data: {what}")));
                }
            }
        }
    }
    if errors.is_empty() {
        // Checked line by line above, so the whole is valid UTF-8.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    } else {
        Err(errors)
    }
}

/// Largest input file read (pmxcfs itself holds files of at most 1 MiB).
pub const MAX_FILE: u64 = 4 << 20;

/// Reads `path` as text (see [`decode`]), at most [`MAX_FILE`] bytes.
pub fn read_text(path: &Path) -> Result<String, Vec<ParseError>> {
    use std::io::Read as _;
    let err = |m: String| vec![ParseError::new(path, 0, m)];
    let file = std::fs::File::open(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(err(format!(
            "larger than {} MiB: not a Proxmox configuration file",
            MAX_FILE >> 20
        )));
    }
    decode(path, &bytes)
}

/// The lines of `text`, numbered from 1, without a trailing `\r`.
fn numbered(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)))
}

/// Whether `k` is a Proxmox config key: a letter, then letters, digits, `_`, `-` or `.`
/// (raw `lxc.*` keys).
fn is_key(k: &str) -> bool {
    let mut chars = k.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A guest config (`qm.conf(5)`, `pct.conf(5)`): the main section, then the other
/// sections (`[snapshot]`, `[PENDING]`, `[special:cloudinit]`) in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestConf {
    /// The main section: the guest's configuration.
    pub main: Section,
    /// Every `[name]` section.
    pub sections: Vec<Section>,
    /// `#` comment lines of the main section (Proxmox's description), joined.
    pub description: Option<(usize, String)>,
}

/// Parses a guest config. Every bad line is reported.
pub fn parse_guest(file: &Path, text: &str) -> Result<GuestConf, Vec<ParseError>> {
    let mut conf = GuestConf::default();
    let mut errors = Vec::new();
    let mut current: Option<Section> = None;
    for (line, l) in numbered(text) {
        let t = l.trim();
        if t.is_empty() {
            continue;
        }
        if let Some(c) = t.strip_prefix('#') {
            if current.is_none() {
                let d = conf.description.get_or_insert((line, String::new()));
                if !d.1.is_empty() {
                    d.1.push('\n');
                }
                d.1.push_str(c.trim());
            }
            continue;
        }
        if let Some(h) = t.strip_prefix('[') {
            match h.strip_suffix(']') {
                Some(name) if !name.is_empty() && !name.contains(['[', ']']) => {
                    if let Some(s) = current.take() {
                        conf.sections.push(s);
                    }
                    current = Some(Section {
                        kind: name.to_string(),
                        line,
                        ..Section::default()
                    });
                }
                _ => errors.push(ParseError::new(
                    file,
                    line,
                    format!("unterminated section header `{t}`: expected `[name]`"),
                )),
            }
            continue;
        }
        let entry = match guest_entry(t, line) {
            Ok(e) => e,
            Err(m) => {
                errors.push(ParseError::new(file, line, m));
                continue;
            }
        };
        let section = current.as_mut().unwrap_or(&mut conf.main);
        if let Err(e) = section.push(file, entry) {
            errors.push(e);
        }
    }
    if let Some(s) = current {
        conf.sections.push(s);
    }
    if errors.is_empty() {
        Ok(conf)
    } else {
        Err(errors)
    }
}

/// One `key: value` line of a guest config.
fn guest_entry(t: &str, line: usize) -> Result<Entry, String> {
    let Some((k, v)) = t.split_once(':') else {
        return Err(format!(
            "truncated line `{}`: expected `key: value`",
            shorten(t)
        ));
    };
    let (k, v) = (k.trim(), v.trim());
    if !is_key(k) {
        return Err(format!("`{}` is not a config key", shorten(k)));
    }
    if v.is_empty() {
        return Err(format!("truncated line: `{k}:` has no value"));
    }
    Ok(Entry {
        key: k.to_string(),
        value: v.to_string(),
        line,
    })
}

/// The first 40 characters of `s`, for messages.
fn shorten(s: &str) -> String {
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Parses a section config (storage.cfg, jobs.cfg, sdn/*.cfg): `type: id` at the start
/// of a line opens a block, indented `key value` lines fill it.
pub fn parse_section_config(file: &Path, text: &str) -> Result<Vec<Section>, Vec<ParseError>> {
    let mut out: Vec<Section> = Vec::new();
    let mut errors = Vec::new();
    for (line, l) in numbered(text) {
        let t = l.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if !l.starts_with([' ', '\t']) {
            match section_header(t) {
                Ok((kind, id)) => out.push(Section {
                    kind,
                    id,
                    line,
                    entries: Vec::new(),
                }),
                Err(m) => errors.push(ParseError::new(file, line, m)),
            }
            continue;
        }
        let (k, v) = t.split_once([' ', '\t']).unwrap_or((t, ""));
        if !is_key(k) {
            errors.push(ParseError::new(
                file,
                line,
                format!("`{}` is not a config key", shorten(k)),
            ));
            continue;
        }
        let Some(section) = out.last_mut() else {
            errors.push(ParseError::new(
                file,
                line,
                format!("`{k}` before any `type: id` header"),
            ));
            continue;
        };
        let entry = Entry {
            key: k.to_string(),
            value: v.trim().to_string(),
            line,
        };
        if let Err(e) = section.push(file, entry) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// `type: id` of a section config header.
fn section_header(t: &str) -> Result<(String, String), String> {
    let Some((kind, id)) = t.split_once(':') else {
        return Err(format!(
            "truncated line `{}`: expected a `type: id` header",
            shorten(t)
        ));
    };
    let (kind, id) = (kind.trim(), id.trim());
    if !is_key(kind) || id.is_empty() || id.contains(char::is_whitespace) {
        return Err(format!("`{}` is not a `type: id` header", shorten(t)));
    }
    Ok((kind.to_string(), id.to_string()))
}

/// One `iface NAME FAMILY METHOD` stanza of `interfaces(5)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stanza {
    /// Interface name.
    pub name: String,
    /// `inet` | `inet6`.
    pub family: String,
    /// `static`, `manual`, `dhcp`, …
    pub method: String,
    /// Line of the `iface` line.
    pub line: usize,
    /// Its options.
    pub options: Section,
}

/// An `interfaces(5)` file: its stanzas, `auto` names and `source` lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Interfaces {
    /// `iface` stanzas.
    pub stanzas: Vec<Stanza>,
    /// `source`/`source-directory` patterns with their line.
    pub sources: Vec<(usize, String)>,
}

/// Options that may repeat in a stanza (hook commands).
const REPEATABLE: &[&str] = &["up", "down", "pre-up", "post-up", "pre-down", "post-down"];

/// Parses an `interfaces(5)` file.
pub fn parse_interfaces(file: &Path, text: &str) -> Result<Interfaces, Vec<ParseError>> {
    let mut out = Interfaces::default();
    let mut errors = Vec::new();
    let mut in_stanza = false;
    for (line, l) in numbered(text) {
        let t = l.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let mut words = t.split_whitespace();
        let first = words.next().unwrap_or_default();
        match first {
            "iface" => {
                let w: Vec<&str> = words.collect();
                if w.len() < 3 {
                    errors.push(ParseError::new(
                        file,
                        line,
                        format!("truncated line `{t}`: expected `iface NAME FAMILY METHOD`"),
                    ));
                    in_stanza = false;
                    continue;
                }
                out.stanzas.push(Stanza {
                    name: w[0].to_string(),
                    family: w[1].to_string(),
                    method: w[2].to_string(),
                    line,
                    options: Section::default(),
                });
                in_stanza = true;
            }
            "auto" | "mapping" | "rename" => in_stanza = false,
            w if w.starts_with("allow-") => in_stanza = false,
            "source" | "source-directory" => {
                out.sources
                    .push((line, words.collect::<Vec<_>>().join(" ")));
                in_stanza = false;
            }
            key if in_stanza => {
                let value = t[key.len()..].trim().to_string();
                let Some(st) = out.stanzas.last_mut() else {
                    continue;
                };
                let entry = Entry {
                    key: key.to_string(),
                    value,
                    line,
                };
                if REPEATABLE.contains(&key) {
                    st.options.entries.push(entry);
                } else if let Err(e) = st.options.push(file, entry) {
                    errors.push(e);
                }
            }
            _ => errors.push(ParseError::new(
                file,
                line,
                format!("`{}` outside an `iface` stanza", shorten(t)),
            )),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Splits a Proxmox property string `a=1,b=2` (optionally led by a bare default value,
/// `local:vm-100-disk-0,size=8G`) into its default value and `key=value` pairs.
pub fn property_string(v: &str) -> (Option<&str>, Vec<(&str, &str)>) {
    let mut first = None;
    let mut pairs = Vec::new();
    for (i, part) in v.split(',').enumerate() {
        match part.split_once('=') {
            Some((k, val)) => pairs.push((k.trim(), val.trim())),
            None if i == 0 => first = Some(part.trim()),
            None => pairs.push((part.trim(), "")),
        }
    }
    (first, pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f() -> PathBuf {
        PathBuf::from("100.conf")
    }

    #[test]
    fn guest_main_and_sections() {
        let text = "# web server\n#  second line\nname: web\nmemory: 2048\n\n[snap1]\nmemory: 1024\n[PENDING]\ncores: 4\n";
        let c = parse_guest(&f(), text).unwrap();
        assert_eq!(c.main.value("name"), Some("web"));
        assert_eq!(c.main.get("memory").unwrap().line, 4);
        assert_eq!(c.sections.len(), 2);
        assert_eq!(c.sections[0].kind, "snap1");
        assert_eq!(c.sections[1].kind, "PENDING");
        assert_eq!(c.sections[1].line, 8);
        assert_eq!(
            c.description,
            Some((1, "web server\nsecond line".to_string()))
        );
    }

    #[test]
    fn duplicate_key_is_an_error() {
        let e = parse_guest(&f(), "memory: 1\ncores: 1\nmemory: 2\n").unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].to_string(),
            "100.conf:3: duplicate key `memory` (first at line 1): which one is meant is ambiguous"
        );
        // The same key in two sections is fine.
        assert!(parse_guest(&f(), "memory: 1\n[s]\nmemory: 2\n").is_ok());
    }

    #[test]
    fn truncated_lines_are_errors() {
        let e = parse_guest(&f(), "name: a\nscsi0\nnet0:\n").unwrap_err();
        assert_eq!(e.len(), 2);
        assert!(
            e[0].to_string()
                .starts_with("100.conf:2: truncated line `scsi0`")
        );
        assert!(e[1].to_string().starts_with("100.conf:3: truncated line"));
    }

    #[test]
    fn unterminated_header_is_an_error() {
        let e = parse_guest(&f(), "name: a\n[snap1\nmemory: 2\n").unwrap_err();
        assert_eq!(
            e[0].to_string(),
            "100.conf:2: unterminated section header `[snap1`: expected `[name]`"
        );
        assert!(parse_guest(&f(), "[]\n").is_err());
    }

    #[test]
    fn binary_garbage_is_an_error() {
        let e = decode(&f(), b"name: a\nmem\0ory: 1\n").unwrap_err();
        assert_eq!(e[0].to_string(), "100.conf:2: binary data: a NUL byte");
        let e = decode(&f(), b"name: a\n\n\xff\xfe: x\n").unwrap_err();
        assert_eq!(e[0].line, 3);
        assert!(e[0].message.contains("invalid UTF-8"));
        let e = decode(&f(), b"name: \x1b[31m\n").unwrap_err();
        assert!(e[0].message.contains("U+001B"));
        assert_eq!(
            decode(&f(), b"a: b\r\n\tc: d\n").unwrap(),
            "a: b\r\n\tc: d\n"
        );
    }

    #[test]
    fn large_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.conf");
        std::fs::write(&p, vec![b'a'; (MAX_FILE + 1) as usize]).unwrap();
        let e = read_text(&p).unwrap_err();
        assert!(e[0].message.contains("larger than 4 MiB"), "{e:?}");
        std::fs::write(&p, "name: a\n").unwrap();
        assert_eq!(read_text(&p).unwrap(), "name: a\n");
    }

    #[test]
    fn section_config() {
        let text = "dir: local\n\tpath /var/lib/vz\n\tcontent iso,backup\n\tshared\n\nlvmthin: local-lvm\n\tthinpool data\n";
        let s = parse_section_config(&f(), text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].kind.as_str(), s[0].id.as_str()), ("dir", "local"));
        assert_eq!(s[0].value("content"), Some("iso,backup"));
        assert_eq!(s[0].value("shared"), Some(""));
        assert_eq!(s[1].get("thinpool").unwrap().line, 7);
        let e = parse_section_config(&f(), "dir: a\n\tpath /x\n\tpath /y\nnfs\n").unwrap_err();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].line, 3);
        assert!(e[1].message.contains("truncated line `nfs`"));
        let e = parse_section_config(&f(), "\tpath /x\n").unwrap_err();
        assert!(e[0].message.contains("before any"));
    }

    #[test]
    fn interfaces_stanzas() {
        let text = "auto lo\niface lo inet loopback\n\niface vmbr0 inet static\n\taddress 10.0.0.2/24\n\tpost-up a\n\tpost-up b\n\tbridge-ports eno1\nsource /etc/network/interfaces.d/*\n";
        let i = parse_interfaces(&f(), text).unwrap();
        assert_eq!(i.stanzas.len(), 2);
        assert_eq!(i.stanzas[1].name, "vmbr0");
        assert_eq!(i.stanzas[1].options.value("address"), Some("10.0.0.2/24"));
        assert_eq!(
            i.sources,
            vec![(9, "/etc/network/interfaces.d/*".to_string())]
        );
        let e =
            parse_interfaces(&f(), "iface a inet static\n\tmtu 1\n\tmtu 2\niface b\n").unwrap_err();
        assert_eq!(e.len(), 2);
        assert!(e[1].message.contains("truncated"));
    }

    #[test]
    fn property_strings() {
        let (first, pairs) = property_string("local:vm-100-disk-0,size=8G,ssd=1");
        assert_eq!(first, Some("local:vm-100-disk-0"));
        assert_eq!(pairs, vec![("size", "8G"), ("ssd", "1")]);
        let (first, pairs) = property_string("ip=dhcp,gw=10.0.0.1");
        assert_eq!(first, None);
        assert_eq!(pairs.len(), 2);
    }
}

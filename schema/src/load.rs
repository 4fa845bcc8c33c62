//! Span-preserving manifest loading.
//!
//! Each file is parsed with saphyr's `MarkedYaml`, which keeps a position for every
//! node. The tree is turned into a `serde_json::Value` plus a JSON-pointer → position
//! map; the typed model is then deserialized with `serde_path_to_error`, so that a type
//! error is reported at the exact node. To report *all* errors of a document rather
//! than the first, a failing node is removed and deserialization is retried.
//! See docs/architecture.md for why (serde_yaml gives positions only for syntax errors).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use saphyr::{MarkedYaml, Scalar, YamlData, YamlLoader};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::resource::{
    API_VERSION, Desired, Kind, Metadata, NodePos, Origin, Pos, Resource, ResourceId, Spec,
};

/// One problem found in the manifests, with its location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The file.
    pub file: PathBuf,
    /// Line and column (1-based).
    pub pos: Pos,
    /// Field path, e.g. `Container/web spec.interfaces[0].network`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when we can tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: ",
            self.file.display(),
            self.pos.line,
            self.pos.col
        )?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Turns a JSON pointer (`/spec/interfaces/0/network`) into a field path
/// (`spec.interfaces[0].network`).
pub fn pointer_to_field(ptr: &str) -> String {
    let mut out = String::new();
    for seg in ptr.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

fn escape_ptr(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Collects the manifest files named by `paths`: files as given, directories by the
/// rule of [`crate::files`] (`*.yaml`, `*.yml`, no dot-entries, sorted by path).
/// Manifest-named entries that are not regular files are left out.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Diagnostic> {
    collect(paths).map(|(files, _skipped)| files)
}

/// Like [`collect_files`], also returning a diagnostic per skipped entry.
fn collect(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, Vec<Diagnostic>), Diagnostic> {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| io_diag(p, &e))?;
        if meta.is_dir() {
            let found = crate::files::walk_manifest_dir(p).map_err(|e| Diagnostic {
                file: e.path.clone(),
                pos: Pos { line: 0, col: 0 },
                field: String::new(),
                message: format!("cannot read: {}", e.source),
                hint: None,
            })?;
            out.extend(found.files);
            skipped.extend(found.skipped.into_iter().map(|s| Diagnostic {
                file: s.path,
                pos: Pos { line: 0, col: 0 },
                field: String::new(),
                message: format!("skipped: {}", s.reason),
                hint: Some("a manifest must be a regular file (or a link to one)".into()),
            }));
        } else {
            out.push(p.clone());
        }
    }
    Ok((out, skipped))
}

fn io_diag(p: &Path, e: &std::io::Error) -> Diagnostic {
    Diagnostic {
        file: p.to_path_buf(),
        pos: Pos { line: 0, col: 0 },
        field: String::new(),
        message: format!("cannot read: {e}"),
        hint: None,
    }
}

fn read_diag(p: &Path, e: &crate::files::ReadError) -> Diagnostic {
    use crate::files::ReadError;
    let (line, hint) = match e {
        ReadError::TooLarge { line } => {
            (*line, Some("split the manifests into several files".into()))
        }
        ReadError::NotRegular(_) => (
            0,
            Some("a manifest must be a regular file (or a link to one)".into()),
        ),
        _ => (0, None),
    };
    Diagnostic {
        file: p.to_path_buf(),
        pos: Pos {
            line,
            col: if line == 0 { 0 } else { 1 },
        },
        field: String::new(),
        message: e.to_string(),
        hint,
    }
}

/// Loads every document of every file. Returns what loaded and every error found.
/// Semantic validation is separate: see [`crate::validate::validate`].
pub fn load_paths(paths: &[PathBuf]) -> (Vec<Resource>, Vec<Diagnostic>) {
    let (resources, _partial, errors) = load_paths_partial(paths);
    (resources, errors)
}

/// Like [`load_paths`], also returning the documents that loaded with errors.
pub(crate) fn load_paths_partial(
    paths: &[PathBuf],
) -> (Vec<Resource>, Vec<Partial>, Vec<Diagnostic>) {
    let (files, mut errors) = match collect(paths) {
        Ok(f) => f,
        Err(d) => return (Vec::new(), Vec::new(), vec![d]),
    };
    let mut resources = Vec::new();
    let mut partial = Vec::new();
    for (r, p, e) in load_files_parallel(&files) {
        resources.extend(r);
        partial.extend(p);
        errors.extend(e);
    }
    (resources, partial, errors)
}

/// Files per thread below which loading stays on one thread (a thread costs more than
/// a few small files).
const FILES_PER_THREAD: usize = 16;

/// Reads and loads `files` in contiguous chunks, one thread per core when there are
/// enough of them; the chunks' results in file order (the same order as one thread's).
fn load_files_parallel(files: &[PathBuf]) -> Vec<(Vec<Resource>, Vec<Partial>, Vec<Diagnostic>)> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores.min(files.len() / FILES_PER_THREAD).max(1);
    if threads == 1 {
        return vec![load_files(files)];
    }
    let chunk = files.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|c| scope.spawn(move || load_files(c)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Reads and loads `files` in order.
fn load_files(files: &[PathBuf]) -> (Vec<Resource>, Vec<Partial>, Vec<Diagnostic>) {
    let mut resources = Vec::new();
    let mut partial = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match crate::files::read_manifest(f) {
            Ok(text) => load_str_partial(f, &text, &mut resources, &mut partial, &mut errors),
            Err(e) => errors.push(read_diag(f, &e)),
        }
    }
    (resources, partial, errors)
}

/// The deepest nesting of YAML collections (mappings and sequences) accepted.
pub const MAX_DEPTH: usize = 64;

/// Keys longer than this get no "did you mean" hint (its edit distance is quadratic).
const MAX_HINT_KEY: usize = 64;

/// Messages are cut to this many characters (a key can be megabytes long).
const MAX_MESSAGE: usize = 300;

/// Checks the event stream while the tree is built, in the same pass: nesting at most
/// [`MAX_DEPTH`] levels and no aliases. Stops checking at the first violation of the depth
/// limit. Once anything is refused, no more events reach the tree (it is thrown away).
/// Syntax errors are left to the parser, which reports them with their position.
struct Guarded<'a, 'input> {
    file: &'a Path,
    loader: YamlLoader<'input, MarkedYaml<'input>>,
    depth: usize,
    too_deep: bool,
    refused: Vec<Diagnostic>,
}

impl<'a, 'input> Guarded<'a, 'input> {
    fn new(file: &'a Path) -> Self {
        Guarded {
            file,
            loader: YamlLoader::default(),
            depth: 0,
            too_deep: false,
            refused: Vec::new(),
        }
    }

    fn refuse(&mut self, span: saphyr_parser::Span, message: String, hint: &str) {
        self.refused.push(Diagnostic {
            file: self.file.to_path_buf(),
            pos: Pos {
                line: span.start.line(),
                col: span.start.col() + 1,
            },
            field: String::new(),
            message,
            hint: Some(hint.into()),
        });
    }

    /// The depth and alias checks of one event.
    fn check(&mut self, ev: &saphyr_parser::Event<'input>, span: saphyr_parser::Span) {
        use saphyr_parser::Event;
        match ev {
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    self.too_deep = true;
                    self.refuse(
                        span,
                        format!("YAML nesting is deeper than {MAX_DEPTH} levels"),
                        "manifests need only a few levels; flatten the document",
                    );
                }
            }
            Event::SequenceEnd | Event::MappingEnd => self.depth = self.depth.saturating_sub(1),
            Event::Alias(_) => self.refuse(
                span,
                "YAML aliases (`*name`) are not supported in manifests".into(),
                "write the value out in full",
            ),
            _ => {}
        }
    }
}

impl<'input> saphyr_parser::SpannedEventReceiver<'input> for Guarded<'_, 'input> {
    fn on_event(&mut self, ev: saphyr_parser::Event<'input>, span: saphyr_parser::Span) {
        if !self.too_deep {
            self.check(&ev, span);
        }
        if self.refused.is_empty() {
            self.loader.on_event(ev, span);
        }
    }
}

/// Parses `text` into its documents in one pass, with the checks of [`Guarded`]: the
/// refusals, or the syntax error, or the documents.
fn parse_guarded<'input>(
    file: &Path,
    text: &'input str,
) -> Result<Vec<MarkedYaml<'input>>, Vec<Diagnostic>> {
    use saphyr_parser::SpannedEventReceiver;
    let mut guarded = Guarded::new(file);
    // The parser's iterator is flat (its `load` recurses per nesting level) and does not
    // forget anchors between documents: an alias is refused, never "unknown".
    let mut parsed = Ok(());
    for ev in saphyr_parser::Parser::new_from_str(text) {
        match ev {
            Ok((ev, span)) => guarded.on_event(ev, span),
            Err(e) => {
                parsed = Err(e);
                break;
            }
        }
    }
    if !guarded.refused.is_empty() {
        return Err(guarded.refused);
    }
    let syntax = match parsed {
        Err(e) => e,
        Ok(()) => match guarded.loader.error() {
            Some(e) => e.clone(),
            None => return Ok(guarded.loader.into_documents()),
        },
    };
    let m = syntax.marker();
    Err(vec![Diagnostic {
        file: file.to_path_buf(),
        pos: Pos {
            line: m.line(),
            col: m.col() + 1,
        },
        field: String::new(),
        message: format!("YAML syntax error: {}", syntax.info()),
        hint: None,
    }])
}

/// Loads all documents from `text` (named `file` in diagnostics). Only documents
/// without any error are added to `out`.
pub fn load_str(file: &Path, text: &str, out: &mut Vec<Resource>, errors: &mut Vec<Diagnostic>) {
    load_str_partial(file, text, out, &mut Vec::new(), errors);
}

/// Like [`load_str`], also returning the documents that loaded with errors.
pub(crate) fn load_str_partial(
    file: &Path,
    text: &str,
    out: &mut Vec<Resource>,
    partial: &mut Vec<Partial>,
    errors: &mut Vec<Diagnostic>,
) {
    let docs = match parse_guarded(file, text) {
        Ok(d) => d,
        Err(refused) => {
            errors.extend(refused);
            return;
        }
    };
    for doc in docs {
        if matches!(doc.data, YamlData::Value(Scalar::Null)) {
            continue; // empty document, e.g. a trailing `---`
        }
        let mut spans = BTreeMap::new();
        let mut conv_errors = Vec::new();
        let value = to_json(&doc, String::new(), None, &mut spans, &mut conv_errors);
        let origin = Origin {
            file: file.to_path_buf(),
            pos: pos_of(&doc),
            spans: Arc::new(spans),
        };
        for (ptr, msg) in conv_errors {
            errors.push(diag(&origin, &ptr, msg, None));
        }
        match load_document(value, origin, errors) {
            Some(l) if l.complete => out.push(l.resource),
            Some(l) => partial.push(Partial {
                resource: l.resource,
                broken: l.broken,
            }),
            None => {}
        }
    }
}

fn pos_of(n: &MarkedYaml<'_>) -> Pos {
    Pos {
        line: n.span.start.line(),
        col: n.span.start.col() + 1,
    }
}

/// The JSON value of `node` (at pointer `ptr`), recording the position of every node in
/// `spans`. `key`: where the mapping key naming `node` is (none for a document or a
/// sequence item).
fn to_json(
    node: &MarkedYaml<'_>,
    ptr: String,
    key: Option<Pos>,
    spans: &mut BTreeMap<String, NodePos>,
    errs: &mut Vec<(String, String)>,
) -> Value {
    let here = pos_of(node);
    let value = match &node.data {
        YamlData::Value(s) => scalar_to_json(s),
        YamlData::Representation(text, _, _) => Value::String(text.to_string()),
        YamlData::Sequence(seq) => Value::Array(
            seq.iter()
                .enumerate()
                .map(|(i, n)| to_json(n, format!("{ptr}/{i}"), None, spans, errs))
                .collect(),
        ),
        YamlData::Mapping(map) => mapping_to_json(map, &ptr, spans, errs),
        YamlData::Tagged(_, inner) => {
            // The tag's node keeps its own position as the key; the value is the inner one's.
            let value = to_json(inner, ptr.clone(), None, spans, errs);
            if let Some(p) = spans.get_mut(&ptr) {
                p.key = key.unwrap_or(here);
            }
            return value;
        }
        YamlData::Alias(_) => {
            errs.push((
                ptr.clone(),
                "YAML aliases are not supported in manifests".into(),
            ));
            Value::Null
        }
        YamlData::BadValue => {
            errs.push((ptr.clone(), "invalid YAML value".into()));
            Value::Null
        }
    };
    // A block collection starts on the next line: its value points at its key.
    let collection = matches!(node.data, YamlData::Mapping(_) | YamlData::Sequence(_));
    let pos = match key {
        Some(k) if collection => NodePos { key: k, value: k },
        Some(k) => NodePos {
            key: k,
            value: here,
        },
        None => NodePos {
            key: here,
            value: here,
        },
    };
    spans.insert(ptr, pos);
    value
}

/// The JSON object of a YAML mapping at `ptr` (see [`to_json`]).
fn mapping_to_json(
    map: &saphyr::AnnotatedMapping<'_, MarkedYaml<'_>>,
    ptr: &str,
    spans: &mut BTreeMap<String, NodePos>,
    errs: &mut Vec<(String, String)>,
) -> Value {
    let mut obj = Map::with_capacity(map.len());
    for (k, v) in map.iter() {
        let key = match &k.data {
            YamlData::Value(Scalar::String(s)) => s.to_string(),
            YamlData::Value(other) => match scalar_to_json(other) {
                Value::String(s) => s,
                v => v.to_string(),
            },
            _ => {
                errs.push((ptr.to_string(), "mapping keys must be plain strings".into()));
                continue;
            }
        };
        let child = format!("{ptr}/{}", escape_ptr(&key));
        let val = to_json(v, child, Some(pos_of(k)), spans, errs);
        obj.insert(key, val);
    }
    Value::Object(obj)
}

fn scalar_to_json(s: &Scalar<'_>) -> Value {
    match s {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(*b),
        Scalar::Integer(i) => Value::from(*i),
        Scalar::FloatingPoint(f) => serde_json::Number::from_f64(f.into_inner())
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Scalar::String(s) => Value::String(s.to_string()),
    }
}

fn diag(origin: &Origin, ptr: &str, message: String, hint: Option<String>) -> Diagnostic {
    let pos = if message.starts_with("unknown field") {
        origin.key_pos_of(ptr)
    } else {
        origin.pos_of(ptr)
    };
    Diagnostic {
        file: origin.file.clone(),
        pos,
        field: truncate(&pointer_to_field(ptr)),
        message: truncate(&message),
        hint,
    }
}

/// A resource that loaded with errors: its wrong nodes were removed or stood in for
/// (`broken`, JSON pointers), so that the rest can still be validated.
#[derive(Debug, Clone)]
pub(crate) struct Partial {
    /// The resource, with stand-ins.
    pub resource: Resource,
    /// Pointers of the nodes that were wrong.
    pub broken: Vec<String>,
}

/// A loaded document; `complete` when it had no error at all.
struct Loaded {
    resource: Resource,
    broken: Vec<String>,
    complete: bool,
}

fn load_document(value: Value, origin: Origin, errors: &mut Vec<Diagnostic>) -> Option<Loaded> {
    let Value::Object(mut top) = value else {
        errors.push(diag(
            &origin,
            "",
            "a manifest document must be a mapping with apiVersion, kind, metadata and spec".into(),
            None,
        ));
        return None;
    };
    let mut ok = true;
    for key in top.keys() {
        if !matches!(key.as_str(), "apiVersion" | "kind" | "metadata" | "spec") {
            errors.push(diag(
                &origin,
                &format!("/{}", escape_ptr(key)),
                format!("unknown field `{key}`"),
                Some("a document has only apiVersion, kind, metadata and spec".into()),
            ));
            ok = false;
        }
    }
    match top.get("apiVersion") {
        Some(Value::String(v)) if v == API_VERSION => {}
        Some(v) => {
            errors.push(diag(
                &origin,
                "/apiVersion",
                format!("unsupported apiVersion {v}"),
                Some(format!("use apiVersion: {API_VERSION}")),
            ));
            ok = false;
        }
        None => {
            errors.push(diag(
                &origin,
                "",
                "missing field `apiVersion`".into(),
                Some(format!("add apiVersion: {API_VERSION}")),
            ));
            ok = false;
        }
    }
    let kind = match top.get("kind") {
        Some(Value::String(k)) => match k.parse::<Kind>() {
            Ok(k) => Some(k),
            Err(e) => {
                let hint = Kind::ALL
                    .iter()
                    .find(|c| c.as_str().eq_ignore_ascii_case(k))
                    .map(|c| format!("did you mean {c}?"));
                errors.push(diag(&origin, "/kind", e.0, hint));
                None
            }
        },
        Some(_) => {
            errors.push(diag(&origin, "/kind", "kind must be a string".into(), None));
            None
        }
        None => {
            errors.push(diag(&origin, "", "missing field `kind`".into(), None));
            None
        }
    };
    let metadata = match top.remove("metadata") {
        Some(v) => deserialize_all::<Metadata>(v, "/metadata", &origin, errors),
        None => {
            errors.push(diag(
                &origin,
                "",
                "missing field `metadata`".into(),
                Some("add metadata: {name: ...}".into()),
            ));
            None
        }
    };
    let spec = match (kind, top.remove("spec")) {
        (Some(kind), Some(v)) => deserialize_spec(kind, v, &origin, errors),
        (Some(_), None) => {
            errors.push(diag(&origin, "", "missing field `spec`".into(), None));
            None
        }
        (None, _) => None,
    };
    let (metadata, spec) = (metadata?, spec?);
    // Without a valid name the resource cannot be told apart from others.
    if metadata.broken.iter().any(|b| b == "/metadata/name") {
        return None;
    }
    let mut broken = metadata.broken;
    broken.extend(spec.broken);
    Some(Loaded {
        complete: ok && broken.is_empty(),
        resource: Resource {
            id: ResourceId::new(spec.value.kind(), metadata.value.name.0.clone()),
            metadata: metadata.value,
            spec: spec.value,
            origin,
        },
        broken,
    })
}

fn deserialize_spec(
    kind: Kind,
    v: Value,
    origin: &Origin,
    errors: &mut Vec<Diagnostic>,
) -> Option<Parsed<Spec>> {
    fn typed<T: serde::de::DeserializeOwned>(
        v: Value,
        origin: &Origin,
        errors: &mut Vec<Diagnostic>,
        wrap: fn(T) -> Spec,
    ) -> Option<Parsed<Spec>> {
        deserialize_all::<T>(v, "/spec", origin, errors).map(|p| Parsed {
            value: wrap(p.value),
            broken: p.broken,
        })
    }
    match kind {
        Kind::StoragePool => typed(v, origin, errors, Spec::StoragePool),
        Kind::Network => typed(v, origin, errors, Spec::Network),
        Kind::Bond => typed(v, origin, errors, Spec::Bond),
        Kind::Volume => typed(v, origin, errors, Spec::Volume),
        Kind::Container => typed(v, origin, errors, Spec::Container),
        Kind::VirtualMachine => typed(v, origin, errors, Spec::VirtualMachine),
        Kind::BackupSchedule => typed(v, origin, errors, Spec::BackupSchedule),
        Kind::HaGroup => typed(v, origin, errors, Spec::HaGroup),
    }
}

fn path_to_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("/{index}")),
            Segment::Map { key } => out.push_str(&format!("/{}", escape_ptr(key))),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

fn remove_at(v: &mut Value, rel: &str) -> bool {
    let Some((parent, last)) = rel.rsplit_once('/') else {
        return false;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    match v.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&last).is_some(),
        Some(Value::Array(a)) => match last.parse::<usize>() {
            // Replace rather than remove, so later indices keep their positions.
            Ok(i) if i < a.len() => {
                a[i] = Value::Null;
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// Sets the node at `ptr` (an existing one, or a new key of an existing mapping).
fn set_at(v: &mut Value, ptr: &str, value: Value) -> bool {
    if let Some(slot) = v.pointer_mut(ptr) {
        *slot = value;
        return true;
    }
    let Some((parent, last)) = ptr.rsplit_once('/') else {
        return false;
    };
    match v.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.insert(last.replace("~1", "/").replace("~0", "~"), value);
            true
        }
        _ => false,
    }
}

/// Stand-ins tried, in order, for a required node that is missing or was removed, so
/// that the rest of the resource can still be checked. Chosen to satisfy the common
/// value types (name, interface name, path, number, flag, block, list, socket address).
fn placeholder(attempt: usize) -> Option<Value> {
    Some(match attempt {
        0 => Value::String("x-placeholder".into()),
        1 => Value::from(0),
        2 => Value::Bool(false),
        3 => Value::Object(Map::new()),
        4 => Value::Array(Vec::new()),
        5 => Value::String("0.0.0.0:0".into()),
        _ => return None,
    })
}

/// The first allowed value named by an "unknown variant" error.
fn first_variant(msg: &str) -> Option<Value> {
    let (_, expected) = msg
        .strip_prefix("unknown variant")?
        .split_once("expected")?;
    let name = expected.split('`').nth(1)?;
    Some(Value::String(name.to_string()))
}

/// The result of [`deserialize_all`]: the value, and the pointers of the nodes that
/// were removed or stood in for because they were wrong (empty when the input was
/// valid).
struct Parsed<T> {
    value: T,
    broken: Vec<String>,
}

/// Deserializes `v` into `T`, reporting every error it can find: after each error the
/// offending node is removed (or, when required, replaced by a placeholder) and the
/// rest is tried again (bounded). Returns the value built that way with the list of
/// broken nodes, so that semantic checks can still run on the rest.
fn deserialize_all<T: serde::de::DeserializeOwned>(
    mut v: Value,
    base: &str,
    origin: &Origin,
    errors: &mut Vec<Diagnostic>,
) -> Option<Parsed<T>> {
    let mut broken: Vec<String> = Vec::new();
    let mut tries: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..128 {
        let e = match serde_path_to_error::deserialize::<_, T>(v.clone()) {
            Ok(value) => {
                let broken = broken.into_iter().map(|r| format!("{base}{r}")).collect();
                return Some(Parsed { value, broken });
            }
            Err(e) => e,
        };
        let mut rel = path_to_pointer(e.path());
        let msg = e.inner().to_string();
        // An unknown field error points at the map; name the key itself.
        if let Some(field) = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            let candidate = format!("{rel}/{}", escape_ptr(field));
            if v.pointer(&candidate).is_some() {
                rel = candidate;
            }
        }
        let missing = msg
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(|field| format!("{rel}/{}", escape_ptr(field)));
        let target = missing.clone().unwrap_or_else(|| rel.clone());
        // An error at or below a node we removed or stood in for is not news.
        let consequential = broken
            .iter()
            .any(|b| target == *b || target.starts_with(&format!("{b}/")));
        if !consequential {
            errors.push(diag(
                origin,
                &format!("{base}{rel}"),
                clean_message(&msg),
                hint_for(&msg),
            ));
        }
        if missing.is_none() && !consequential {
            // A wrong node: drop it and see whether it was required.
            if rel.is_empty() || !remove_at(&mut v, &rel) {
                return None;
            }
            broken.push(rel);
            continue;
        }
        // A required node is missing (or its stand-in did not fit): try the next one.
        let attempt = tries.entry(target.clone()).or_default();
        let stand_in = first_variant(&msg)
            .filter(|_| consequential && *attempt > 0)
            .or_else(|| placeholder(*attempt))?;
        *attempt += 1;
        if !set_at(&mut v, &target, stand_in) {
            return None;
        }
        if !broken.contains(&target) {
            broken.push(target);
        }
    }
    None
}

fn clean_message(msg: &str) -> String {
    // serde_json appends " at line X column Y" for text input; values have none, but be safe.
    let msg = match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    truncate(msg)
}

/// Cuts a message to [`MAX_MESSAGE`] characters.
fn truncate(msg: &str) -> String {
    match msg.char_indices().nth(MAX_MESSAGE) {
        Some((i, _)) => format!("{}…", &msg[..i]),
        None => msg.to_string(),
    }
}

fn hint_for(msg: &str) -> Option<String> {
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (field, tail) = rest.split_once('`')?;
        if field.chars().count() > MAX_HINT_KEY {
            return None;
        }
        let expected: Vec<&str> = tail
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s)
            .collect();
        if let Some(best) = expected
            .iter()
            .min_by_key(|c| edit_distance(&c.to_ascii_lowercase(), &field.to_ascii_lowercase()))
            .filter(|c| edit_distance(&c.to_ascii_lowercase(), &field.to_ascii_lowercase()) <= 3)
        {
            return Some(format!("did you mean `{best}`?"));
        }
        return None;
    }
    if msg.starts_with("unknown variant") {
        return Some("check the allowed values in docs/manifests.md or `stead schema`".into());
    }
    None
}

/// Levenshtein distance, for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Builds the [`Desired`] set from loaded resources, reporting duplicates.
pub fn into_desired(resources: Vec<Resource>, errors: &mut Vec<Diagnostic>) -> Desired {
    let mut desired = Desired::default();
    for r in resources {
        if let Some(first) = desired.resources.get(&r.id) {
            errors.push(Diagnostic {
                file: r.origin.file.clone(),
                pos: r.origin.pos_of("/metadata/name"),
                field: "metadata.name".into(),
                message: format!(
                    "duplicate {}: also defined at {}",
                    r.id,
                    first.origin.locate("/metadata/name")
                ),
                hint: Some("names are unique per kind".into()),
            });
            continue;
        }
        desired.resources.insert(r.id.clone(), r);
    }
    desired
}

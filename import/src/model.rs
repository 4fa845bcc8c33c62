//! The manifests an import writes: kind, name, labels, annotations and a typed spec,
//! grouped into output files.

use std::collections::BTreeMap;

use serde::Serialize;
use stead_schema::{API_VERSION, Kind};

/// The annotation that tells stead to adopt an existing object of the same name.
pub const ADOPT: &str = "stead.dev/adopt";

/// The label every imported guest carries.
pub const VMID_LABEL: &str = "pve-vmid";

/// One manifest to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Its kind.
    pub kind: Kind,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations` (always `stead.dev/adopt: "true"`).
    pub annotations: BTreeMap<String, String>,
    /// The spec as JSON.
    pub spec: serde_json::Value,
    /// Output file, relative to `--out` (`vms/web.yaml`).
    pub file: String,
}

impl Manifest {
    /// A manifest of `kind` named `name` in output file `file`, marked for adoption.
    pub fn new(kind: Kind, name: &str, spec: &impl Serialize, file: &str) -> Self {
        let mut annotations = BTreeMap::new();
        annotations.insert(ADOPT.to_string(), "true".to_string());
        Manifest {
            kind,
            name: name.to_string(),
            labels: BTreeMap::new(),
            annotations,
            spec: serde_json::to_value(spec).unwrap_or(serde_json::Value::Null),
            file: file.to_string(),
        }
    }

    /// Adds a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.to_string(), v.to_string());
        self
    }

    /// The manifest as one YAML document (without the `---` separator).
    pub fn to_yaml(&self) -> String {
        let mut meta = serde_json::Map::new();
        meta.insert("name".into(), self.name.clone().into());
        if !self.labels.is_empty() {
            meta.insert(
                "labels".into(),
                serde_json::to_value(&self.labels).unwrap_or_default(),
            );
        }
        meta.insert(
            "annotations".into(),
            serde_json::to_value(&self.annotations).unwrap_or_default(),
        );
        let doc = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": self.kind.as_str(),
            "metadata": meta,
            "spec": self.spec,
        });
        serde_saphyr::to_string(&doc).unwrap_or_default()
    }
}

/// Renders manifests into output files: relative path → YAML text, documents in the
/// order given.
pub fn render_files(manifests: &[Manifest]) -> BTreeMap<String, String> {
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for m in manifests {
        let text = files.entry(m.file.clone()).or_default();
        if !text.is_empty() {
            text.push_str("---\n");
        }
        text.push_str(&m.to_yaml());
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_schema::{Content, PoolType, StoragePoolSpec};

    #[test]
    fn yaml_quotes_label_values() {
        let spec = StoragePoolSpec {
            pool_type: PoolType::Dir,
            path: "/var/lib/vz".into(),
            content: vec![Content::Images],
            nfs: None,
            lvm: None,
            zfs: None,
            shared: false,
            depends_on: vec![],
        };
        let m = Manifest::new(Kind::StoragePool, "local", &spec, "storage.yaml")
            .label(VMID_LABEL, "100");
        let y = m.to_yaml();
        assert!(y.contains("kind: StoragePool"), "{y}");
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        stead_schema::load::load_str(std::path::Path::new("s.yaml"), &y, &mut out, &mut errors);
        assert!(errors.is_empty(), "{errors:?}\n{y}");
        assert_eq!(out[0].metadata.labels["pve-vmid"], "100");
        assert_eq!(out[0].metadata.annotations[ADOPT], "true");
    }

    #[test]
    fn files_join_documents() {
        let a = Manifest::new(Kind::Network, "a", &serde_json::json!({}), "n.yaml");
        let b = Manifest::new(Kind::Network, "b", &serde_json::json!({}), "n.yaml");
        let files = render_files(&[a, b]);
        assert_eq!(files.len(), 1);
        assert_eq!(files["n.yaml"].matches("---\n").count(), 1);
    }
}

//! Test support for the unit tests: manifests written inline as YAML.

use std::path::Path;

use stead_schema::Desired;

/// The desired state of `yaml` (one or more documents); panics on any load error.
pub(crate) fn desired(yaml: &str) -> Desired {
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    stead_schema::load::load_str(Path::new("m.yaml"), yaml, &mut resources, &mut errors);
    let d = stead_schema::load::into_desired(resources, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    d
}

/// One YAML document of `kind` named `name` with the flow-style `spec`.
pub(crate) fn doc(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: stead.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

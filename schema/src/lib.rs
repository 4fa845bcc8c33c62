//! stead's manifest model: typed kinds, value types, span-preserving loading,
//! validation that reports every error with its location, the dependency graph
//! and the JSON Schema. No host I/O beyond reading manifest files.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod cloudinit;
pub mod files;
pub mod graph;
pub mod kinds;
pub mod load;
pub mod resource;
pub mod schema;
pub mod toolnames;
pub mod validate;
pub mod values;

pub use kinds::*;
pub use load::Diagnostic;
pub use resource::{
    API_VERSION, Desired, Kind, KindSpec, Metadata, Origin, Pos, Resource, ResourceId, Spec,
};
pub use values::*;

use std::path::PathBuf;

/// Loads and validates manifests at `paths` (files or directories). Returns the
/// desired set, or every diagnostic found (syntax, types, names, references, cycles,
/// conflicts), sorted by file and position.
///
/// A resource that fails to load (a missing field, a wrong value) is still checked
/// with the rest: its wrong nodes are left out or stood in for, and no diagnostic is
/// reported at or below them a second time.
pub fn load_and_validate(paths: &[PathBuf]) -> Result<Desired, Vec<Diagnostic>> {
    let (mut resources, partial, mut errors) = load::load_paths_partial(paths);
    let broken: Vec<String> = partial
        .iter()
        .flat_map(|p| {
            p.broken
                .iter()
                .map(|b| format!("{} {}", p.resource.id, load::pointer_to_field(b)))
        })
        .collect();
    resources.extend(partial.into_iter().map(|p| p.resource));
    let desired = load::into_desired(resources, &mut errors);
    errors.extend(
        validate::validate(&desired)
            .into_iter()
            .filter(|d| !broken.iter().any(|b| field_is_at_or_below(&d.field, b))),
    );
    if errors.is_empty() {
        Ok(desired)
    } else {
        errors.sort_by(|a, b| (&a.file, a.pos).cmp(&(&b.file, b.pos)));
        errors.dedup();
        Err(errors)
    }
}

/// Whether the diagnostic field `field` (`Kind/name spec.a[0].b`) is `node` or below it.
fn field_is_at_or_below(field: &str, node: &str) -> bool {
    field
        .strip_prefix(node)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

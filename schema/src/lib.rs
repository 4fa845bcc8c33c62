//! stead's manifest model: typed kinds, value types, span-preserving loading,
//! validation that reports every error with its location, the dependency graph, the
//! JSON Schema, and the driver contract shared by the reconciler and the drivers.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod driver;
pub mod files;
pub mod graph;
pub mod kinds;
pub mod load;
pub mod resource;
pub mod schema;
pub mod toolnames;
pub mod validate;
pub mod values;

pub use driver::{
    Driver, DriverError, FieldChange, Health, HostEnv, Impact, Lookup, Observed, PruneAction,
};
pub use kinds::*;
pub use load::Diagnostic;
pub use resource::{API_VERSION, Desired, Kind, Metadata, Origin, Pos, Resource, ResourceId, Spec};
pub use values::*;

use std::path::PathBuf;

/// Loads and validates manifests at `paths` (files or directories). Returns the
/// desired set, or every diagnostic found (syntax, types, names, references, cycles,
/// conflicts), sorted by file and position.
pub fn load_and_validate(paths: &[PathBuf]) -> Result<Desired, Vec<Diagnostic>> {
    let (resources, mut errors) = load::load_paths(paths);
    let desired = load::into_desired(resources, &mut errors);
    errors.extend(validate::validate(&desired));
    if errors.is_empty() {
        Ok(desired)
    } else {
        errors.sort_by(|a, b| (&a.file, a.pos).cmp(&(&b.file, b.pos)));
        errors.dedup();
        Err(errors)
    }
}

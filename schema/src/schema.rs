//! The JSON Schema of every kind, for editors (yaml-language-server) and CI.
//! The checked-in copy is `schema/stead.schema.json`; a test fails when it is stale.

use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use crate::kinds::*;
use crate::resource::{API_VERSION, Kind, Metadata};

/// Generates the JSON Schema of a manifest document (any kind).
pub fn json_schema() -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let metadata = generator.subschema_for::<Metadata>();
    let specs = [
        (
            Kind::StoragePool,
            generator.subschema_for::<StoragePoolSpec>(),
        ),
        (Kind::Network, generator.subschema_for::<NetworkSpec>()),
        (Kind::Bond, generator.subschema_for::<BondSpec>()),
        (Kind::Volume, generator.subschema_for::<VolumeSpec>()),
        (Kind::Container, generator.subschema_for::<ContainerSpec>()),
        (
            Kind::VirtualMachine,
            generator.subschema_for::<VirtualMachineSpec>(),
        ),
        (
            Kind::BackupSchedule,
            generator.subschema_for::<BackupScheduleSpec>(),
        ),
        (Kind::HaGroup, generator.subschema_for::<HaGroupSpec>()),
    ];
    let one_of: Vec<Value> = specs
        .into_iter()
        .map(|(kind, spec)| {
            json!({
                "type": "object",
                "title": kind.as_str(),
                "additionalProperties": false,
                "required": ["apiVersion", "kind", "metadata", "spec"],
                "properties": {
                    "apiVersion": {"const": API_VERSION},
                    "kind": {"const": kind.as_str()},
                    "metadata": metadata.clone(),
                    "spec": spec,
                }
            })
        })
        .collect();
    let defs = generator.take_definitions(true);
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://stead.dev/schema/v1alpha1/stead.schema.json",
        "title": "stead manifest (v1alpha1)",
        "oneOf": one_of,
        "$defs": defs,
    })
}

/// The schema as pretty JSON text, newline-terminated (the checked-in form).
pub fn json_schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&json_schema()).unwrap_or_default();
    s.push('\n');
    s
}

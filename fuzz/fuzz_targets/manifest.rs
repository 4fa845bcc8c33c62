//! Manifest loader + validation: any bytes as a YAML file must give resources or
//! diagnostics, never a panic, a hang or unbounded memory.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    stead_schema::load::load_str(Path::new("fuzz.yaml"), text, &mut resources, &mut errors);
    let desired = stead_schema::load::into_desired(resources, &mut errors);
    let _ = stead_schema::validate::validate(&desired);
});

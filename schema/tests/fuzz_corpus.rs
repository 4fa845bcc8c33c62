//! Replays the manifest fuzzer's corpus (`fuzz/corpus/manifest`, found by libFuzzer; see
//! docs/fuzzing.md) through load + validate in every test run: no input may panic, and
//! the corpus must keep exercising both the accepting and the rejecting paths.

use std::path::Path;

use stead_schema::load::{into_desired, load_str};
use stead_schema::validate::validate;

#[path = "../../fuzz/fuzz_targets/harness/corpus.rs"]
mod corpus;

#[test]
fn manifest_fuzz_corpus_loads_and_validates_without_panicking() {
    let files = corpus::inputs(
        &Path::new(
            &std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../fuzz/corpus/manifest"),
    );
    assert!(files.len() > 100, "corpus too small: {}", files.len());
    let (mut accepted, mut rejected) = (0usize, 0usize);
    for (f, bytes) in &files {
        let Ok(text) = std::str::from_utf8(bytes) else {
            continue;
        };
        let mut resources = Vec::new();
        let mut errors = Vec::new();
        load_str(Path::new("fuzz.yaml"), text, &mut resources, &mut errors);
        let loaded = resources.len();
        let desired = into_desired(resources, &mut errors);
        errors.extend(validate(&desired));
        if errors.is_empty() && loaded > 0 {
            accepted += 1;
        } else if !errors.is_empty() {
            rejected += 1;
            for e in &errors {
                // Every diagnostic names the file it is about.
                assert!(
                    e.to_string().contains("fuzz.yaml"),
                    "{}: diagnostic without its file: {e}",
                    f.display()
                );
            }
        }
    }
    assert!(accepted > 0, "no corpus input was accepted");
    assert!(rejected > 0, "no corpus input was rejected");
}

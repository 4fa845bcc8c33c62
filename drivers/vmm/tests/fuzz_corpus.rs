//! Replays the `control` and `virtio` fuzzers' corpora (`fuzz/corpus/{control,virtio}`, found
//! by libFuzzer; see docs/fuzzing.md) in every test run, through the very harness code the
//! fuzz targets run (`fuzz/fuzz_targets/harness/`): no input may panic or break a checked
//! property, and the corpora must keep reaching the paths they were grown for.

use std::path::{Path, PathBuf};

#[path = "../../../fuzz/fuzz_targets/harness/control.rs"]
mod control;
#[path = "../../../fuzz/fuzz_targets/harness/corpus.rs"]
mod corpus;
#[path = "../../../fuzz/fuzz_targets/harness/virtio.rs"]
mod virtio;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    corpus::inputs(
        &Path::new(
            &std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../../fuzz/corpus")
        .join(target),
    )
}

#[test]
fn control_fuzz_corpus_replays_without_a_broken_property() {
    let files = corpus("control");
    assert!(files.len() >= 5, "corpus too small: {}", files.len());
    let parsed = files.iter().filter(|(_, data)| control::run(data)).count();
    assert!(parsed > 0, "no corpus input parsed as a request");
    assert!(
        parsed < files.len(),
        "every corpus input parsed as a request"
    );
}

#[test]
fn virtio_fuzz_corpus_replays_without_a_broken_property() {
    let files = corpus("virtio");
    assert!(files.len() >= 5, "corpus too small: {}", files.len());
    let served = files
        .iter()
        .filter(|(_, data)| virtio::run(data) > 0)
        .count();
    assert!(served > 0, "no corpus input got a request completed");
}

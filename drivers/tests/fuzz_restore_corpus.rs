//! Replays the `restore` fuzzer's corpus (`fuzz/corpus/restore`: hand-written manifests per
//! docs/backup-format.md plus what libFuzzer grew from them; see docs/fuzzing.md) in every
//! test run, through the very harness the fuzz target runs
//! (`fuzz/fuzz_targets/harness/restore.rs`): verify + restore of each manifest in a temp store
//! must not panic nor write beside the restore target, and the corpus must keep reaching both
//! a successful restore and a refused one.

use std::path::Path;

#[path = "../../fuzz/fuzz_targets/harness/corpus.rs"]
mod corpus;
#[path = "../../fuzz/fuzz_targets/harness/restore.rs"]
mod restore;

#[test]
fn restore_fuzz_corpus_replays_without_a_broken_property() {
    let files = corpus::inputs(
        &Path::new(
            &std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../fuzz/corpus/restore"),
    );
    assert!(files.len() >= 5, "corpus too small: {}", files.len());
    let restored = files.iter().filter(|(_, data)| restore::run(data)).count();
    assert!(restored > 0, "no corpus manifest restored");
    assert!(restored < files.len(), "every corpus manifest restored");
}

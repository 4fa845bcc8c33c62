//! Replays the `restore` fuzzer's corpus (`fuzz/corpus/restore`: hand-written manifests per
//! docs/backup-format.md plus what libFuzzer grew from them; see docs/fuzzing.md) in every
//! test run, through the very harness the fuzz target runs
//! (`fuzz/fuzz_targets/harness/restore.rs`): verify + restore of each manifest in a temp store
//! must not panic nor write beside the restore target, and the corpus must keep reaching both
//! a successful restore and a refused one.

use std::path::{Path, PathBuf};

#[path = "../../fuzz/fuzz_targets/harness/restore.rs"]
mod restore;

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/restore");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    files
}

#[test]
fn restore_fuzz_corpus_replays_without_a_broken_property() {
    let files = corpus();
    assert!(files.len() >= 5, "corpus too small: {}", files.len());
    let mut restored = 0usize;
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if restore::run(&data) {
            restored += 1;
        }
    }
    assert!(restored > 0, "no corpus manifest restored");
    assert!(restored < files.len(), "every corpus manifest restored");
}

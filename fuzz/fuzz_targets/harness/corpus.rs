//! Reading a fuzzer's corpus for the tests that replay it through its harness (included
//! by path, like the harnesses, from drivers/tests/fuzz_restore_corpus.rs,
//! drivers/vmm/tests/fuzz_corpus.rs and schema/tests/fuzz_corpus.rs).

use std::path::{Path, PathBuf};

/// Every file of the corpus directory `dir`, sorted by path, with its bytes; panics
/// naming the path when `dir` or a file cannot be read.
pub fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            (f, data)
        })
        .collect()
}

//! Container end-to-end tests (own harness, see Cargo.toml).
fn main() {}

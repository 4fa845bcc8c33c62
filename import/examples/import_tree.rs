//! Imports a Proxmox tree and writes the files, as `stead import proxmox` does, without
//! the rest of the CLI: `import_tree ROOT OUT` (OUT is replaced). For timing the import
//! itself in a release build (scripts/bench-import.sh).

use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(root), Some(out)) = (args.next(), args.next()) else {
        eprintln!("usage: import_tree ROOT OUT");
        return std::process::ExitCode::from(2);
    };
    let opts = stead_import::proxmox::Options {
        root,
        node: None,
        skip_invalid: false,
    };
    let output = match stead_import::proxmox::import(&opts) {
        Ok(o) => o,
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            return std::process::ExitCode::from(1);
        }
    };
    let _ = std::fs::remove_dir_all(&out);
    for (rel, text) in &output.files {
        let path = out.join(rel);
        if let Some(p) = path.parent()
            && let Err(e) = std::fs::create_dir_all(p)
        {
            eprintln!("{}: {e}", p.display());
            return std::process::ExitCode::from(1);
        }
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("{}: {e}", path.display());
            return std::process::ExitCode::from(1);
        }
    }
    std::process::ExitCode::SUCCESS
}

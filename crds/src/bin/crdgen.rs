//! Writes the CRD YAML of every kind to a directory (default: the crate's own
//! directory, `crds/`), or checks that the files there are current.
//!
//! Usage: `cargo run -p verge-crds --bin crdgen [-- --check] [DIR]`

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut check = false;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!("usage: crdgen [--check] [DIR]");
                return ExitCode::SUCCESS;
            }
            other => dir = PathBuf::from(other),
        }
    }
    let mut stale = false;
    for (file, crd) in verge_crds::all_crds() {
        let yaml = match verge_crds::crd_yaml(&crd) {
            Ok(y) => y,
            Err(e) => {
                eprintln!("crdgen: cannot render {file}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let path = dir.join(file);
        if check {
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current != yaml {
                eprintln!("crdgen: {} is out of date", path.display());
                stale = true;
            }
        } else if let Err(e) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("wrote {}", path.display());
        }
    }
    if stale {
        eprintln!("crdgen: run `cargo run -p verge-crds --bin crdgen` and commit the result");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

//! Writes the CRD YAML of kube-fim's resources into a directory (default: `crds/`
//! beside this crate), or prints it with `--stdout`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args().nth(1);
    if arg.as_deref() == Some("--help") || arg.as_deref() == Some("-h") {
        println!(
            "usage: crdgen [DIR | --stdout]\nWrites the kube-fim CRDs as YAML into DIR (default: the crds/ directory)."
        );
        return Ok(());
    }
    for (file, crd) in kube_fim_crds::crds() {
        let yaml = kube_fim_crds::render_crd(&crd)?;
        match arg.as_deref() {
            Some("--stdout") => print!("---\n{yaml}"),
            dir => {
                let dir = dir
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
                let path = dir.join(file);
                std::fs::write(&path, yaml)?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

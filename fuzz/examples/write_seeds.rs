//! Writes the seed corpus of every fuzz target (or of those named) into
//! `<dir>/<target>/<seed name>`: `cargo run --example write_seeds -- fuzz/corpus [TARGET...]`.
//! The seeds are the unit tests' cases, defined as structures in each harness's `seeds()`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: write_seeds <corpus dir> [TARGET...]");
        std::process::exit(2);
    };
    let named: Vec<String> = args.collect();
    for target in xenvirtio_fuzz::TARGETS {
        if !named.is_empty() && !named.iter().any(|n| n == target) {
            continue;
        }
        let out = dir.join(target);
        std::fs::create_dir_all(&out)?;
        let seeds = xenvirtio_fuzz::seeds(target);
        for (name, bytes) in &seeds {
            std::fs::write(out.join(format!("seed-{name}")), bytes)?;
        }
        println!("{target}: {} seeds in {}", seeds.len(), out.display());
    }
    Ok(())
}

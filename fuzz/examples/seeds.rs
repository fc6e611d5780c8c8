//! Writes the seed corpus: `cargo run --example seeds` (from fuzz/).

use std::fs;
use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, inputs) in ringtftpd_fuzz::seeds::all() {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        for (name, bytes) in inputs {
            fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
        println!("{target}: {} seeds", inputs_len(&dir)?);
    }
    Ok(())
}

fn inputs_len(dir: &Path) -> std::io::Result<usize> {
    Ok(fs::read_dir(dir)?.filter(|e| e.is_ok()).count())
}

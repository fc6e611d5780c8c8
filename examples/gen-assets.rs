//! Writes what the Debian package ships beside the binary, generated from
//! the clap definition so it cannot drift from `--help`: the man page
//! (ringtftpd.8) and shell completions (bash, zsh, fish).
//!
//! `cargo run --example gen-assets -- DIR` (scripts/build-deb.sh runs it).

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;
use ringtftpd::config::Config;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/assets".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let command = Config::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section("8")
        .render(&mut page)?;
    std::fs::write(dir.join("ringtftpd.8"), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut command = command.clone();
        let path = clap_complete::generate_to(shell, &mut command, "ringtftpd", &dir)?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!("wrote {}", dir.join("ringtftpd.8").display());
    Ok(())
}

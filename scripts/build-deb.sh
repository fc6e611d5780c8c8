#!/usr/bin/env bash
# Builds the Debian package: target/debian/ringtftpd_VERSION_ARCH.deb.
# Installs cargo-deb on first use. The man page and shell completions are
# generated from the clap definition (examples/gen-assets.rs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*"; }

if ! cargo deb --version >/dev/null 2>&1; then
    log "cargo install cargo-deb --version 3.8.0 --locked"
    cargo install cargo-deb --version 3.8.0 --locked --quiet
fi
log "generating the man page and completions"
rm -rf target/assets
cargo run --quiet --example gen-assets -- target/assets
gzip -9n target/assets/ringtftpd.8
log "cargo deb"
cargo deb --quiet --dbgsym "$@"
ls target/debian/*.deb target/debian/*.ddeb

#!/usr/bin/env bash
# Fetch one TFTP server from Debian unstable (sid) with unstable's libc6 and the
# libraries it depends on directly, unpack them into target/peers/NAME/x and print
# the command prefix that runs it with unstable's loader (the host's glibc may be
# older than the one it was built against):
#
#   DIR/usr/lib64/ld-linux-x86-64.so.2 --library-path DIR/usr/lib/x86_64-linux-gnu:DIR/lib/x86_64-linux-gnu DIR/BIN
#
# Usage: scripts/peer-sid.sh NAME PACKAGE BIN VERSION_ARG VERSION_REGEX
#   e.g. scripts/peer-sid.sh dnsmasq-2.93 dnsmasq-base usr/sbin/dnsmasq --version '^Dnsmasq version 2\.9[3-9]'
# (scripts/peer-dnsmasq.sh and scripts/peer-atftpd.sh call it so.) Idempotent: once the
# unpacked binary reports a matching version, a second run only prints the prefix.
# Nothing is installed on the host: apt-get runs with its own lists, cache and status
# under the peer directory, and only downloads. Diagnostics go to stderr; stdout
# carries the prefix alone. Exit status 1 (with the reason on stderr) when it cannot.
set -euo pipefail

[ $# -eq 5 ] || { echo "usage: $0 NAME PACKAGE BIN VERSION_ARG VERSION_REGEX" >&2; exit 2; }
name=$1 pkg=$2 relbin=$3 varg=$4 vre=$5

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${CARGO_TARGET_DIR:-$root/target}/peers/$name"
x="$dir/x"
ld="$x/usr/lib64/ld-linux-x86-64.so.2"
libs="$x/usr/lib/x86_64-linux-gnu:$x/lib/x86_64-linux-gnu"
bin="$x/$relbin"

prefix() { printf '%s --library-path %s %s\n' "$ld" "$libs" "$bin"; }
works() {
    [ -x "$ld" ] && [ -x "$bin" ] \
        && timeout 10 "$ld" --library-path "$libs" "$bin" "$varg" 2>&1 </dev/null | grep -Eq "$vre"
}

if works; then
    prefix
    exit 0
fi

command -v apt-get >/dev/null || { echo "peer-sid($name): apt-get is needed to fetch Debian's packages" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "peer-sid($name): dpkg-deb is needed to unpack Debian's packages" >&2; exit 1; }

apt="$dir/apt"
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/prefs.d" "$dir/debs"
echo 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main' >"$apt/sources.list"
: >"$apt/status"
opts=(
    -o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State=$apt" -o "Dir::State::Lists=$apt/lists" -o "Dir::State::status=$apt/status"
    -o "Dir::Cache=$apt/cache" -o Dir::Etc::Preferences=/nonexistent -o "Dir::Etc::PreferencesParts=$apt/prefs.d"
    -o APT::Architecture=amd64 -o APT::Architectures=amd64 -o Acquire::Languages=none
    -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
    -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
    -o Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false
    -o APT::Sandbox::User=root
)

echo "peer-sid($name): fetching $pkg, libc6 and $pkg's libraries from Debian unstable into $dir" >&2
apt-get -qq "${opts[@]}" update >&2
# The package's dependencies that are shared libraries (lib*, followed recursively): the
# host's versions of these may be missing or older than unstable's build needs.
mapfile -t deps < <(apt-cache "${opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances "$pkg" 2>/dev/null \
    | sed -n 's/^ *|\{0,1\}Depends: \(lib[^ <>]*\)$/\1/p' | sort -u)
echo "peer-sid($name): libraries: ${deps[*]:-(none)}" >&2
(cd "$dir/debs" && rm -f ./*.deb && apt-get -qq "${opts[@]}" download "$pkg" libc6 "${deps[@]}" >&2)

rm -rf "$x"
mkdir -p "$x"
for deb in "$dir"/debs/*.deb; do
    dpkg-deb -x "$deb" "$x"
done

if ! works; then
    echo "peer-sid($name): unpacked, but $bin $varg does not match /$vre/:" >&2
    "$ld" --library-path "$libs" "$bin" "$varg" 2>&1 </dev/null | head -3 >&2 || true
    exit 1
fi
prefix

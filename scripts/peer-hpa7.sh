#!/usr/bin/env bash
# Fetch tftpd-hpa 7.x from Debian unstable, with unstable's libc6 (7.x needs
# a newer glibc than the host may have), unpack both into target/peers/hpa7/
# and print the command prefix that runs it:
#
#   DIR/usr/lib64/ld-linux-x86-64.so.2 --library-path DIR/usr/lib/x86_64-linux-gnu DIR/usr/sbin/in.tftpd
#
# Idempotent: a second run only checks the unpacked binary and prints the
# prefix. Nothing is installed on the host: apt-get runs with its own lists,
# cache and status under the peer directory, and only downloads.
# Diagnostics go to stderr; stdout carries the prefix alone.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${RINGTFTPD_PEER_HPA7_DIR:-${CARGO_TARGET_DIR:-$root/target}/peers/hpa7}"
x="$dir/x"
ld="$x/usr/lib64/ld-linux-x86-64.so.2"
libs="$x/usr/lib/x86_64-linux-gnu"
bin="$x/usr/sbin/in.tftpd"

prefix() { printf '%s --library-path %s %s\n' "$ld" "$libs" "$bin"; }

works() { [ -x "$ld" ] && [ -x "$bin" ] && "$ld" --library-path "$libs" "$bin" -V 2>/dev/null | grep -q '^tftp-hpa 7\.'; }

if works; then
    prefix
    exit 0
fi

command -v apt-get >/dev/null || { echo "peer-hpa7: apt-get is needed to fetch Debian's packages" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "peer-hpa7: dpkg-deb is needed to unpack Debian's packages" >&2; exit 1; }

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

echo "peer-hpa7: fetching tftpd-hpa and libc6 from Debian unstable into $dir" >&2
apt-get -qq "${opts[@]}" update >&2
(cd "$dir/debs" && rm -f ./*.deb && apt-get -qq "${opts[@]}" download tftpd-hpa libc6 >&2)

rm -rf "$x"
mkdir -p "$x"
for deb in "$dir"/debs/*.deb; do
    dpkg-deb -x "$deb" "$x"
done

if ! works; then
    echo "peer-hpa7: unpacked, but $bin -V does not report tftp-hpa 7.x" >&2
    exit 1
fi
prefix

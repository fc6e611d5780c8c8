#!/usr/bin/env bash
# The Debian package, end to end: build it (scripts/build-deb.sh), run
# lintian (no errors allowed), then install it with dpkg on this machine
# over tftpd-hpa, check its files and account, and serve a file with the
# installed binary to tftp-hpa's client on loopback.
#
# The install happens in a throwaway copy of the root: a private mount
# namespace with an overlay over /, entered with chroot, so this machine's
# packages (tftpd-hpa, which the differential tests use) stay as they were.
# Needs root (mount, chroot). Exit 0 only if every check passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*"; }
die() { printf 'deb-test: FAIL: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (mount namespace, overlay, chroot)"

if [[ ${1:-} != --inside ]]; then
    export DEBIAN_FRONTEND=noninteractive
    if ! command -v lintian >/dev/null 2>&1; then
        log "apt-get install -y lintian"
        apt-get update -q </dev/null
        apt-get install -y -q --no-install-recommends lintian </dev/null
    fi
    scripts/build-deb.sh
    deb=$(ls -t target/debian/ringtftpd_*.deb | head -n1)
    log "lintian $deb"
    # Errors fail; warnings are shown.
    lintian --fail-on error --suppress-tags-from-file /dev/null "$deb" || die "lintian reported errors"
    log "dpkg -I"
    dpkg-deb -I "$deb" | sed -n '/Package:/,$p'
    scratch=$(mktemp -d /tmp/ringtftpd-deb-test.XXXXXX)
    trap 'rm -rf "$scratch"' EXIT
    cp "$deb" "$scratch/ringtftpd.deb"
    unshare --mount --propagation private -- "$0" --inside "$scratch"
    log "PASS: package built, lintian clean of errors, installed and served"
    exit 0
fi

# ---- inside the private mount namespace
scratch=$2
mkdir -p "$scratch/ov"
mount -t tmpfs tmpfs "$scratch/ov"
mkdir -p "$scratch/ov/upper" "$scratch/ov/work" "$scratch/ov/root"
root=$scratch/ov/root
mount -t overlay overlay -o "lowerdir=/,upperdir=$scratch/ov/upper,workdir=$scratch/ov/work" "$root"
for fs in proc sys dev; do mount --rbind "/$fs" "$root/$fs"; done
mount -t tmpfs tmpfs "$root/tmp"
mount -t tmpfs tmpfs "$root/run"
cp "$scratch/ringtftpd.deb" "$root/tmp/"
in_root() { chroot "$root" "$@"; }

if in_root dpkg-query -W -f='${Status}' tftpd-hpa 2>/dev/null | grep -q 'install ok installed'; then
    log "tftpd-hpa is installed (in the copy): installing ringtftpd over it"
    had_hpa=1
else
    had_hpa=0
fi
# What an operator of tftpd-hpa has: its settings, which the unit reads.
if [[ ! -e $root/etc/default/tftpd-hpa ]]; then
    printf 'TFTP_USERNAME="tftp"\nTFTP_DIRECTORY="/srv/tftp"\nTFTP_ADDRESS=":69"\nTFTP_OPTIONS="--secure"\n' \
        >"$root/etc/default/tftpd-hpa"
fi
log "dpkg -i (tftpd-hpa conflicts: removed first, as apt would)"
if [[ $had_hpa -eq 1 ]]; then
    in_root dpkg --remove tftpd-hpa >/dev/null
fi
in_root dpkg -i /tmp/ringtftpd.deb

log "checking the installed files"
for f in /usr/sbin/ringtftpd /usr/share/man/man8/ringtftpd.8.gz \
    /usr/share/bash-completion/completions/ringtftpd \
    /usr/share/zsh/vendor-completions/_ringtftpd \
    /usr/share/fish/vendor_completions.d/ringtftpd.fish \
    /etc/default/ringtftpd /usr/lib/sysusers.d/ringtftpd.conf \
    /usr/share/doc/ringtftpd/copyright; do
    [[ -e $root$f ]] || die "missing $f"
done
unit=$(in_root dpkg -L ringtftpd | grep -E '/systemd/system/ringtftpd\.service$') || die "no ringtftpd.service in the package"
in_root dpkg -L ringtftpd | grep -E '/systemd/system/ringtftpd-activated\.socket$' >/dev/null || die "no ringtftpd-activated.socket in the package"
[[ -L $root/etc/systemd/system/multi-user.target.wants/ringtftpd.service ]] || die "ringtftpd.service is not enabled"
[[ ! -e $root/etc/systemd/system/sockets.target.wants/ringtftpd-activated.socket ]] || die "the socket unit is enabled too"
grep -q '^/etc/default/ringtftpd$' "$root/var/lib/dpkg/info/ringtftpd.conffiles" || die "/etc/default/ringtftpd is not a conffile"
in_root getent passwd tftp >/dev/null || die "no tftp account after install"
[[ -d $root/srv/tftp ]] || die "no /srv/tftp after install"
in_root /usr/sbin/ringtftpd --version
in_root man -w ringtftpd >/dev/null 2>&1 || in_root zcat /usr/share/man/man8/ringtftpd.8.gz | grep -q '^\.TH' || die "the man page does not read"
if in_root systemd-analyze --version >/dev/null 2>&1; then
    in_root systemd-analyze verify "$unit" "${unit%/*}/ringtftpd-activated.socket" 2>&1 | tee "$scratch/verify.txt"
    # The man page named in Documentation= is installed now: no warnings.
    [[ ! -s $scratch/verify.txt ]] || die "systemd-analyze verify warned about the installed unit"
fi
# The stock settings, as the unit passes them, pass --check-config.
in_root /usr/sbin/ringtftpd --check-config --foreground --address :69 --secure /srv/tftp

log "serving a file with the installed binary on loopback, as user tftp"
head -c 300000 /dev/urandom >"$root/srv/tftp/boot.img"
chmod 0644 "$root/srv/tftp/boot.img"
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
chroot "$root" /usr/sbin/ringtftpd --foreground --address "127.0.0.1:$port" --user tftp --secure /srv/tftp \
    2>"$scratch/server.log" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
ok=0
for _ in $(seq 1 50); do
    rm -f "$scratch/got.img"
    if (cd "$scratch" && timeout 10 tftp -m binary 127.0.0.1 "$port" -c get boot.img got.img) 2>/dev/null &&
        cmp -s "$scratch/got.img" "$root/srv/tftp/boot.img"; then
        ok=1
        break
    fi
    sleep 0.1
done
kill "$server"
wait "$server" || true
trap - EXIT
cat "$scratch/server.log"
[[ $ok -eq 1 ]] || die "the installed server did not serve boot.img byte for byte"
log "installed binary served 300000 bytes to tftp-hpa"
log "dpkg --purge ringtftpd"
in_root dpkg --purge ringtftpd >/dev/null
[[ ! -e $root/usr/sbin/ringtftpd ]] || die "/usr/sbin/ringtftpd left after purge"

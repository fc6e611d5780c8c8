#!/usr/bin/env bash
# The project's one test command. On Debian it first installs, if absent, the
# TFTP clients the integration tests drive (tftp-hpa, atftp, curl, busybox)
# and promtool (for tests/metrics.rs) and tmux (for tests/top.rs),
# then runs every test in the workspace. Safe to re-run: it installs only
# what is missing and runs `apt-get update` only when it must install.
#
# RINGTFTPD_TEST_SERVER=hpa runs the client tests against tftpd-hpa instead
# of ringtftpd (to validate the tests). tftpd-hpa is installed without
# starting it; tftpd-hpa 7.x comes from Debian unstable through
# scripts/peer-hpa7.sh (RINGTFTPD_SKIP_PEER_HPA7=1 skips what needs it).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*"; }
die() { printf 'test.sh: error: %s\n' "$*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive

# Files to remove on exit.
cleanup=()
trap 'if ((${#cleanup[@]})); then "${SUDO[@]}" rm -f "${cleanup[@]}"; fi' EXIT

SUDO=()
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
fi

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: $*"
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        "${SUDO[@]}" apt-get update -q </dev/null
        apt_updated=1
    fi
    log "apt-get install -y $*"
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "$@" </dev/null
}

# grep without -q reads all input, so the writer never dies of SIGPIPE
# (which pipefail would report as "absent").
have_tftp_hpa() {
    command -v tftp >/dev/null 2>&1 && tftp -V 2>&1 | grep 'tftp-hpa' >/dev/null
}
have_atftp() {
    command -v atftp >/dev/null 2>&1
}
have_curl_tftp() {
    command -v curl >/dev/null 2>&1 &&
        curl -V 2>/dev/null | grep '^Protocols:' | grep -w tftp >/dev/null
}
have_busybox_tftp() {
    command -v busybox >/dev/null 2>&1 && busybox --list 2>/dev/null | grep -x tftp >/dev/null
}

log "checking TFTP clients"

if have_tftp_hpa; then
    log "tftp-hpa present: $(tftp -V 2>&1 | head -n1)"
else
    apt_install tftp-hpa
    have_tftp_hpa || die "tftp-hpa installed but 'tftp -V' does not say tftp-hpa"
fi

if have_atftp; then
    log "atftp present: $(atftp -V 2>&1 | head -n1)"
else
    apt_install atftp
    have_atftp || die "atftp installed but not on PATH"
fi

if have_curl_tftp; then
    log "curl with tftp present: $(curl -V | head -n1 | cut -d' ' -f1-2)"
else
    apt_install curl
    have_curl_tftp || die "curl installed but 'curl -V' lists no tftp protocol"
fi

# Some busybox builds lack the tftp applet; busybox-static is the fallback.
if have_busybox_tftp; then
    log "busybox with tftp applet present"
else
    command -v busybox >/dev/null 2>&1 || apt_install busybox
    if ! have_busybox_tftp; then
        log "busybox lacks the tftp applet; trying busybox-static"
        apt_install busybox-static
    fi
    have_busybox_tftp || die "no busybox with a tftp applet (tried busybox, busybox-static)"
fi
bb_pkg=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' busybox busybox-static 2>/dev/null |
    awk '$1 == "ii" { print $2 }' | head -n1 || true)
log "busybox tftp applet from package: ${bb_pkg:-unknown}"

# tftpd-hpa 5.2 is the reference server of the differential tests
# (tests/remap.rs, and every client test under RINGTFTPD_TEST_SERVER=hpa).
# Keeps an installed package's service from starting: policy-rc.d exit 101
# denies it. The policy is removed afterwards only if we created it.
deny_service_starts() {
    local policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        cleanup+=("$policy")
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 755 "$policy"
    fi
}
if [[ ! -x /usr/sbin/in.tftpd ]]; then
    deny_service_starts
    apt_install tftpd-hpa
fi

# tests/metrics.rs checks the --metrics output with `promtool check
# metrics`, which Debian ships in its prometheus package (the Prometheus
# server itself is not started).
if command -v promtool >/dev/null 2>&1; then
    log "promtool present: $(promtool --version 2>&1 | head -n1)"
else
    deny_service_starts
    apt_install prometheus
    command -v promtool >/dev/null 2>&1 || die "prometheus installed but promtool not on PATH"
fi

# The real-loss tests (tests/lossy.rs) build network namespaces joined by a
# veth pair and drop and duplicate packets with nftables.
if command -v nft >/dev/null 2>&1; then
    log "nftables present: $(nft --version 2>&1 | head -n1)"
else
    apt_install nftables
    command -v nft >/dev/null 2>&1 || die "nftables installed but nft not on PATH"
fi
command -v ip >/dev/null 2>&1 || apt_install iproute2
# tests/startup.rs starts the server under socket activation as systemd does.
command -v systemd-socket-activate >/dev/null 2>&1 || apt_install systemd

# tests/top.rs drives `ringtftpd top` inside tmux (send-keys, capture-pane).
if command -v tmux >/dev/null 2>&1; then
    log "tmux present: $(tmux -V 2>&1 | head -n1)"
else
    apt_install tmux
    command -v tmux >/dev/null 2>&1 || die "tmux installed but not on PATH"
fi

command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust stable first)"

# Client tests fail rather than skip when a client is missing; the lossy
# tests fail rather than skip when namespaces or nft cannot be used.
export RINGTFTPD_REQUIRE_CLIENTS=1
export RINGTFTPD_REQUIRE_NETNS=1

log "cargo test --workspace --all-targets --no-fail-fast"
out=$(mktemp)
cleanup+=("$out")
status=0
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$out" || status=$?
# Smoke test of the benchmark harness: every scenario at a small scale,
# byte-exact and complete; it asserts no timing.
log "scripts/compare.sh --quick"
scripts/compare.sh --quick 2>&1 | tee -a "$out" || status=$?
# The Debian package: built, lintian-checked, installed with dpkg over
# tftpd-hpa in a throwaway overlay of / and served from (needs root).
if [[ $(id -u) -eq 0 ]]; then
    log "scripts/deb-test.sh"
    if scripts/deb-test.sh 2>&1 | tee -a "$out"; then
        echo "deb test: 1 passed, 0 failed" | tee -a "$out"
    else
        status=1
        echo "deb test: 0 passed, 1 failed" | tee -a "$out"
    fi
else
    log "scripts/deb-test.sh skipped: needs root"
fi
# Fuzz smoke run: replay the checked-in corpus, then each coverage-guided
# target briefly (installs cargo-fuzz on first use; see docs/robustness.md).
log "fuzz/smoke.sh (FUZZ_SECONDS=${FUZZ_SECONDS:=15})"
FUZZ_SECONDS=$FUZZ_SECONDS fuzz/smoke.sh 2>&1 | tee -a "$out" || status=$?
# One closing line over every test binary, for whoever reads only the end.
# A test binary that panicked outside a test (a bench's setup) and a fuzz
# target that crashed print no counts: each is one failure.
awk '/^test result:|^compare --quick:|^fuzz smoke:|^deb test:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1) } }
     /^error: (test|bench) failed, to rerun/ && !/--test |--lib/ { f += 1 }
     /^fuzz smoke: [a-z_]+ FAILED/ { f += 1 }
     END { printf "total: %d passed, %d failed\n", p, f }' "$out"
exit "$status"

#!/usr/bin/env bash
# Benchmarks ringtftpd beside tftpd-hpa, atftpd and dnsmasq (Debian stable's, and the newest
# releases from Debian unstable: tftpd-hpa 7.x, dnsmasq 2.93, atftpd 0.8.1) and loadtest's
# lock-step floor server on loopback and writes docs/benchmarks.md, docs/benchmarks/*.png
# and docs/benchmarks/raw.jsonl.
#
# Usage:
#   scripts/compare.sh             full run: the criterion micro-benchmarks (benches/*.rs),
#                                  then S1-S6, S8 and S3a x 3 repetitions x 8 servers (S8 uploads: not dnsmasq nor
#                                  the floor), plus syscall counts, instruction counts and a profile
#                                  (about 30-45 min; --budget 2700 s of measuring)
#   scripts/compare.sh --quick     smoke test: ringtftpd alone (and --single-port), tiny sizes, checks that every
#                                  transfer completes byte-exact (and every client of a 1,000-client S7 boot storm), asserts no timing
#   Any other arguments go to the `compare` binary (see `target/release/compare --help`),
#   e.g. --scenarios S1,S2 --servers ringtftpd,dnsmasq --reps 1 --no-extras,
#   or --client-style both (each scenario also as S1i, S2i, ...: loadtest --client-style independent).
#   S7 is the boot storm (loadtest/src/bin/compare/storm.rs: 15,000 iPXE-like clients over several
#   loadtest processes, each asking for a missing autoexec.ipxe, then 1 MiB at blksize 1432); it runs
#   only when named, e.g. --scenarios S7 --servers ringtftpd,ringtftpd-single-port --reps 1 --no-extras,
#   prints its table and writes no page (docs/benchmarks.md's "Boot storm" section is by hand).
#
# The full run needs root: it installs what is missing from Debian (tftpd-hpa and
# dnsmasq-base with a policy-rc.d that keeps any service from starting; atftpd, which
# conflicts with tftpd-hpa as a package, is downloaded and unpacked under target/peers/;
# linux-perf, fonts-dejavu-core; and, when the system valgrind is older than 3.21 and cannot
# run a server that uses openat2, Debian trixie's valgrind unpacked under target/peers/),
# puts each server in a cgroup of its own and pins it to CPU 1, the load generator to CPU 0.
# dnsmasq serves TFTP on port 69 only: it is skipped if anything else holds that port.
# COMPARE_VALGRIND=0 skips the instruction counts (and the valgrind download).
# COMPARE_CRITERION=0 skips the micro-benchmarks (cargo bench with short settings, pinned to
# the servers' CPU, about 1.5-3 min); if they fail the run goes on and the docs say so.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT_DIR=$(pwd)
# Cargo's output directory (CARGO_TARGET_DIR when set, as in a worktree sharing a build dir).
TARGET=${CARGO_TARGET_DIR:-$ROOT_DIR/target}

quick=0
for a in "$@"; do
    [[ $a == --quick ]] && quick=1
done

say() { printf 'compare.sh: %s\n' "$*" >&2; }

if [[ $quick == 1 ]]; then
    # The test command has just built the dev profile: reuse it rather than build release.
    say "cargo build --workspace (dev profile)"
    cargo build --workspace --bins -q
    exec "$TARGET/debug/compare" --bin-dir "$TARGET/debug" "$@"
fi

export DEBIAN_FRONTEND=noninteractive
[[ $(id -u) -eq 0 ]] || { say "the full run needs root (cgroups, apt-get, port 69)"; exit 2; }

apt_updated=0
apt_install() {
    if [[ $apt_updated == 0 ]]; then
        say "apt-get update"
        apt-get update -q >/dev/null
        apt_updated=1
    fi
    say "apt-get install -y $*"
    apt-get install -y -q --no-install-recommends "$@" </dev/null >/dev/null
}

# Keep package services (tftpd-hpa's in particular, which would take port 69) from
# starting; remove the policy afterwards only if we created it.
policy=/usr/sbin/policy-rc.d
created_policy=0
cleanup() { [[ $created_policy == 1 ]] && rm -f "$policy"; return 0; }
trap cleanup EXIT
with_policy() {
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
}

if [[ ! -x /usr/sbin/in.tftpd ]]; then
    with_policy
    apt_install tftpd-hpa
fi
if [[ ! -x /usr/sbin/dnsmasq ]]; then
    # dnsmasq-base is the binary alone, without the DNS service of the dnsmasq package.
    with_policy
    apt_install dnsmasq-base
fi
command -v perf >/dev/null || apt_install linux-perf || say "no perf: syscall counts and profile will be skipped"
command -v taskset >/dev/null || apt_install util-linux
[[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || apt_install fonts-dejavu-core \
    || say "no font: charts will be skipped"

PEERS=$TARGET/peers
mkdir -p "$PEERS"

# atftpd conflicts with tftpd-hpa as a package: unpack Debian's binary instead.
ATFTPD=$PEERS/atftpd/usr/sbin/atftpd
if [[ ! -x $ATFTPD ]]; then
    say "apt-get download atftpd (unpacked under target/peers/atftpd)"
    [[ $apt_updated == 1 ]] || { apt-get update -q >/dev/null; apt_updated=1; }
    (cd "$PEERS" && rm -f atftpd_*.deb && apt-get download atftpd >/dev/null 2>&1 \
        && dpkg -x atftpd_*.deb atftpd) || say "could not fetch atftpd: it will be skipped"
fi
if [[ -x $ATFTPD ]] && ldd "$ATFTPD" | grep -q 'not found'; then
    # Its libraries (libwrap0, libpcre2-8-0) come with tftpd-hpa on most systems.
    apt_install libwrap0 libpcre2-8-0 || true
fi

# The newest releases from Debian unstable (issue 12), run with unstable's loader and
# libraries unpacked beside them: tftpd-hpa 7.x, dnsmasq 2.93, atftpd 0.8.1. One that
# cannot be fetched is skipped with the reason (compare then reports it as skipped).
# COMPARE_NEWEST=0 skips them.
peer_args=()
if [[ ${COMPARE_NEWEST:-1} != 0 ]]; then
    for spec in tftpd-hpa-7:peer-hpa7.sh dnsmasq-2.93:peer-dnsmasq.sh atftpd-0.8.1:peer-atftpd.sh; do
        kind=${spec%%:*} script=${spec#*:}
        if cmd=$(timeout 300 "scripts/$script" 2>"$PEERS/$kind.log"); then
            peer_args+=(--peer "$kind=$cmd")
        else
            say "SKIP $kind: scripts/$script failed: $(tail -1 "$PEERS/$kind.log" 2>/dev/null)"
        fi
    done
fi

# Instruction counts use callgrind; valgrind before 3.21 does not know openat2, which
# ringtftpd needs, so a newer one is unpacked from Debian trixie (its tools are static).
VALGRIND=""
vg_ok() { # version >= 3.21
    local v
    v=$("$1" --version 2>/dev/null | sed -n 's/^valgrind-\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    [[ -n $v ]] && read -r major minor <<<"$v" && ((major > 3 || (major == 3 && minor >= 21)))
}
if [[ ${COMPARE_VALGRIND:-1} != 0 ]]; then
    if command -v valgrind >/dev/null && vg_ok valgrind; then
        VALGRIND=$(command -v valgrind)
    else
        VG=$PEERS/valgrind
        if [[ ! -x $VG/valgrind ]]; then
            say "fetching Debian trixie's valgrind into target/peers/valgrind (system one is too old)"
            apt_dir=$PEERS/apt-trixie
            mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$VG"
            echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
                >"$apt_dir/sources.list"
            opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
                  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
            if apt-get "${opts[@]}" update -q >/dev/null 2>&1 \
                && (cd "$VG" && rm -f valgrind_*.deb && apt-get "${opts[@]}" download valgrind >/dev/null 2>&1) \
                && dpkg -x "$VG"/valgrind_*.deb "$VG/pkg"; then
                printf '#!/bin/sh\nVALGRIND_LIB=%s/pkg/usr/libexec/valgrind exec %s/pkg/usr/bin/valgrind.bin "$@"\n' \
                    "$VG" "$VG" >"$VG/valgrind"
                chmod 755 "$VG/valgrind"
            fi
            rm -rf "$apt_dir"
        fi
        if [[ -x $VG/valgrind ]] && vg_ok "$VG/valgrind"; then
            VALGRIND=$VG/valgrind
        else
            say "no valgrind >= 3.21: instruction counts will be skipped"
        fi
    fi
fi

say "cargo build --release --workspace"
cargo build --release --workspace -q

args=(--atftpd "$ATFTPD" "${peer_args[@]}" --command "scripts/compare.sh${*:+ $*}")
[[ -n $VALGRIND ]] && args+=(--valgrind "$VALGRIND")

# Criterion micro-benchmarks, on the CPU the servers will use (as `compare` picks it: 1 when
# there are two CPUs or more, or --server-cpu), with short settings so all take ~1.5-3 min.
# `compare` puts the results written from $since on into the docs, so a stale
# target/criterion never passes for this run's.
if [[ ${COMPARE_CRITERION:-1} != 0 ]]; then
    cpu=""
    [[ $(nproc) -ge 2 ]] && cpu=1
    prev=""
    for a in "$@"; do
        [[ $prev == --server-cpu ]] && cpu=$a
        [[ $a == --server-cpu=* ]] && cpu=${a#--server-cpu=}
        prev=$a
    done
    benches=(--bench proto --bench session --bench timer --bench files)
    bench_cmd=(cargo bench "${benches[@]}" -- --warm-up-time 1 --measurement-time 3 --noplot)
    [[ -n $cpu ]] && command -v taskset >/dev/null && bench_cmd=(taskset -c "$cpu" "${bench_cmd[@]}")
    # Build unpinned first, so compiling is neither slowed by the pinning nor timed.
    say "cargo bench --no-run ${benches[*]}"
    if cargo bench --no-run -q "${benches[@]}"; then
        since=$(date +%s)
        say "${bench_cmd[*]}"
        status=0
        # Criterion reports on stdout; keep compare's stdout for its summary.
        "${bench_cmd[@]}" >&2 || status=$?
        say "micro-benchmarks done in $(($(date +%s) - since)) s"
        args+=(--criterion-dir "$TARGET/criterion" --criterion-since "$since"
               --criterion-command "${bench_cmd[*]}")
        if [[ $status != 0 ]]; then
            say "the micro-benchmarks failed (exit status $status): going on without the rest of them"
            args+=(--criterion-error "exit status $status")
        fi
    else
        say "the micro-benchmarks did not build: going on without them"
        args+=(--criterion-command "${bench_cmd[*]}" --criterion-error "they did not build")
    fi
fi

exec "$TARGET/release/compare" "${args[@]}" "$@"

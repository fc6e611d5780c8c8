#!/usr/bin/env bash
# Throughput under real packet loss: ringtftpd and tftpd-hpa served across a
# veth pair between two network namespaces of our own (scripts/lossy-net.sh),
# first clean, then with LOSS % of the UDP datagrams dropped and DUP %
# duplicated, each way. Every transfer is byte-checked by the load generator.
#
#   scripts/loss-bench.sh rto     60 transfers of 64 KiB..4 MiB, 20 at a time, lock-step
#                                 (windowsize 1), ringtftpd only; REPS runs of clean and
#                                 lossy, interleaved; medians and lossy/clean ratio
#                                 (issue #9 target: >= 10 %)
#   scripts/loss-bench.sh mixed   200 transfers of 1 KiB..4 MiB, 20 at a time, at
#                                 windowsize 1 and 16, ringtftpd and tftpd-hpa, clean and
#                                 lossy, one run each
#   scripts/loss-bench.sh         both
#
# Environment: LOSS=5 DUP=1 (percent), REPS=3, BLKSIZE=1468 (a 1500-byte MTU),
# C=20, N_RTO=60, N_MIXED=200, SERVERS="ringtftpd tftpd-hpa" (mixed only),
# RINGTFTPD=target/release/ringtftpd, LOADTEST=target/release/loadtest,
# MAX_TIME=600 (seconds per run), CHECK_TARGET=1 (rto: exit 3 when lossy/clean < 10 %).
# The client retransmits after 1 s (loadtest default), so recovery speed is
# the server's. Exit status: 0 when every run completed byte-exact, 1 if not.
set -u

LOSS=${LOSS:-5}
DUP=${DUP:-1}
REPS=${REPS:-3}
BLKSIZE=${BLKSIZE:-1468}
C=${C:-20}
N_RTO=${N_RTO:-60}
N_MIXED=${N_MIXED:-200}
SERVERS=${SERVERS:-ringtftpd tftpd-hpa}
MAX_TIME=${MAX_TIME:-600}
CHECK_TARGET=${CHECK_TARGET:-0}

ROOT_DIR=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT_DIR" || exit 1
NET="$ROOT_DIR/scripts/lossy-net.sh"
RINGTFTPD=${RINGTFTPD:-target/release/ringtftpd}
LOADTEST=${LOADTEST:-target/release/loadtest}
SERVER_IP=10.99.0.1
PORT=69

say() { printf '%s\n' "$*" >&2; }

scenarios=("$@")
[ ${#scenarios[@]} -eq 0 ] && scenarios=(rto mixed)
for s in "${scenarios[@]}"; do
    case $s in rto | mixed) ;; *) say "unknown scenario '$s' (rto, mixed)"; exit 2 ;; esac
done

[ "$(id -u)" -eq 0 ] || { say "needs root (network namespaces)"; exit 2; }
"$NET" check >/dev/null || exit 2

# Unique per run, so concurrent runs on one machine do not collide.
NAME="lb$$"
NAME=${NAME:0:10}
TMP=""
SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
        SERVER_PID=""
    fi
}
cleanup() {
    stop_server
    "$NET" down "$NAME" 2>/dev/null
    [ -n "$TMP" ] && rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build and tftpd-hpa ----------------------------------------------------------------
if [ -z "${SKIP_BUILD:-}" ]; then
    say "building (cargo build --release --workspace)..."
    cargo build --release --workspace >&2 || { say "build failed"; exit 2; }
fi
[ -x "$LOADTEST" ] || { say "no $LOADTEST"; exit 2; }
[ -x "$RINGTFTPD" ] || { say "no $RINGTFTPD"; exit 2; }
if [[ " ${scenarios[*]} " == *" mixed "* && " $SERVERS " == *" tftpd-hpa "* && ! -x /usr/sbin/in.tftpd ]]; then
    say "installing tftpd-hpa (its service is not started)..."
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tftpd-hpa </dev/null >&2 ||
        { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends tftpd-hpa </dev/null >&2; }
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ -x /usr/sbin/in.tftpd ] || { say "tftpd-hpa could not be installed"; exit 2; }
fi

# CPU pinning needs two CPUs.
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    PIN_SERVER=(taskset -c 1)
    PIN_CLIENT=(taskset -c 0)
else
    PIN_SERVER=()
    PIN_CLIENT=()
fi

# --- files ------------------------------------------------------------------------------
# Powers of two from 1 KiB to 4 MiB, each with an odd tail so most last blocks are partial;
# m1m is an exact multiple of 1468 (an empty last DATA).
TMP=$(mktemp -d /tmp/loss-bench.XXXXXX)
ROOT="$TMP/root"
mkdir -p "$ROOT"
chmod 755 "$TMP" "$ROOT"
MIXED=()
RTO_FILES=()
for k in $(seq 0 12); do
    size=$(((1024 << k) + (k * 37) % 1468))
    name=$(printf 'm%02d' "$k")
    [ "$k" -eq 10 ] && size=$((1468 * 714))
    head -c "$size" /dev/urandom >"$ROOT/$name"
    chmod 644 "$ROOT/$name"
    MIXED+=("$name")
    [ "$k" -ge 6 ] && RTO_FILES+=("$name")
done
join() { local IFS=,; printf '%s' "$*"; }

"$NET" up "$NAME" || exit 2
in_s() { ip netns exec "$NAME-s" "$@"; }
in_c() { ip netns exec "$NAME-c" "$@"; }

port_bound() { [ -n "$(in_s ss -Huan "sport = :$PORT" 2>/dev/null)" ]; }

start_server() { # KIND
    local log="$TMP/$1.log"
    case $1 in
    # Not via in_s: a backgrounded function is a subshell, and $! would be its PID, not the
    # server's. `ip netns exec` and taskset exec, so $! is the server itself.
    ringtftpd) ip netns exec "$NAME-s" "${PIN_SERVER[@]}" "$RINGTFTPD" --address "$SERVER_IP:$PORT" "$ROOT" >"$log" 2>&1 & ;;
    tftpd-hpa) ip netns exec "$NAME-s" "${PIN_SERVER[@]}" /usr/sbin/in.tftpd -L -s "$ROOT" -a "$SERVER_IP:$PORT" >"$log" 2>&1 & ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 1 50); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        port_bound && return 0
        sleep 0.1
    done
    say "$1 did not start on $SERVER_IP:$PORT:"
    tail -5 "$log" >&2
    return 1
}

all_ok=1
# Runs one load; prints "MB/s completed/n elapsed_s client_retransmits ok".
run_load() { # N WINDOWSIZE FILES
    local n=$1 ws=$2 files=$3 out rc
    out=$(timeout $((MAX_TIME + 60)) "${PIN_CLIENT[@]}" ip netns exec "$NAME-c" "$LOADTEST" \
        --server "$SERVER_IP:$PORT" --files "$files" --expect-dir "$ROOT" -n "$n" -c "$C" \
        --blksize "$BLKSIZE" --windowsize "$ws" --json --max-time "$MAX_TIME" --stall 60 \
        2>"$TMP/err")
    rc=$?
    field() { printf '%s' "$out" | sed -n "s/.*\"$1\":\([0-9.a-z]*\).*/\1/p"; }
    local mbs comp el rx
    mbs=$(field mb_per_s)
    comp=$(field completed)
    el=$(field elapsed_s)
    rx=$(field client_retransmits)
    if [ "$rc" -ne 0 ] || [ -z "$mbs" ]; then
        all_ok=0
        say "  run failed (exit $rc):"
        head -5 "$TMP/err" >&2
        printf '%s\n' "$out" | sed -n 's/.*"failures":\({[^}]*}\).*/  failures: \1/p' >&2
        printf '%s %s/%s %s %s FAIL\n' "${mbs:-0}" "${comp:-0}" "$n" "${el:-0}" "${rx:-0}"
        return
    fi
    printf '%s %s/%s %s %s ok\n' "$mbs" "$comp" "$n" "$el" "$rx"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f", 100 * a / b; else print "-" }'; }

say "link: $NAME-s $SERVER_IP <-veth-> $NAME-c 10.99.0.2; lossy = $LOSS % dropped + $DUP % duplicated each way"
SUMMARY=()

# --- rto --------------------------------------------------------------------------------
if [[ " ${scenarios[*]} " == *" rto "* ]]; then
    start_server ringtftpd || exit 1
    files=$(join "${RTO_FILES[@]}")
    clean=()
    lossy=()
    for rep in $(seq 1 "$REPS"); do
        "$NET" impair "$NAME" 0 0
        r=$(run_load "$N_RTO" 1 "$files")
        say "rto run $rep clean: $r   (MB/s completed elapsed_s client_retransmits)"
        clean+=("${r%% *}")
        "$NET" impair "$NAME" "$LOSS" "$DUP"
        r=$(run_load "$N_RTO" 1 "$files")
        say "rto run $rep lossy: $r"
        lossy+=("${r%% *}")
    done
    "$NET" counters "$NAME" >&2
    stop_server
    mc=$(median "${clean[@]}")
    ml=$(median "${lossy[@]}")
    ratio=$(pct "$ml" "$mc")
    SUMMARY+=("rto: ringtftpd $N_RTO x 64 KiB..4 MiB, c=$C, windowsize 1, blksize $BLKSIZE:" \
        "  clean MB/s: ${clean[*]} (median $mc)" \
        "  lossy MB/s: ${lossy[*]} (median $ml)" \
        "  lossy/clean: $ratio % (target >= 10 %)")
    if [ "$CHECK_TARGET" = 1 ] && awk -v r="$ratio" 'BEGIN { exit !(r + 0 < 10) }'; then
        TARGET_MISSED=1
    fi
fi

# --- mixed ------------------------------------------------------------------------------
if [[ " ${scenarios[*]} " == *" mixed "* ]]; then
    files=$(join "${MIXED[@]}")
    SUMMARY+=("mixed: $N_MIXED x 1 KiB..4 MiB, c=$C, blksize $BLKSIZE (MB/s completed/n elapsed_s client_retransmits status)")
    for srv in $SERVERS; do
        start_server "$srv" || { all_ok=0; continue; }
        for ws in 1 16; do
            "$NET" impair "$NAME" 0 0
            rc=$(run_load "$N_MIXED" "$ws" "$files")
            say "mixed $srv windowsize $ws clean: $rc"
            "$NET" impair "$NAME" "$LOSS" "$DUP"
            rl=$(run_load "$N_MIXED" "$ws" "$files")
            say "mixed $srv windowsize $ws lossy: $rl"
            SUMMARY+=("  $srv ws=$ws clean: $rc | lossy: $rl | lossy/clean $(pct "${rl%% *}" "${rc%% *}") %")
        done
        stop_server
    done
fi

echo
printf '%s\n' "${SUMMARY[@]}"
[ "$all_ok" = 1 ] || exit 1
[ -z "${TARGET_MISSED:-}" ] || exit 3
exit 0

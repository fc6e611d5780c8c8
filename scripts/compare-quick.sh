#!/usr/bin/env bash
# Quick side-by-side: 1000 transfers of a 64 KiB random file, 200 at a time, blksize 1468,
# from ringtftpd and from tftpd-hpa on loopback (and loadtest's lock-step floor, and
# tftpd-hpa 7.x and atftpd 0.8.1 when already unpacked under target/peers); 3 repetitions
# each (interleaved), medians of transfers/s. Servers are pinned to CPU 1, the load
# generator to CPU 0. The newest peers' runs do not decide the exit status.
#
# Usage: scripts/compare-quick.sh      (env: N=1000 C=200 BLKSIZE=1468 REPS=3 SIZE=65536)
# Exit status: 0 when every run completed and verified, 1 otherwise.
set -u

N=${N:-1000}
C=${C:-200}
BLKSIZE=${BLKSIZE:-1468}
REPS=${REPS:-3}
SIZE=${SIZE:-65536}

ROOT_DIR=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT_DIR" || exit 1

PIDS=()
TMP=""
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    [ -n "$TMP" ] && rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '%s\n' "$*" >&2; }

# CPU pinning needs two CPUs; on one, run unpinned rather than fail.
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    PIN_SERVER=(taskset -c 1)
    PIN_CLIENT=(taskset -c 0)
else
    say "note: fewer than 2 CPUs or no taskset; running unpinned"
    PIN_SERVER=()
    PIN_CLIENT=()
fi

# --- build ---------------------------------------------------------------------------------
say "building (cargo build --release --workspace)..."
RING_BUILT=1
if ! cargo build --release --workspace >&2; then
    say "workspace build failed; building the load generator alone (ringtftpd will be skipped)"
    RING_BUILT=0
    cargo build --release -p loadtest >&2 || { say "cannot build loadtest"; exit 1; }
fi
TARGET=${CARGO_TARGET_DIR:-$ROOT_DIR/target}
LOADTEST=$TARGET/release/loadtest
RINGTFTPD=$TARGET/release/ringtftpd

# --- tftpd-hpa ------------------------------------------------------------------------------
if [ ! -x /usr/sbin/in.tftpd ]; then
    say "installing tftpd-hpa (its service is not started)..."
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y tftpd-hpa >&2 \
        || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y tftpd-hpa >&2; }
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ -x /usr/sbin/in.tftpd ] || { say "tftpd-hpa could not be installed"; exit 1; }
fi

# --- test root ------------------------------------------------------------------------------
TMP=$(mktemp -d /tmp/compare-quick.XXXXXX)
ROOT="$TMP/root"
mkdir -p "$ROOT"
head -c "$SIZE" /dev/urandom > "$ROOT/f64k"
chmod 755 "$TMP" "$ROOT"
chmod 644 "$ROOT/f64k"

port_free() { [ -z "$(ss -Huan "sport = :$1" 2>/dev/null)" ]; }
pick_port() {
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 30000))
        if port_free "$p"; then echo "$p"; return 0; fi
    done
    return 1
}
# Waits until PID listens on PORT (UDP) or dies; at most 5 s.
wait_listening() {
    local pid=$1 port=$2
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 1
        port_free "$port" || return 0
        sleep 0.1
    done
    return 1
}

declare -A ADDR
SERVERS=()

HPA_PORT=$(pick_port) || { say "no free UDP port"; exit 1; }
"${PIN_SERVER[@]}" /usr/sbin/in.tftpd -L -s "$ROOT" -a "127.0.0.1:$HPA_PORT" \
    >"$TMP/tftpd-hpa.log" 2>&1 &
PIDS+=($!)
if wait_listening "$!" "$HPA_PORT"; then
    ADDR[tftpd-hpa]="127.0.0.1:$HPA_PORT"
    SERVERS+=(tftpd-hpa)
else
    say "tftpd-hpa did not start on 127.0.0.1:$HPA_PORT; its output:"
    tail -5 "$TMP/tftpd-hpa.log" >&2
    exit 1
fi

if [ "$RING_BUILT" = 0 ]; then
    say "SKIP ringtftpd: the workspace did not build (a $RINGTFTPD left from before would be stale)"
elif [ -x "$RINGTFTPD" ]; then
    RING_PORT=$(pick_port) || { say "no free UDP port"; exit 1; }
    # Its per-transfer log lines go to a file, not the terminal. All C
    # clients come from 127.0.0.1: lift the per-address cap above C.
    "${PIN_SERVER[@]}" "$RINGTFTPD" --address "127.0.0.1:$RING_PORT" \
        --max-per-client $((C * 4)) "$ROOT" \
        >"$TMP/ringtftpd.log" 2>&1 &
    PIDS+=($!)
    if wait_listening "$!" "$RING_PORT"; then
        ADDR[ringtftpd]="127.0.0.1:$RING_PORT"
        SERVERS=(ringtftpd "${SERVERS[@]}")
    else
        say "SKIP ringtftpd: it did not start listening on 127.0.0.1:$RING_PORT; its output:"
        tail -5 "$TMP/ringtftpd.log" >&2
    fi
else
    say "SKIP ringtftpd: $RINGTFTPD not built yet"
fi

# --- the lock-step floor and the newest peers (issue 12), when cheap ------------------------
# Started like the others; any that is missing or does not come up is skipped with the
# reason, never failing the run. The newest peers are used only when already unpacked under
# $TARGET/peers (scripts/compare.sh or scripts/peer-*.sh fetch them); QUICK_FETCH=1 fetches.
start_extra() { # NAME PORT ARGV...
    local name=$1 port=$2
    shift 2
    "${PIN_SERVER[@]}" "$@" >"$TMP/$name.log" 2>&1 &
    PIDS+=($!)
    if wait_listening "$!" "$port"; then
        ADDR[$name]="127.0.0.1:$port"
        SERVERS+=("$name")
    else
        say "SKIP $name: it did not start listening on 127.0.0.1:$port; its output:"
        tail -3 "$TMP/$name.log" >&2
    fi
}
FLOOR=$TARGET/release/lockstep-floor
if [ -x "$FLOOR" ]; then
    p=$(pick_port) || { say "no free UDP port"; exit 1; }
    start_extra floor "$p" "$FLOOR" --address "127.0.0.1:$p" --max-seconds 600 "$ROOT"
else
    say "SKIP floor: $FLOOR not built"
fi
peer_cmd() { # SCRIPT UNPACKED-BINARY: the prefix, or nothing
    if [ -x "$2" ] || [ "${QUICK_FETCH:-0}" = 1 ]; then
        timeout 120 "scripts/$1" 2>/dev/null
    fi
}
cmd=$(peer_cmd peer-hpa7.sh "$TARGET/peers/hpa7/x/usr/sbin/in.tftpd")
if [ -n "$cmd" ]; then
    p=$(pick_port) || { say "no free UDP port"; exit 1; }
    # shellcheck disable=SC2086
    start_extra tftpd-hpa-7 "$p" $cmd -L -s "$ROOT" -a "127.0.0.1:$p"
else
    say "SKIP tftpd-hpa-7: not unpacked under $TARGET/peers/hpa7 (scripts/peer-hpa7.sh)"
fi
cmd=$(peer_cmd peer-atftpd.sh "$TARGET/peers/atftpd-sid/x/usr/sbin/atftpd")
if [ -n "$cmd" ]; then
    p=$(pick_port) || { say "no free UDP port"; exit 1; }
    # shellcheck disable=SC2086
    start_extra atftpd-0.8.1 "$p" $cmd --daemon --no-fork --port "$p" --bind-address 127.0.0.1 \
        --user root.root --logfile /dev/null --verbose=0 --maxthread 5000 "$ROOT"
else
    say "SKIP atftpd-0.8.1: not unpacked under $TARGET/peers/atftpd-sid (scripts/peer-atftpd.sh)"
fi
# dnsmasq (2.90 or 2.93) serves TFTP on port 69 only: not in this quick check.

# --- runs -----------------------------------------------------------------------------------
declare -A RESULTS
declare -A CPUS  # load generator CPU % of wall: near 100 means the figure is client-bound
all_ok=1
for rep in $(seq 1 "$REPS"); do
    for s in "${SERVERS[@]}"; do
        out=$(timeout 120 "${PIN_CLIENT[@]}" "$LOADTEST" --server "${ADDR[$s]}" \
            --file f64k --expect "$ROOT/f64k" -n "$N" -c "$C" --blksize "$BLKSIZE" \
            --json --max-time 110 2>"$TMP/err")
        rc=$?
        tps=$(printf '%s' "$out" | sed -n 's/.*"transfers_per_s":\([0-9.]*\).*/\1/p')
        cpu=$(printf '%s' "$out" | sed -n 's/.*"cpu_pct":\([0-9.]*\).*/\1/p')
        CPUS[$s]="${CPUS[$s]:-} ${cpu:-0}"
        if [ "$rc" -ne 0 ] || [ -z "$tps" ]; then
            # A newest peer (a binary fetched from Debian unstable) failing is reported, not fatal.
            case $s in tftpd-hpa-7 | atftpd-0.8.1) ;; *) all_ok=0 ;; esac
            say "run $rep against $s failed (exit $rc):"
            head -5 "$TMP/err" >&2
            printf '%s\n' "$out" | sed -n 's/.*"completed":\([0-9]*\).*/  completed: \1/p' >&2
            printf '%s\n' "$out" | sed -n 's/.*"failures":\({[^}]*}\).*/  failures: \1/p' >&2
            tps="${tps:-0}!"
        fi
        RESULTS[$s]="${RESULTS[$s]:-} $tps"
        say "run $rep $s: ${tps} transfers/s (load generator CPU ${cpu:-?} %)"
    done
done

median() { printf '%s\n' "$@" | tr -d '!' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

echo
echo "S1-quick: $N x $SIZE B, c=$C, blksize $BLKSIZE (transfers/s; ! = run failed)"
header="server"
for rep in $(seq 1 "$REPS"); do header+=$'\t'"run$rep"; done
printf '%s\tmedian\tratio vs tftpd-hpa\tclient CPU %% (median)\n' "$header"
base=$(median ${RESULTS[tftpd-hpa]})
for s in "${SERVERS[@]}"; do
    # shellcheck disable=SC2086
    med=$(median ${RESULTS[$s]})
    ratio=$(awk -v a="$med" -v b="$base" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    line="$s"
    for v in ${RESULTS[$s]}; do line+=$'\t'"$v"; done
    # shellcheck disable=SC2086
    printf '%s\t%s\t%s\t%s\n' "$line" "$med" "$ratio" "$(median ${CPUS[$s]})"
done

echo "(client CPU near 100 % means that figure is bound by the load generator, not the server)"
[ "$all_ok" = 1 ]

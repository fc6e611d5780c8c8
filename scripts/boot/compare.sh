#!/usr/bin/env bash
# Side by side: the same PXE boot (scripts/boot-test.sh) served by ringtftpd
# and by tftpd-hpa, runs interleaved (ours, theirs, ours, ...), every
# server pinned to its own CPU (--pin). Prints one Markdown table row per
# server: VMs booted, time to marker, TFTP phase per VM (first RRQ to last
# DATA) and time inside transfers per VM (min / median / max over every VM
# of every run).
#
# Usage: scripts/boot/compare.sh [--reps N] [--out DIR] [boot-test.sh options...]
#   e.g. scripts/boot/compare.sh --reps 3 --vms 8
#        scripts/boot/compare.sh --reps 1 --uefi --vms 8
# Each run's full output is kept in DIR (default: a new /tmp/ringtftpd-compare-boot.*).
# Exit status: 0 if every run passed.
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
REPS=3
OUT=""
ARGS=()
while [[ $# -gt 0 ]]; do
    case $1 in
    --reps) REPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --server) echo "compare.sh runs both servers; drop --server" >&2; exit 2 ;;
    *) ARGS+=("$1"); shift ;;
    esac
done
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 ]] || { echo "--reps wants a positive number" >&2; exit 2; }
[[ -n $OUT ]] || OUT=$(mktemp -d /tmp/ringtftpd-compare-boot.XXXXXX)
mkdir -p "$OUT"

failed=0
for ((rep = 1; rep <= REPS; rep++)); do
    for server in ringtftpd hpa; do
        f=$OUT/$server.$rep.txt
        echo "==> run $rep/$REPS: $server ${ARGS[*]}" >&2
        if ! "$ROOT_DIR/scripts/boot-test.sh" --pin --server "$server" "${ARGS[@]}" >"$f" 2>"$f.err"; then
            failed=1
            echo "    failed: $(grep '^RESULT' "$f" || tail -n 3 "$f.err")" >&2
        fi
        grep '^RESULT' "$f" >&2 || true
    done
done

# min / median / max of the values on stdin, one per line.
stats() {
    sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "-"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.1f / %.1f / %.1f", v[1], m, v[NR] }'
}
stats3() {
    sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "-"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.3f / %.3f / %.3f", v[1], m, v[NR] }'
}

echo
echo "runs: $REPS per server, boot-test.sh --pin ${ARGS[*]}; outputs in $OUT"
echo
echo "| server | runs passed | VMs booted | time to marker, s (min / median / max) | TFTP phase per VM, s | in transfers per VM, s |"
echo "|---|---|---|---|---|---|"
for server in ringtftpd hpa; do
    files=("$OUT/$server".*.txt)
    passed=$(cat "${files[@]}" | grep -c '^RESULT pass' || true)
    booted=$(cat "${files[@]}" | grep '^BOOT ' | grep -c 'status=ok' || true)
    total=$(cat "${files[@]}" | grep -c '^BOOT ' || true)
    mark=$(cat "${files[@]}" | sed -n 's/^BOOT .* marker_s=\([0-9.]*\) .*/\1/p' | stats)
    tftp=$(cat "${files[@]}" | sed -n 's/^TFTP .* tftp_s=\([0-9.]*\) .*/\1/p' | stats3)
    inx=$(cat "${files[@]}" | sed -n 's/^TFTP .* in_transfers_s=\([0-9.]*\) .*/\1/p' | stats3)
    name=$server
    [[ $server == hpa ]] && name="tftpd-hpa"
    echo "| $name | $passed/$REPS | $booted/$total | $mark | $tftp | $inx |"
done
exit "$failed"

#!/usr/bin/env bash
# A lossy link of our own: two network namespaces joined by one veth pair,
# with random loss and duplication of UDP datagrams injected by nftables
# (this kernel has no netem). Nothing outside the two namespaces is touched:
# the addresses live only inside them.
#
#   scripts/lossy-net.sh up NAME              create NAME-s (10.99.0.1, the server
#                                             side) and NAME-c (10.99.0.2, the client)
#   scripts/lossy-net.sh impair NAME LOSS DUP drop LOSS % of the UDP datagrams each
#                                             namespace receives and duplicate DUP %
#                                             of those it sends (each way; 0 0 = clean)
#   scripts/lossy-net.sh counters NAME        the nft counters of both sides
#   scripts/lossy-net.sh down NAME            delete both namespaces (and the veth)
#   scripts/lossy-net.sh check                can this machine do it? (root, ip netns,
#                                             nft numgen + netdev ingress/egress + dup)
#
# NAME: 1 to 10 characters [a-z0-9] (interface names are at most 15).
# Run a program inside with `ip netns exec NAME-s PROGRAM ...`.
#
# Why the rules sit where they do:
# - Drops are on receipt (netdev ingress). A drop in the sender's output
#   chain makes sendmsg fail with EPERM, which a server sees as a send
#   error, not as loss on the wire.
# - Duplication is on send (netdev egress, `dup to` the same veth).
# - UDP GSO is turned off on the veths (gso_max_segs 1) so that a window
#   sent as one GSO buffer is segmented before the peer's ingress hook and
#   each datagram is dropped on its own, as on a real wire.
# - Only IPv4 UDP is impaired, so neighbour resolution (ARP) is unaffected.
set -euo pipefail

SERVER_ADDR=10.99.0.1
CLIENT_ADDR=10.99.0.2
PREFIX=24

die() { printf 'lossy-net.sh: %s\n' "$*" >&2; exit 1; }

need_name() {
    [[ ${1:-} =~ ^[a-z0-9]{1,10}$ ]] || die "NAME must be 1 to 10 characters [a-z0-9], got '${1:-}'"
}

# Percent (up to two decimals) to parts per 10000, for `numgen random mod 10000`.
per10k() {
    [[ $1 =~ ^[0-9]{1,3}(\.[0-9]{1,2})?$ ]] || die "not a percentage: '$1'"
    local v
    v=$(awk -v p="$1" 'BEGIN { printf "%d", p * 100 + 0.5 }')
    ((v <= 10000)) || die "percentage above 100: '$1'"
    printf '%s' "$v"
}

rules() { # DEV LOSS10K DUP10K
    local dev=$1 loss=$2 dup=$3
    printf 'table netdev lossy {\n'
    printf '  chain ingress {\n    type filter hook ingress device "%s" priority 0; policy accept;\n' "$dev"
    if ((loss > 0)); then
        printf '    ip protocol udp numgen random mod 10000 < %s counter drop\n' "$loss"
    fi
    printf '  }\n'
    printf '  chain egress {\n    type filter hook egress device "%s" priority 0; policy accept;\n' "$dev"
    if ((dup > 0)); then
        printf '    ip protocol udp numgen random mod 10000 < %s counter dup to "%s"\n' "$dup" "$dev"
    fi
    printf '  }\n}\n'
}

impair() { # NAME LOSS DUP
    local name=$1 loss dup side
    loss=$(per10k "$2")
    dup=$(per10k "$3")
    for side in s c; do
        local ns=$name-$side
        [[ -e /run/netns/$ns ]] || die "no namespace $ns (run: $0 up $name)"
        # Replace the table atomically: delete (if present) and add in one batch.
        {
            if ip netns exec "$ns" nft list table netdev lossy >/dev/null 2>&1; then
                printf 'delete table netdev lossy\n'
            fi
            rules "$ns" "$loss" "$dup"
        } | ip netns exec "$ns" nft -f - || die "nft rules in $ns failed"
    done
}

# Every step checked by hand: `set -e` is off inside a function called from `if`.
links() { # NAME
    local name=$1 s=$1-s c=$1-c ns
    ip link add "$s" netns "$s" type veth peer name "$c" netns "$c" || return 1
    ip -n "$s" addr add "$SERVER_ADDR/$PREFIX" dev "$s" || return 1
    ip -n "$c" addr add "$CLIENT_ADDR/$PREFIX" dev "$c" || return 1
    for ns in "$s" "$c"; do
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 || return 1
        ip -n "$ns" link set dev "$ns" gso_max_segs 1 || return 1
        ip -n "$ns" link set dev lo up || return 1
        ip -n "$ns" link set dev "$ns" up || return 1
    done
    (impair "$name" 0 0) || return 1
}

up() { # NAME
    local name=$1 s=$1-s c=$1-c ns
    for ns in "$s" "$c"; do
        [[ ! -e /run/netns/$ns ]] || die "namespace $ns exists already (run: $0 down $name)"
    done
    ip netns add "$s" || die "ip netns add $s failed"
    ip netns add "$c" || { ip netns del "$s"; die "ip netns add $c failed"; }
    if ! links "$name"; then
        down "$name"
        die "setting up $name failed (cleaned up)"
    fi
}

down() { # NAME; deleting a namespace deletes the veth end in it, and so the pair.
    local name=$1 ns rc=0
    for ns in "$name-s" "$name-c"; do
        if [[ -e /run/netns/$ns ]]; then
            ip netns del "$ns" || rc=1
        fi
    done
    return "$rc"
}

counters() { # NAME
    local ns
    for ns in "$1-s" "$1-c"; do
        printf '%s:\n' "$ns"
        ip netns exec "$ns" nft list table netdev lossy | grep -E 'counter|chain' || true
    done
}

check() {
    [[ $(id -u) -eq 0 ]] || die "not root"
    command -v ip >/dev/null || die "no ip (iproute2)"
    command -v nft >/dev/null || die "no nft (Debian package nftables)"
    local name="chk$$"
    name=${name:0:10}
    trap 'down "$name" >/dev/null 2>&1 || true' EXIT
    up "$name"
    impair "$name" 5 1
    down "$name"
    trap - EXIT
    echo "ok: ip netns, veth, nft netdev ingress drop with numgen and egress dup all work"
}

cmd=${1:-}
case $cmd in
up) need_name "${2:-}"; up "$2" ;;
impair)
    need_name "${2:-}"
    [[ $# -eq 4 ]] || die "usage: $0 impair NAME LOSS% DUP%"
    impair "$2" "$3" "$4"
    ;;
counters) need_name "${2:-}"; counters "$2" ;;
down) need_name "${2:-}"; down "$2" ;;
check) check ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac

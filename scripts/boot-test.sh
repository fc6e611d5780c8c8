#!/usr/bin/env bash
# PXE-boots real (qemu) machines from a TFTP server inside a network
# namespace this script creates, and checks that every machine reached
# userspace: its initramfs prints a marker with its MAC to the serial
# console and powers off.
#
#   namespace rtb<pid>:  br0 198.18.0.1/24 + fd00:5eed:0:1::1/64
#                        tap1..tapN (one per VM) enslaved to br0
#                        dnsmasq: DHCP only (--port=0, no TFTP) + IPv6 RAs
#                        the TFTP server (ringtftpd or tftpd-hpa) on 198.18.0.1:69
#                        tcpdump on br0 (headers only) for the TFTP phase
#   VMs: qemu-system-x86_64, virtio-net, boot from the network:
#     ipxe      SeaBIOS + Debian's iPXE ROM: boot.ipxe -> ${mac}.ipxe || default.ipxe
#     pxelinux  SeaBIOS + iPXE ROM -> pxelinux.0 -> ldlinux.c32 -> pxelinux.cfg/01-<mac> | default
#     uefi      OVMF's own PXE client (no option ROM) -> snponly.efi (iPXE) -> boot.ipxe
#   each loading Debian's kernel and a busybox initramfs over TFTP.
#
# Usage: scripts/boot-test.sh [options]
#   --vms N             machines booted at once (default 1)
#   --server S          ringtftpd (default) or hpa (tftpd-hpa, /usr/sbin/in.tftpd)
#   --binary PATH       ringtftpd binary (default target/release/ringtftpd, built if absent)
#   --ipxe | --pxelinux | --uefi   boot path (default --ipxe)
#   --pad SIZE          pad the initramfs to SIZE (e.g. 64M) with random bytes the
#                       guest checksums (an installer-sized payload)
#   --accel A           auto (default: KVM only if a probe boot reaches the marker), kvm, tcg
#   --pin               server alone on the last CPU, VMs and dnsmasq on the others
#   --bound SECS        per-VM bound from qemu start to marker (default depends on the run)
#   --server-args "..." extra arguments for the server
#   --loss PCT          drop PCT% of the TFTP datagrams each way (nftables in the
#                       namespace), to see how firmware and server recover
#   --keep              keep the work directory (logs, capture) and print its path
# Environment: RINGTFTPD_BOOT_CACHE (default target/boot-cache): kernel, modules.
#
# Output: one "BOOT vm=.." and one "TFTP vm=.." line per VM, "XFER" lines
# (every transfer of VM 1: request options, OACK, how it ended), then
# "RESULT pass|fail ...". Exit 0 = every VM printed its marker in time;
# 1 = failure; 77 = skipped (printed "SKIP: reason") because qemu cannot run.
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

VMS=1
SERVER=ringtftpd
BINARY=""
MODE=ipxe
PAD=""
ACCEL=auto
PIN=0
BOUND=""
SERVER_ARGS=""
KEEP=0
LOSS=0

die() { printf 'boot-test: error: %s\n' "$*" >&2; exit 1; }
skip() { printf 'SKIP: %s\n' "$*"; exit 77; }
log() { printf '==> %s\n' "$*" >&2; }

while [[ $# -gt 0 ]]; do
    case $1 in
    --vms) VMS=$2; shift 2 ;;
    --server) SERVER=$2; shift 2 ;;
    --binary) BINARY=$2; shift 2 ;;
    --ipxe) MODE=ipxe; shift ;;
    --pxelinux) MODE=pxelinux; shift ;;
    --uefi) MODE=uefi; shift ;;
    --mode) MODE=$2; shift 2 ;;
    --pad) PAD=$2; shift 2 ;;
    --accel) ACCEL=$2; shift 2 ;;
    --pin) PIN=1; shift ;;
    --bound) BOUND=$2; shift 2 ;;
    --server-args) SERVER_ARGS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --loss) LOSS=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[[ $VMS =~ ^[0-9]+$ && $VMS -ge 1 && $VMS -le 64 ]] || die "--vms must be 1..64"
case $SERVER in ringtftpd | hpa) ;; *) die "--server must be ringtftpd or hpa" ;; esac
case $MODE in ipxe | pxelinux | uefi) ;; *) die "unknown mode $MODE" ;; esac
case $ACCEL in auto | kvm | tcg) ;; *) die "--accel must be auto, kvm or tcg" ;; esac
[[ $LOSS =~ ^[0-9]+$ && $LOSS -lt 100 ]] || die "--loss wants a whole percentage below 100"

PAD_BYTES=0
if [[ -n $PAD ]]; then
    [[ $PAD =~ ^([0-9]+)([KMG]?)$ ]] || die "--pad wants a size like 64M"
    n=${BASH_REMATCH[1]}
    case ${BASH_REMATCH[2]} in K) n=$((n << 10)) ;; M) n=$((n << 20)) ;; G) n=$((n << 30)) ;; esac
    PAD_BYTES=$n
fi

# ---------------------------------------------------------------- prerequisites

[[ $(id -u) -eq 0 ]] || skip "boot test needs root (network namespaces, tap devices, apt-get); qemu cannot run here"

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -q </dev/null >&2 || return 1
        apt_updated=1
    fi
    log "apt-get install -y $*"
    apt-get install -y -q --no-install-recommends "$@" </dev/null >&2
}

# Each entry: a file that proves the package is there, and the package.
need=(
    /usr/bin/qemu-system-x86_64:qemu-system-x86
    /usr/lib/ipxe/qemu/efi-virtio.rom:ipxe-qemu
    /usr/sbin/dnsmasq:dnsmasq-base
    /usr/bin/tcpdump:tcpdump
    /usr/bin/tshark:tshark
    /usr/sbin/ip:iproute2
    /usr/bin/taskset:util-linux
)
case $MODE in
pxelinux) need+=(/usr/lib/PXELINUX/pxelinux.0:pxelinux /usr/lib/syslinux/modules/bios/ldlinux.c32:syslinux-common) ;;
uefi) need+=(/usr/share/OVMF/OVMF_CODE_4M.fd:ovmf /usr/lib/ipxe/snponly.efi:ipxe) ;;
esac
[[ $LOSS -gt 0 ]] && need+=(/usr/sbin/nft:nftables)
missing=()
for e in "${need[@]}"; do
    [[ -e ${e%%:*} ]] || missing+=("${e##*:}")
done
if [[ $SERVER == hpa && ! -x /usr/sbin/in.tftpd ]]; then
    # policy-rc.d exit 101 keeps the package's service from starting; it is
    # removed afterwards only if this script created it.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_CREATED=1
    fi
    missing+=(tftpd-hpa)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    apt_install "${missing[@]}" || true
    [[ ${POLICY_CREATED:-0} -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
fi
command -v qemu-system-x86_64 >/dev/null 2>&1 ||
    skip "qemu-system-x86_64 is not installed and could not be installed (apt-get install qemu-system-x86)"
for e in "${need[@]}"; do
    [[ -e ${e%%:*} ]] || die "missing ${e%%:*} (package ${e##*:}) after apt-get install"
done
[[ $SERVER != hpa || -x /usr/sbin/in.tftpd ]] || die "tftpd-hpa (/usr/sbin/in.tftpd) is not installed"
if [[ ! -c /dev/net/tun ]]; then
    mkdir -p /dev/net && mknod -m 0666 /dev/net/tun c 10 200 2>/dev/null || true
fi
[[ -c /dev/net/tun ]] || skip "/dev/net/tun is missing and cannot be made: qemu cannot attach a tap device here"

if [[ $SERVER == ringtftpd ]]; then
    if [[ -z $BINARY ]]; then
        BINARY=$ROOT_DIR/target/release/ringtftpd
        if [[ ! -x $BINARY ]]; then
            log "building $BINARY"
            (cd "$ROOT_DIR" && cargo build --release -q) >&2
        fi
    fi
    [[ -x $BINARY ]] || die "ringtftpd binary not found: $BINARY"
fi

# ---------------------------------------------------------------- cleanup

NS=rtb$$
WORK=""
PIDS=()
VM_PIDS=()
NS_CREATED=0
cleanup() {
    local rc=$?
    set +e
    for pid in "${VM_PIDS[@]}" "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${VM_PIDS[@]}" "${PIDS[@]}"; do
        # Bounded: everything was started under timeout or answers SIGTERM.
        wait "$pid" 2>/dev/null
    done
    if [[ $NS_CREATED -eq 1 ]]; then
        # Anything still running inside our own namespace was started by us.
        local left
        left=$(ip netns pids "$NS" 2>/dev/null || true)
        if [[ -n $left ]]; then
            kill $left 2>/dev/null
            sleep 1
            left=$(ip netns pids "$NS" 2>/dev/null || true)
            [[ -n $left ]] && kill -9 $left 2>/dev/null
        fi
        # Deleting the namespace deletes the bridge and taps inside it.
        ip netns del "$NS" 2>/dev/null
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP -eq 1 ]]; then
            log "kept work directory $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- kernel + initramfs

CACHE=${RINGTFTPD_BOOT_CACHE:-$ROOT_DIR/target/boot-cache}
mkdir -p "$CACHE"
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net)
MODPATHS=(drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev
    drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci net/core/failover
    drivers/net/net_failover drivers/net/virtio_net)

fetch_kernel() {
    # Debian's kernel: the package linux-image-amd64 currently depends on.
    local pkg deb tmp
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    if [[ -z $pkg ]]; then
        apt-get update -q </dev/null >&2 || true
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    fi
    [[ -n $pkg ]] || die "cannot resolve linux-image-amd64's kernel package (apt-get update?)"
    tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
    log "apt-get download $pkg"
    (cd "$tmp" && apt-get download -q "$pkg" </dev/null) >&2 || die "apt-get download $pkg failed"
    deb=$(ls "$tmp"/*.deb)
    dpkg -x "$deb" "$tmp/x"
    mkdir -p "$tmp/out/modules"
    cp "$tmp"/x/boot/vmlinuz-* "$tmp/out/vmlinuz"
    local i
    for i in "${!MODULES[@]}"; do
        cp "$tmp"/x/lib/modules/*/kernel/"${MODPATHS[$i]}".ko "$tmp/out/modules/" ||
            die "module ${MODPATHS[$i]} not in $pkg"
    done
    echo "$pkg" >"$tmp/out/package"
    rm -rf "$CACHE/kernel"
    mv "$tmp/out" "$CACHE/kernel"
    rm -rf "$tmp"
}
[[ -s $CACHE/kernel/vmlinuz && -s $CACHE/kernel/package ]] || fetch_kernel
KPKG=$(cat "$CACHE/kernel/package")

# The initramfs has no libc: it needs busybox-static's binary. Taken from the
# installed package, else from its .deb (so the host's busybox stays as it is).
if dpkg-query -W -f='${db:Status-Abbrev}' busybox-static 2>/dev/null | grep '^ii' >/dev/null; then
    BUSYBOX=/bin/busybox
else
    BUSYBOX=$CACHE/busybox-static/busybox
    if [[ ! -x $BUSYBOX ]]; then
        tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
        log "apt-get download busybox-static"
        (cd "$tmp" && apt-get download -q busybox-static </dev/null) >&2 ||
            { apt-get update -q </dev/null >&2 && (cd "$tmp" && apt-get download -q busybox-static </dev/null) >&2; } ||
            die "apt-get download busybox-static failed"
        dpkg -x "$tmp"/busybox-static_*.deb "$tmp/x"
        mkdir -p "$CACHE/busybox-static"
        cp "$tmp/x/bin/busybox" "$BUSYBOX"
        rm -rf "$tmp"
    fi
fi

WORK=$(mktemp -d /tmp/ringtftpd-boot.XXXXXX)
chmod 755 "$WORK"
TFTP=$WORK/tftp
mkdir -p "$TFTP" "$WORK/initramfs"/{bin,dev,proc,sys,lib/modules}

# The guest's /init: the MAC comes from the NIC itself (sysfs, after loading
# virtio-net) and, for comparison, from what the boot loader put on the
# command line (rtb_mac= from iPXE's ${mac}, BOOTIF= from pxelinux's IPAPPEND 2).
cat >"$WORK/initramfs/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t devtmpfs dev /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sys /sys
exec >/dev/ttyS0 2>&1
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net; do
    insmod /lib/modules/$m.ko 2>/dev/null
done
nic=none
for i in 1 2 3 4 5 6 7 8 9 10; do
    for a in /sys/class/net/*/address; do
        case $a in */lo/*) continue ;; esac
        [ -f "$a" ] && nic=$(cat "$a")
    done
    [ "$nic" != none ] && break
    sleep 0.2
done
cfg=none boot_mac=none
for w in $(cat /proc/cmdline); do
    case $w in
    rtb_cfg=*) cfg=${w#rtb_cfg=} ;;
    rtb_mac=*) boot_mac=${w#rtb_mac=} ;;
    BOOTIF=01-*) boot_mac=$(echo "${w#BOOTIF=01-}" | tr - :) ;;
    esac
done
pad=none
[ -f /pad.bin ] && pad=$(md5sum /pad.bin | cut -d' ' -f1)
read up _ </proc/uptime
echo "RINGTFTPD-BOOT-OK nic=$nic boot_mac=$boot_mac cfg=$cfg pad=$pad uptime=$up"
poweroff -f
EOF
chmod 755 "$WORK/initramfs/init"
cp "$BUSYBOX" "$WORK/initramfs/bin/busybox"
for m in "${MODULES[@]}"; do cp "$CACHE/kernel/modules/$m.ko" "$WORK/initramfs/lib/modules/"; done
PAD_SUM=none
if [[ $PAD_BYTES -gt 0 ]]; then
    # Random, so a corrupted or misplaced block cannot go unnoticed.
    base=$( (cd "$WORK/initramfs" && find . | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) | wc -c)
    padfile=$((PAD_BYTES - base - 4096))
    [[ $padfile -gt 0 ]] || die "--pad $PAD is smaller than the initramfs ($base bytes)"
    head -c "$padfile" /dev/urandom >"$WORK/initramfs/pad.bin"
    PAD_SUM=$(md5sum "$WORK/initramfs/pad.bin" | cut -d' ' -f1)
fi
(cd "$WORK/initramfs" && find . | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) >"$TFTP/initrd.img"
if [[ $PAD_BYTES -gt 0 ]]; then
    # The kernel skips zeros after the cpio trailer: exactly PAD_BYTES.
    truncate -s "$PAD_BYTES" "$TFTP/initrd.img"
fi
cp "$CACHE/kernel/vmlinuz" "$TFTP/vmlinuz"
rm -rf "$WORK/initramfs"

# ---------------------------------------------------------------- machines and boot files

mac_of() { printf '52:54:00:5e:ed:%02x' "$1"; }
ip_of() { printf '198.18.0.%d' $((100 + $1)); }
# Even-numbered machines have a per-MAC config; odd ones (so also a lone VM)
# fall back to the default after a "file not found".
cfg_of() { if (($1 % 2 == 0)); then echo permac; else echo default; fi; }

CMDLINE="console=ttyS0 quiet panic=-1 loglevel=3"
ipxe_cfg() {
    # initrd= on the command line: the EFI stub loads the initrd by that name
    # from iPXE's virtual file system (iPXE 2019 has no initrd media GUID).
    printf '#!ipxe\nkernel vmlinuz initrd=initrd.img %s rtb_mac=${mac} rtb_cfg=%s\ninitrd initrd.img\nboot\n' \
        "$CMDLINE" "$1"
}
pxelinux_cfg() {
    printf 'DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  INITRD initrd.img\n  APPEND %s rtb_cfg=%s\n  IPAPPEND 2\n' \
        "$CMDLINE" "$1"
}
printf '#!ipxe\nchain ${mac:hexhyp}.ipxe || chain default.ipxe\n' >"$TFTP/boot.ipxe"
ipxe_cfg default >"$TFTP/default.ipxe"
case $MODE in
pxelinux)
    cp /usr/lib/PXELINUX/pxelinux.0 /usr/lib/syslinux/modules/bios/ldlinux.c32 "$TFTP/"
    mkdir -p "$TFTP/pxelinux.cfg"
    pxelinux_cfg default >"$TFTP/pxelinux.cfg/default"
    ;;
uefi) cp /usr/lib/ipxe/snponly.efi "$TFTP/" ;;
esac
for ((i = 1; i <= VMS; i++)); do
    if [[ $(cfg_of "$i") == permac ]]; then
        m=$(mac_of "$i")
        ipxe_cfg permac >"$TFTP/${m//:/-}.ipxe"
        [[ $MODE == pxelinux ]] && pxelinux_cfg permac >"$TFTP/pxelinux.cfg/01-${m//:/-}"
    fi
done
chmod -R a+rX "$TFTP"

# ---------------------------------------------------------------- accelerator

CPUS=$(nproc)
if [[ $PIN -eq 1 && $CPUS -ge 2 ]]; then
    SERVER_PIN=(taskset -c $((CPUS - 1)))
    VM_PIN=(taskset -c 0-$((CPUS - 2)))
else
    [[ $PIN -eq 1 ]] && log "one CPU: running unpinned"
    SERVER_PIN=()
    VM_PIN=()
fi

probe_kvm() {
    # A direct kernel boot (no network) under KVM: on some hosts the guest
    # hangs once it enters long mode, so KVM is used only if this reaches
    # the marker. The verdict is cached per host kernel, qemu and guest kernel.
    [[ -r /dev/kvm && -w /dev/kvm ]] || return 1
    local key verdict
    key="$(uname -r) $(qemu-system-x86_64 --version | head -n1) $KPKG"
    if [[ -f $CACHE/kvm-probe ]] && [[ $(head -n1 "$CACHE/kvm-probe") == "$key" ]]; then
        verdict=$(sed -n 2p "$CACHE/kvm-probe")
        log "KVM probe (cached): $verdict"
        [[ $verdict == ok ]]
        return
    fi
    log "probing KVM with a direct kernel boot (bounded to 20 s)"
    timeout -k 5 20 qemu-system-x86_64 -accel kvm -m 256 -nographic -no-reboot -monitor none \
        -nic none -kernel "$TFTP/vmlinuz" -initrd "$TFTP/initrd.img" \
        -append "$CMDLINE rtb_cfg=probe" -serial "file:$WORK/kvm-probe.serial" >/dev/null 2>&1 || true
    if grep -a 'RINGTFTPD-BOOT-OK' "$WORK/kvm-probe.serial" >/dev/null 2>&1; then verdict=ok; else verdict=hangs; fi
    printf '%s\n%s\n' "$key" "$verdict" >"$CACHE/kvm-probe"
    log "KVM probe: $verdict"
    [[ $verdict == ok ]]
}
case $ACCEL in
auto) if probe_kvm; then ACCEL=kvm; else ACCEL=tcg; fi ;;
esac

if [[ -z $BOUND ]]; then
    # Under TCG the guests share the CPUs: the bound grows with the fleet.
    per=30
    [[ $MODE == uefi ]] && per=45
    [[ $ACCEL == kvm ]] && per=10
    BOUND=$((60 + per * VMS / (CPUS > 1 ? CPUS - PIN : 1) + PAD_BYTES / 1048576 * VMS))
fi

# ---------------------------------------------------------------- network namespace

log "namespace $NS: br0 198.18.0.1/24, fd00:5eed:0:1::1/64, $VMS tap(s)"
ip netns add "$NS"
NS_CREATED=1
# Background processes start as `ip netns exec NS cmd &`: ip execs cmd, so
# $! is the process itself and cleanup can kill it by PID (a shell function
# here would leave $! pointing at a subshell and orphan the command).
NSX=(ip netns exec "$NS")
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge
ip -n "$NS" link set br0 type bridge forward_delay 0 stp_state 0
ip -n "$NS" addr add 198.18.0.1/24 dev br0
ip -n "$NS" -6 addr add fd00:5eed:0:1::1/64 dev br0 nodad
ip -n "$NS" link set br0 up
for ((i = 1; i <= VMS; i++)); do
    ip -n "$NS" tuntap add dev "tap$i" mode tap
    ip -n "$NS" link set "tap$i" master br0 up
done

if [[ $LOSS -gt 0 ]]; then
    # Random loss at the server, both directions, TFTP only (DHCP on 67/68
    # and IPv6 RAs pass). The capture on br0 sees datagrams dropped on the
    # way in (before the input hook), not those dropped on the way out.
    "${NSX[@]}" nft -f - <<EOF
table inet rtbloss {
    chain in {
        type filter hook input priority 0; policy accept;
        ip saddr 198.18.0.0/24 udp sport != 68 numgen random mod 100 < $LOSS counter drop
    }
    chain out {
        type filter hook output priority 0; policy accept;
        ip daddr 198.18.0.0/24 udp dport != 68 numgen random mod 100 < $LOSS counter drop
    }
}
EOF
fi

# Capture headers only: enough for TFTP opcodes, blocks, options, errors.
"${NSX[@]}" tcpdump -i br0 -n -s 256 -U -w "$WORK/capture.pcap" udp >/dev/null 2>"$WORK/tcpdump.log" &
PIDS+=($!)
for _ in $(seq 50); do
    grep 'listening on' "$WORK/tcpdump.log" >/dev/null 2>&1 && break
    sleep 0.1
done

{
    echo "port=0"
    echo "interface=br0"
    echo "bind-interfaces"
    echo "no-resolv"
    echo "no-hosts"
    echo "user=root"
    echo "log-dhcp"
    echo "dhcp-authoritative"
    echo "dhcp-leasefile=$WORK/dnsmasq.leases"
    echo "dhcp-range=198.18.0.100,198.18.0.199,255.255.255.0,1h"
    # Router advertisements: iPXE waits ~13 s for IPv6 autoconfiguration otherwise.
    echo "enable-ra"
    echo "dhcp-range=fd00:5eed:0:1::,ra-only,64"
    for ((i = 1; i <= VMS; i++)); do echo "dhcp-host=$(mac_of "$i"),$(ip_of "$i")"; done
    echo "dhcp-userclass=set:ipxe,iPXE"
    echo "dhcp-match=set:efi64,option:client-arch,7"
    echo "dhcp-match=set:efi64,option:client-arch,9"
    case $MODE in
    ipxe) echo "dhcp-boot=boot.ipxe,,198.18.0.1" ;;
    pxelinux) echo "dhcp-boot=pxelinux.0,,198.18.0.1" ;;
    uefi)
        echo "dhcp-boot=tag:ipxe,boot.ipxe,,198.18.0.1"
        echo "dhcp-boot=tag:!ipxe,tag:efi64,snponly.efi,,198.18.0.1"
        ;;
    esac
} >"$WORK/dnsmasq.conf"
"${NSX[@]}" "${VM_PIN[@]}" dnsmasq --keep-in-foreground --conf-file="$WORK/dnsmasq.conf" \
    --pid-file="$WORK/dnsmasq.pid" --log-facility="$WORK/dnsmasq.log" >/dev/null 2>>"$WORK/dnsmasq.log" &
PIDS+=($!)

case $SERVER in
ringtftpd)
    # shellcheck disable=SC2086
    "${NSX[@]}" "${SERVER_PIN[@]}" "$BINARY" --address 198.18.0.1:69 $SERVER_ARGS "$TFTP" >/dev/null 2>"$WORK/server.log" &
    ;;
hpa)
    # -L: foreground; -s: chroot to the root; -u tftp as its package runs it.
    # shellcheck disable=SC2086
    "${NSX[@]}" "${SERVER_PIN[@]}" /usr/sbin/in.tftpd -L -s -u tftp -a 198.18.0.1:69 $SERVER_ARGS "$TFTP" >/dev/null 2>"$WORK/server.log" &
    ;;
esac
SERVER_PID=$!
PIDS+=("$SERVER_PID")
for _ in $(seq 50); do
    "${NSX[@]}" ss -Hlun 'sport = :69' 2>/dev/null | grep 198.18.0.1 >/dev/null && break
    sleep 0.1
done
"${NSX[@]}" ss -Hlun 'sport = :69' | grep 198.18.0.1 >/dev/null || {
    cat "$WORK/server.log" >&2
    die "$SERVER is not listening on 198.18.0.1:69"
}

# ---------------------------------------------------------------- boot

MEM=256
[[ $PAD_BYTES -gt 0 ]] && MEM=$((256 + 2 * PAD_BYTES / 1048576))
[[ $MODE == uefi && $MEM -lt 512 ]] && MEM=512
log "booting $VMS VM(s): mode=$MODE server=$SERVER accel=$ACCEL mem=${MEM}M bound=${BOUND}s kernel=$KPKG initrd=$(stat -c %s "$TFTP/initrd.img") bytes"
declare -A START MARK
for ((i = 1; i <= VMS; i++)); do
    fw=()
    case $MODE in
    uefi)
        cp /usr/share/OVMF/OVMF_VARS_4M.fd "$WORK/vm$i.vars.fd"
        fw=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
            -drive "if=pflash,format=raw,unit=1,file=$WORK/vm$i.vars.fd")
        # No option ROM: OVMF's own virtio-net driver and PXE client.
        rom=""
        ;;
    *)
        # qemu's default ROM for virtio-net-pci is ipxe-qemu's
        # /usr/lib/ipxe/qemu/efi-virtio.rom (its data path), and only a
        # default ROM gets its PCI IDs patched to the device's: naming the
        # same file in romfile= leaves SeaBIOS skipping it.
        rom=default
        ;;
    esac
    romopt=",romfile=$rom"
    [[ $rom == default ]] && romopt=""
    START[$i]=$EPOCHREALTIME
    "${NSX[@]}" "${VM_PIN[@]}" timeout -k 5 "$BOUND" qemu-system-x86_64 -accel "$ACCEL" -m "$MEM" -smp 1 \
        -nographic -no-reboot -monitor none -serial "file:$WORK/vm$i.serial" "${fw[@]}" \
        -netdev "tap,id=n0,ifname=tap$i,script=no,downscript=no" \
        -device "virtio-net-pci,netdev=n0,mac=$(mac_of "$i")$romopt,bootindex=1" \
        -boot n >"$WORK/vm$i.qemu.log" 2>&1 &
    VM_PIDS+=($!)
done

# Poll the serial logs for the markers until every VM has one or has exited.
deadline=$((${EPOCHREALTIME%.*} + BOUND + 10))
while :; do
    pending=0
    for ((i = 1; i <= VMS; i++)); do
        [[ -n ${MARK[$i]:-} ]] && continue
        if grep -a 'RINGTFTPD-BOOT-OK' "$WORK/vm$i.serial" >/dev/null 2>&1; then
            MARK[$i]=$EPOCHREALTIME
        elif kill -0 "${VM_PIDS[$((i - 1))]}" 2>/dev/null; then
            pending=1
        fi
    done
    [[ $pending -eq 0 || ${EPOCHREALTIME%.*} -gt $deadline ]] && break
    sleep 0.2
done
for pid in "${VM_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
VM_PIDS=()

# Stop the server and the capture (SIGTERM; tcpdump flushes on it).
kill "$SERVER_PID" 2>/dev/null || true
wait "$SERVER_PID" 2>/dev/null || true
for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
PIDS=()

# ---------------------------------------------------------------- results

# One line per TFTP packet: time|src|sport|dst|dport|opcode|file|block|optnames|optvalues|errcode|errmsg|udplen
tshark -r "$WORK/capture.pcap" -n -Y tftp -T fields -E separator='|' \
    -e frame.time_epoch -e ip.src -e udp.srcport -e ip.dst -e udp.dstport -e tftp.opcode \
    -e tftp.source_file -e tftp.block -e tftp.option.name -e tftp.option.value \
    -e tftp.error.code -e tftp.error.message -e udp.length \
    >"$WORK/tftp.txt" 2>"$WORK/tshark.log" || die "tshark failed: $(cat "$WORK/tshark.log")"

# Per transfer (client ip:port): request, options, OACK, counts, how it ended.
xfers() {
    awk -F'|' -v ip="$1" '
    {
        op = $6; c = ""
        if ($2 == ip) c = $2 ":" $3; else if ($4 == ip) c = $4 ":" $5; else next
        if (!(c in first)) { first[c] = $1; order[++n] = c }
        last[c] = $1
        if (op == 1) {
            rrq[c]++
            if (rrq[c] == 1) { file[c] = $7; opts[c] = optstr($9, $10) }
        } else if (op == 6) {
            if (oack[c] == "") oack[c] = optstr($9, $10)
        } else if (op == 3) {
            # A block seen before in this pass of the 16-bit block space is a resend.
            data[c]++
            if ($8 < 100 && maxblk[c] > 65000) { epoch[c]++; maxblk[c] = 0 }
            if ($8 > maxblk[c]) maxblk[c] = $8
            if ((c, epoch[c], $8) in seen_d) resent[c]++
            seen_d[c, epoch[c], $8] = 1
            lastdata[c] = $1; lastblk[c] = $8; lastlen[c] = $13 - 12
        } else if (op == 4) {
            ack[c]++
        } else if (op == 5) {
            err[c] = err[c] sprintf("ERROR %s \"%s\" from %s; ", $11, $12, ($2 == ip) ? "client" : "server")
        }
        tail[c] = tail[c] " " name(op, $2 == ip, $8, $11)
        if (split(tail[c], t, " ") > 3) tail[c] = " " t[2] " " t[3] " " t[4]
    }
    function optstr(names, values,   a, b, i, m, s) {
        m = split(names, a, ","); split(values, b, ",")
        s = ""
        for (i = 1; i <= m; i++) s = s (i > 1 ? "," : "") a[i] "=" b[i]
        return s == "" ? "-" : s
    }
    function name(op, fromclient, blk, ec) {
        if (op == 1) return "RRQ"
        if (op == 3) return "DATA" blk
        if (op == 4) return "ACK" blk
        if (op == 5) return (fromclient ? "ERROR" ec "(client)" : "ERROR" ec "(server)")
        if (op == 6) return "OACK"
        return "op" op
    }
    END {
        for (i = 1; i <= n; i++) {
            c = order[i]
            printf "XFER client=%s file=\"%s\" rrq_opts=%s rrqs=%d oack=%s data=%d resent=%d acks=%d last_data_len=%s ms=%.1f ends:%s %s\n", \
                c, file[c], opts[c], rrq[c], (oack[c] == "" ? "none" : oack[c]), data[c], resent[c], ack[c], \
                (lastlen[c] == "" ? "-" : lastlen[c]), (last[c] - first[c]) * 1000, tail[c], err[c]
        }
    }' "$WORK/tftp.txt"
}

# TFTP phase: first RRQ from the VM to the last DATA to it. in_transfers_s
# adds up each transfer's first-to-last packet, leaving out the firmware's
# own work between transfers.
tftp_phase() {
    awk -F'|' -v ip="$1" '
        $2 == ip && $6 == 1 && t0 == "" { t0 = $1 }
        $4 == ip && $6 == 3 { t1 = $1; n++; bytes += $13 - 12 }
        $2 == ip && $6 == 1 { rrqs++ }
        $6 == 5 && $4 == ip { errs++ }
        {
            c = ""
            if ($2 == ip) c = $3; else if ($4 == ip) c = $5; else next
            if (!(c in first)) first[c] = $1
            last[c] = $1
        }
        END {
            if (t0 == "" || t1 == "") { print "tftp_s=none"; exit }
            for (c in first) sum += last[c] - first[c]
            printf "tftp_s=%.3f in_transfers_s=%.3f data_packets=%d data_bytes=%d rrqs=%d server_errors=%d\n", t1 - t0, sum, n, bytes, rrqs, errs + 0
        }' "$WORK/tftp.txt"
}

fails=0
max_mark=0
max_tftp=0
for ((i = 1; i <= VMS; i++)); do
    mac=$(mac_of "$i")
    expect=$(cfg_of "$i")
    line=$(grep -a -o 'RINGTFTPD-BOOT-OK[^[:cntrl:]]*' "$WORK/vm$i.serial" 2>/dev/null | head -n1 || true)
    status=ok
    if [[ -z $line || -z ${MARK[$i]:-} ]]; then
        status="no-marker"
        mark=none
    else
        mark=$(awk -v a="${START[$i]}" -v b="${MARK[$i]}" 'BEGIN { printf "%.1f", b - a }')
        field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$line"; }
        nic=$(field nic)
        got_cfg=$(field cfg)
        pad=$(field pad)
        [[ $nic == "$mac" ]] || status="wrong-nic($nic)"
        [[ $got_cfg == "$expect" ]] || status="wrong-cfg($got_cfg)"
        [[ $pad == "$PAD_SUM" ]] || status="pad-checksum($pad!=$PAD_SUM)"
        max_mark=$(awk -v a="$max_mark" -v b="$mark" 'BEGIN { print (b > a) ? b : a }')
    fi
    phase=$(tftp_phase "$(ip_of "$i")")
    t=$(sed -n 's/^tftp_s=\([0-9.]*\).*/\1/p' <<<"$phase")
    [[ -n $t ]] && max_tftp=$(awk -v a="$max_tftp" -v b="$t" 'BEGIN { print (b > a) ? b : a }')
    printf 'BOOT vm=%d mac=%s ip=%s expect_cfg=%s marker_s=%s status=%s marker="%s"\n' \
        "$i" "$mac" "$(ip_of "$i")" "$expect" "$mark" "$status" "$line"
    printf 'TFTP vm=%d %s\n' "$i" "$phase"
    if [[ $status != ok ]]; then
        fails=$((fails + 1))
        printf -- '--- vm%d serial (last 25 lines) ---\n' "$i"
        tr -d '\r' <"$WORK/vm$i.serial" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' | tail -n 25 || true
        printf -- '--- vm%d qemu ---\n' "$i"
        tail -n 5 "$WORK/vm$i.qemu.log" || true
    fi
done

xfers "$(ip_of 1)"
# Every OACK any VM got, by what it granted (tsize's value left out).
awk -F'|' '$6 == 6 {
        m = split($9, a, ","); split($10, b, ","); s = ""
        for (i = 1; i <= m; i++) s = s (i > 1 ? "," : "") a[i] (a[i] == "tsize" ? "" : "=" b[i])
        n[s]++
    }
    END { for (k in n) printf "OACKS %d x %s\n", n[k], k }' "$WORK/tftp.txt" | sort
if [[ $SERVER == ringtftpd ]]; then
    grep -c '^transfer ' "$WORK/server.log" | sed 's/^/SERVER transfers_logged=/'
    grep '^transfer ' "$WORK/server.log" | grep -v 'outcome=completed' | sed 's/^/SERVER not-completed: /' | head -n 20 || true
    grep -o 'blksize=[0-9]* windowsize=[0-9]*' "$WORK/server.log" | sort | uniq -c | sed 's/^ */SERVER x/' || true
fi
if [[ $fails -gt 0 ]]; then
    printf -- '--- server log (last 20 lines) ---\n'
    tail -n 20 "$WORK/server.log" || true
    printf -- '--- dnsmasq log (last 20 lines) ---\n'
    tail -n 20 "$WORK/dnsmasq.log" || true
fi

if [[ $MODE == uefi ]]; then
    # OVMF asks windowsize=4 (RFC 7440) for its boot program: show what each
    # such request was granted in the OACK (none = option ignored).
    awk -F'|' '
        $6 == 1 && $9 ~ /windowsize/ {
            m = split($9, a, ","); split($10, b, ",")
            for (i = 1; i <= m; i++) if (a[i] == "windowsize") ask[$2 ":" $3] = b[i]
            tsz[$2 ":" $3] = ($9 ~ /tsize/) ? "tsize-probe" : "fetch"
            order[++n] = $2 ":" $3; file[$2 ":" $3] = $7
        }
        $6 == 6 && (($4 ":" $5) in ask) && !(($4 ":" $5) in got) {
            got[$4 ":" $5] = "none"
            m = split($9, a, ","); split($10, b, ",")
            for (i = 1; i <= m; i++) if (a[i] == "windowsize") got[$4 ":" $5] = b[i]
        }
        END {
            for (i = 1; i <= n; i++) {
                c = order[i]
                printf "WINDOWSIZE client=%s file=\"%s\" kind=%s requested=%s granted=%s\n", c, file[c], tsz[c], ask[c], (c in got) ? got[c] : "no-oack"
            }
        }' "$WORK/tftp.txt" | tee "$WORK/windowsize.txt"
    if [[ $SERVER == ringtftpd ]]; then
        fetches=$(grep -c 'kind=fetch' "$WORK/windowsize.txt" || true)
        granted=$(grep 'kind=fetch' "$WORK/windowsize.txt" | grep -c 'granted=4$' || true)
        logged=$(grep -c 'file="snponly.efi".*windowsize=4 .*outcome=completed' "$WORK/server.log" || true)
        printf 'CHECK uefi-windowsize fetches=%s oack_granted_4=%s server_log_completed_windowsize_4=%s\n' \
            "$fetches" "$granted" "$logged"
        if [[ $fetches -lt $VMS || $granted -ne $fetches || $logged -lt $VMS ]]; then
            echo "CHECK failed: every OVMF fetch must be granted windowsize=4 and complete"
            fails=$((fails + 1))
        fi
    fi
fi

if [[ $LOSS -gt 0 ]]; then
    "${NSX[@]}" nft list table inet rtbloss | grep -o 'packets [0-9]*' |
        awk 'NR == 1 { i = $2 } NR == 2 { o = $2 } END { printf "LOSS dropped_inbound=%d dropped_outbound=%d\n", i, o }'
fi

verdict=pass
[[ $fails -eq 0 ]] || verdict=fail
printf 'RESULT %s server=%s mode=%s vms=%d pad=%s loss=%d accel=%s booted=%d/%d max_marker_s=%s max_tftp_s=%s pin=%d kernel=%s\n' \
    "$verdict" "$SERVER" "$MODE" "$VMS" "${PAD:-0}" "$LOSS" "$ACCEL" $((VMS - fails)) "$VMS" "$max_mark" "$max_tftp" "$PIN" "$KPKG"
[[ $verdict == pass ]]

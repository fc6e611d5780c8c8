#!/usr/bin/env bash
# dnsmasq 2.93+ from Debian unstable (dnsmasq-base: the binary without the DNS service)
# under target/peers/dnsmasq-sid; prints the command prefix that runs it (see peer-sid.sh).
exec "$(dirname "${BASH_SOURCE[0]}")/peer-sid.sh" dnsmasq-sid dnsmasq-base usr/sbin/dnsmasq \
    --version '^Dnsmasq version 2\.(9[3-9]|[1-9][0-9][0-9])'

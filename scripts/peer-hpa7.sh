#!/usr/bin/env bash
# tftpd-hpa 7.x from Debian unstable (it needs a newer glibc than the host may
# have) under target/peers/hpa7; prints the command prefix that runs it (see
# peer-sid.sh). The differential tests (tests/common's hpa7_command) use it.
exec "$(dirname "${BASH_SOURCE[0]}")/peer-sid.sh" hpa7 tftpd-hpa usr/sbin/in.tftpd \
    -V '^tftp-hpa 7\.'

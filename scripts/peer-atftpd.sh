#!/usr/bin/env bash
# atftpd 0.8.1+ from Debian unstable under target/peers/atftpd-sid; prints the command
# prefix that runs it (see peer-sid.sh). atftpd prints its version with --version.
exec "$(dirname "${BASH_SOURCE[0]}")/peer-sid.sh" atftpd-sid atftpd usr/sbin/atftpd \
    --version 'atftp-0\.8\.([1-9]|[1-9][0-9])'

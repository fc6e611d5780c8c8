//! The command line. Flags follow tftpd-hpa's where they overlap
//! (`-a/--address`, the directory last, `-B`, `-p`), so that ringtftpd can
//! stand in for it.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::endpoint::EndpointConfig;
use crate::proto;
use crate::session::{Limits, MAX_WINDOWSIZE};

/// The TFTP port.
pub const DEFAULT_PORT: u16 = 69;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "ringtftpd",
    version,
    about = "A high-performance TFTP server on io_uring"
)]
pub struct Config {
    /// Directory to serve; a leading '/' in requests means this root.
    #[arg(default_value = "/srv/tftp")]
    pub directory: PathBuf,

    /// Address to listen on, `ADDR[:PORT]`, `[V6ADDR][:PORT]` or `:PORT`;
    /// repeatable. `[::]` is dual-stack.
    #[arg(short = 'a', long = "address", value_parser = parse_listen_address, default_value = "[::]:69")]
    pub addresses: Vec<SocketAddr>,

    /// Largest blksize granted (RFC 2348: 8..=65464).
    #[arg(short = 'B', long = "max-blksize", default_value_t = proto::MAX_BLKSIZE,
          value_parser = clap::value_parser!(u16).range(i64::from(proto::MIN_BLKSIZE)..=i64::from(proto::MAX_BLKSIZE)))]
    pub max_blksize: u16,

    /// Largest windowsize granted (RFC 7440).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_WINDOWSIZE)))]
    pub max_windowsize: u16,

    /// Do not clamp blksize to the MTU of the interface a request came in on.
    #[arg(long)]
    pub no_mtu_clamp: bool,

    /// Serve files that are not world-readable too.
    #[arg(short = 'p', long)]
    pub permissive: bool,

    /// Retransmissions of one packet before a transfer is given up.
    #[arg(long, default_value_t = 8)]
    pub retries: u32,

    /// Floor of the adaptive retransmission timeout, in milliseconds. Below
    /// ~100 ms, slow firmware's ACK jitter causes spurious resends.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub rto_min_ms: u64,

    /// Ceiling of the adaptive retransmission timeout, in milliseconds.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rto_max_ms: u64,

    /// Retransmission timeout before the first RTT sample, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub initial_rto_ms: u64,

    /// Most concurrent transfers, across all threads.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions: u32,

    /// Worker threads (shards); default: one per CPU this process may run on.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,

    /// Receive buffer of each listening socket, in bytes (absorbs bursts
    /// of requests).
    #[arg(long, default_value_t = 16 << 20)]
    pub rcvbuf: usize,

    /// ERROR replies per second and thread to strangers and malformed
    /// packets (a bound on reflected traffic).
    #[arg(long, default_value_t = 100)]
    pub error_rate: u32,

    /// Milliseconds for which the result of opening a file name (the
    /// file, or its refusal) is reused; 0 opens the file for every request.
    #[arg(long, default_value_t = 1000)]
    pub open_cache_ms: u64,

    /// Seconds that running transfers may take to finish after SIGINT or
    /// SIGTERM.
    #[arg(long, default_value_t = 5)]
    pub shutdown_grace: u64,

    /// No log line per finished transfer.
    #[arg(short = 'q', long)]
    pub quiet: bool,

    /// Once the listening sockets are bound, switch to this user and its
    /// primary group (as tftpd-hpa's -u); needs root. Default: stay.
    #[arg(short = 'u', long = "user", value_name = "USER")]
    pub user: Option<String>,

    /// Accepted for tftpd-hpa compatibility; ringtftpd always runs standalone.
    #[arg(short = 'l', long = "listen", hide = true)]
    pub listen: bool,

    /// Accepted for tftpd-hpa compatibility; ringtftpd stays in the foreground.
    #[arg(short = 'L', long = "foreground", hide = true)]
    pub foreground: bool,

    /// Accepted for tftpd-hpa compatibility; ringtftpd always confines
    /// requests to the directory.
    #[arg(short = 's', long = "secure", hide = true)]
    pub secure: bool,
}

/// Parses tftpd-hpa style listen addresses: `1.2.3.4`, `1.2.3.4:69`,
/// `[::1]`, `[::1]:69`, `::1`, `:6969` (all addresses, dual-stack).
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        if let Ok(ip) = inner.parse::<Ipv6Addr>() {
            return Ok(SocketAddr::new(IpAddr::V6(ip), DEFAULT_PORT));
        }
    }
    if let Some(port) = text.strip_prefix(':') {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
        }
    }
    Err(format!(
        "'{text}' is not an address: use ADDR[:PORT], [V6ADDR][:PORT] or :PORT"
    ))
}

impl Config {
    pub fn limits(&self) -> Limits {
        let rto_min = Duration::from_millis(self.rto_min_ms);
        Limits {
            max_blksize: self.max_blksize,
            max_windowsize: self.max_windowsize,
            mtu_clamp: !self.no_mtu_clamp,
            initial_rto: Duration::from_millis(self.initial_rto_ms),
            rto_min,
            rto_max: Duration::from_millis(self.rto_max_ms).max(rto_min),
            retries: self.retries,
            ..Limits::default()
        }
    }

    /// The endpoint configuration of one of `shards` shards.
    pub fn endpoint(&self, shards: usize) -> EndpointConfig {
        let shards = shards.max(1) as u32;
        EndpointConfig {
            max_sessions: self.max_sessions.div_ceil(shards) as usize,
            limits: self.limits(),
            error_replies_per_sec: self.error_rate,
            error_reply_burst: self.error_rate.max(1),
            open_cache_ttl: Duration::from_millis(self.open_cache_ms),
            ..EndpointConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_like_tftpd_hpa() {
        let p = |s| parse_listen_address(s).unwrap().to_string();
        assert_eq!(p("127.0.0.1:6969"), "127.0.0.1:6969");
        assert_eq!(p("127.0.0.1"), "127.0.0.1:69");
        assert_eq!(p("[::1]:6969"), "[::1]:6969");
        assert_eq!(p("[::1]"), "[::1]:69");
        assert_eq!(p("::1"), "[::1]:69");
        assert_eq!(p(":6969"), "[::]:6969");
        assert!(parse_listen_address("nonsense").is_err());
        assert!(parse_listen_address("1.2.3.4:99999").is_err());
    }

    #[test]
    fn defaults_and_repeated_addresses() {
        let c = Config::parse_from(["ringtftpd", "/tmp"]);
        assert_eq!(c.addresses, vec!["[::]:69".parse().unwrap()]);
        let c = Config::parse_from([
            "ringtftpd",
            "-a",
            "127.0.0.1:1",
            "--address",
            "[::1]:2",
            "-l",
            "-s",
            "/tmp",
        ]);
        assert_eq!(c.addresses.len(), 2);
        assert_eq!(c.directory, PathBuf::from("/tmp"));
        assert!(Config::try_parse_from(["ringtftpd", "--max-blksize", "7", "/tmp"]).is_err());
        assert!(Config::try_parse_from(["ringtftpd", "--max-windowsize", "0", "/tmp"]).is_err());
        assert_eq!(c.endpoint(3).max_sessions, 6667);
    }
}

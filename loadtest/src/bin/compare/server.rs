//! The servers compared and the exact command line each is started with (those of
//! /work/shared/research/peers-measured.md, with limits raised for 10,000 sessions).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Ringtftpd,
    TftpdHpa,
    Atftpd,
    Dnsmasq,
    /// ringtftpd `--single-port`: every transfer on the listening port.
    RingtftpdSinglePort,
    /// dnsmasq `--tftp-single-port`.
    DnsmasqSinglePort,
    /// The newest releases, from Debian unstable, run with unstable's loader
    /// (scripts/peer-hpa7.sh, peer-dnsmasq.sh, peer-atftpd.sh): same command lines.
    TftpdHpa7,
    Dnsmasq293,
    Atftpd081,
    /// loadtest's `lockstep-floor`: the least a lock-step server can do per block.
    Floor,
}

/// The servers a default run compares: the stable four, the newest releases (skipped when
/// not fetched) and the lock-step floor. tftpd-hpa (5.2) stays the incumbent ratios are to.
pub const ALL: [Kind; 8] = [
    Kind::Ringtftpd,
    Kind::TftpdHpa,
    Kind::Atftpd,
    Kind::Dnsmasq,
    Kind::TftpdHpa7,
    Kind::Dnsmasq293,
    Kind::Atftpd081,
    Kind::Floor,
];

/// Every server `--servers` may name: the default four, the single-port variants, the
/// newest peers and the lock-step floor.
pub const NAMED: [Kind; 10] = [
    Kind::Ringtftpd,
    Kind::TftpdHpa,
    Kind::Atftpd,
    Kind::Dnsmasq,
    Kind::RingtftpdSinglePort,
    Kind::DnsmasqSinglePort,
    Kind::TftpdHpa7,
    Kind::Dnsmasq293,
    Kind::Atftpd081,
    Kind::Floor,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ringtftpd => "ringtftpd",
            Kind::TftpdHpa => "tftpd-hpa",
            Kind::Atftpd => "atftpd",
            Kind::Dnsmasq => "dnsmasq",
            Kind::RingtftpdSinglePort => "ringtftpd-single-port",
            Kind::DnsmasqSinglePort => "dnsmasq-single-port",
            Kind::TftpdHpa7 => "tftpd-hpa-7",
            Kind::Dnsmasq293 => "dnsmasq-2.93",
            Kind::Atftpd081 => "atftpd-0.8.1",
            Kind::Floor => "floor",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        NAMED.into_iter().find(|k| k.name() == s)
    }

    /// The server program this is a way (or a release) of running: its command line.
    pub fn base(self) -> Kind {
        match self {
            Kind::RingtftpdSinglePort => Kind::Ringtftpd,
            Kind::DnsmasqSinglePort | Kind::Dnsmasq293 => Kind::Dnsmasq,
            Kind::TftpdHpa7 => Kind::TftpdHpa,
            Kind::Atftpd081 => Kind::Atftpd,
            k => k,
        }
    }

    /// A newest-release peer: found by its fetch script, run with a loader prefix.
    pub fn is_newest_peer(self) -> bool {
        matches!(self, Kind::TftpdHpa7 | Kind::Dnsmasq293 | Kind::Atftpd081)
    }

    /// Whether the server can take uploads that create new files, and if not, why.
    pub fn uploads(self) -> Result<(), &'static str> {
        match self.base() {
            Kind::Floor => Err("the lock-step floor serves reads only"),
            Kind::Dnsmasq => Err(
                "dnsmasq's TFTP server is read-only (it answers every WRQ with an ERROR);                  it has no option to take uploads",
            ),
            _ => Ok(()),
        }
    }

    /// dnsmasq has no TFTP port option: it serves on 69 only.
    pub fn fixed_port(self) -> Option<u16> {
        (self.base() == Kind::Dnsmasq).then_some(69)
    }
}

/// A server ready to start: its binary and how to call it.
#[derive(Debug, Clone)]
pub struct Server {
    pub kind: Kind,
    pub binary: PathBuf,
    /// Run before the binary: a newest peer's loader and `--library-path DIR` (empty for
    /// the others).
    pub prefix: Vec<String>,
}

impl Server {
    /// The argument vector (binary first) serving `root` on 127.0.0.1:`port`, in the
    /// foreground, quiet, with limits that let 10,000 transfers run at once. With `uploads`,
    /// it also takes WRQs creating new files (ringtftpd and tftpd-hpa `-c`; atftpd takes them
    /// without a flag, into a directory it can write: it runs as root here).
    pub fn command(&self, root: &Path, port: u16, uploads: bool) -> Vec<String> {
        let bin = self.binary.display().to_string();
        let root = root.display().to_string();
        let addr = format!("127.0.0.1:{port}");
        let mut v: Vec<String> = match self.kind.base() {
            Kind::Floor => vec![bin, "--address".into(), addr, root],
            Kind::Ringtftpd => vec![
                bin,
                "--address".into(),
                addr,
                "--threads".into(),
                "1".into(),
                "-q".into(),
                // Every simulated client shares 127.0.0.1: lift the
                // per-address cap and rate, which would take them for one.
                "--max-per-client".into(),
                "1048576".into(),
                "--request-rate".into(),
                "0".into(),
                root,
            ],
            // Drops to nobody; forks a process per transfer.
            Kind::TftpdHpa => vec![bin, "-L".into(), "-s".into(), root, "-a".into(), addr],
            // The default --maxthread 100 would refuse most of S1/S5/S6.
            Kind::Atftpd => vec![
                bin,
                "--daemon".into(),
                "--no-fork".into(),
                "--port".into(),
                port.to_string(),
                "--bind-address".into(),
                "127.0.0.1".into(),
                "--user".into(),
                "root.root".into(),
                "--logfile".into(),
                "/dev/null".into(),
                "--verbose=0".into(),
                "--maxthread".into(),
                "20000".into(),
                root,
            ],
            // The default --tftp-max 50 would refuse most transfers.
            Kind::Dnsmasq => vec![
                bin,
                "--no-daemon".into(),
                "--conf-file=/dev/null".into(),
                "--port=0".into(),
                "--enable-tftp".into(),
                format!("--tftp-root={root}"),
                "--listen-address=127.0.0.1".into(),
                "--bind-interfaces".into(),
                "--user=root".into(),
                "--group=root".into(),
                "--pid-file=".into(),
                "--tftp-max=20000".into(),
                "--quiet-tftp".into(),
                "--log-facility=/dev/null".into(),
            ],
            _ => unreachable!("base() is one of the five programs"),
        };
        match self.kind {
            // Before the root, its last argument.
            Kind::RingtftpdSinglePort => v.insert(v.len() - 1, "--single-port".into()),
            // dnsmasq 2.90 fails every single-port send with ENETUNREACH when bound to
            // the interface's address (--bind-interfaces): bound to the wildcard it
            // still answers only 127.0.0.1 (--listen-address).
            Kind::DnsmasqSinglePort => {
                v.retain(|a| a != "--bind-interfaces");
                v.push("--tftp-single-port".into());
            }
            _ => {}
        }
        if uploads {
            match self.kind.base() {
                // Before the root, its last argument.
                Kind::Ringtftpd => v.insert(v.len() - 1, "-c".into()),
                Kind::TftpdHpa => v.insert(1, "-c".into()),
                _ => {}
            }
        }
        if !self.prefix.is_empty() {
            v.splice(0..0, self.prefix.iter().cloned());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let s = |kind, bin: &str| Server {
            kind,
            binary: bin.into(),
            prefix: Vec::new(),
        };
        let root = Path::new("/tmp/r");
        assert_eq!(
            s(Kind::Ringtftpd, "/x/ringtftpd")
                .command(root, 7000, false)
                .join(" "),
            "/x/ringtftpd --address 127.0.0.1:7000 --threads 1 -q --max-per-client 1048576 \
             --request-rate 0 /tmp/r"
        );
        assert_eq!(
            s(Kind::TftpdHpa, "/usr/sbin/in.tftpd")
                .command(root, 7001, false)
                .join(" "),
            "/usr/sbin/in.tftpd -L -s /tmp/r -a 127.0.0.1:7001"
        );
        assert_eq!(
            s(Kind::TftpdHpa, "/usr/sbin/in.tftpd")
                .command(root, 7001, true)
                .join(" "),
            "/usr/sbin/in.tftpd -c -L -s /tmp/r -a 127.0.0.1:7001"
        );
        assert!(
            s(Kind::Ringtftpd, "r")
                .command(root, 7000, true)
                .join(" ")
                .ends_with(" -c /tmp/r")
        );
        assert!(Kind::Dnsmasq.uploads().is_err() && Kind::Atftpd.uploads().is_ok());
        let a = s(Kind::Atftpd, "atftpd")
            .command(root, 7002, true)
            .join(" ");
        assert!(
            a.contains("--port 7002 --bind-address 127.0.0.1") && a.ends_with(" /tmp/r"),
            "{a}"
        );
        let d = s(Kind::Dnsmasq, "dnsmasq")
            .command(root, 69, false)
            .join(" ");
        assert!(
            d.contains("--tftp-root=/tmp/r") && d.contains("--port=0"),
            "{d}"
        );
        assert_eq!(Kind::Dnsmasq.fixed_port(), Some(69));
        assert_eq!(Kind::parse("tftpd-hpa"), Some(Kind::TftpdHpa));
        assert!(
            s(Kind::RingtftpdSinglePort, "r")
                .command(root, 7000, true)
                .join(" ")
                .ends_with(" --single-port -c /tmp/r")
        );
        let d = s(Kind::DnsmasqSinglePort, "dnsmasq").command(root, 69, false);
        assert_eq!(d.last().map(String::as_str), Some("--tftp-single-port"));
        assert!(!d.iter().any(|a| a == "--bind-interfaces"));
        assert_eq!(Kind::DnsmasqSinglePort.fixed_port(), Some(69));
        assert!(Kind::DnsmasqSinglePort.uploads().is_err());
        assert_eq!(
            Kind::parse("ringtftpd-single-port"),
            Some(Kind::RingtftpdSinglePort)
        );
        assert!(
            !ALL.contains(&Kind::RingtftpdSinglePort),
            "not in a default run"
        );
        assert_eq!(Kind::parse("x"), None);
        let mut h7 = s(Kind::TftpdHpa7, "/p/in.tftpd");
        h7.prefix = vec!["/p/ld.so".into(), "--library-path".into(), "/p/lib".into()];
        assert_eq!(
            h7.command(root, 7003, false).join(" "),
            "/p/ld.so --library-path /p/lib /p/in.tftpd -L -s /tmp/r -a 127.0.0.1:7003"
        );
        assert_eq!(
            Kind::parse("dnsmasq-2.93").map(Kind::base),
            Some(Kind::Dnsmasq)
        );
        assert_eq!(Kind::Dnsmasq293.fixed_port(), Some(69));
        assert_eq!(
            s(Kind::Floor, "/x/lockstep-floor")
                .command(root, 7004, false)
                .join(" "),
            "/x/lockstep-floor --address 127.0.0.1:7004 /tmp/r"
        );
        assert!(Kind::Floor.uploads().is_err() && ALL.contains(&Kind::Floor));
    }
}

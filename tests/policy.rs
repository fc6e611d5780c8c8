//! The request-decision seam, sans-IO: a `Policy` decides each admitted
//! request (the path to open and its limits, or a refusal) before any
//! file is opened, and `Endpoint::set_settings` swaps settings for new
//! requests while running transfers keep theirs.

mod sim;

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtftpd::endpoint::{EndpointConfig, RequestOutcome, SessionId};
use ringtftpd::policy::{Decision, DefaultPolicy, Grant, Incoming, NameProbe, Policy, RemapPolicy};
use ringtftpd::proto::{ErrorCode, Options, Packet};
use ringtftpd::refusal::{Refusal, RefusalKind};
use ringtftpd::remap::RemapRules;
use ringtftpd::session::Transmit;
use sim::*;

const SLOW_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));

fn peer(host: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)), port)
}

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    request(1, name, "octet", options)
}

/// Per-MAC configs all resolve to the default one; `secret` is refused;
/// one client gets small blocks; the rest is the default policy's.
#[derive(Debug)]
struct SiteRules;

impl Policy for SiteRules {
    fn decide<'a>(
        &self,
        incoming: &Incoming<'a>,
        settings: &ringtftpd::policy::Settings,
    ) -> Decision<'a> {
        let name = incoming.request.filename;
        if name == b"secret" {
            return Decision::Refuse(Refusal::Denied("refused by a rule"));
        }
        let mut grant = match DefaultPolicy.decide(incoming, settings) {
            Decision::Serve(grant) => grant,
            refused => return refused,
        };
        if name.starts_with(b"pxelinux.cfg/01-") {
            grant.path = Cow::Borrowed(b"pxelinux.cfg/default");
        }
        if incoming.peer.ip() == SLOW_CLIENT {
            grant.limits.max_blksize = 512;
        }
        Decision::Serve(grant)
    }
}

type Fixture = Desk<MemFiles>;

impl Fixture {
    /// `pxelinux.cfg/default` and `boot.img`, decided by `policy`.
    fn with_policy(policy: Arc<dyn Policy>) -> Self {
        let mut files = MemFiles::default();
        for (name, len) in [("pxelinux.cfg/default", 700), ("boot.img", 100_000)] {
            files.insert(name, content(len, len as u64));
        }
        let config = EndpointConfig {
            settings: Settings {
                open_cache_ttl: Duration::from_secs(1),
                policy,
                ..settings()
            },
            ..config()
        };
        Desk::new(config, files)
    }

    /// The first transmit of `id`: its OACK's options, or None for DATA 1.
    fn first_reply(&mut self, id: SessionId) -> Option<Options> {
        let t = self
            .endpoint
            .poll_transmit(self.now, id, &mut self.buf)
            .unwrap();
        match (t, Packet::parse(&self.buf[..t.header_len()])) {
            (Transmit::Oack { .. }, Ok(Packet::Oack(options))) => Some(options),
            (Transmit::Data { .. }, _) => None,
            other => panic!("{other:?}"),
        }
    }

    /// The file bytes `id` serves (its handle).
    fn content(&self, id: SessionId) -> Arc<Vec<u8>> {
        self.endpoint.session(id).unwrap().handle.clone()
    }
}

#[test]
fn a_rewritten_path_is_opened_and_the_open_cache_keys_on_it() {
    let mut f = Fixture::with_policy(Arc::new(SiteRules));
    let a = f.started(peer(2, 1), &rrq("pxelinux.cfg/01-aa-bb-cc-dd-ee-01", &[]));
    let b = f.started(peer(3, 1), &rrq("pxelinux.cfg/01-aa-bb-cc-dd-ee-02", &[]));
    let default = f.files.files[&b"pxelinux.cfg/default".to_vec()].clone();
    assert_eq!(f.content(a), default);
    assert_eq!(f.content(b), default);
    // Two names asked, one path opened once.
    assert_eq!(f.files.opens, [b"pxelinux.cfg/default".to_vec()]);
    // The log line keeps the name as asked.
    f.endpoint
        .abort(f.now, a, ringtftpd::refusal::Abort::ShuttingDown);
    while f.endpoint.poll_transmit(f.now, a, &mut f.buf).is_some() {}
    let done = f.endpoint.poll_event(a).expect("ended");
    assert_eq!(done.filename, "pxelinux.cfg/01-aa-bb-cc-dd-ee-01");
}

#[test]
fn a_policy_refusal_is_answered_before_any_open() {
    let mut f = Fixture::with_policy(Arc::new(SiteRules));
    let RequestOutcome::Reply(n) = f.request(peer(2, 1), &rrq("secret", &[])) else {
        panic!("not refused");
    };
    assert_eq!(
        Packet::parse(&f.buf[..n]),
        Ok(Packet::Error {
            code: ErrorCode::AccessViolation,
            message: b"refused by a rule",
        })
    );
    assert!(f.files.opens.is_empty(), "{:?}", f.files.opens);
}

#[test]
fn a_grant_sets_the_limits_of_its_transfer() {
    let mut f = Fixture::with_policy(Arc::new(SiteRules));
    let ask = rrq("boot.img", &[("blksize", "1468")]);
    let slow = f.started(SocketAddr::new(SLOW_CLIENT, 1), &ask);
    let other = f.started(peer(2, 1), &ask);
    assert_eq!(f.first_reply(slow).unwrap().blksize, Some(512));
    assert_eq!(f.first_reply(other).unwrap().blksize, Some(1468));
}

#[test]
fn new_settings_reach_new_requests_and_running_sessions_keep_theirs() {
    let mut f = Fixture::with_policy(Arc::new(DefaultPolicy));
    let ask = rrq("boot.img", &[("blksize", "1468")]);
    let running = f.started(peer(2, 1), &ask);
    assert_eq!(f.first_reply(running).unwrap().blksize, Some(1468));
    let mut smaller = (**f.endpoint.settings()).clone();
    smaller.limits.max_blksize = 1024;
    f.endpoint.set_settings(Arc::new(smaller));
    // The running session goes on with its blocks...
    f.endpoint
        .handle_datagram(f.now, running, peer(2, 1), &[0, 4, 0, 0], &mut vec![0; 600]);
    let t = f
        .endpoint
        .poll_transmit(f.now, running, &mut f.buf)
        .unwrap();
    assert_eq!(t.payload().map(|p| p.len), Some(1468));
    // ...a new one is granted under the new limits, and opens afresh (the
    // open cache started again: a policy may resolve names differently).
    let opens = f.files.opens.len();
    let new = f.started(peer(3, 1), &ask);
    assert_eq!(f.first_reply(new).unwrap().blksize, Some(1024));
    assert_eq!(f.files.opens.len(), opens + 1);
}

#[test]
fn the_default_policy_refuses_uploads_only_while_they_are_off() {
    let settings = Settings {
        uploads: true,
        max_upload: Some(1000),
        ..settings()
    };
    let decide = |settings: &Settings, datagram: &[u8]| {
        let Ok(Packet::Wrq(request)) = Packet::parse(datagram) else {
            panic!()
        };
        let incoming = Incoming {
            now: Instant::now(),
            peer: peer(2, 1),
            local: LOCAL,
            mtu: None,
            write: true,
            request: &request,
            mac: None,
            client_sessions: 0,
        };
        match DefaultPolicy.decide(&incoming, settings) {
            Decision::Serve(Grant {
                path, max_upload, ..
            }) => Ok((path.into_owned(), max_upload)),
            Decision::Refuse(refusal) => Err(refusal),
        }
    };
    let wrq = request(2, "up.bin", "octet", &[("tsize", "5000")]);
    // Granted with the limit; the endpoint holds the announced size to it.
    assert_eq!(
        decide(&settings, &wrq),
        Ok((b"up.bin".to_vec(), Some(1000)))
    );
    let off = Settings {
        uploads: false,
        ..settings
    };
    assert_eq!(decide(&off, &wrq), Err(Refusal::UploadsDisabled));
}

/// A policy may grant a smaller upload limit than the settings: the
/// endpoint refuses an announced size over the grant's, before any sink.
#[derive(Debug)]
struct SmallUploads;

impl Policy for SmallUploads {
    fn decide<'a>(
        &self,
        incoming: &Incoming<'a>,
        settings: &ringtftpd::policy::Settings,
    ) -> Decision<'a> {
        match DefaultPolicy.decide(incoming, settings) {
            Decision::Serve(grant) => Decision::Serve(Grant {
                max_upload: Some(100),
                ..grant
            }),
            refused => refused,
        }
    }
}

#[test]
fn an_upload_over_the_grants_limit_is_refused_with_error_3() {
    let mut f = Fixture::with_policy(Arc::new(SmallUploads));
    let mut on = (**f.endpoint.settings()).clone();
    on.uploads = true;
    f.endpoint.set_settings(Arc::new(on));
    let over = request(2, "up.bin", "octet", &[("tsize", "101")]);
    assert_eq!(
        f.refused(peer(2, 1), &over),
        (ErrorCode::DiskFull, "file too large".to_string())
    );
    // At the limit it reaches the sink (read-only here: ERROR 2).
    let at = request(2, "up.bin", "octet", &[("tsize", "100")]);
    assert_eq!(f.refused(peer(3, 1), &at).0, ErrorCode::AccessViolation);
}

#[test]
fn refused_options_are_left_out_of_the_oack() {
    let mut f = Fixture::with_policy(Arc::new(DefaultPolicy));
    let mut refusing = (**f.endpoint.settings()).clone();
    refusing.refused_options.blksize = true;
    f.endpoint.set_settings(Arc::new(refusing.clone()));
    let ask = rrq("boot.img", &[("blksize", "1468"), ("tsize", "0")]);
    let id = f.started(peer(2, 1), &ask);
    let oack = f.first_reply(id).expect("an OACK for tsize");
    assert_eq!((oack.blksize, oack.tsize), (None, Some(100_000)));
    // Its DATA are the default 512 bytes.
    f.endpoint
        .handle_datagram(f.now, id, peer(2, 1), &[0, 4, 0, 0], &mut vec![0; 600]);
    let t = f.endpoint.poll_transmit(f.now, id, &mut f.buf).unwrap();
    assert_eq!(t.payload().map(|p| p.len), Some(512));
    // Everything refused: plain RFC 1350, DATA 1 at once.
    refusing.refused_options = ringtftpd::policy::RefusedOptions::ALL;
    f.endpoint.set_settings(Arc::new(refusing));
    let id = f.started(peer(3, 1), &ask);
    assert_eq!(f.first_reply(id), None);
}

/// `-m`'s rules in front of the default policy, with `E` answered by
/// `has` (names that exist).
fn remap_policy(rules: &str, has: &'static [&'static str]) -> Arc<dyn Policy> {
    let probe: Arc<NameProbe> =
        Arc::new(move |name: &[u8], _write| has.iter().any(|h| h.as_bytes() == name));
    Arc::new(RemapPolicy {
        rules: RemapRules::parse(rules).expect("rules parse"),
        max_steps: 64,
        probe: Some(probe),
        inner: Arc::new(DefaultPolicy),
    })
}

#[test]
fn remap_rules_rewrite_the_path_opened_and_the_log_keeps_the_name_asked() {
    let rules = "rg \\\\ /\nri ^PXELINUX\\.CFG/01-.* pxelinux.cfg/default\n";
    let mut f = Fixture::with_policy(remap_policy(rules, &[]));
    let id = f.started(peer(2, 1), &rrq("PXELINUX.CFG\\01-aa-bb", &[]));
    assert_eq!(
        f.content(id),
        f.files.files[&b"pxelinux.cfg/default".to_vec()]
    );
    assert_eq!(f.files.opens, [b"pxelinux.cfg/default".to_vec()]);
    f.endpoint
        .abort(f.now, id, ringtftpd::refusal::Abort::ShuttingDown);
    while f.endpoint.poll_transmit(f.now, id, &mut f.buf).is_some() {}
    // (Escaped for the log line.)
    let done = f.endpoint.poll_event(id).expect("ended");
    assert_eq!(done.filename, r"PXELINUX.CFG\\01-aa-bb");
    assert_eq!(done.served.as_deref(), Some("pxelinux.cfg/default"));
    assert!(
        done.to_string()
            .contains(r#" served="pxelinux.cfg/default""#),
        "{done}"
    );
}

#[test]
fn remap_refusals_and_failures_say_access_denied_and_are_counted_as_remap() {
    let rules = "a \\.key$ keys\\ stay\\ here\n:spin\nrg spin$ spin\n";
    let mut f = Fixture::with_policy(remap_policy(rules, &[]));
    for name in ["host.key", "spin"] {
        let (code, text) = f.refused(peer(2, 1), &rrq(name, &[]));
        assert_eq!(
            (code, text.as_str()),
            (ErrorCode::AccessViolation, "access denied"),
            "{name}"
        );
    }
    assert_eq!(f.endpoint.refusals().get(RefusalKind::Remap), 2);
    assert!(f.files.opens.is_empty(), "nothing was opened");
}

#[test]
fn remap_e_rules_ask_the_probe_and_undo_a_miss() {
    let rules = "rE ^(.*)$ \\1.local\n";
    let mut f = Fixture::with_policy(remap_policy(rules, &["boot.img.local"]));
    f.files.insert("boot.img.local", content(10, 9));
    let hit = f.started(peer(2, 1), &rrq("boot.img", &[]));
    assert_eq!(f.content(hit).len(), 10, "the override the probe found");
    let miss = f.started(peer(3, 1), &rrq("pxelinux.cfg/default", &[]));
    assert_eq!(f.content(miss).len(), 700, "no override: the name as asked");
}

#[test]
fn remap_direction_and_family_letters_see_the_request() {
    // Uploads land per client; downloads are untouched.
    let rules = "rP ^ uploads/\\i/\nr6 ^ v6/\n";
    let policy = remap_policy(rules, &[]);
    let request = ringtftpd::proto::Request {
        filename: b"log.txt",
        mode: ringtftpd::proto::Mode::Octet,
        options: Options::default(),
    };
    let settings = Settings {
        uploads: true,
        ..settings()
    };
    let decide = |peer: SocketAddr, write: bool| -> Vec<u8> {
        let incoming = Incoming {
            now: Instant::now(),
            peer,
            local: LOCAL,
            mtu: None,
            write,
            request: &request,
            mac: None,
            client_sessions: 0,
        };
        match policy.decide(&incoming, &settings) {
            Decision::Serve(grant) => grant.path.into_owned(),
            Decision::Refuse(refusal) => panic!("{refusal:?}"),
        }
    };
    let v6: SocketAddr = "[2001:db8::1]:69".parse().unwrap();
    assert_eq!(decide(peer(2, 1), false), b"log.txt");
    assert_eq!(decide(peer(2, 1), true), b"uploads/127.0.0.2/log.txt");
    assert_eq!(decide(v6, false), b"v6/log.txt");
    assert_eq!(decide(v6, true), b"v6/uploads/2001:db8::1/log.txt");
}

#[test]
fn remap_rules_with_the_mac_escape_ask_for_macs_and_see_them() {
    let policy = remap_policy("r ^default$ 01-\\m\n", &[]);
    assert!(policy.needs_mac());
    assert!(!remap_policy("r ^a b\n", &[]).needs_mac());
    let request = ringtftpd::proto::Request {
        filename: b"default",
        mode: ringtftpd::proto::Mode::Octet,
        options: Options::default(),
    };
    let incoming = Incoming {
        now: Instant::now(),
        peer: peer(2, 1),
        local: LOCAL,
        mtu: None,
        write: false,
        request: &request,
        mac: Some([0x52, 0x54, 0, 1, 2, 3]),
        client_sessions: 0,
    };
    match policy.decide(&incoming, &settings()) {
        Decision::Serve(grant) => assert_eq!(&*grant.path, b"01-52-54-00-01-02-03"),
        Decision::Refuse(refusal) => panic!("{refusal:?}"),
    }
}

//! What a shard may change while running, and the seam where a request is
//! decided. [`Settings`] are the limits, rates and [`Policy`] one shard
//! applies to new requests; the driver swaps them between requests
//! (running transfers keep what they were granted). Sizes fixed at start
//! (slab capacity, receive buffers) are not settings: see
//! [`crate::endpoint::EndpointConfig`]. Sans-IO, like the endpoint.
#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::Rollover;
use crate::proto::{Options, Request};
use crate::refusal::Refusal;
use crate::remap::{RemapContext, RemapRules, Remapped};
use crate::session::Limits;

/// A request that passed admission (rate, duplicates, capacity), as the
/// endpoint parsed it, for a [`Policy`] to decide on.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub now: Instant,
    pub peer: SocketAddr,
    /// The address the request was sent to.
    pub local: IpAddr,
    /// The ingress interface's MTU, if known.
    pub mtu: Option<u32>,
    /// A write request (WRQ).
    pub write: bool,
    pub request: &'a Request<'a>,
    /// The client's hardware address, from the neighbour table, when it is
    /// directly attached and [`Settings::lookup_mac`] asked for it.
    pub mac: Option<[u8; 6]>,
    /// The client address's live sessions on this shard (already below
    /// [`Settings::max_sessions_per_client`]), for a policy's own cap.
    pub client_sessions: usize,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    Serve(Grant<'a>),
    Refuse(Refusal),
}

impl Decision<'_> {
    /// The same decision, owning its path.
    pub fn into_owned(self) -> Decision<'static> {
        match self {
            Decision::Serve(grant) => Decision::Serve(Grant {
                path: Cow::Owned(grant.path.into_owned()),
                ..grant
            }),
            Decision::Refuse(refusal) => Decision::Refuse(refusal),
        }
    }
}

/// A request to serve, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant<'a> {
    /// The name to open below the root: the one asked for, or a rewrite
    /// of it. The open cache is keyed on it.
    pub path: Cow<'a, [u8]>,
    /// Limits to negotiate options and run the transfer under.
    pub limits: Limits,
    /// Largest upload in bytes (WRQ only); an upload that sends more is
    /// ended with ERROR 3.
    pub max_upload: Option<u64>,
    /// Options not negotiated for this request (as if the client had not
    /// asked).
    pub refused: RefusedOptions,
    /// What block numbers go on from past 65535.
    pub rollover: Rollover,
    /// Which of the directories served the path is opened under (0, the
    /// first, unless there are several: [`crate::paths::PathRules`]).
    pub root: usize,
}

/// RFC 2347 options the server will not negotiate (tftpd-hpa's
/// `-r/--refuse OPTION` and `--refuse-all`): left out of the OACK, the
/// transfer runs with that option's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusedOptions {
    pub blksize: bool,
    pub blksize2: bool,
    pub cookie: bool,
    pub rollover: bool,
    pub tsize: bool,
    pub timeout: bool,
    pub utimeout: bool,
    pub windowsize: bool,
}

impl RefusedOptions {
    /// Every option.
    pub const ALL: RefusedOptions = RefusedOptions {
        blksize: true,
        blksize2: true,
        cookie: true,
        rollover: true,
        tsize: true,
        timeout: true,
        utimeout: true,
        windowsize: true,
    };

    /// Refuses option `name` as tftpd-hpa 7.x spells it (any case); false
    /// if it names none. Each is refused alone, as in tftpd-hpa: refusing
    /// blksize leaves blksize2, refusing timeout leaves utimeout.
    pub fn add(&mut self, name: &str) -> bool {
        match name.to_ascii_lowercase().as_str() {
            "blksize" => self.blksize = true,
            "blksize2" => self.blksize2 = true,
            "cookie" => self.cookie = true,
            "rollover" => self.rollover = true,
            "tsize" => self.tsize = true,
            "timeout" => self.timeout = true,
            "utimeout" => self.utimeout = true,
            "windowsize" => self.windowsize = true,
            _ => return false,
        }
        true
    }

    /// What the client asked, less what is refused.
    pub fn strip(&self, asked: &Options) -> Options {
        Options {
            blksize: asked.blksize.filter(|_| !self.blksize),
            blksize2: asked.blksize2.filter(|_| !self.blksize2),
            cookie: asked.cookie.filter(|_| !self.cookie),
            rollover: asked.rollover.filter(|_| !self.rollover),
            tsize: asked.tsize.filter(|_| !self.tsize),
            timeout: asked.timeout.filter(|_| !self.timeout),
            utimeout: asked.utimeout.filter(|_| !self.utimeout),
            windowsize: asked.windowsize.filter(|_| !self.windowsize),
            case: asked.case,
        }
    }
}

/// Decides each admitted request before any file is opened. Remap rules
/// and per-client rules are policies; [`DefaultPolicy`] is what the
/// command line alone asks for.
pub trait Policy: Debug + Send + Sync {
    fn decide<'a>(&self, incoming: &Incoming<'a>, settings: &Settings) -> Decision<'a>;

    /// Whether it reads [`Incoming::mac`] (the driver then looks it up).
    fn needs_mac(&self) -> bool {
        false
    }
}

/// Serves the name as asked, under the settings' limits; refuses a WRQ
/// while uploads are off. (A WRQ whose announced size is over the grant's
/// `max_upload` is refused by the endpoint, whatever policy granted it.)
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPolicy;

impl Policy for DefaultPolicy {
    fn decide<'a>(&self, incoming: &Incoming<'a>, settings: &Settings) -> Decision<'a> {
        let grant = Grant {
            path: Cow::Borrowed(incoming.request.filename),
            limits: settings.limits.clone(),
            max_upload: settings.max_upload,
            refused: settings.refused_options,
            rollover: Rollover::Zero,
            root: 0,
        };
        if incoming.write && !settings.uploads {
            return Decision::Refuse(Refusal::UploadsDisabled);
        }
        Decision::Serve(grant)
    }
}

/// `E`'s question for [`RemapPolicy`]: could this name be served as it
/// stands (for a WRQ: written)? The driver answers from the file root.
pub type NameProbe = dyn Fn(&[u8], bool) -> bool + Send + Sync;

/// tftpd-hpa's `-m/--map-file`: the remap rules rewrite or refuse the
/// requested name first, then `inner` decides on the rewritten request.
pub struct RemapPolicy {
    pub rules: RemapRules,
    /// `--map-steps`.
    pub max_steps: usize,
    /// Without one, `E` rules never see a file (as `--map-test`).
    pub probe: Option<Arc<NameProbe>>,
    pub inner: Arc<dyn Policy>,
}

impl Debug for RemapPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemapPolicy")
            .field("rules", &self.rules.len())
            .field("max_steps", &self.max_steps)
            .field("probe", &self.probe.is_some())
            .field("inner", &self.inner)
            .finish()
    }
}

impl Policy for RemapPolicy {
    fn needs_mac(&self) -> bool {
        self.rules.uses_mac() || self.inner.needs_mac()
    }

    fn decide<'a>(&self, incoming: &Incoming<'a>, settings: &Settings) -> Decision<'a> {
        let write = incoming.write;
        let probe = self
            .probe
            .as_deref()
            .map(|p| move |name: &[u8]| p(name, write));
        let mut context = RemapContext::new(incoming.peer.ip(), write).with_mac(incoming.mac);
        if let Some(probe) = &probe {
            context = context.with_probe(probe);
        }
        let name = match self
            .rules
            .apply(incoming.request.filename, &context, self.max_steps)
        {
            Remapped::Rewritten(name) => name,
            // As tftpd-hpa 7.x, the client is told "access denied" only; an
            // `a` rule's message is for --map-test.
            Remapped::Refused(_) => return Decision::Refuse(Refusal::RemapDenied),
            Remapped::Failed(_) => return Decision::Refuse(Refusal::RemapFailed),
        };
        if name == incoming.request.filename {
            return self.inner.decide(incoming, settings);
        }
        decide_renamed(self.inner.as_ref(), incoming, &name, settings)
    }
}

/// What `policy` decides on `incoming` as if it had asked for `name` (a
/// rewrite of its own), the grant owning its path.
pub fn decide_renamed<'a>(
    policy: &dyn Policy,
    incoming: &Incoming<'_>,
    name: &[u8],
    settings: &Settings,
) -> Decision<'a> {
    let request = Request {
        filename: name,
        ..*incoming.request
    };
    let renamed = Incoming {
        request: &request,
        ..*incoming
    };
    policy.decide(&renamed, settings).into_owned()
}

/// `--busy-patience-ms`: iPXE, the least patient PXE client, sends its
/// request at 0, 0.25, 0.75, 1.75, 3.75 and 7.75 s and gives up at 15.75 s;
/// a wait of 7 s answers its last retransmission (docs/robustness.md).
pub const DEFAULT_BUSY_PATIENCE_MS: u64 = 7_000;

/// Per-shard limits, rates and policy for new requests.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    /// Token bucket for ERROR replies to strangers and bad requests.
    pub error_replies_per_sec: u32,
    pub error_reply_burst: u32,
    /// How long the result of opening a path (the file, or the refusal)
    /// is reused for later requests of that path; zero opens every time.
    pub open_cache_ttl: Duration,
    /// Most concurrent sessions of one client address on this shard, so
    /// one address cannot take every slot.
    pub max_sessions_per_client: usize,
    /// Token bucket per client address for datagrams at the listener;
    /// beyond it requests are dropped unanswered (the client retries).
    pub requests_per_sec_per_client: u32,
    pub request_burst_per_client: u32,
    /// Token bucket for ERROR replies to well-formed requests (missing
    /// file, denied, busy, uploads): high enough for a boot storm's probes
    /// of missing per-MAC configs, bounded all the same.
    pub refusal_replies_per_sec: u32,
    /// How long a request refused for lack of capacity is met with
    /// silence (its client retransmits) before it is answered ERROR 0
    /// busy; zero answers at once.
    pub busy_patience: Duration,
    /// Largest windowsize for a client address with no finished transfer
    /// in the path cache (0: no separate cap). Slow start by transfers:
    /// RFC 7440 receivers acknowledge only full windows, so a window cannot
    /// grow inside a transfer without costing the client's timeout.
    pub first_contact_windowsize: u16,
    /// Write requests are taken (else refused with ERROR 2).
    pub uploads: bool,
    /// Largest upload in bytes (`--max-upload`).
    pub max_upload: Option<u64>,
    /// `-r/--refuse`, `--refuse-all`.
    pub refused_options: RefusedOptions,
    /// The policy matches on clients' MACs: the driver looks each
    /// request's up in the neighbour table (`crate::neigh`).
    pub lookup_mac: bool,
    pub policy: Arc<dyn Policy>,
}

impl Default for Settings {
    /// The command line's defaults for a one-shard server.
    fn default() -> Self {
        Settings {
            limits: Limits::default(),
            error_replies_per_sec: 100,
            error_reply_burst: 100,
            open_cache_ttl: Duration::from_secs(1),
            max_sessions_per_client: 256,
            requests_per_sec_per_client: 1000,
            request_burst_per_client: 4000,
            refusal_replies_per_sec: 20_000,
            busy_patience: Duration::from_millis(DEFAULT_BUSY_PATIENCE_MS),
            first_contact_windowsize: 16,
            uploads: false,
            max_upload: None,
            refused_options: RefusedOptions::default(),
            lookup_mac: false,
            policy: Arc::new(DefaultPolicy),
        }
    }
}

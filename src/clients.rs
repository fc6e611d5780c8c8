//! Per-client rules (`--policy-file`), pure: a TOML file parses once into
//! [`ClientRules`]; [`ClientPolicy`] applies them to each request as the
//! innermost [`Policy`]. No I/O here: the client's MAC comes in
//! [`Incoming::mac`], looked up by the driver (`crate::neigh`) only while
//! [`ClientRules::needs_mac`].
//!
//! # Matching
//! A `[[rule]]` matches a request when every match field it has matches:
//! `cidr` (one or a list; the client's address is in any of them; an
//! IPv4-mapped IPv6 client is its IPv4 address), `mac` (one or a list,
//! exact or a prefix such as `"52:54:00:*"`; a client whose MAC is not
//! known matches no `mac`), `name` (one glob or a list) and `name_regex`
//! on the requested name, leading `/` removed. A rule with no match field
//! matches every request. The name is the one the policy is given: behind
//! the remap and path policies, the rewritten, normalized name.
//!
//! # Merging
//! Every matching rule applies, in file order, field by field: a later
//! rule's field replaces an earlier one's, fields it does not set are
//! kept. So "all clients get X" comes first and "this model also gets Y"
//! after it. The command line bounds the result: caps (`max_blksize`,
//! `max_windowsize`, `max_sessions`) only lower what it allows, `refuse`
//! adds to `-r`, and `uploads = true` cannot take uploads the command line
//! does not.
//!
//! # Effects
//! `deny` refuses (ERROR 2 with its message); `uploads` allows or refuses
//! write requests; `max_sessions` caps the client's concurrent transfers
//! (across threads, as `--max-per-client`); `max_blksize`,
//! `max_windowsize`, `refuse` shape the negotiation; `prefix` is put
//! before the name (`{ip}` and `{mac}` expand to the client's address and
//! MAC; with `{mac}` and no MAC known, no prefix is added, as dnsmasq's
//! `--tftp-unique-root=mac` falls back to the shared root); `rollover`
//! (0 or 1) is the block number that follows 65535, for reads and writes.
#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use regex::bytes::Regex;
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use crate::policy::{Decision, Grant, Incoming, Policy, RefusedOptions, Settings};
use crate::proto::{self, Rollover};
use crate::refusal::Refusal;
use crate::session::MAX_WINDOWSIZE;

/// Longest policy file, in bytes.
pub const MAX_FILE_LEN: u64 = 1 << 20;
/// Most rules in one file (each request tries them all).
pub const MAX_RULES: usize = 1024;
/// Longest `prefix`, before expansion.
pub const MAX_PREFIX_LEN: usize = 255;
/// Longest `deny` message (it must fit an ERROR packet with room to spare).
pub const MAX_MESSAGE_LEN: usize = 200;
/// Longest pattern (`name`, `name_regex`).
pub const MAX_PATTERN_LEN: usize = 1024;
/// Most entries in one match list.
pub const MAX_LIST_LEN: usize = 256;
/// Largest compiled `name`/`name_regex` program, in bytes.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Largest `max_sessions`, as `--max-per-client`'s bound.
const MAX_SESSIONS: i64 = 1 << 20;
/// `deny = true` says this.
const DEFAULT_DENY_MESSAGE: &str = "access denied by policy";

/// A policy file that does not parse, with where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFileError {
    /// 1-based, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The 1-based `[[rule]]` the error is in, when it is in one.
    pub rule: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut at = Vec::new();
        if let Some(rule) = self.rule {
            at.push(format!("rule {rule}"));
        }
        match (self.line, self.column) {
            (Some(l), Some(c)) => at.push(format!("line {l}, column {c}")),
            (Some(l), None) => at.push(format!("line {l}")),
            _ => {}
        }
        if !at.is_empty() {
            write!(f, "{}: ", at.join(", "))?;
        }
        // One line: toml's messages may hold several.
        let message = self.message.trim().replace('\n', "; ");
        f.write_str(&message)
    }
}

impl std::error::Error for PolicyFileError {}

/// A string or a list of them, each made a `T`. (Not an untagged enum:
/// that would lose the entry's own error message.)
fn one_or_many<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<String, Error = String>,
{
    struct Strings;
    impl<'de> Visitor<'de> for Strings {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or a list of strings")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_string()])
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                if out.len() >= MAX_LIST_LEN {
                    return Err(de::Error::custom(format!(
                        "more than {MAX_LIST_LEN} entries"
                    )));
                }
                out.push(s);
            }
            Ok(out)
        }
    }
    let strings = d.deserialize_any(Strings)?;
    strings
        .into_iter()
        .map(|s| T::try_from(s).map_err(de::Error::custom))
        .collect::<Result<Vec<T>, D::Error>>()
        .map(Some)
}

/// `deny = "message"`, `deny = true` or `deny = false`.
#[derive(Debug)]
enum DenyField {
    Flag(bool),
    Message(String),
}

impl<'de> Deserialize<'de> for DenyField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DenyField;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("deny: a message, true or false")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<DenyField, E> {
                Ok(DenyField::Flag(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<DenyField, E> {
                if v.len() > MAX_MESSAGE_LEN || v.contains('\0') {
                    return Err(E::custom(format!(
                        "deny: the message must be at most {MAX_MESSAGE_LEN} bytes, no NUL"
                    )));
                }
                Ok(DenyField::Message(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    rule: Vec<toml::Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default, deserialize_with = "one_or_many")]
    cidr: Option<Vec<Cidr>>,
    #[serde(default, deserialize_with = "one_or_many")]
    mac: Option<Vec<MacPattern>>,
    #[serde(default, deserialize_with = "one_or_many")]
    name: Option<Vec<Glob>>,
    name_regex: Option<NameRegex>,
    prefix: Option<Prefix>,
    max_blksize: Option<Blksize>,
    max_windowsize: Option<Windowsize>,
    refuse: Option<Vec<OptionName>>,
    rollover: Option<RolloverField>,
    max_sessions: Option<SessionCap>,
    uploads: Option<bool>,
    deny: Option<DenyField>,
}

/// An address block, v4 or v6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    network: IpAddr,
    len: u8,
}

impl Cidr {
    /// Whether `ip` (canonical: IPv4-mapped IPv6 is IPv4) is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let bad = || format!("cidr: '{text}' is not an address or ADDRESS/LENGTH");
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text.as_str(), None),
        };
        let network: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        // A mapped address in the file means its IPv4 one, as for clients.
        let (network, max) = match network.to_canonical() {
            IpAddr::V4(v4) if network.is_ipv6() => {
                let len = len.map(|l| l.trim().parse::<u8>().map_err(|_| bad()));
                let len = len.transpose()?.unwrap_or(128);
                if !(96..=128).contains(&len) {
                    return Err(format!(
                        "cidr: '{text}': a mapped IPv4 block needs a length of 96..=128"
                    ));
                }
                return Cidr::checked(IpAddr::V4(v4), len - 96, &text);
            }
            ip @ IpAddr::V4(_) => (ip, 32),
            ip => (ip, 128),
        };
        let len = match len {
            Some(l) => l.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if len > max {
            return Err(format!("cidr: '{text}': the length is at most {max}"));
        }
        Cidr::checked(network, len, &text)
    }
}

impl Cidr {
    /// Refuses host bits under the mask: `10.0.0.5/24` is likely a typo.
    fn checked(network: IpAddr, len: u8, text: &str) -> Result<Cidr, String> {
        let masked = match network {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        };
        if masked != network {
            return Err(format!(
                "cidr: '{text}' has bits set past /{len}: did you mean {masked}/{len}?"
            ));
        }
        Ok(Cidr { network, len })
    }
}

/// A MAC, or the first octets of one (an OUI) followed by `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct MacPattern {
    octets: [u8; 6],
    /// How many leading octets must match (6: exact).
    len: u8,
}

impl MacPattern {
    pub fn matches(&self, mac: &[u8; 6]) -> bool {
        mac[..usize::from(self.len)] == self.octets[..usize::from(self.len)]
    }
}

impl TryFrom<String> for MacPattern {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let bad = || {
            format!(
                "mac: '{text}' is not a MAC (aa:bb:cc:dd:ee:ff, or a prefix such as aa:bb:cc:*)"
            )
        };
        let t = text.trim();
        let (body, wild) = match t.strip_suffix('*') {
            Some(b) => (b.trim_end_matches([':', '-']), true),
            None => (t, false),
        };
        let mut octets = [0u8; 6];
        let mut len = 0usize;
        if !body.is_empty() {
            for part in body.split([':', '-']) {
                let slot = octets.get_mut(len).ok_or_else(bad)?;
                if part.is_empty() || part.len() > 2 {
                    return Err(bad());
                }
                *slot = u8::from_str_radix(part, 16).map_err(|_| bad())?;
                len += 1;
            }
        }
        if (!wild && len != 6) || (wild && len == 6) {
            return Err(bad());
        }
        Ok(MacPattern {
            octets,
            len: len as u8,
        })
    }
}

/// A shell-like pattern on the whole name: `*` any run of bytes but `/`,
/// `**` any run, `?` one byte but `/`; every other byte is itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
struct Glob(Regex);

impl TryFrom<String> for Glob {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if text.len() > MAX_PATTERN_LEN {
            return Err(format!("name: longer than {MAX_PATTERN_LEN} bytes"));
        }
        let glob = text.trim_start_matches('/');
        let mut re = String::from("(?s-u)^");
        let mut rest = glob;
        while let Some(c) = rest.chars().next() {
            if let Some(r) = rest.strip_prefix("**") {
                re.push_str(".*");
                rest = r;
                continue;
            }
            match c {
                '*' => re.push_str("[^/]*"),
                '?' => re.push_str("[^/]"),
                _ => {
                    // Byte-wise, so a non-ASCII name matches as its UTF-8.
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        re.push_str(&format!("\\x{b:02x}"));
                    }
                }
            }
            rest = &rest[c.len_utf8()..];
        }
        re.push('$');
        compile(&re)
            .map(Glob)
            .map_err(|e| format!("name: '{text}': {e}"))
    }
}

/// A regular expression (Rust `regex` syntax) searched in the name.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
struct NameRegex(Regex);

impl TryFrom<String> for NameRegex {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if text.len() > MAX_PATTERN_LEN {
            return Err(format!("name_regex: longer than {MAX_PATTERN_LEN} bytes"));
        }
        compile(&text)
            .map(NameRegex)
            .map_err(|e| format!("name_regex: '{text}': {e}"))
    }
}

fn compile(re: &str) -> Result<Regex, String> {
    regex::bytes::RegexBuilder::new(re)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        // regex's message is a drawing over several lines: one line here.
        .map_err(|e| {
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
}

/// One piece of a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(Box<[u8]>),
    Ip,
    Mac,
}

/// `prefix`: text with `{ip}` and `{mac}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
struct Prefix {
    pieces: Vec<Piece>,
    uses_mac: bool,
}

impl TryFrom<String> for Prefix {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if text.len() > MAX_PREFIX_LEN {
            return Err(format!("prefix: longer than {MAX_PREFIX_LEN} bytes"));
        }
        if text.contains('\0') {
            return Err("prefix: a NUL byte".to_string());
        }
        let mut pieces = Vec::new();
        let mut rest = text.trim_start_matches('/');
        while !rest.is_empty() {
            let (piece, len) = if rest.starts_with("{ip}") {
                (Piece::Ip, 4)
            } else if rest.starts_with("{mac}") {
                (Piece::Mac, 5)
            } else if rest.starts_with(['{', '}']) {
                return Err(format!(
                    "prefix: '{text}': only {{ip}} and {{mac}} may stand in braces"
                ));
            } else {
                let end = rest.find(['{', '}']).unwrap_or(rest.len());
                (Piece::Text(rest.as_bytes()[..end].into()), end)
            };
            pieces.push(piece);
            rest = &rest[len..];
        }
        if text.split('/').any(|c| c == "..") {
            return Err(format!("prefix: '{text}': '..' would leave the prefix"));
        }
        let uses_mac = pieces.contains(&Piece::Mac);
        Ok(Prefix { pieces, uses_mac })
    }
}

impl Prefix {
    /// The prefix for this client, or None when it needs a MAC not known.
    fn expand(&self, ip: IpAddr, mac: Option<[u8; 6]>) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(64);
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.extend_from_slice(t),
                Piece::Ip => out.extend_from_slice(ip.to_canonical().to_string().as_bytes()),
                Piece::Mac => out.extend_from_slice(mac_dashed(&mac?).as_bytes()),
            }
        }
        Some(out)
    }
}

/// dnsmasq's form of a MAC in `--tftp-unique-root=mac`: `01-02-03-04-aa-bb`.
pub fn mac_dashed(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = *mac;
    format!("{a:02x}-{b:02x}-{c:02x}-{d:02x}-{e:02x}-{f:02x}")
}

macro_rules! bounded_int {
    ($name:ident, $ty:ty, $field:literal, $lo:expr, $hi:expr) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
        #[serde(try_from = "i64")]
        struct $name($ty);

        impl TryFrom<i64> for $name {
            type Error = String;

            fn try_from(n: i64) -> Result<Self, String> {
                let (lo, hi) = (i64::from($lo), i64::from($hi));
                if !(lo..=hi).contains(&n) {
                    return Err(format!("{}: {n} is not in {lo}..={hi}", $field));
                }
                <$ty>::try_from(n)
                    .map($name)
                    .map_err(|_| format!("{}: {n} is out of range", $field))
            }
        }
    };
}

bounded_int!(
    Blksize,
    u16,
    "max_blksize",
    proto::MIN_BLKSIZE,
    proto::MAX_BLKSIZE
);
bounded_int!(Windowsize, u16, "max_windowsize", 1u16, MAX_WINDOWSIZE);
bounded_int!(SessionCap, u32, "max_sessions", 1u32, MAX_SESSIONS);

/// `rollover`: what block numbers go on from past 65535, 0 or 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "i64")]
struct RolloverField(Rollover);

impl TryFrom<i64> for RolloverField {
    type Error = String;

    fn try_from(n: i64) -> Result<Self, String> {
        match n {
            0 => Ok(RolloverField(Rollover::Zero)),
            1 => Ok(RolloverField(Rollover::One)),
            _ => Err(format!("rollover: {n} is not 0 or 1")),
        }
    }
}

/// An option name for `refuse`, as `-r` takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
struct OptionName(String);

impl TryFrom<String> for OptionName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        if RefusedOptions::default().add(&name) {
            Ok(OptionName(name))
        } else {
            Err(format!(
                "refuse: '{name}' is not an option: blksize, tsize, timeout, windowsize, \
                 blksize2, utimeout, rollover or cookie"
            ))
        }
    }
}

/// What matching rules do to a request; `None`: this rule leaves it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Effects {
    prefix: Option<Prefix>,
    max_blksize: Option<u16>,
    max_windowsize: Option<u16>,
    refuse: Option<RefusedOptions>,
    rollover: Option<Rollover>,
    max_sessions: Option<u32>,
    uploads: Option<bool>,
    /// `Some(None)`: `deny = false`, lifting an earlier rule's deny.
    deny: Option<Option<Arc<str>>>,
}

/// What a rule matches; empty lists match everything.
#[derive(Debug, Clone, Default)]
struct Matcher {
    cidrs: Vec<Cidr>,
    macs: Vec<MacPattern>,
    names: Vec<Regex>,
    name_regex: Option<Regex>,
}

impl Matcher {
    fn matches(&self, ip: IpAddr, mac: Option<&[u8; 6]>, name: &[u8]) -> bool {
        (self.cidrs.is_empty() || self.cidrs.iter().any(|c| c.contains(ip)))
            && (self.macs.is_empty() || mac.is_some_and(|m| self.macs.iter().any(|p| p.matches(m))))
            && (self.names.is_empty() || self.names.iter().any(|g| g.is_match(name)))
            && self.name_regex.as_ref().is_none_or(|r| r.is_match(name))
    }
}

#[derive(Debug, Clone)]
struct Rule {
    /// 1-based line of its `[[rule]]` header.
    line: usize,
    matcher: Matcher,
    effects: Effects,
}

/// A parsed policy file.
#[derive(Debug, Clone, Default)]
pub struct ClientRules {
    rules: Vec<Rule>,
    needs_mac: bool,
}

/// The merged effects of the rules that matched one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matched<'r> {
    /// How many rules matched, and the header line of the last one (no
    /// list: a request allocates nothing to be matched).
    pub matched: usize,
    pub last_line: Option<usize>,
    prefix: Option<&'r Prefix>,
    pub max_blksize: Option<u16>,
    pub max_windowsize: Option<u16>,
    pub refuse: Option<RefusedOptions>,
    pub rollover: Option<Rollover>,
    pub max_sessions: Option<u32>,
    pub uploads: Option<bool>,
    pub deny: Option<&'r Arc<str>>,
}

impl Matched<'_> {
    /// The name to open: the prefix (expanded for this client) before the
    /// name, leading `/` removed; None if no prefix applies.
    pub fn prefixed(&self, ip: IpAddr, mac: Option<[u8; 6]>, name: &[u8]) -> Option<Vec<u8>> {
        let mut path = self.prefix?.expand(ip, mac)?;
        path.extend_from_slice(strip_slashes(name));
        Some(path)
    }
}

fn strip_slashes(name: &[u8]) -> &[u8] {
    let start = name.iter().position(|&b| b != b'/').unwrap_or(name.len());
    &name[start..]
}

/// Line and column (1-based) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    (line, offset - start + 1)
}

/// The 1-based `[[rule]]` whose table holds byte `offset`, if any: the
/// number of `[[rule]]` headers before it.
fn rule_at(text: &str, offset: usize) -> Option<usize> {
    let offset = offset.min(text.len());
    let n = text[..offset]
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.strip_prefix("[[")
                .and_then(|r| r.split_once("]]"))
                .is_some_and(|(name, _)| name.trim() == "rule")
        })
        .count();
    (n > 0).then_some(n)
}

impl ClientRules {
    /// Parses a policy file's text.
    pub fn parse(text: &str) -> Result<ClientRules, PolicyFileError> {
        let doc: FileDoc = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| s.start);
            let (line, column) = at.map(|o| line_col(text, o)).unzip();
            PolicyFileError {
                line,
                column,
                rule: at.and_then(|o| rule_at(text, o)),
                message: e.message().to_string(),
            }
        })?;
        if doc.rule.len() > MAX_RULES {
            let (line, column) = line_col(text, doc.rule[MAX_RULES].span().start);
            return Err(PolicyFileError {
                line: Some(line),
                column: Some(column),
                rule: Some(MAX_RULES + 1),
                message: format!("more than {MAX_RULES} rules"),
            });
        }
        let mut rules = Vec::with_capacity(doc.rule.len());
        for (index, spanned) in doc.rule.into_iter().enumerate() {
            let span = spanned.span();
            let (line, column) = line_col(text, span.start);
            let fail = |message: String| PolicyFileError {
                line: Some(line),
                column: Some(column),
                rule: Some(index + 1),
                message,
            };
            let raw = spanned.into_inner();
            let cidrs = raw.cidr.unwrap_or_default();
            let macs = raw.mac.unwrap_or_default();
            let names: Vec<Regex> = raw
                .name
                .unwrap_or_default()
                .into_iter()
                .map(|g| g.0)
                .collect();
            let refuse = match raw.refuse {
                Some(names) => {
                    if names.len() > MAX_LIST_LEN {
                        return Err(fail(format!("refuse: more than {MAX_LIST_LEN} entries")));
                    }
                    let mut refused = RefusedOptions::default();
                    for name in &names {
                        refused.add(&name.0);
                    }
                    Some(refused)
                }
                None => None,
            };
            let deny = match raw.deny {
                None => None,
                Some(DenyField::Flag(false)) => Some(None),
                Some(DenyField::Flag(true)) => Some(Some(Arc::from(DEFAULT_DENY_MESSAGE))),
                // Shared with each refusal that sends it, freed with the
                // rules (a SIGHUP re-reads the file).
                Some(DenyField::Message(m)) => Some(Some(Arc::from(m))),
            };
            let effects = Effects {
                prefix: raw.prefix,
                max_blksize: raw.max_blksize.map(|b| b.0),
                max_windowsize: raw.max_windowsize.map(|w| w.0),
                refuse,
                rollover: raw.rollover.map(|r| r.0),
                max_sessions: raw.max_sessions.map(|s| s.0),
                uploads: raw.uploads,
                deny,
            };
            rules.push(Rule {
                line,
                matcher: Matcher {
                    cidrs,
                    macs,
                    names,
                    name_regex: raw.name_regex.map(|r| r.0),
                },
                effects,
            });
        }
        let needs_mac = rules.iter().any(|r| {
            !r.matcher.macs.is_empty() || r.effects.prefix.as_ref().is_some_and(|p| p.uses_mac)
        });
        Ok(ClientRules { rules, needs_mac })
    }

    /// Reads and parses `path`; the error names the file.
    pub fn load(path: &std::path::Path) -> Result<ClientRules, String> {
        use std::io::Read;
        let fail = |e: &dyn fmt::Display| format!("policy file {}: {e}", path.display());
        let file = std::fs::File::open(path).map_err(|e| fail(&e))?;
        let mut text = String::new();
        // One byte past the bound tells a file that is too long.
        file.take(MAX_FILE_LEN + 1)
            .read_to_string(&mut text)
            .map_err(|e| fail(&e))?;
        if text.len() as u64 > MAX_FILE_LEN {
            return Err(fail(&format!("longer than {MAX_FILE_LEN} bytes")));
        }
        ClientRules::parse(&text).map_err(|e| format!("policy file {}: {e}", path.display()))
    }

    /// Rules in the file.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Some rule matches on, or expands, the client's MAC: the driver
    /// should look it up.
    pub fn needs_mac(&self) -> bool {
        self.needs_mac
    }

    /// The merged effects of every rule that matches (see the module doc).
    pub fn matching(&self, ip: IpAddr, mac: Option<[u8; 6]>, name: &[u8]) -> Matched<'_> {
        let ip = ip.to_canonical();
        let name = strip_slashes(name);
        let mut m = Matched::default();
        for rule in &self.rules {
            if !rule.matcher.matches(ip, mac.as_ref(), name) {
                continue;
            }
            let e = &rule.effects;
            m.matched += 1;
            m.last_line = Some(rule.line);
            if let Some(p) = &e.prefix {
                m.prefix = Some(p);
            }
            m.max_blksize = e.max_blksize.or(m.max_blksize);
            m.max_windowsize = e.max_windowsize.or(m.max_windowsize);
            m.refuse = e.refuse.or(m.refuse);
            m.rollover = e.rollover.or(m.rollover);
            m.max_sessions = e.max_sessions.or(m.max_sessions);
            m.uploads = e.uploads.or(m.uploads);
            if let Some(deny) = &e.deny {
                m.deny = deny.as_ref();
            }
        }
        m
    }
}

/// The command line's policy ([`crate::policy::DefaultPolicy`]) with a
/// policy file's rules applied on top.
#[derive(Debug, Clone)]
pub struct ClientPolicy {
    rules: std::sync::Arc<ClientRules>,
    /// Threads the server runs: a rule's `max_sessions` is shared among
    /// them, as `--max-per-client` is.
    shards: u32,
}

impl ClientPolicy {
    pub fn new(rules: std::sync::Arc<ClientRules>, shards: usize) -> Self {
        ClientPolicy {
            rules,
            shards: u32::try_from(shards.max(1)).unwrap_or(u32::MAX),
        }
    }
}

impl Policy for ClientPolicy {
    fn needs_mac(&self) -> bool {
        self.rules.needs_mac()
    }

    fn decide<'a>(&self, incoming: &Incoming<'a>, settings: &Settings) -> Decision<'a> {
        let ip = incoming.peer.ip();
        let name = incoming.request.filename;
        let m = self.rules.matching(ip, incoming.mac, name);
        if let Some(message) = m.deny {
            return Decision::Refuse(Refusal::DeniedBy(message.clone()));
        }
        // `uploads = true` cannot take what the command line refuses.
        if incoming.write && !(settings.uploads && m.uploads.unwrap_or(true)) {
            return Decision::Refuse(Refusal::UploadsDisabled);
        }
        // The endpoint already held the client to the command line's cap.
        if let Some(cap) = m.max_sessions {
            let per_shard = cap.div_ceil(self.shards) as usize;
            if incoming.client_sessions >= per_shard {
                return Decision::Refuse(Refusal::PerClientCap);
            }
        }
        let mut limits = settings.limits.clone();
        if let Some(b) = m.max_blksize {
            limits.max_blksize = limits.max_blksize.min(b);
        }
        if let Some(w) = m.max_windowsize {
            limits.max_windowsize = limits.max_windowsize.min(w);
        }
        let mut refused = settings.refused_options;
        if let Some(r) = m.refuse {
            refused.blksize |= r.blksize;
            refused.tsize |= r.tsize;
            refused.timeout |= r.timeout;
            refused.windowsize |= r.windowsize;
        }
        let path = match m.prefixed(ip, incoming.mac, name) {
            Some(p) => Cow::Owned(p),
            None => Cow::Borrowed(name),
        };
        Decision::Serve(Grant {
            path,
            limits,
            max_upload: settings.max_upload,
            refused,
            rollover: m.rollover.unwrap_or_default(),
            root: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rules(text: &str) -> ClientRules {
        ClientRules::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[track_caller]
    fn error(text: &str) -> PolicyFileError {
        match ClientRules::parse(text) {
            Ok(r) => panic!("accepted: {r:?}"),
            Err(e) => e,
        }
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn parse_errors_name_the_rule_the_line_and_the_field() {
        let text = "[[rule]]\nmax_blksize = 1024\n\n[[rule]]\ncidr = \"10.0.0/8\"\n";
        let e = error(text);
        assert_eq!(
            (e.rule, e.line, e.column),
            (Some(2), Some(5), Some(8)),
            "{e}"
        );
        assert!(e.message.contains("cidr") && e.message.contains("10.0.0/8"));
        assert_eq!(
            e.to_string(),
            format!("rule 2, line 5, column 8: {}", e.message.trim())
        );
        let e = error("[[rule]]\nmax_blksize = 70000\n");
        assert_eq!((e.rule, e.line), (Some(1), Some(2)));
        assert!(e.message.contains("max_blksize: 70000"), "{e}");
        let e = error("[[rule]]\nblksize = 1024\n");
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("unknown field `blksize`"), "{e}");
        let e = error("[[rule]]\nrefuse = [\"tsize\", \"bogus\"]\n");
        assert!(e.message.contains("refuse: 'bogus'"), "{e}");
        let e = error("[[rule]]\nrollover = 2\n");
        assert!(e.message.contains("rollover: 2 is not 0 or 1"), "{e}");
        assert!(
            error("[[rule]]\nrollover = -1\n")
                .message
                .contains("not 0 or 1")
        );
        let r = rules("[[rule]]\nrollover = 1\n[[rule]]\ncidr = \"10.0.0.0/8\"\nrollover = 0\n");
        assert_eq!(
            r.matching(ip("192.0.2.1"), None, b"f").rollover,
            Some(Rollover::One)
        );
        assert_eq!(
            r.matching(ip("10.0.0.1"), None, b"f").rollover,
            Some(Rollover::Zero)
        );
        let e = error("[[rule]]\nprefix = \"{hostname}/\"\n");
        assert!(e.message.contains("{ip} and {mac}"), "{e}");
        assert!(
            error("[[rule]]\nprefix = \"../x/\"\n")
                .message
                .contains("'..'")
        );
        assert!(
            error("[[rule]]\nmac = \"52:54:00\"\n")
                .message
                .contains("mac:")
        );
        assert!(
            error("[[rule]]\nname_regex = \"(\"\n")
                .message
                .contains("name_regex")
        );
        assert!(
            error("[[rule]]\nmax_sessions = 0\n")
                .message
                .contains("max_sessions")
        );
        assert!(error("[rule]\ncidr = \"10.0.0.0/8\"\n").line.is_some());
        let e = error("[[rule]]\ncidr = \"10.0.0.5/24\"\n");
        assert!(e.message.contains("did you mean 10.0.0.0/24"), "{e}");
        let e = error("[[rule]]\nuploads = \"yes\"\n");
        assert_eq!(e.line, Some(2));
        let e = error("[[rule]]\ndeny = 3\n");
        assert_eq!(e.line, Some(2));
        let e = error(&format!("[[rule]]\ndeny = \"{}\"\n", "x".repeat(201)));
        assert_eq!((e.rule, e.line), (Some(1), Some(2)), "{e}");
        let e = error("[[rule]]\ncidr = [\"10.0.0.0/8\", \"nonsense\"]\n");
        assert!(e.message.contains("cidr: 'nonsense'"), "{e}");
        // Garbage and an empty file never panic.
        assert!(ClientRules::parse("\u{0}\u{1}[[[").is_err());
        assert!(rules("").is_empty());
        assert!(rules("# nothing yet\n").is_empty());
    }

    #[test]
    fn cidrs_match_v4_v6_and_mapped_clients() {
        let r = rules(
            "[[rule]]\ncidr = [\"10.1.0.0/16\", \"fd00:1::/32\"]\nmax_blksize = 1024\n\
             [[rule]]\ncidr = \"192.0.2.7\"\nmax_windowsize = 4\n\
             [[rule]]\ncidr = \"::ffff:198.51.100.0/120\"\nuploads = false\n",
        );
        let blk = |s: &str| r.matching(ip(s), None, b"f").max_blksize;
        assert_eq!(blk("10.1.200.3"), Some(1024));
        assert_eq!(blk("10.2.0.1"), None);
        assert_eq!(blk("fd00:1:ffff::1"), Some(1024));
        assert_eq!(blk("fd00:2::1"), None);
        // An IPv4-mapped IPv6 client is its IPv4 address.
        assert_eq!(blk("::ffff:10.1.0.9"), Some(1024));
        let win = |s: &str| r.matching(ip(s), None, b"f").max_windowsize;
        assert_eq!(win("192.0.2.7"), Some(4));
        assert_eq!(win("192.0.2.8"), None);
        // A mapped block in the file is the IPv4 block.
        let up = |s: &str| r.matching(ip(s), None, b"f").uploads;
        assert_eq!(up("198.51.100.200"), Some(false));
        assert_eq!(up("::ffff:198.51.100.1"), Some(false));
        assert_eq!(up("198.51.101.1"), None);
        // The whole of each family.
        let all = rules("[[rule]]\ncidr = [\"0.0.0.0/0\"]\nuploads = true\n");
        assert_eq!(all.matching(ip("8.8.8.8"), None, b"f").uploads, Some(true));
        assert_eq!(all.matching(ip("::1"), None, b"f").uploads, None);
        let all6 = rules("[[rule]]\ncidr = \"::/0\"\nuploads = true\n");
        assert_eq!(
            all6.matching(ip("2001:db8::1"), None, b"f").uploads,
            Some(true)
        );
        let c = Cidr::try_from("127.0.0.0/8".to_string()).unwrap();
        assert!(c.contains(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert!(!c.contains(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn macs_match_exactly_or_by_prefix_and_an_unknown_mac_matches_none() {
        let r = rules(
            "[[rule]]\nmac = \"52:54:00:*\"\nmax_blksize = 1024\n\
             [[rule]]\nmac = [\"52-54-00-12-34-56\", \"AA:BB:CC:DD:EE:FF\"]\nmax_windowsize = 1\n",
        );
        assert!(r.needs_mac());
        let m = r.matching(ip("10.0.0.1"), Some(MAC), b"f");
        assert_eq!((m.max_blksize, m.max_windowsize), (Some(1024), Some(1)));
        let other = [0x52, 0x54, 0x00, 0, 0, 1];
        let m = r.matching(ip("10.0.0.1"), Some(other), b"f");
        assert_eq!((m.max_blksize, m.max_windowsize), (Some(1024), None));
        let m = r.matching(
            ip("10.0.0.1"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]),
            b"f",
        );
        assert_eq!((m.max_blksize, m.max_windowsize), (None, Some(1)));
        let m = r.matching(ip("10.0.0.1"), None, b"f");
        assert_eq!((m.max_blksize, m.max_windowsize), (None, None));
        let any = rules("[[rule]]\nmac = \"*\"\nuploads = false\n");
        assert_eq!(
            any.matching(ip("10.0.0.1"), Some(MAC), b"f").uploads,
            Some(false)
        );
        assert_eq!(any.matching(ip("10.0.0.1"), None, b"f").uploads, None);
        assert!(!rules("[[rule]]\ncidr = \"10.0.0.0/8\"\n").needs_mac());
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:*",
            "5254:00:*",
            "zz:*",
            "52::00:*",
        ] {
            assert!(MacPattern::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_match_by_glob_and_regex_after_leading_slashes() {
        let r = rules(
            "[[rule]]\nname = \"pxelinux.cfg/*\"\nmax_blksize = 1024\n\
             [[rule]]\nname = [\"efi/**.efi\", \"?.img\"]\nmax_windowsize = 8\n\
             [[rule]]\nname_regex = \"^grub/.*\\\\.lst$\"\nuploads = false\n",
        );
        let m = |n: &[u8]| r.matching(ip("10.0.0.1"), None, n);
        assert_eq!(m(b"pxelinux.cfg/default").max_blksize, Some(1024));
        assert_eq!(m(b"/pxelinux.cfg/01-aa").max_blksize, Some(1024));
        // `*` stops at a `/`; `**` does not.
        assert_eq!(m(b"pxelinux.cfg/a/b").max_blksize, None);
        assert_eq!(m(b"efi/boot/x/grubx64.efi").max_windowsize, Some(8));
        assert_eq!(m(b"efi/grubx64.efi.bak").max_windowsize, None);
        assert_eq!(m(b"a.img").max_windowsize, Some(8));
        assert_eq!(m(b"ab.img").max_windowsize, None);
        assert_eq!(m(b"grub/fs.lst").uploads, Some(false));
        assert_eq!(m(b"grub/fs.lst.x").uploads, None);
        // Regex metacharacters in a glob are themselves.
        let dots = rules("[[rule]]\nname = \"a.b+(c)\"\nuploads = false\n");
        assert_eq!(
            dots.matching(ip("10.0.0.1"), None, b"a.b+(c)").uploads,
            Some(false)
        );
        assert_eq!(
            dots.matching(ip("10.0.0.1"), None, b"aXbb(c)").uploads,
            None
        );
        // Names that are not UTF-8 are matched byte-wise.
        assert_eq!(
            rules("[[rule]]\nname = \"*\"\nuploads = false\n")
                .matching(ip("10.0.0.1"), None, b"\xff\xfe")
                .uploads,
            Some(false)
        );
    }

    #[test]
    fn matching_rules_merge_field_by_field_later_ones_winning() {
        let r = rules(
            "[[rule]]\nmax_blksize = 1468\nrefuse = [\"tsize\"]\ndeny = \"closed\"\n\
             [[rule]]\ncidr = \"10.0.0.0/8\"\nmax_blksize = 1024\ndeny = false\n\
             [[rule]]\ncidr = \"10.9.0.0/16\"\nrefuse = []\nmax_windowsize = 2\n",
        );
        let m = r.matching(ip("192.0.2.1"), None, b"f");
        assert_eq!((m.matched, m.last_line), (1, Some(1)));
        assert_eq!(m.deny.map(|d| &**d), Some("closed"));
        assert_eq!(m.max_blksize, Some(1468));
        let m = r.matching(ip("10.1.0.1"), None, b"f");
        assert_eq!((m.matched, m.last_line), (2, Some(5)));
        assert_eq!((m.deny.map(|d| &**d), m.max_blksize), (None, Some(1024)));
        assert_eq!(m.refuse.map(|r| r.tsize), Some(true));
        let m = r.matching(ip("10.9.0.1"), None, b"f");
        assert_eq!((m.matched, m.last_line), (3, Some(9)));
        assert_eq!(m.refuse, Some(RefusedOptions::default()));
        assert_eq!((m.max_blksize, m.max_windowsize), (Some(1024), Some(2)));
    }

    #[test]
    fn prefixes_expand_ip_and_mac_placeholders() {
        let r = rules("[[rule]]\nprefix = \"{ip}/\"\n");
        let m = r.matching(ip("10.0.0.5"), None, b"/pxelinux.0");
        assert_eq!(
            m.prefixed(ip("10.0.0.5"), None, b"/pxelinux.0").unwrap(),
            b"10.0.0.5/pxelinux.0"
        );
        let v6 = ip("fd00::5");
        assert_eq!(
            r.matching(v6, None, b"a").prefixed(v6, None, b"a").unwrap(),
            b"fd00::5/a"
        );
        let mapped = ip("::ffff:10.0.0.5");
        assert_eq!(
            r.matching(mapped, None, b"a")
                .prefixed(mapped, None, b"a")
                .unwrap(),
            b"10.0.0.5/a"
        );
        let r = rules("[[rule]]\nprefix = \"/hosts/{mac}/\"\n");
        assert!(r.needs_mac());
        let m = r.matching(ip("10.0.0.5"), Some(MAC), b"boot.ipxe");
        assert_eq!(
            m.prefixed(ip("10.0.0.5"), Some(MAC), b"boot.ipxe").unwrap(),
            b"hosts/52-54-00-12-34-56/boot.ipxe"
        );
        // No MAC known: no prefix (dnsmasq falls back to the shared root).
        assert_eq!(m.prefixed(ip("10.0.0.5"), None, b"boot.ipxe"), None);
        let plain = rules("[[rule]]\nprefix = \"model-a-\"\n");
        let m = plain.matching(ip("10.0.0.5"), None, b"x");
        assert_eq!(
            m.prefixed(ip("10.0.0.5"), None, b"x").unwrap(),
            b"model-a-x"
        );
        assert_eq!(mac_dashed(&MAC), "52-54-00-12-34-56");
    }

    fn decide(
        policy: &ClientPolicy,
        settings: &Settings,
        peer: &str,
        mac: Option<[u8; 6]>,
        write: bool,
        sessions: usize,
        name: &[u8],
    ) -> Result<(Vec<u8>, Grant<'static>), Refusal> {
        let request = crate::proto::Request {
            filename: name,
            mode: crate::proto::Mode::Octet,
            options: crate::proto::Options::default(),
        };
        let incoming = Incoming {
            now: std::time::Instant::now(),
            peer: std::net::SocketAddr::new(ip(peer), 1000),
            local: ip("10.0.0.254"),
            mtu: None,
            write,
            request: &request,
            mac,
            client_sessions: sessions,
        };
        match policy.decide(&incoming, settings) {
            Decision::Serve(g) => Ok((
                g.path.to_vec(),
                Grant {
                    path: Cow::Owned(g.path.into_owned()),
                    ..g
                },
            )),
            Decision::Refuse(r) => Err(r),
        }
    }

    #[test]
    fn caps_only_lower_the_command_lines_and_refusals_add_to_its() {
        let r = rules(
            "[[rule]]\nmax_blksize = 65464\nmax_windowsize = 512\nrefuse = [\"timeout\"]\n\
             [[rule]]\ncidr = \"10.0.1.0/24\"\nmax_blksize = 1024\nmax_windowsize = 4\n",
        );
        let policy = ClientPolicy::new(std::sync::Arc::new(r), 1);
        let mut settings = Settings::default();
        settings.limits.max_blksize = 1468;
        settings.limits.max_windowsize = 16;
        settings.refused_options.tsize = true;
        settings.max_upload = Some(77);
        let (path, g) = decide(&policy, &settings, "10.0.2.1", None, false, 0, b"f").unwrap();
        assert_eq!(path, b"f");
        // A rule above the command line leaves the command line's.
        assert_eq!((g.limits.max_blksize, g.limits.max_windowsize), (1468, 16));
        assert!(g.refused.tsize && g.refused.timeout && !g.refused.blksize);
        assert_eq!(g.max_upload, Some(77));
        let (_, g) = decide(&policy, &settings, "10.0.1.9", None, false, 0, b"f").unwrap();
        assert_eq!((g.limits.max_blksize, g.limits.max_windowsize), (1024, 4));
        // Everything else is the command line's.
        assert_eq!(g.limits.retries, settings.limits.retries);
    }

    #[test]
    fn deny_uploads_and_the_session_cap_refuse() {
        let r = rules(
            "[[rule]]\nuploads = false\nmax_sessions = 4\n\
             [[rule]]\ncidr = \"10.0.1.0/24\"\nuploads = true\nmax_sessions = 1\n\
             [[rule]]\nmac = \"de:ad:*\"\ndeny = \"go away\"\n",
        );
        // Two threads: the cap of 4 is 2 per thread (as --max-per-client).
        let policy = ClientPolicy::new(std::sync::Arc::new(r), 2);
        let on = Settings {
            uploads: true,
            ..Settings::default()
        };
        let d = |peer, mac, write, sessions| {
            decide(&policy, &on, peer, mac, write, sessions, b"f").map(|_| ())
        };
        assert_eq!(d("10.0.2.1", None, true, 0), Err(Refusal::UploadsDisabled));
        assert_eq!(d("10.0.2.1", None, false, 0), Ok(()));
        assert_eq!(d("10.0.1.1", None, true, 0), Ok(()));
        // uploads = true cannot take what the command line refuses.
        let off = Settings::default();
        assert_eq!(
            decide(&policy, &off, "10.0.1.1", None, true, 0, b"f").map(|_| ()),
            Err(Refusal::UploadsDisabled)
        );
        assert_eq!(d("10.0.2.1", None, false, 1), Ok(()));
        assert_eq!(d("10.0.2.1", None, false, 2), Err(Refusal::PerClientCap));
        assert_eq!(d("10.0.1.1", None, false, 1), Err(Refusal::PerClientCap));
        let mac = Some([0xde, 0xad, 0, 0, 0, 1]);
        assert_eq!(
            d("10.0.2.1", mac, false, 0),
            Err(Refusal::DeniedBy("go away".into()))
        );
        assert_eq!(d("10.0.2.1", Some(MAC), false, 0), Ok(()));
    }

    #[test]
    fn the_prefix_is_put_before_the_name_for_reads_and_writes() {
        let r = rules("[[rule]]\nmac = \"*\"\nprefix = \"{mac}/\"\n");
        let policy = ClientPolicy::new(std::sync::Arc::new(r), 1);
        let on = Settings {
            uploads: true,
            ..Settings::default()
        };
        let (path, _) = decide(&policy, &on, "10.0.0.1", Some(MAC), false, 0, b"/a/b").unwrap();
        assert_eq!(path, b"52-54-00-12-34-56/a/b");
        let (path, _) = decide(&policy, &on, "10.0.0.1", Some(MAC), true, 0, b"up").unwrap();
        assert_eq!(path, b"52-54-00-12-34-56/up");
        let (path, _) = decide(&policy, &on, "10.0.0.1", None, false, 0, b"/a/b").unwrap();
        assert_eq!(path, b"/a/b");
    }

    const SAMPLE: &str = "[[rule]]\ncidr = [\"10.0.0.0/8\", \"fd00::/8\"]\nmac = \"52:54:00:*\"\n\
        name = \"efi/**\"\nname_regex = \"^a.*b$\"\nprefix = \"{ip}/{mac}/\"\nmax_blksize = 1024\n\
        max_windowsize = 4\nrefuse = [\"tsize\"]\nrollover = 0\nmax_sessions = 3\n\
        uploads = false\ndeny = \"no\"\n";

    proptest::proptest! {
        #[test]
        fn no_file_text_panics(
            cut in 0..SAMPLE.len(),
            at in 0..SAMPLE.len(),
            byte in proptest::prelude::any::<u8>(),
            junk in "\\PC{0,64}",
        ) {
            // The sample cut short, one byte changed, or junk inserted.
            let _ = ClientRules::parse(&SAMPLE[..cut]);
            let mut bytes = SAMPLE.as_bytes().to_vec();
            bytes[at] = byte;
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = ClientRules::parse(text);
            }
            let _ = ClientRules::parse(&format!("{}{junk}{}", &SAMPLE[..at.min(cut)], &SAMPLE[at.min(cut)..]));
        }

        #[test]
        fn no_request_panics(
            v4 in proptest::prelude::any::<u32>(),
            v6 in proptest::prelude::any::<u128>(),
            mac in proptest::prelude::any::<Option<[u8; 6]>>(),
            name in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
        ) {
            let r = rules(SAMPLE);
            for ip in [IpAddr::V4(v4.into()), IpAddr::V6(v6.into())] {
                let m = r.matching(ip, mac, &name);
                let _ = m.prefixed(ip, mac, &name);
            }
        }
    }
}

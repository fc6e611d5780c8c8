//! tftpd-hpa 7.x filename remapping (`-m/--map-file`), pure: a rule file
//! parses once into [`RemapRules`]; [`RemapRules::apply`] rewrites one
//! requested name for one client and direction, or refuses it. No I/O: the
//! one rule that asks about the file system (`E`) calls back through
//! [`RemapContext::probe`]. The behaviour is tftpd-hpa 7.3's in the C
//! locale, checked line for line against its `--map-test` by
//! `tests/remap_diff.rs`.
//!
//! # The language
//! A line is blank, a comment (`#` to the end of the line, unless escaped),
//! a label `:name`, or `OPS REGEX [PATTERN]`; fields are separated by
//! whitespace, and `\ ` and `\#` keep a blank or a hash inside a field.
//! Anything after the third field is ignored, as in tftpd-hpa. `\r` and
//! NUL bytes are dropped from every line.
//!
//! OPS letters: `r` replace the match with PATTERN; `g` repeat from the
//! start until no match; `gg` repeat on the part after the last
//! replacement (sed's `s///g`); `i` match case-insensitively; `e` end after
//! this rule if it matched; `E` as `e`, but only if the probe accepts the
//! result (else the rewrite is undone and processing goes on); `s` restart
//! from the first rule; `a` refuse, PATTERN being the message; `j` jump to
//! the label PATTERN expands to; `G`/`P` RRQ/WRQ only; `4`/`6` IPv4/IPv6
//! clients only; `~` act when the regex does *not* match. Forbidden
//! together, as in tftpd-hpa: `r~ ra rj aj as ej ae es eE Ej aE Es`.
//!
//! PATTERN escapes: `\0` the match, `\1`..`\9` groups, `\i` the client's
//! address (dotted quad, or glibc's `inet_ntop` form for IPv6), `\x` the
//! address in upper-case hex, `\m` the client's MAC (ours, below), `\U`
//! `\L` `\E` upper/lower/stop case
//! folding, `\\` a backslash, and `\` before any other byte that byte (so
//! `\ ` and `\#`). A trailing `\` is a backslash.
//!
//! Each rule tried (its `G`/`P`/`4`/`6` letters allow it) costs one step,
//! and so does each extra round of `g`/`gg`; past `max_steps` (tftpd-hpa's
//! `--map-steps`, default [`DEFAULT_MAX_STEPS`]) the mapping fails.
//! Labels cost nothing.
//!
//! # tftpd-hpa's quirks, kept
//! - Expansion stops copying a group (or `\0`) at its first backslash:
//!   `r (.*) <\1>` turns `a\b` into `<a>`.
//! - In the C locale, expanding a byte of 0x80 or above (from a group, a
//!   macro or the pattern's own text) fails the whole mapping ("Remap
//!   table failure"); the text around the match is copied untouched.
//! - `gg` does not step over an empty match, and `g` rescans from the
//!   start: `rgg a* X` or `rg a a` only ends at the step limit.
//! - A label line is `:name` (the rest of the line ignored) or, with a
//!   lone `:`, the next field. A label's name is kept raw, while a jump's
//!   target is expanded, so `:a\ b` can never be reached.
//! - `a` with an empty message refuses with no message (`--map-test`
//!   prints `ERROR: (null)`).
//!
//! # Where we differ, on purpose
//! - `\m` is the client's MAC, `aa-bb-cc-dd-ee-ff` as pxelinux spells it
//!   (without its `01-`), when the neighbour table knows it (a directly
//!   attached client), else nothing. In tftpd-hpa `\m` is a plain `m`.
//! - A `j` whose target has no escape must name a label that exists, and
//!   must not be empty: a parse error here, a failure at run time there.
//! - At most [`MAX_RULES`] rules, names up to [`MAX_NAME_LEN`] bytes after
//!   each rewrite (tftpd-hpa grows its heap string without bound; a longer
//!   result fails the mapping), repeat counts up to [`MAX_REPEAT`].
//!
//! # POSIX ERE (glibc) against Rust's `regex`
//! Patterns are translated from POSIX ERE into `regex::bytes` syntax,
//! byte-wise (`(?-u)`, `.` matches any byte, newline included), and every
//! construct whose meaning would differ is refused at parse time with the
//! line number, so an accepted rule matches as tftpd-hpa matches it:
//! - POSIX picks the leftmost-*longest* match and longest groups; Rust the
//!   leftmost-*first* by priority. They agree while every choice is
//!   decided by the input, so: alternation is accepted only between plain
//!   literals none of which is a prefix of another (`(pxelinux|grub)`,
//!   not `(a|ab)` nor `(a|)`), and a quantifier only after one byte, `.`,
//!   a bracket expression or `\w`-like class, never after a group
//!   (`(ab)?` is refused).
//! - Backreferences (`\1` in a pattern) are unsupported by Rust.
//! - `\` before an ordinary byte is that byte in glibc (`\d` is `d`), a
//!   class in Rust: translated to the byte. GNU's `\w \W \s \S` become the
//!   ASCII classes; `\b \B \< \> \` \'` are refused (their context at a
//!   `gg` restart differs).
//! - Stacked quantifiers (`a**`, `a*?`, lazy in Rust) are refused, and so
//!   are `[.x.]`/`[=x=]` in brackets; a backslash in brackets is literal,
//!   as in POSIX.
//! - Case folding (`i`) is ASCII-only, as in the C locale. Under a UTF-8
//!   locale tftpd-hpa matches and case-folds characters, not bytes, and
//!   copies non-ASCII text; we follow the C locale.

#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use regex::bytes::{CaptureLocations, Regex, RegexBuilder};

/// tftpd-hpa's `--map-steps` default.
pub const DEFAULT_MAX_STEPS: usize = 4096;
/// Rules and labels one file may hold.
pub const MAX_RULES: usize = 1024;
/// The longest name a rewrite may produce (tftpd-hpa's largest request).
pub const MAX_NAME_LEN: usize = 65_464;
/// The largest `{n,m}` bound accepted.
pub const MAX_REPEAT: u32 = 255;
/// Compiled size allowed per regex.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The client `--map-test` pretends to be, for IPv4 (RFC 5737).
pub const MAP_TEST_CLIENT_V4: [u8; 4] = [192, 0, 2, 34];
/// The client `--map-test -6` pretends to be (RFC 3849).
pub const MAP_TEST_CLIENT_V6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0xfe, 0xed, 0xfa, 0xce, 0xde, 0xad, 0xbe, 0xef,
];
/// The longest line `--map-test` reads at once (`fgets` of MAX_SEGSIZE+1).
const MAP_TEST_LINE: usize = 65_464;

/// A rule file that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemapError {
    /// 1-based line of the rule file.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for RemapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "remap: line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for RemapError {}

/// `E`'s question: may this name be transferred (it exists, may be opened)?
pub type Probe<'a> = dyn Fn(&[u8]) -> bool + 'a;

/// Who asks, and how: what the `4`/`6`/`G`/`P` letters and `\i`/`\x` see.
#[derive(Clone, Copy)]
pub struct RemapContext<'a> {
    /// An IPv4-mapped IPv6 address counts as IPv4 (tftpd-hpa 5.3 on).
    pub client: IpAddr,
    /// A WRQ (upload); otherwise an RRQ.
    pub write: bool,
    /// For `E`: could this name be transferred? `None` answers no, as
    /// `--map-test` does.
    pub probe: Option<&'a Probe<'a>>,
    /// The client's hardware address, for `\m` (ours), where known.
    pub mac: Option<[u8; 6]>,
}

impl<'a> RemapContext<'a> {
    pub fn new(client: IpAddr, write: bool) -> Self {
        RemapContext {
            client,
            write,
            probe: None,
            mac: None,
        }
    }

    pub fn with_mac(mut self, mac: Option<[u8; 6]>) -> Self {
        self.mac = mac;
        self
    }

    pub fn with_probe(mut self, probe: &'a Probe<'a>) -> Self {
        self.probe = Some(probe);
        self
    }
}

/// What the rules made of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remapped {
    Rewritten(Vec<u8>),
    /// An `a` rule matched; its message, if it expanded to any.
    Refused(Option<Vec<u8>>),
    /// tftpd-hpa's "Remap table failure".
    Failed(Failure),
}

/// Why a mapping failed; tftpd-hpa tells the client only
/// "Remap table failure" for each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// More than `max_steps` rules (and `g` rounds) ran.
    StepLimit,
    /// A `j` target expanded to nothing.
    NoLabel,
    /// A `j` target named no label.
    LabelNotFound(Vec<u8>),
    /// A byte of 0x80 or above was expanded (the C locale cannot).
    Encoding,
    /// A rewrite grew past [`MAX_NAME_LEN`].
    TooLong,
}

impl Remapped {
    /// The text `--map-test` prints for this outcome (without newline).
    pub fn map_test_output(&self) -> Vec<u8> {
        match self {
            Remapped::Rewritten(name) => name.clone(),
            Remapped::Refused(Some(msg)) => [b"ERROR: ".as_slice(), msg].concat(),
            Remapped::Refused(None) => b"ERROR: (null)".to_vec(),
            Remapped::Failed(_) => b"ERROR: Remap table failure".to_vec(),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Ops {
    rewrite: bool,
    global: bool,
    sed: bool,
    exit: bool,
    has_file: bool,
    restart: bool,
    abort: bool,
    jump: bool,
    icase: bool,
    inverse: bool,
    v4: bool,
    v6: bool,
    rrq: bool,
    wrq: bool,
}

#[derive(Debug)]
enum Rule {
    Label(Vec<u8>),
    Op {
        ops: Ops,
        regex: Regex,
        pattern: Vec<u8>,
    },
}

/// A parsed rule file.
#[derive(Debug, Default)]
pub struct RemapRules {
    rules: Vec<Rule>,
}

/// Group positions of the last match: tftpd-hpa's `pmatch[10]`.
type Groups = [Option<(usize, usize)>; 10];

impl RemapRules {
    /// Parses a rule file; the first bad line is the error.
    pub fn parse(text: &str) -> Result<RemapRules, RemapError> {
        Self::parse_bytes(text.as_bytes())
    }

    /// As [`RemapRules::parse`], for a file that need not be UTF-8.
    pub fn parse_bytes(text: &[u8]) -> Result<RemapRules, RemapError> {
        let mut rules = Vec::new();
        let mut jumps = Vec::new();
        for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
            let line = i + 1;
            let err = |message: String| RemapError { line, message };
            // As tftpd-hpa's read_line: CR and NUL vanish anywhere.
            let bytes: Vec<u8> = raw
                .iter()
                .copied()
                .filter(|&b| b != b'\r' && b != 0)
                .collect();
            let Some(rule) = parse_line(&bytes).map_err(err)? else {
                continue;
            };
            if rules.len() == MAX_RULES {
                return Err(err(format!("more than {MAX_RULES} rules")));
            }
            if let Rule::Op { ops, pattern, .. } = &rule
                && ops.jump
            {
                jumps.push((line, pattern.clone()));
            }
            rules.push(rule);
        }
        for (line, target) in jumps {
            // A target with an escape is only known at run time.
            if target.contains(&b'\\') {
                continue;
            }
            let err = |message: String| Err(RemapError { line, message });
            if target.is_empty() {
                return err("j needs a label to jump to".into());
            }
            if !target.is_ascii() {
                return err("a j label must be ASCII (tftpd-hpa cannot expand it)".into());
            }
            let known = rules
                .iter()
                .any(|r| matches!(r, Rule::Label(name) if *name == target));
            if !known {
                return err(format!(
                    "j to undefined label \"{}\"",
                    String::from_utf8_lossy(&target)
                ));
            }
        }
        Ok(RemapRules { rules })
    }

    /// Rules and labels held.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether a pattern uses `\m`, so that requests need their MAC.
    pub fn uses_mac(&self) -> bool {
        self.rules.iter().any(|rule| match rule {
            Rule::Op { pattern, .. } => {
                let mut bytes = pattern.iter();
                while let Some(&b) = bytes.next() {
                    if b == b'\\' && bytes.next() == Some(&b'm') {
                        return true;
                    }
                }
                false
            }
            Rule::Label(_) => false,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Runs the rules on `name` (cut at a NUL, as the C string it is there).
    pub fn apply(&self, name: &[u8], ctx: &RemapContext<'_>, max_steps: usize) -> Remapped {
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        let client = ctx.client.to_canonical();
        let macros = Macros::new(client, ctx.mac);
        let v4 = client.is_ipv4();
        let mut current = name.to_vec();
        let mut steps = max_steps;
        let mut at = 0;
        while let Some(rule) = self.rules.get(at) {
            let mut next = at + 1;
            let Rule::Op {
                ops,
                regex,
                pattern,
            } = rule
            else {
                at = next;
                continue;
            };
            let applies =
                !(ops.rrq && ctx.write || ops.wrq && !ctx.write || ops.v4 && !v4 || ops.v6 && v4);
            if !applies {
                at = next;
                continue;
            }
            // The deadman: tftpd-hpa's `if (!deadman--)`.
            if steps == 0 {
                return Remapped::Failed(Failure::StepLimit);
            }
            steps -= 1;

            let mut locs = regex.capture_locations();
            let mut groups: Groups = [None; 10];
            let matched = if ops.inverse {
                !regex.is_match(&current)
            } else {
                find(regex, &mut locs, &current, 0, &mut groups)
            };
            if !matched {
                at = next;
                continue;
            }

            let mut candidate = None;
            if ops.rewrite {
                let mut s = current.clone();
                loop {
                    let (new, after) = match substitute(&s, pattern, &groups, &macros) {
                        Ok(r) => r,
                        Err(f) => return Remapped::Failed(f),
                    };
                    s = new;
                    if !ops.global {
                        break;
                    }
                    let from = if ops.sed {
                        if after >= s.len() {
                            break;
                        }
                        after
                    } else {
                        0
                    };
                    if !find(regex, &mut locs, &s, from, &mut groups) {
                        break;
                    }
                    if steps == 0 {
                        return Remapped::Failed(Failure::StepLimit);
                    }
                    steps -= 1;
                }
                candidate = Some(s);
            }

            if ops.has_file {
                let name = candidate.as_deref().unwrap_or(&current);
                let ok = ctx.probe.is_some_and(|probe| probe(name));
                if !ok {
                    // E: undo the rewrite and carry on as if no match.
                    at = next;
                    continue;
                }
            }
            if let Some(s) = candidate {
                current = s;
            }

            // `a` and `j` expand their pattern alone; an error is "none".
            let word = if ops.abort || ops.jump {
                expand(pattern, &current, &groups, &macros)
                    .ok()
                    .filter(|w| !w.is_empty())
            } else {
                None
            };
            if ops.abort {
                return Remapped::Refused(word);
            }
            if ops.exit || ops.has_file {
                return Remapped::Rewritten(current);
            }
            if ops.restart {
                next = 0;
            } else if ops.jump {
                let Some(word) = word else {
                    return Remapped::Failed(Failure::NoLabel);
                };
                match self
                    .rules
                    .iter()
                    .position(|r| matches!(r, Rule::Label(name) if *name == word))
                {
                    Some(label) => next = label,
                    None => return Remapped::Failed(Failure::LabelNotFound(word)),
                }
            }
            at = next;
        }
        Remapped::Rewritten(current)
    }

    /// One line of `--map-test` output (without its newline) for `line`.
    pub fn map_test_line(&self, line: &[u8], ctx: &RemapContext<'_>, max_steps: usize) -> Vec<u8> {
        self.apply(line, ctx, max_steps).map_test_output()
    }

    /// All of `--map-test`'s standard output for an input file, read as
    /// tftpd-hpa reads it: `fgets` chunks of at most 65464 bytes, and a
    /// chunk without its newline (a last line unterminated, or the head
    /// of an overlong line) skipped.
    pub fn map_test(&self, input: &[u8], ctx: &RemapContext<'_>, max_steps: usize) -> Vec<u8> {
        self.map_test_then(input, ctx, max_steps, |name| name)
    }

    /// [`Self::map_test`], with `then` applied to each rewritten name
    /// (tftpd-hpa prints names normalized under `--normalize`).
    pub fn map_test_then(
        &self,
        input: &[u8],
        ctx: &RemapContext<'_>,
        max_steps: usize,
        then: impl Fn(Vec<u8>) -> Vec<u8>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let window = &rest[..rest.len().min(MAP_TEST_LINE)];
            let (chunk, terminated) = match window.iter().position(|&b| b == b'\n') {
                Some(nl) => (&window[..nl], true),
                None => (window, false),
            };
            rest = &rest[chunk.len() + usize::from(terminated)..];
            if terminated {
                let line = match self.apply(chunk, ctx, max_steps) {
                    Remapped::Rewritten(name) => then(name),
                    other => other.map_test_output(),
                };
                out.extend(line);
                out.push(b'\n');
            }
        }
        out
    }
}

/// The `--map-test` client for the address family asked for.
pub fn map_test_client(ipv6: bool) -> IpAddr {
    if ipv6 {
        IpAddr::from(MAP_TEST_CLIENT_V6)
    } else {
        IpAddr::from(MAP_TEST_CLIENT_V4)
    }
}

/// Searches `hay` from `from`; fills `groups` with absolute positions.
fn find(
    regex: &Regex,
    locs: &mut CaptureLocations,
    hay: &[u8],
    from: usize,
    groups: &mut Groups,
) -> bool {
    if regex.captures_read_at(locs, hay, from).is_none() {
        return false;
    }
    for (i, g) in groups.iter_mut().enumerate() {
        *g = locs.get(i);
    }
    true
}

/// The rewritten string and where its replacement ends (`gg` resumes there).
fn substitute(
    hay: &[u8],
    pattern: &[u8],
    groups: &Groups,
    macros: &Macros,
) -> Result<(Vec<u8>, usize), Failure> {
    let (start, end) = groups[0].unwrap_or((0, 0));
    let replacement = expand(pattern, hay, groups, macros)?;
    let mut out = Vec::with_capacity(hay.len() - (end - start) + replacement.len());
    out.extend_from_slice(&hay[..start]);
    out.extend_from_slice(&replacement);
    let after = out.len();
    out.extend_from_slice(&hay[end..]);
    if out.len() > MAX_NAME_LEN {
        return Err(Failure::TooLong);
    }
    Ok((out, after))
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Keep,
    Upper,
    Lower,
}

/// Expands a replacement pattern against the last match in `hay`.
fn expand(
    pattern: &[u8],
    hay: &[u8],
    groups: &Groups,
    macros: &Macros,
) -> Result<Vec<u8>, Failure> {
    let mut out = Vec::new();
    let mut case = Case::Keep;
    let mut i = 0;
    while let Some(&b) = pattern.get(i) {
        if b != b'\\' {
            emit(&mut out, &[b], case)?;
            i += 1;
            continue;
        }
        let Some(&m) = pattern.get(i + 1) else {
            // A trailing backslash stands for itself.
            out.push(b'\\');
            break;
        };
        i += 2;
        match m {
            b'0'..=b'9' => {
                if let Some((s, e)) = groups[usize::from(m - b'0')] {
                    emit(&mut out, &hay[s..e], case)?;
                }
            }
            b'L' => case = Case::Lower,
            b'U' => case = Case::Upper,
            b'E' => case = Case::Keep,
            // Written as is, outside the case folding.
            b'\\' => out.push(b'\\'),
            b'i' => emit(&mut out, macros.dotted.as_bytes(), case)?,
            b'x' => emit(&mut out, macros.hex.as_bytes(), case)?,
            b'm' => emit(&mut out, macros.mac.as_bytes(), case)?,
            // Any other escaped byte is itself: drop the backslash only.
            _ => i -= 1,
        }
    }
    Ok(out)
}

/// tftpd-hpa's xform_out in the C locale: folds ASCII case, stops at a
/// backslash, cannot convert bytes of 0x80 and above.
fn emit(out: &mut Vec<u8>, text: &[u8], case: Case) -> Result<(), Failure> {
    for &b in text {
        if b == b'\\' {
            break;
        }
        if !b.is_ascii() {
            return Err(Failure::Encoding);
        }
        out.push(match case {
            Case::Keep => b,
            Case::Upper => b.to_ascii_uppercase(),
            Case::Lower => b.to_ascii_lowercase(),
        });
    }
    if out.len() > MAX_NAME_LEN {
        return Err(Failure::TooLong);
    }
    Ok(())
}

/// `\i`, `\x` and `\m` for one client, computed once per name.
struct Macros {
    dotted: String,
    hex: String,
    /// `aa-bb-cc-dd-ee-ff` (pxelinux's spelling, without its `01-`), or
    /// empty when the MAC is not known.
    mac: String,
}

impl Macros {
    fn new(client: IpAddr, mac: Option<[u8; 6]>) -> Self {
        let (dotted, octets) = match client {
            IpAddr::V4(a) => (a.to_string(), a.octets().to_vec()),
            IpAddr::V6(a) => (inet_ntop6(&a), a.octets().to_vec()),
        };
        let hex = octets.iter().map(|o| format!("{o:02X}")).collect();
        let mac = mac
            .map(|m| m.map(|b| format!("{b:02x}")).join("-"))
            .unwrap_or_default();
        Macros { dotted, hex, mac }
    }
}

/// glibc's `inet_ntop(AF_INET6)`: like RFC 5952, except that `::a.b.c.d`
/// (IPv4-compatible) keeps its dotted tail, which Rust's Display drops.
fn inet_ntop6(a: &Ipv6Addr) -> String {
    let w = a.segments();
    // The first longest run of two or more zero words.
    let (mut best, mut best_len) = (None, 0);
    let mut i = 0;
    while i < 8 {
        if w[i] == 0 {
            let start = i;
            while i < 8 && w[i] == 0 {
                i += 1;
            }
            if i - start > best_len {
                best = Some(start);
                best_len = i - start;
            }
        } else {
            i += 1;
        }
    }
    if best_len < 2 {
        best = None;
    }
    let mut s = String::new();
    let o = a.octets();
    for (i, word) in w.iter().enumerate() {
        if let Some(b) = best
            && i >= b
            && i < b + best_len
        {
            if i == b {
                s.push(':');
            }
            continue;
        }
        if i != 0 {
            s.push(':');
        }
        if i == 6 && best == Some(0) && (best_len == 6 || best_len == 5 && w[5] == 0xffff) {
            s.push_str(&format!("{}.{}.{}.{}", o[12], o[13], o[14], o[15]));
            return s;
        }
        s.push_str(&format!("{word:x}"));
    }
    if best.is_some_and(|b| b + best_len == 8) {
        s.push(':');
    }
    s
}

/// C's isspace in the C locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// One field: leading blanks skipped, ended by an unescaped blank or `#`.
/// Backslashes stay in the field; escapes mean something only later.
fn field<'a>(line: &mut &'a [u8]) -> &'a [u8] {
    let s = *line;
    let start = s.iter().position(|&b| !is_space(b)).unwrap_or(s.len());
    let mut end = start;
    let mut escaped = false;
    while let Some(&b) = s.get(end) {
        if !escaped && (is_space(b) || b == b'#') {
            break;
        }
        // Two backslashes leave us unescaped.
        escaped = !escaped && b == b'\\';
        end += 1;
    }
    *line = &s[end..];
    &s[start..end]
}

fn parse_line(mut line: &[u8]) -> Result<Option<Rule>, String> {
    let first = field(&mut line);
    if first.is_empty() {
        return Ok(None);
    }
    if let Some(name) = first.strip_prefix(b":") {
        // A lone ':' takes its name from the next field, as in tftpd-hpa.
        let name = if name.is_empty() {
            field(&mut line)
        } else {
            name
        };
        return Ok(Some(Rule::Label(name.to_vec())));
    }
    let mut ops = Ops::default();
    for &c in first {
        match c {
            b'r' => ops.rewrite = true,
            b'g' if ops.global => ops.sed = true,
            b'g' => ops.global = true,
            b'e' => ops.exit = true,
            b'E' => ops.has_file = true,
            b's' => ops.restart = true,
            b'a' => ops.abort = true,
            b'j' => ops.jump = true,
            b'i' => ops.icase = true,
            b'~' => ops.inverse = true,
            b'4' => ops.v4 = true,
            b'6' => ops.v6 = true,
            b'G' => ops.rrq = true,
            b'P' => ops.wrq = true,
            _ => {
                return Err(format!(
                    "invalid operation flag \"{}\"",
                    (c as char).escape_default()
                ));
            }
        }
    }
    let bad = [
        (ops.rewrite && ops.inverse, "r and ~"),
        (ops.rewrite && ops.abort, "r and a"),
        (ops.rewrite && ops.jump, "r and j"),
        (ops.abort && ops.jump, "a and j"),
        (ops.abort && ops.restart, "a and s"),
        (ops.exit && ops.jump, "e and j"),
        (ops.exit && ops.abort, "a and e"),
        (ops.exit && ops.restart, "e and s"),
        (ops.exit && ops.has_file, "e and E"),
        (ops.has_file && ops.jump, "E and j"),
        (ops.has_file && ops.abort, "a and E"),
        (ops.has_file && ops.restart, "E and s"),
    ];
    if let Some((_, pair)) = bad.iter().find(|(hit, _)| *hit) {
        return Err(format!("rule flags {pair} cannot be combined"));
    }
    if !ops.rewrite {
        ops.global = false;
        ops.sed = false;
    }
    let ere = field(&mut line);
    if ere.is_empty() {
        return Err("regex missing".into());
    }
    let translated = translate(ere, ops.icase).map_err(|m| format!("bad regex: {m}"))?;
    let regex = RegexBuilder::new(&translated)
        .unicode(false)
        .dot_matches_new_line(true)
        .case_insensitive(ops.icase)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("bad regex: {e}"))?;
    let pattern = field(&mut line).to_vec();
    Ok(Some(Rule::Op {
        ops,
        regex,
        pattern,
    }))
}

/// What the previous piece of a regex was, for what may follow it.
#[derive(Clone, Copy, PartialEq)]
enum Prev {
    /// Start of the regex, a group or an alternative.
    Nothing,
    /// One byte, `.`, a bracket expression or a class: may be repeated.
    Single,
    Quantified,
    Anchor,
    Group,
}

/// One open group (the whole regex is the outermost): its alternatives
/// as literals, `None` once an alternative is not a plain literal.
struct Group {
    alternatives: Vec<Option<Vec<u8>>>,
}

/// Translates a POSIX ERE to `regex` syntax, refusing what would not
/// match the same (see the module docs).
fn translate(ere: &[u8], icase: bool) -> Result<String, String> {
    let mut out = String::new();
    let mut stack = vec![Group {
        alternatives: vec![Some(Vec::new())],
    }];
    let mut prev = Prev::Nothing;
    let mut i = 0;
    // Marks the current alternative as more than a literal.
    fn not_literal(stack: &mut [Group]) {
        if let Some(alt) = stack.last_mut().and_then(|g| g.alternatives.last_mut()) {
            *alt = None;
        }
    }
    fn quantifiable(prev: Prev, what: &str) -> Result<(), String> {
        match prev {
            Prev::Single => Ok(()),
            Prev::Nothing | Prev::Anchor => Err(format!("{what} has nothing to repeat")),
            Prev::Quantified => Err(format!(
                "stacked quantifier {what} (POSIX repeats again, Rust reads it as lazy or refuses)"
            )),
            Prev::Group => Err(format!(
                "{what} after a group: POSIX and Rust may choose different repetitions"
            )),
        }
    }
    while let Some(&b) = ere.get(i) {
        i += 1;
        match b {
            b'(' => {
                not_literal(&mut stack);
                stack.push(Group {
                    alternatives: vec![Some(Vec::new())],
                });
                out.push('(');
                prev = Prev::Nothing;
            }
            b')' => {
                if stack.len() == 1 {
                    return Err("unmatched )".into());
                }
                if let Some(g) = stack.pop() {
                    check_alternation(&g, icase)?;
                }
                out.push(')');
                prev = Prev::Group;
            }
            b'|' => {
                if let Some(g) = stack.last_mut() {
                    g.alternatives.push(Some(Vec::new()));
                }
                out.push('|');
                prev = Prev::Nothing;
            }
            b'*' | b'+' | b'?' => {
                quantifiable(prev, &(b as char).to_string())?;
                not_literal(&mut stack);
                out.push(b as char);
                prev = Prev::Quantified;
            }
            b'{' => {
                quantifiable(prev, "{")?;
                let close = ere[i..]
                    .iter()
                    .position(|&c| c == b'}')
                    .ok_or("unmatched {")?;
                let body = std::str::from_utf8(&ere[i..i + close]).map_err(|_| "bad {} bound")?;
                i += close + 1;
                let bound = |s: &str| -> Result<u32, String> {
                    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                        return Err(format!("bad {{}} bound \"{body}\""));
                    }
                    match s.parse::<u32>() {
                        Ok(n) if n <= MAX_REPEAT => Ok(n),
                        _ => Err(format!("repeat count over {MAX_REPEAT}")),
                    }
                };
                match body.split_once(',') {
                    None => out.push_str(&format!("{{{}}}", bound(body)?)),
                    Some((lo, "")) => out.push_str(&format!("{{{},}}", bound(lo)?)),
                    Some((lo, hi)) => {
                        let lo = if lo.is_empty() { 0 } else { bound(lo)? };
                        let hi = bound(hi)?;
                        if lo > hi {
                            return Err(format!("bad {{}} bounds \"{body}\""));
                        }
                        out.push_str(&format!("{{{lo},{hi}}}"));
                    }
                }
                not_literal(&mut stack);
                prev = Prev::Quantified;
            }
            b'^' | b'$' => {
                not_literal(&mut stack);
                out.push(b as char);
                prev = Prev::Anchor;
            }
            b'.' => {
                not_literal(&mut stack);
                out.push('.');
                prev = Prev::Single;
            }
            b'[' => {
                i = bracket(ere, i, &mut out)?;
                not_literal(&mut stack);
                prev = Prev::Single;
            }
            b'\\' => {
                let c = *ere.get(i).ok_or("trailing backslash")?;
                i += 1;
                let class = match c {
                    b'0'..=b'9' => {
                        return Err("backreferences (\\N in a regex) are not supported".into());
                    }
                    b'w' => Some("[[:alnum:]_]"),
                    b'W' => Some("[^[:alnum:]_]"),
                    b's' => Some("[[:space:]]"),
                    b'S' => Some("[^[:space:]]"),
                    b'b' | b'B' | b'<' | b'>' | b'`' | b'\'' => {
                        return Err(format!("\\{} (GNU anchors) is not supported", c as char));
                    }
                    _ => None,
                };
                match class {
                    Some(cls) => {
                        not_literal(&mut stack);
                        out.push_str(cls);
                    }
                    None => literal(&mut out, &mut stack, c),
                }
                prev = Prev::Single;
            }
            _ => {
                literal(&mut out, &mut stack, b);
                prev = Prev::Single;
            }
        }
    }
    if stack.len() > 1 {
        return Err("unmatched (".into());
    }
    if let Some(g) = stack.pop() {
        check_alternation(&g, icase)?;
    }
    Ok(out)
}

fn literal(out: &mut String, stack: &mut [Group], b: u8) {
    if b.is_ascii_alphanumeric() || b == b'_' || b == b'/' {
        out.push(b as char);
    } else {
        out.push_str(&format!("\\x{b:02X}"));
    }
    if let Some(Some(alt)) = stack.last_mut().and_then(|g| g.alternatives.last_mut()) {
        alt.push(b);
    }
}

/// Alternation is safe only when the input decides it: plain, non-empty
/// literals, none a prefix of another.
fn check_alternation(g: &Group, icase: bool) -> Result<(), String> {
    if g.alternatives.len() < 2 {
        return Ok(());
    }
    let mut lits = Vec::new();
    for alt in &g.alternatives {
        match alt {
            Some(l) if !l.is_empty() => lits.push(if icase {
                l.to_ascii_lowercase()
            } else {
                l.clone()
            }),
            _ => {
                return Err(
                    "alternation is accepted only between plain, non-empty literals \
                     (POSIX takes the longest alternative, Rust the first)"
                        .into(),
                );
            }
        }
    }
    for (a, x) in lits.iter().enumerate() {
        for (b, y) in lits.iter().enumerate() {
            if a != b && y.starts_with(x) {
                return Err(format!(
                    "alternatives \"{}\" and \"{}\": one is a prefix of the other \
                     (POSIX takes the longest, Rust the first)",
                    String::from_utf8_lossy(x),
                    String::from_utf8_lossy(y)
                ));
            }
        }
    }
    Ok(())
}

/// Translates a bracket expression whose `[` ends before `i`; returns the
/// index after its `]`.
fn bracket(ere: &[u8], mut i: usize, out: &mut String) -> Result<usize, String> {
    const UNMATCHED: &str = "unmatched [";
    out.push('[');
    if ere.get(i) == Some(&b'^') {
        out.push('^');
        i += 1;
    }
    let mut first = true;
    // The last single byte, which a following '-' may extend to a range.
    let mut last: Option<u8> = None;
    loop {
        let &b = ere.get(i).ok_or(UNMATCHED)?;
        if b == b']' && !first {
            i += 1;
            break;
        }
        first = false;
        if b == b'[' && matches!(ere.get(i + 1), Some(b':' | b'.' | b'=')) {
            let kind = ere[i + 1];
            let rest = &ere[i + 2..];
            let end = rest
                .windows(2)
                .position(|w| w[0] == kind && w[1] == b']')
                .ok_or(UNMATCHED)?;
            let name = &rest[..end];
            if kind != b':' {
                return Err("[. .] and [= =] in brackets are not supported".into());
            }
            const CLASSES: [&str; 12] = [
                "alpha", "digit", "alnum", "upper", "lower", "space", "blank", "punct", "print",
                "graph", "cntrl", "xdigit",
            ];
            let name = std::str::from_utf8(name).unwrap_or("");
            if !CLASSES.contains(&name) {
                return Err(format!("unknown character class [:{name}:]"));
            }
            out.push_str(&format!("[:{name}:]"));
            i += 2 + end + 2;
            last = None;
            continue;
        }
        if b == b'-' && last.is_some() && ere.get(i + 1).is_some_and(|&c| c != b']') {
            let lo = last.take().unwrap_or(b'-');
            let hi = ere[i + 1];
            if hi == b'[' && matches!(ere.get(i + 2), Some(b'.' | b'=' | b':')) {
                return Err("a range ending in [. .], [= =] or [: :] is not supported".into());
            }
            if hi < lo {
                return Err("invalid range end".into());
            }
            out.push_str(&format!("-\\x{hi:02X}"));
            i += 2;
            if ere.get(i) == Some(&b'-') && ere.get(i + 1).is_some_and(|&c| c != b']') {
                return Err("a range may not start where another ends".into());
            }
            continue;
        }
        out.push_str(&format!("\\x{b:02X}"));
        last = Some(b);
        i += 1;
    }
    out.push(']');
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4() -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 34))
    }

    fn run(rules: &str, name: &str) -> Remapped {
        run_ctx(rules, name, &RemapContext::new(v4(), false))
    }

    fn run_ctx(rules: &str, name: &str, ctx: &RemapContext<'_>) -> Remapped {
        RemapRules::parse(rules).expect("rules parse").apply(
            name.as_bytes(),
            ctx,
            DEFAULT_MAX_STEPS,
        )
    }

    fn rw(s: &str) -> Remapped {
        Remapped::Rewritten(s.as_bytes().to_vec())
    }

    fn err_line(rules: &str) -> (usize, String) {
        let e = RemapRules::parse(rules).expect_err("must not parse");
        (e.line, e.message)
    }

    #[test]
    fn the_mac_escape_expands_to_the_known_mac_or_nothing() {
        let rules = RemapRules::parse("r ^pxelinux\\.cfg/default$ pxelinux.cfg/01-\\m\n").unwrap();
        assert!(rules.uses_mac());
        let client = IpAddr::from([10, 0, 0, 5]);
        let known =
            RemapContext::new(client, false).with_mac(Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(
            rules.apply(b"pxelinux.cfg/default", &known, 16),
            Remapped::Rewritten(b"pxelinux.cfg/01-52-54-00-ab-cd-ef".to_vec())
        );
        let unknown = RemapContext::new(client, false);
        assert_eq!(
            rules.apply(b"pxelinux.cfg/default", &unknown, 16),
            Remapped::Rewritten(b"pxelinux.cfg/01-".to_vec())
        );
        let upper = RemapRules::parse("r ^ \\U\\m/\n").unwrap();
        assert_eq!(
            upper.apply(b"x", &known, 16),
            Remapped::Rewritten(b"52-54-00-AB-CD-EF/x".to_vec())
        );
        for text in ["r ^ \\i\n", "r ^ \\\\m\n", ":m\n"] {
            assert!(!RemapRules::parse(text).unwrap().uses_mac(), "{text}");
        }
    }

    #[test]
    fn r_replaces_the_first_match() {
        assert_eq!(run("r a X", "banana"), rw("bXnana"));
        assert_eq!(run("r ^ /tftpboot/", "f"), rw("/tftpboot/f"));
        assert_eq!(run("r zz X", "banana"), rw("banana"));
    }

    #[test]
    fn g_rescans_from_the_start_and_gg_from_after_the_replacement() {
        assert_eq!(run("rg a X", "banana"), rw("bXnXnX"));
        assert_eq!(run("rgg a X", "banana"), rw("bXnXnX"));
        // g sees its own output; gg does not.
        assert_eq!(run("rg ab a", "aabb"), rw("aa"));
        assert_eq!(run("rgg ab a", "aabb"), rw("aab"));
        assert_eq!(run("rgg ^a X", "aaa"), rw("Xaa"));
        assert_eq!(run("rgg a$ X", "aaa"), rw("aaX"));
    }

    #[test]
    fn i_folds_ascii_case() {
        assert_eq!(run("ri ^ABC x", "abcd"), rw("xd"));
        assert_eq!(run("r ^ABC x", "abcd"), rw("abcd"));
    }

    #[test]
    fn e_ends_and_rules_run_on_otherwise() {
        let rules = "re ^a X\nr ^ Y";
        assert_eq!(run(rules, "a"), rw("X"));
        assert_eq!(run(rules, "b"), rw("Yb"));
        assert_eq!(run("e ^ok/\nr ^ /x/", "ok/f"), rw("ok/f"));
    }

    #[test]
    fn capital_e_needs_the_probe() {
        let rules = "rE ^a X\nr ^ Y";
        // No probe (as --map-test): undone, processing goes on.
        assert_eq!(run(rules, "a"), rw("Ya"));
        let yes = |n: &[u8]| n == b"X";
        let ctx = RemapContext::new(v4(), false).with_probe(&yes);
        assert_eq!(run_ctx(rules, "a", &ctx), rw("X"));
        let ctx2 = RemapContext::new(v4(), false).with_probe(&yes);
        assert_eq!(run_ctx("E ^X$\nr ^ Y", "X", &ctx2), rw("X"));
    }

    #[test]
    fn s_restarts() {
        assert_eq!(run("rs ^a b\nr ^b c", "aa"), rw("ca"));
        assert_eq!(run("rs ^a b", "aaaa"), rw("baaa"));
    }

    #[test]
    fn a_refuses_with_its_expanded_message() {
        assert_eq!(
            run("a \\.pvt$ private\\ \\i", "x.pvt"),
            Remapped::Refused(Some(b"private 192.0.2.34".to_vec()))
        );
        assert_eq!(run("a ^", "x"), Remapped::Refused(None));
        assert_eq!(run("a ^", "x").map_test_output(), b"ERROR: (null)");
        assert_eq!(run("a \\.pvt$", "x.bin"), rw("x.bin"));
    }

    #[test]
    fn inverse_acts_when_the_regex_does_not_match() {
        let rules = "a~ \\.cfg$ nocfg";
        assert_eq!(run(rules, "x.cfg"), rw("x.cfg"));
        assert_eq!(
            run(rules, "x.bin"),
            Remapped::Refused(Some(b"nocfg".to_vec()))
        );
        // \0 has nothing to copy in an inverse rule.
        assert_eq!(
            run("a~ ^z <\\0>", "x"),
            Remapped::Refused(Some(b"<>".to_vec()))
        );
    }

    #[test]
    fn g_and_p_pick_the_direction_and_4_6_the_family() {
        let rules = "rG ^ get:\nrP ^ put:\nr4 ^ v4:\nr6 ^ v6:";
        assert_eq!(run(rules, "f"), rw("v4:get:f"));
        let put = RemapContext::new(v4(), true);
        assert_eq!(run_ctx(rules, "f", &put), rw("v4:put:f"));
        let six = RemapContext::new(map_test_client(true), false);
        assert_eq!(run_ctx(rules, "f", &six), rw("v6:get:f"));
        // A v4-mapped v6 client is IPv4, and \i prints it so.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
        let ctx = RemapContext::new(mapped, false);
        assert_eq!(run_ctx("r4 ^ \\i/", "f", &ctx), rw("10.1.2.3/f"));
    }

    #[test]
    fn labels_and_jumps() {
        let rules = "j ^ foo\nr ^ X\n:foo\nr ^ Y";
        assert_eq!(run(rules, "a"), rw("Ya"));
        // The rest of a label line is ignored; a lone ':' names by the next field.
        assert_eq!(run("j ^ foo\nr ^ X\n:foo junk\nr ^ Y", "a"), rw("Ya"));
        assert_eq!(run("j ^ foo\nr ^ X\n: foo\nr ^ Y", "a"), rw("Ya"));
        // A computed target.
        let rules = "j ^(.) L\\1\nr ^ X\n:La\nr ^ A\n:Lb\nr ^ B";
        assert_eq!(run(rules, "ab"), rw("BAab"));
        assert_eq!(run(rules, "bc"), rw("Bbc"));
        assert_eq!(
            run(rules, "cd"),
            Remapped::Failed(Failure::LabelNotFound(b"Lc".to_vec()))
        );
        // A jump backwards loops until the deadman.
        assert_eq!(
            run(":top\nj ^ top", "a"),
            Remapped::Failed(Failure::StepLimit)
        );
        // A raw label with an escape can never be reached.
        assert_eq!(
            run("j ^ a\\ b\nr ^ X\n:a\\ b", "q"),
            Remapped::Failed(Failure::LabelNotFound(b"a b".to_vec()))
        );
    }

    #[test]
    fn labels_cost_no_steps() {
        let rules = ":a\n:b\n:c\nr ^ X";
        let r = RemapRules::parse(rules).unwrap();
        let ctx = RemapContext::new(v4(), false);
        assert_eq!(r.apply(b"f", &ctx, 1), rw("Xf"));
    }

    #[test]
    fn step_limit_counts_rules_and_g_rounds() {
        let r = RemapRules::parse("rg ^a ").unwrap();
        let ctx = RemapContext::new(v4(), false);
        assert_eq!(
            r.apply(b"aab", &ctx, 1),
            Remapped::Failed(Failure::StepLimit)
        );
        assert_eq!(r.apply(b"aab", &ctx, 2), rw("b"));
        assert_eq!(run("rg a a", "a"), Remapped::Failed(Failure::StepLimit));
        assert_eq!(run("rgg a* X", "b"), Remapped::Failed(Failure::StepLimit));
        let two = RemapRules::parse("r ^ x\nr ^ y").unwrap();
        assert_eq!(
            two.apply(b"f", &ctx, 1),
            Remapped::Failed(Failure::StepLimit)
        );
        assert_eq!(
            two.apply(b"f", &ctx, 0),
            Remapped::Failed(Failure::StepLimit)
        );
    }

    #[test]
    fn escapes_in_the_replacement() {
        assert_eq!(run("r ^a(b)(z*) [\\0|\\1|\\2|\\9]", "abd"), rw("[ab|b||]d"));
        assert_eq!(
            run("r ^a \\L\\UAb\\Ec\\\\d\\ e\\#f\\qg\\", "a"),
            rw("ABc\\d e#fqg\\")
        );
        assert_eq!(run("r (.*) \\U\\1-\\i", "ab"), rw("AB-192.0.2.34"));
        assert_eq!(run("r (.*) \\L\\1", "AbC"), rw("abc"));
        assert_eq!(run("r ^ \\x/", "f"), rw("C0000222/f"));
        let six = RemapContext::new(map_test_client(true), false);
        assert_eq!(
            run_ctx("r ^ \\i|\\x|\\L\\x", "", &six),
            rw(
                "2001:db8::feed:face:dead:beef|20010DB800000000FEEDFACEDEADBEEF|20010db800000000feedfacedeadbeef"
            )
        );
    }

    #[test]
    fn expansion_quirks_of_the_c_locale() {
        // A group is copied up to its first backslash.
        assert_eq!(run("r (.*) X\\1Y", "a\\bc"), rw("XaY"));
        // Non-ASCII may pass around the match but not through it.
        assert_eq!(run("r ^.. XX", "\u{e9}b"), rw("XXb"));
        assert_eq!(
            run("r ^(.) [\\1]", "\u{e9}b"),
            Remapped::Failed(Failure::Encoding)
        );
        assert_eq!(run("r x \u{e9}", "x"), Remapped::Failed(Failure::Encoding));
    }

    #[test]
    fn fields_comments_and_blank_lines() {
        assert_eq!(run("r a\\ b X # comment\nr \\# H", "a ba#"), rw("XaH"));
        assert_eq!(
            run("   # only comment\n\t\nr\t^\tP  trailing junk", "a"),
            rw("Pa")
        );
        assert_eq!(run("r ^ X\r\n", "a"), rw("Xa"));
        assert_eq!(run("r ^#", "a"), Remapped::Rewritten(b"a".to_vec()));
    }

    #[test]
    fn windows_backslashes_become_slashes() {
        let rules = "rg \\\\ /";
        assert_eq!(run(rules, "boot\\x86\\pxe.0"), rw("boot/x86/pxe.0"));
    }

    #[test]
    fn case_folding_setup() {
        assert_eq!(
            run("r .* \\L\\0", "PXELINUX.CFG/Default"),
            rw("pxelinux.cfg/default")
        );
    }

    #[test]
    fn per_client_prefixes() {
        assert_eq!(
            run("r ^ /hosts/\\i/", "pxe.0"),
            rw("/hosts/192.0.2.34/pxe.0")
        );
        assert_eq!(run("r ^ /hosts/\\x/", "pxe.0"), rw("/hosts/C0000222/pxe.0"));
    }

    #[test]
    fn ironic_strips_tftpboot() {
        // Ironic's map file.
        let rules = "re ^(/tftpboot/) /tftpboot/\\2\nre ^/tftpboot/ /tftpboot/\nre ^(^/) /tftpboot/\\1\nre ^([^/]) /tftpboot/\\1";
        assert_eq!(
            run(rules, "/tftpboot/pxelinux.0"),
            rw("/tftpboot/pxelinux.0")
        );
        assert_eq!(run(rules, "pxelinux.0"), rw("/tftpboot/pxelinux.0"));
        assert_eq!(run(rules, "/x/y"), rw("/tftpboot//x/y"));
    }

    #[test]
    fn the_sample_rules_refuse_private_files() {
        let rules = "ri ^[a-z]:\nrg \\\\ /\nrg \\# @\nrg /../ /..no../\ne ^ok/\nr ^[^/] /tftpboot/\\0\na \\.pvt$";
        assert_eq!(run(rules, "C:\\boot\\f"), rw("/boot/f"));
        assert_eq!(run(rules, "ok/x.pvt"), rw("ok/x.pvt"));
        assert_eq!(run(rules, "x.pvt"), Remapped::Refused(None));
        assert_eq!(run(rules, "a#b"), rw("/tftpboot/a@b"));
    }

    #[test]
    fn parse_errors_carry_their_line() {
        assert_eq!(err_line("r ^ x\n\nx ^a b").0, 3);
        assert!(
            err_line("x ^a b")
                .1
                .contains("invalid operation flag \"x\"")
        );
        assert!(err_line("ra ^a b").1.contains("r and a"));
        assert!(err_line("r~ a b").1.contains("r and ~"));
        assert!(err_line("eE a").1.contains("e and E"));
        assert_eq!(err_line("# c\nr"), (2, "regex missing".into()));
        assert!(err_line("r ( b").1.contains("unmatched ("));
        assert!(err_line("r ) b").1.contains("unmatched )"));
        assert!(err_line("r [a b").1.contains("unmatched ["));
        assert!(err_line("r *a b").1.contains("nothing to repeat"));
        assert!(err_line("r a{ b").1.contains("unmatched {"));
    }

    #[test]
    fn undefined_and_empty_labels_fail_to_parse() {
        assert_eq!(err_line("r ^ x\nj ^ nowhere").0, 2);
        assert!(err_line("j ^ nowhere").1.contains("undefined label"));
        assert!(err_line("j ^").1.contains("needs a label"));
        assert!(RemapRules::parse("j ^ \\i\n").is_ok());
    }

    #[test]
    fn regex_constructs_that_would_differ_are_refused() {
        for (ere, what) in [
            ("(a)\\1", "backreferences"),
            ("(a|ab)", "prefix"),
            ("(a|)", "non-empty"),
            ("a|^b", "plain"),
            ("(ab)?", "after a group"),
            ("a**", "stacked"),
            ("a*?", "stacked"),
            ("\\bx", "GNU anchors"),
            ("[[.a.]]", "not supported"),
            ("[[:word:]]", "unknown character class"),
            ("[z-a]", "invalid range"),
            ("a{300}", "over 255"),
            ("a\\", "trailing backslash"),
        ] {
            let e = RemapRules::parse(&format!("r {ere}")).expect_err(ere);
            assert!(e.message.contains(what), "{ere}: {}", e.message);
        }
        // And what is safe is accepted.
        for ere in [
            "(pxelinux|grub)/",
            "^(A|b)",
            "[]a-]x",
            "[^]]",
            "[[:alpha:]_]+",
            "a{2}b{1,}c{,3}",
            "\\.\\d\\w\\s",
            "[a\\]",
        ] {
            RemapRules::parse(&format!("r {ere} x")).expect(ere);
        }
        assert!(RemapRules::parse("ri (a|A) x").is_err());
    }

    #[test]
    fn posix_regex_details() {
        // \d is a plain d in POSIX; brackets keep backslashes literal.
        assert_eq!(run("r \\d D", "d1"), rw("D1"));
        assert_eq!(run("r [\\] X", "a\\b"), rw("aXb"));
        assert_eq!(run("r []]+ X", "a]]b"), rw("aXb"));
        assert_eq!(run("r [a-] X", "x-"), rw("xX"));
        assert_eq!(run("r () X", "ab"), rw("Xab"));
        assert_eq!(run("r a{2,3} X", "aaaa"), rw("Xa"));
        // '.' is any byte, newline included.
        assert_eq!(run("r a.b X", "a\nb"), rw("X"));
    }

    #[test]
    fn ipv6_text_is_glibcs() {
        let f = |s: &str| inet_ntop6(&s.parse::<Ipv6Addr>().unwrap());
        assert_eq!(f("2001:db8::1"), "2001:db8::1");
        assert_eq!(f("::"), "::");
        assert_eq!(f("::1"), "::1");
        assert_eq!(f("::1.2.3.4"), "::1.2.3.4");
        assert_eq!(f("::ffff:1.2.3.4"), "::ffff:1.2.3.4");
        assert_eq!(f("1:0:0:2:0:0:0:3"), "1:0:0:2::3");
        assert_eq!(f("1:0:0:2:0:0:3:4"), "1::2:0:0:3:4");
        assert_eq!(f("1:0:2:3:4:5:6:7"), "1:0:2:3:4:5:6:7");
        assert_eq!(f("1::"), "1::");
    }

    #[test]
    fn bounds() {
        let many = "r ^ x\n".repeat(MAX_RULES + 1);
        assert!(err_line(&many).1.contains("more than"));
        // Doubling every step hits the name cap, not memory.
        let r = RemapRules::parse("rs ^(.*)$ \\1\\1").unwrap();
        let ctx = RemapContext::new(v4(), false);
        assert_eq!(
            r.apply(b"ab", &ctx, 100),
            Remapped::Failed(Failure::TooLong)
        );
    }

    #[test]
    fn map_test_reads_like_fgets() {
        let r = RemapRules::parse("r ^ >").unwrap();
        let ctx = RemapContext::new(v4(), false);
        assert_eq!(
            r.map_test(b"a\nb\nlast", &ctx, DEFAULT_MAX_STEPS),
            b">a\n>b\n"
        );
        assert_eq!(r.map_test(b"a\0b\n", &ctx, DEFAULT_MAX_STEPS), b">a\n");
        let mut long = vec![b'x'; MAP_TEST_LINE + 3];
        long.push(b'\n');
        assert_eq!(r.map_test(&long, &ctx, DEFAULT_MAX_STEPS), b">xxx\n");
    }
}

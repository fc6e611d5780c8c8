//! The TFTP wire format (RFC 1350, 2347, 2348, 2349, 7440).
//!
//! [`Packet::parse`] borrows from the datagram and never allocates; every
//! malformed input is a [`ParseError`], never a panic. [`Packet::emit`] writes
//! into a caller-owned buffer and reports the size it needs when that is too
//! small. Options parse into the fixed [`Options`] struct, not a map.
#![forbid(unsafe_code)]

/// Largest block size RFC 2348 allows.
pub const MAX_BLKSIZE: u16 = 65464;
/// Smallest block size RFC 2348 allows.
pub const MIN_BLKSIZE: u16 = 8;
/// The RFC 1350 block size.
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Longest filename we accept, in bytes.
pub const MAX_FILENAME_LEN: usize = 1024;
/// Most options (known or not) a request may carry before it is refused.
pub const MAX_OPTIONS: usize = 32;
/// Longest `cookie` tftpd-hpa 7.x echoes (tftpd(8): "up to 255 bytes").
pub const MAX_COOKIE_LEN: usize = 255;
/// Largest `blksize2` (tftpd(8): the largest power of 2 up to 65464).
pub const MAX_BLKSIZE2: u16 = 32768;

/// Transfer mode of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
}

/// TFTP error codes (RFC 1350 §5, RFC 2347 for 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTid,
    FileExists,
    NoSuchUser,
    OptionRefused,
    /// A code outside 0..=8, kept as received.
    Other(u16),
}

/// Options as a client requested them (RFC 2347), with tftpd-hpa's
/// nonstandard `blksize2`, `utimeout`, `rollover` and `cookie`. Values are
/// kept as sent, saturated to the field's width; negotiation decides what
/// to accept. `None` means absent or unparseable (an unparseable value is
/// ignored, as an unknown option is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub blksize: Option<u32>,
    /// tftpd(8): blksize, answered with a power of 2.
    pub blksize2: Option<u32>,
    pub timeout: Option<u32>,
    pub tsize: Option<u64>,
    /// tftpd(8): the retransmit timeout, in microseconds.
    pub utimeout: Option<u64>,
    pub windowsize: Option<u32>,
    /// tftpd(8): the block number after 65535 (0 or 1 are valid).
    pub rollover: Option<u32>,
    /// tftpd(8): 1 to 255 arbitrary bytes, echoed in the OACK.
    pub cookie: Option<Cookie>,
    /// How the client spelled each name, so the OACK spells it back so, as
    /// tftpd-hpa does (RFC 2347 names are case-insensitive; not every
    /// client compares them so).
    pub case: NameCase,
}

/// A `cookie` value: 1 to [`MAX_COOKIE_LEN`] bytes, held inline so parsing
/// never allocates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cookie {
    len: u8,
    bytes: [u8; MAX_COOKIE_LEN],
}

impl Cookie {
    /// None if `value` is empty or longer than [`MAX_COOKIE_LEN`].
    pub fn new(value: &[u8]) -> Option<Cookie> {
        if value.is_empty() || value.len() > MAX_COOKIE_LEN {
            return None;
        }
        let mut bytes = [0; MAX_COOKIE_LEN];
        bytes[..value.len()].copy_from_slice(value);
        Some(Cookie {
            len: value.len() as u8,
            bytes,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Cookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cookie({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// Option names, in the order tftpd-hpa 7.x writes them in an OACK
/// (whatever the request's order).
pub const OPTION_NAMES: [&str; 8] = [
    "blksize",
    "blksize2",
    "cookie",
    "rollover",
    "timeout",
    "tsize",
    "utimeout",
    "windowsize",
];

/// Per name of [`OPTION_NAMES`], a bit per letter the client sent in upper
/// case. All zero (the default) is lower case.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NameCase(pub [u16; OPTION_NAMES.len()]);

impl NameCase {
    fn of(name: &[u8]) -> u16 {
        name.iter()
            .enumerate()
            .filter(|(_, b)| b.is_ascii_uppercase())
            .fold(0, |mask, (i, _)| mask | (1 << i))
    }
}

/// Which block number follows 65535 on the wire: 0 (RFC 1350 readings
/// and the default) or 1 (tftpd-hpa's `rollover=1`, for clients that expect
/// it). Transfers count blocks in 64 bits from 1; this maps them to the
/// 16-bit wire number and back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Rollover {
    #[default]
    Zero,
    One,
}

impl Rollover {
    /// Absolute block `block` (1-based; 0 before the first) on the wire.
    pub fn wire(self, block: u64) -> u16 {
        match self {
            Rollover::Zero => block as u16,
            Rollover::One if block == 0 => 0,
            // 1..=65535, then 1 again: 65535 numbers a cycle.
            Rollover::One => ((block - 1) % 65535 + 1) as u16,
        }
    }

    /// The first absolute block at or after `from` that is `wire` on the
    /// wire; None if none is (0, past the start, with [`Rollover::One`]).
    pub fn at_or_after(self, from: u64, wire: u16) -> Option<u64> {
        match self {
            Rollover::Zero => Some(from + u64::from(wire.wrapping_sub(from as u16))),
            Rollover::One if wire == 0 => (from == 0).then_some(0),
            Rollover::One if from == 0 => Some(u64::from(wire)),
            Rollover::One => {
                let ahead = (u64::from(wire) + 65535 - u64::from(self.wire(from))) % 65535;
                Some(from + ahead)
            }
        }
    }
}

/// One option's value for the wire.
enum Value<'a> {
    Number(u64),
    Bytes(&'a [u8]),
}

/// A read or write request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// Raw filename bytes, without the terminating NUL.
    pub filename: &'a [u8],
    pub mode: Mode,
    pub options: Options,
}

/// One parsed TFTP packet, borrowing from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request<'a>),
    Wrq(Request<'a>),
    Data { block: u16, payload: &'a [u8] },
    Ack { block: u16 },
    Error { code: ErrorCode, message: &'a [u8] },
    Oack(Options),
}

/// Why a datagram is not a valid TFTP packet. Each maps to ERROR 4, except
/// [`ParseError::UnknownMode`] (also 4, with its own message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("packet too short")]
    TooShort,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("missing NUL terminator")]
    Unterminated,
    #[error("unknown transfer mode")]
    UnknownMode,
    #[error("filename too long or empty")]
    BadFilename,
    #[error("too many options")]
    BadOptions,
    #[error("trailing bytes after packet")]
    Trailing,
}

/// The buffer given to `emit` is too small; `required` is the size needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("buffer too small: {required} bytes needed")]
pub struct BufferTooSmall {
    pub required: usize,
}

const OP_RRQ: u16 = 1;
const OP_WRQ: u16 = 2;
const OP_DATA: u16 = 3;
const OP_ACK: u16 = 4;
const OP_ERROR: u16 = 5;
const OP_OACK: u16 = 6;

impl ErrorCode {
    pub fn from_u16(code: u16) -> Self {
        match code {
            0 => Self::NotDefined,
            1 => Self::FileNotFound,
            2 => Self::AccessViolation,
            3 => Self::DiskFull,
            4 => Self::IllegalOperation,
            5 => Self::UnknownTid,
            6 => Self::FileExists,
            7 => Self::NoSuchUser,
            8 => Self::OptionRefused,
            other => Self::Other(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Self::NotDefined => 0,
            Self::FileNotFound => 1,
            Self::AccessViolation => 2,
            Self::DiskFull => 3,
            Self::IllegalOperation => 4,
            Self::UnknownTid => 5,
            Self::FileExists => 6,
            Self::NoSuchUser => 7,
            Self::OptionRefused => 8,
            Self::Other(code) => code,
        }
    }
}

impl Mode {
    /// The mode's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Octet => "octet",
            Self::Netascii => "netascii",
        }
    }
}

impl Options {
    /// No option carries a value (the name spellings do not count).
    pub fn is_empty(&self) -> bool {
        self.values().iter().all(Option::is_none)
    }

    /// Each option's value, in [`OPTION_NAMES`] order.
    fn values(&self) -> [Option<Value<'_>>; OPTION_NAMES.len()] {
        let n = |v: Option<u64>| v.map(Value::Number);
        [
            n(self.blksize.map(u64::from)),
            n(self.blksize2.map(u64::from)),
            self.cookie.as_ref().map(|c| Value::Bytes(c.as_bytes())),
            n(self.rollover.map(u64::from)),
            n(self.timeout.map(u64::from)),
            n(self.tsize),
            n(self.utimeout),
            n(self.windowsize.map(u64::from)),
        ]
    }
}

/// Splits `buf` at its first NUL: (field, rest after the NUL).
fn take_cstr(buf: &[u8]) -> Result<(&[u8], &[u8]), ParseError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(ParseError::Unterminated)?;
    Ok((&buf[..end], &buf[end + 1..]))
}

/// Parses a decimal option value; None if it is not all digits or does
/// not fit 64 bits (tftpd-hpa's strtoumax gives ERANGE: ignored).
fn parse_decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

fn saturate_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Parses `name\0value\0` pairs (RFC 2347). Unknown names are skipped;
/// names are case-insensitive; a later duplicate with a valid value wins
/// (an unparseable or empty one does not erase an earlier valid one; a
/// cookie over 255 bytes does, as in tftpd-hpa 7.x). Stray NULs (empty
/// names: padding some clients add) are skipped, as tftpd-hpa does. Names
/// and values of any length are taken (tftpd-hpa ignores what it does not
/// know), bounded by the datagram and [`MAX_OPTIONS`].
fn parse_options(mut rest: &[u8]) -> Result<Options, ParseError> {
    let mut options = Options::default();
    let mut count = 0;
    while !rest.is_empty() {
        if rest[0] == 0 {
            rest = &rest[1..];
            continue;
        }
        count += 1;
        if count > MAX_OPTIONS {
            return Err(ParseError::BadOptions);
        }
        let (name, after) = take_cstr(rest)?;
        let (value, after) = take_cstr(after)?;
        rest = after;
        let Some(index) = OPTION_NAMES
            .iter()
            .position(|known| name.eq_ignore_ascii_case(known.as_bytes()))
        else {
            continue;
        };
        if value.is_empty() {
            continue;
        }
        if OPTION_NAMES[index] == "cookie" {
            options.cookie = Cookie::new(value);
            // A spelling only for a value the OACK can carry back.
            options.case.0[index] = options.cookie.map_or(0, |_| NameCase::of(name));
            continue;
        }
        let Some(parsed) = parse_decimal(value) else {
            continue;
        };
        match OPTION_NAMES[index] {
            "blksize" => options.blksize = Some(saturate_u32(parsed)),
            "blksize2" => options.blksize2 = Some(saturate_u32(parsed)),
            "rollover" => options.rollover = Some(saturate_u32(parsed)),
            "timeout" => options.timeout = Some(saturate_u32(parsed)),
            "tsize" => options.tsize = Some(parsed),
            "utimeout" => options.utimeout = Some(parsed),
            _ => options.windowsize = Some(saturate_u32(parsed)),
        }
        options.case.0[index] = NameCase::of(name);
    }
    Ok(options)
}

fn parse_request(body: &[u8]) -> Result<Request<'_>, ParseError> {
    let (filename, rest) = take_cstr(body)?;
    if filename.is_empty() || filename.len() > MAX_FILENAME_LEN {
        return Err(ParseError::BadFilename);
    }
    let (mode, rest) = take_cstr(rest)?;
    let mode = if mode.eq_ignore_ascii_case(b"octet") {
        Mode::Octet
    } else if mode.eq_ignore_ascii_case(b"netascii") {
        Mode::Netascii
    } else {
        // Includes the obsolete "mail" mode (RFC 1350 §1).
        return Err(ParseError::UnknownMode);
    };
    let options = parse_options(rest)?;
    Ok(Request {
        filename,
        mode,
        options,
    })
}

fn read_u16(buf: &[u8], at: usize) -> Result<u16, ParseError> {
    match buf.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(ParseError::TooShort),
    }
}

impl<'a> Packet<'a> {
    /// Parses one datagram.
    pub fn parse(buf: &'a [u8]) -> Result<Self, ParseError> {
        let opcode = read_u16(buf, 0)?;
        let body = &buf[2..];
        match opcode {
            OP_RRQ => Ok(Packet::Rrq(parse_request(body)?)),
            OP_WRQ => Ok(Packet::Wrq(parse_request(body)?)),
            OP_DATA => Ok(Packet::Data {
                block: read_u16(buf, 2)?,
                payload: &buf[4..],
            }),
            OP_ACK => {
                let block = read_u16(buf, 2)?;
                // Some clients pad ACKs; RFC 1350 is silent, so tolerate it.
                Ok(Packet::Ack { block })
            }
            OP_ERROR => {
                let code = ErrorCode::from_u16(read_u16(buf, 2)?);
                // A missing terminator is common in the wild: take the rest.
                let rest = &buf[4..];
                let message = match rest.iter().position(|&b| b == 0) {
                    Some(end) => &rest[..end],
                    None => rest,
                };
                Ok(Packet::Error { code, message })
            }
            OP_OACK => Ok(Packet::Oack(parse_options(body)?)),
            other => Err(ParseError::UnknownOpcode(other)),
        }
    }

    /// Bytes `emit` writes.
    pub fn buffer_len(&self) -> usize {
        match self {
            Packet::Rrq(req) | Packet::Wrq(req) => {
                2 + req.filename.len() + 1 + req.mode.as_str().len() + 1 + options_len(&req.options)
            }
            Packet::Data { payload, .. } => 4 + payload.len(),
            Packet::Ack { .. } => 4,
            Packet::Error { message, .. } => 4 + message.len() + 1,
            Packet::Oack(options) => 2 + options_len(options),
        }
    }

    /// Writes the packet to the start of `buf` and returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, BufferTooSmall> {
        let required = self.buffer_len();
        if buf.len() < required {
            return Err(BufferTooSmall { required });
        }
        let mut w = Writer { buf, at: 0 };
        match self {
            Packet::Rrq(req) | Packet::Wrq(req) => {
                let op = if matches!(self, Packet::Rrq(_)) {
                    OP_RRQ
                } else {
                    OP_WRQ
                };
                w.u16(op);
                w.cstr(req.filename);
                w.cstr(req.mode.as_str().as_bytes());
                w.options(&req.options);
            }
            Packet::Data { block, payload } => {
                w.u16(OP_DATA);
                w.u16(*block);
                w.bytes(payload);
            }
            Packet::Ack { block } => {
                w.u16(OP_ACK);
                w.u16(*block);
            }
            Packet::Error { code, message } => {
                w.u16(OP_ERROR);
                w.u16(code.to_u16());
                w.cstr(message);
            }
            Packet::Oack(options) => {
                w.u16(OP_OACK);
                w.options(options);
            }
        }
        debug_assert_eq!(w.at, required);
        Ok(w.at)
    }
}

/// Writes a DATA header (opcode and block) into `buf[..4]`.
pub fn emit_data_header(block: u16, buf: &mut [u8]) -> Result<usize, BufferTooSmall> {
    Packet::Data {
        block,
        payload: &[],
    }
    .emit(buf)
}

/// Writes an ERROR packet whose message is cut to fit `buf`.
pub fn emit_error(code: ErrorCode, message: &str, buf: &mut [u8]) -> Result<usize, BufferTooSmall> {
    let room = buf.len().saturating_sub(5);
    let message = &message.as_bytes()[..message.len().min(room)];
    Packet::Error { code, message }.emit(buf)
}

fn decimal_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

fn options_len(options: &Options) -> usize {
    let mut len = 0;
    for (name, value) in OPTION_NAMES.iter().zip(options.values()) {
        len += match value {
            None => continue,
            Some(Value::Number(v)) => decimal_len(v),
            Some(Value::Bytes(b)) => b.len(),
        } + name.len()
            + 2;
    }
    len
}

struct Writer<'b> {
    buf: &'b mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }
    fn cstr(&mut self, b: &[u8]) {
        self.bytes(b);
        self.bytes(&[0]);
    }
    fn decimal(&mut self, v: u64) {
        let mut digits = [0u8; 20];
        let len = decimal_len(v);
        let mut n = v;
        for slot in digits[..len].iter_mut().rev() {
            *slot = b'0' + (n % 10) as u8;
            n /= 10;
        }
        self.bytes(&digits[..len]);
        self.bytes(&[0]);
    }
    fn options(&mut self, options: &Options) {
        let names = OPTION_NAMES.iter().zip(options.case.0);
        for ((name, case), value) in names.zip(options.values()) {
            let Some(value) = value else {
                continue;
            };
            for (i, &b) in name.as_bytes().iter().enumerate() {
                let upper = case & (1 << i) != 0;
                self.bytes(&[if upper { b.to_ascii_uppercase() } else { b }]);
            }
            self.bytes(&[0]);
            match value {
                Value::Number(v) => self.decimal(v),
                Value::Bytes(b) => self.cstr(b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn options() -> impl Strategy<Value = Options> {
        let cookie = proptest::collection::vec(1u8..=255, 1..=MAX_COOKIE_LEN);
        (
            (
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u64>()),
            ),
            (
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(cookie),
            ),
            any::<[u16; OPTION_NAMES.len()]>(),
        )
            .prop_map(
                |(
                    (blksize, blksize2, timeout, tsize),
                    (utimeout, windowsize, rollover, cookie),
                    case,
                )| {
                    let mut o = Options {
                        blksize,
                        blksize2,
                        timeout,
                        tsize,
                        utimeout,
                        windowsize,
                        rollover,
                        cookie: cookie.and_then(|c| Cookie::new(&c)),
                        case: NameCase::default(),
                    };
                    // Spellings round-trip for the options present, within
                    // each name's letters.
                    let present = o.values().map(|v| v.is_some());
                    for (i, name) in OPTION_NAMES.iter().enumerate() {
                        if present[i] {
                            o.case.0[i] = case[i] & ((1u16 << name.len()) - 1);
                        }
                    }
                    // Digits have no case.
                    o.case.0[1] &= 0x7f;
                    o
                },
            )
    }

    fn mode() -> impl Strategy<Value = Mode> {
        prop_oneof![Just(Mode::Octet), Just(Mode::Netascii)]
    }

    fn filename() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(1u8..=255, 1..200)
    }

    fn roundtrip(packet: Packet<'_>) {
        let mut buf = vec![0u8; packet.buffer_len()];
        let n = packet.emit(&mut buf).unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(Packet::parse(&buf[..n]).unwrap(), packet);
        if n > 0 {
            let mut short = vec![0u8; n - 1];
            assert_eq!(packet.emit(&mut short), Err(BufferTooSmall { required: n }));
        }
    }

    proptest! {
        #[test]
        fn requests_roundtrip(name in filename(), mode in mode(), options in options(), write in any::<bool>()) {
            let request = Request { filename: &name, mode, options };
            roundtrip(if write { Packet::Wrq(request) } else { Packet::Rrq(request) });
        }

        #[test]
        fn data_roundtrips(block in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            roundtrip(Packet::Data { block, payload: &payload });
        }

        #[test]
        fn ack_roundtrips(block in any::<u16>()) {
            roundtrip(Packet::Ack { block });
        }

        #[test]
        fn error_roundtrips(code in any::<u16>(), message in proptest::collection::vec(1u8..=255, 0..300)) {
            roundtrip(Packet::Error { code: ErrorCode::from_u16(code), message: &message });
        }

        #[test]
        fn oack_roundtrips(options in options()) {
            roundtrip(Packet::Oack(options));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = Packet::parse(&bytes);
        }

        #[test]
        fn requests_with_random_option_bytes_never_panic(
            op in 1u16..=6,
            tail in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..400),
        ) {
            let mut bytes = op.to_be_bytes().to_vec();
            bytes.extend_from_slice(&tail);
            let _ = Packet::parse(&bytes);
        }
    }

    #[test]
    fn error_codes_map_both_ways() {
        for code in 0..=20u16 {
            assert_eq!(ErrorCode::from_u16(code).to_u16(), code);
        }
        assert_eq!(ErrorCode::from_u16(8), ErrorCode::OptionRefused);
    }

    #[test]
    fn typical_requests_parse() {
        let p = Packet::parse(b"\x00\x01pxelinux.0\x00octet\x00tsize\x000\x00blksize\x001468\x00")
            .unwrap();
        let Packet::Rrq(r) = p else { panic!() };
        assert_eq!(r.filename, b"pxelinux.0");
        assert_eq!(r.options.tsize, Some(0));
        assert_eq!(r.options.blksize, Some(1468));
        // A missing final NUL on the mode is malformed.
        assert_eq!(
            Packet::parse(b"\x00\x01f\x00octet"),
            Err(ParseError::Unterminated)
        );
        // An option name without a value is malformed.
        assert_eq!(
            Packet::parse(b"\x00\x01f\x00octet\x00tsize\x00"),
            Err(ParseError::Unterminated)
        );
        assert_eq!(
            Packet::parse(b"\x00\x01f\x00mail\x00"),
            Err(ParseError::UnknownMode)
        );
        assert_eq!(
            Packet::parse(b"\x00\x01\x00octet\x00"),
            Err(ParseError::BadFilename)
        );
        assert_eq!(Packet::parse(b"\x00"), Err(ParseError::TooShort));
        assert_eq!(
            Packet::parse(b"\x00\x07"),
            Err(ParseError::UnknownOpcode(7))
        );
        // Values saturate to the field's width...
        let p = Packet::parse(b"\x00\x01f\x00octet\x00blksize\x0099999999999\x00").unwrap();
        let Packet::Rrq(r) = p else { panic!() };
        assert_eq!(r.options.blksize, Some(u32::MAX));
        // ...but one past 64 bits is ignored, as tftpd-hpa's strtoumax
        // (ERANGE) has it.
        let p =
            Packet::parse(b"\x00\x01f\x00octet\x00blksize\x0099999999999999999999999\x00").unwrap();
        let Packet::Rrq(r) = p else { panic!() };
        assert_eq!(r.options.blksize, None);
    }

    #[test]
    fn padding_nuls_are_skipped_like_tftpd_hpa() {
        for datagram in [
            &b"\x00\x01f\x00octet\x00\x00"[..],
            b"\x00\x01f\x00octet\x00\x00\x00\x00",
            b"\x00\x01f\x00octet\x00\x00blksize\x001468\x00\x00\x00",
        ] {
            let Ok(Packet::Rrq(r)) = Packet::parse(datagram) else {
                panic!("{datagram:?} did not parse");
            };
            assert_eq!(r.filename, b"f");
            let want = datagram.windows(7).any(|w| w == b"blksize").then_some(1468);
            assert_eq!(r.options.blksize, want, "{datagram:?}");
        }
    }

    #[test]
    fn a_later_unparseable_duplicate_keeps_the_earlier_value() {
        let p =
            Packet::parse(b"\x00\x01f\x00octet\x00blksize\x001468\x00BLKSIZE\x00x1\x00").unwrap();
        let Packet::Rrq(r) = p else { panic!() };
        assert_eq!(r.options.blksize, Some(1468));
        // A later valid duplicate still wins.
        let p =
            Packet::parse(b"\x00\x01f\x00octet\x00blksize\x001468\x00blksize\x00512\x00").unwrap();
        let Packet::Rrq(r) = p else { panic!() };
        assert_eq!(r.options.blksize, Some(512));
    }

    fn rrq_options(datagram: &[u8]) -> Options {
        match Packet::parse(datagram) {
            Ok(Packet::Rrq(r)) => r.options,
            other => panic!("{datagram:?}: {other:?}"),
        }
    }

    #[test]
    fn tftpd_hpa_options_parse() {
        let o = rrq_options(
            b"\x00\x01f\x00octet\x00blksize2\x001000\x00utimeout\x00500000\x00rollover\x001\x00cookie\x00a\xffb\x00",
        );
        assert_eq!(o.blksize2, Some(1000));
        assert_eq!(o.utimeout, Some(500_000));
        assert_eq!(o.rollover, Some(1));
        assert_eq!(
            o.cookie.map(|c| c.as_bytes().to_vec()),
            Some(b"a\xffb".to_vec())
        );
        // A cookie of 255 bytes is kept; one of 256 is dropped and erases
        // an earlier one; an empty one erases nothing (tftpd-hpa 7.3).
        let mut d = b"\x00\x01f\x00octet\x00cookie\x00".to_vec();
        d.extend_from_slice(&[b'x'; MAX_COOKIE_LEN]);
        d.push(0);
        assert_eq!(rrq_options(&d).cookie.unwrap().as_bytes().len(), 255);
        d.extend_from_slice(b"cookie\x00");
        d.extend_from_slice(&[b'y'; MAX_COOKIE_LEN + 1]);
        d.push(0);
        assert_eq!(rrq_options(&d).cookie, None);
        let o = rrq_options(b"\x00\x01f\x00octet\x00cookie\x00abc\x00cookie\x00\x00");
        assert_eq!(o.cookie.unwrap().as_bytes(), b"abc");
        // Long unknown names and values are skipped, not refused.
        let mut d = b"\x00\x01f\x00octet\x00".to_vec();
        d.extend_from_slice(&[b'n'; 100]);
        d.extend_from_slice(b"\x001\x00foo\x00");
        d.extend_from_slice(&[b'q'; 600]);
        d.extend_from_slice(b"\x00blksize\x001000\x00");
        assert_eq!(rrq_options(&d).blksize, Some(1000));
    }

    #[test]
    fn the_oack_spells_names_as_asked_in_tftpd_hpa_order() {
        let o = rrq_options(
            b"\x00\x01f\x00octet\x00WindowSize\x002\x00TSIZE\x000\x00Cookie\x00q\x00BlkSize\x001000\x00",
        );
        let mut buf = [0u8; 128];
        let n = Packet::Oack(o).emit(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"\x00\x06BlkSize\x001000\x00Cookie\x00q\x00TSIZE\x000\x00WindowSize\x002\x00"
        );
        assert!(!o.is_empty());
        let spelled_only = Options {
            case: o.case,
            ..Options::default()
        };
        assert!(spelled_only.is_empty(), "spellings alone are no options");
    }

    #[test]
    fn block_numbers_roll_over_to_zero_or_one() {
        let seq = |r: Rollover| (65534..=65538).map(|b| r.wire(b)).collect::<Vec<_>>();
        assert_eq!(seq(Rollover::Zero), [65534, 65535, 0, 1, 2]);
        assert_eq!(seq(Rollover::One), [65534, 65535, 1, 2, 3]);
        assert_eq!(Rollover::One.wire(0), 0);
        assert_eq!(Rollover::One.wire(65535 * 2), 65535);
        assert_eq!(Rollover::One.wire(65535 * 2 + 1), 1);
        // ACK 0 is the start only.
        assert_eq!(Rollover::One.at_or_after(0, 0), Some(0));
        assert_eq!(Rollover::One.at_or_after(70_000, 0), None);
        assert_eq!(Rollover::One.at_or_after(0, 65535), Some(65535));
        assert_eq!(Rollover::One.at_or_after(65535, 1), Some(65536));
        assert_eq!(Rollover::Zero.at_or_after(65535, 0), Some(65536));
    }

    proptest::proptest! {
        #[test]
        fn at_or_after_finds_the_block_a_wire_number_means(
            from in 0u64..1 << 40,
            ahead in 0u64..65535,
            one in proptest::prelude::any::<bool>(),
        ) {
            let r = if one { Rollover::One } else { Rollover::Zero };
            let block = from + ahead;
            proptest::prop_assert_eq!(r.at_or_after(from, r.wire(block)), Some(block));
            if !one {
                // The old arithmetic, exactly.
                let w = block as u16;
                proptest::prop_assert_eq!(
                    r.at_or_after(from, w),
                    Some(from + u64::from(w.wrapping_sub(from as u16)))
                );
            }
        }
    }

    #[test]
    fn error_messages_are_cut_to_fit() {
        let mut buf = [0u8; 10];
        let n = emit_error(ErrorCode::NotDefined, "a very long message", &mut buf).unwrap();
        assert_eq!(n, 10);
        assert_eq!(buf[9], 0);
    }
}

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
/// Longest option name or value we accept, in bytes.
pub const MAX_OPTION_LEN: usize = 64;

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

/// Options as a client requested them (RFC 2347). Values are kept as sent,
/// saturated to the field's width; negotiation decides what to accept.
/// `None` means absent or unparseable (an unparseable value is ignored, as
/// an unknown option is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub blksize: Option<u32>,
    pub timeout: Option<u32>,
    pub tsize: Option<u64>,
    pub windowsize: Option<u32>,
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
    #[error("too many or over-long options")]
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
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
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

/// Parses a decimal option value, saturating at `u64::MAX`; None if it is
/// not all digits.
fn parse_decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.saturating_mul(10).saturating_add(u64::from(b - b'0'));
    }
    Some(n)
}

fn saturate_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Parses `name\0value\0` pairs (RFC 2347). Unknown names are skipped;
/// names are case-insensitive; a later duplicate with a valid value wins
/// (an unparseable one does not erase an earlier valid one). Stray NULs
/// (empty names: padding some clients add) are skipped, as tftpd-hpa does.
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
        if name.len() > MAX_OPTION_LEN || value.len() > MAX_OPTION_LEN {
            return Err(ParseError::BadOptions);
        }
        let Some(parsed) = parse_decimal(value) else {
            continue;
        };
        if name.eq_ignore_ascii_case(b"blksize") {
            options.blksize = Some(saturate_u32(parsed));
        } else if name.eq_ignore_ascii_case(b"timeout") {
            options.timeout = Some(saturate_u32(parsed));
        } else if name.eq_ignore_ascii_case(b"tsize") {
            options.tsize = Some(parsed);
        } else if name.eq_ignore_ascii_case(b"windowsize") {
            options.windowsize = Some(saturate_u32(parsed));
        }
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
    let mut add = |name: &str, value: Option<u64>| {
        if let Some(v) = value {
            len += name.len() + 1 + decimal_len(v) + 1;
        }
    };
    add("blksize", options.blksize.map(u64::from));
    add("timeout", options.timeout.map(u64::from));
    add("tsize", options.tsize);
    add("windowsize", options.windowsize.map(u64::from));
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
    fn option(&mut self, name: &str, value: Option<u64>) {
        if let Some(v) = value {
            self.cstr(name.as_bytes());
            self.decimal(v);
        }
    }
    fn options(&mut self, options: &Options) {
        self.option("blksize", options.blksize.map(u64::from));
        self.option("timeout", options.timeout.map(u64::from));
        self.option("tsize", options.tsize);
        self.option("windowsize", options.windowsize.map(u64::from));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn options() -> impl Strategy<Value = Options> {
        (
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(|(blksize, timeout, tsize, windowsize)| Options {
                blksize,
                timeout,
                tsize,
                windowsize,
            })
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
        // Values saturate rather than overflow.
        let p =
            Packet::parse(b"\x00\x01f\x00octet\x00blksize\x0099999999999999999999999\x00").unwrap();
        let Packet::Rrq(r) = p else { panic!() };
        assert_eq!(r.options.blksize, Some(u32::MAX));
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

    #[test]
    fn error_messages_are_cut_to_fit() {
        let mut buf = [0u8; 10];
        let n = emit_error(ErrorCode::NotDefined, "a very long message", &mut buf).unwrap();
        assert_eq!(n, 10);
        assert_eq!(buf[9], 0);
    }
}

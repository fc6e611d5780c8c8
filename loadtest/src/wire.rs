//! The client's own view of the TFTP wire format (RFC 1350, options per RFC 2347/2348/2349/7440).
//!
//! Deliberately independent of the server's `proto` module: a load generator that shares the
//! server's codec would agree with the server's bugs instead of catching them.
//! Encoders write into a caller-owned buffer and return the length; `parse` borrows the datagram.
#![forbid(unsafe_code)]

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// RFC 1350 error code 5.
pub const ERR_UNKNOWN_TID: u16 = 5;

/// The options a client puts in its RRQ. `None` means "not requested".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestOptions {
    pub blksize: Option<u16>,
    pub windowsize: Option<u16>,
    /// RFC 2349: a reading client sends `tsize 0` and the server answers with the size.
    pub tsize: bool,
    /// RFC 2349 `timeout` in seconds, asked of the server.
    pub timeout: Option<u8>,
}

impl RequestOptions {
    pub fn any(&self) -> bool {
        self.blksize.is_some() || self.windowsize.is_some() || self.tsize || self.timeout.is_some()
    }
}

/// The encoder was handed a buffer too small; carries the size needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferTooSmall {
    pub needed: usize,
}

/// A received datagram, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    Data {
        block: u16,
        payload: &'a [u8],
    },
    Ack {
        block: u16,
    },
    Error {
        code: u16,
        message: &'a str,
    },
    /// Raw option area (after the opcode); walk it with [`oack_options`].
    Oack {
        options: &'a [u8],
    },
    /// RRQ/WRQ or an unknown opcode: nothing a client should receive.
    Other {
        opcode: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than an opcode plus the fixed fields of its kind.
    Truncated,
    /// ERROR message or OACK strings not NUL-terminated or not UTF-8.
    BadString,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Truncated => f.write_str("truncated datagram"),
            ParseError::BadString => f.write_str("malformed string field"),
        }
    }
}

pub fn parse(buf: &[u8]) -> Result<Packet<'_>, ParseError> {
    if buf.len() < 2 {
        return Err(ParseError::Truncated);
    }
    let opcode = u16::from_be_bytes([buf[0], buf[1]]);
    let rest = &buf[2..];
    match opcode {
        OP_DATA | OP_ACK | OP_ERROR => {
            if rest.len() < 2 {
                return Err(ParseError::Truncated);
            }
            let n = u16::from_be_bytes([rest[0], rest[1]]);
            let tail = &rest[2..];
            Ok(match opcode {
                OP_DATA => Packet::Data {
                    block: n,
                    payload: tail,
                },
                OP_ACK => Packet::Ack { block: n },
                _ => {
                    // RFC 1350: the message is NUL-terminated; be lenient with a missing NUL
                    // (some servers omit it) but not with invalid UTF-8.
                    let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
                    let message =
                        std::str::from_utf8(&tail[..end]).map_err(|_| ParseError::BadString)?;
                    Packet::Error { code: n, message }
                }
            })
        }
        OP_OACK => {
            // Validate the shape now so the consumer can walk it without error paths.
            if !rest.is_empty() && rest.last() != Some(&0) {
                return Err(ParseError::BadString);
            }
            if std::str::from_utf8(rest).is_err() {
                return Err(ParseError::BadString);
            }
            if rest.split(|&b| b == 0).count() % 2 == 0 {
                // `k\0v\0` splits into [k, v, ""]: an odd count. An even one is a dangling key.
                return Err(ParseError::BadString);
            }
            Ok(Packet::Oack { options: rest })
        }
        _ => Ok(Packet::Other { opcode }),
    }
}

/// Walks a validated OACK option area as (name, value) pairs.
pub fn oack_options(options: &[u8]) -> impl Iterator<Item = (&str, &str)> {
    let mut parts = options
        .split(|&b| b == 0)
        .map(|s| std::str::from_utf8(s).unwrap_or(""));
    std::iter::from_fn(move || {
        let k = parts.next()?;
        if k.is_empty() {
            return None;
        }
        let v = parts.next()?;
        Some((k, v))
    })
}

struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
    needed: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Writer {
            buf,
            len: 0,
            needed: 0,
        }
    }
    fn put(&mut self, bytes: &[u8]) {
        self.needed += bytes.len();
        if self.needed <= self.buf.len() {
            self.buf[self.len..self.needed].copy_from_slice(bytes);
            self.len = self.needed;
        }
    }
    fn put_u16(&mut self, v: u16) {
        self.put(&v.to_be_bytes());
    }
    fn put_str0(&mut self, s: &str) {
        self.put(s.as_bytes());
        self.put(&[0]);
    }
    fn finish(self) -> Result<usize, BufferTooSmall> {
        if self.needed <= self.buf.len() {
            Ok(self.len)
        } else {
            Err(BufferTooSmall {
                needed: self.needed,
            })
        }
    }
}

/// RRQ in octet mode with the given options (RFC 2347 §2 layout).
pub fn encode_rrq(
    buf: &mut [u8],
    filename: &str,
    opts: &RequestOptions,
) -> Result<usize, BufferTooSmall> {
    encode_request(buf, OP_RRQ, filename, opts, 0)
}

/// WRQ in octet mode with the given options; with `opts.tsize` it carries `tsize` = `size`,
/// the length about to be sent (RFC 2349: a writing client states it).
pub fn encode_wrq(
    buf: &mut [u8],
    filename: &str,
    opts: &RequestOptions,
    size: u64,
) -> Result<usize, BufferTooSmall> {
    encode_request(buf, OP_WRQ, filename, opts, size)
}

fn encode_request(
    buf: &mut [u8],
    opcode: u16,
    filename: &str,
    opts: &RequestOptions,
    tsize: u64,
) -> Result<usize, BufferTooSmall> {
    let mut w = Writer::new(buf);
    w.put_u16(opcode);
    w.put_str0(filename);
    w.put_str0("octet");
    let mut num = [0u8; 20];
    if let Some(b) = opts.blksize {
        w.put_str0("blksize");
        w.put_str0(fmt_u64(&mut num, u64::from(b)));
    }
    if let Some(t) = opts.timeout {
        w.put_str0("timeout");
        w.put_str0(fmt_u64(&mut num, u64::from(t)));
    }
    if opts.tsize {
        w.put_str0("tsize");
        w.put_str0(fmt_u64(&mut num, tsize));
    }
    if let Some(ws) = opts.windowsize {
        w.put_str0("windowsize");
        w.put_str0(fmt_u64(&mut num, u64::from(ws)));
    }
    w.finish()
}

/// The 4-byte header of DATA block `block`; the payload follows it in the same buffer.
pub fn encode_data_header(buf: &mut [u8], block: u16) -> Result<usize, BufferTooSmall> {
    let mut w = Writer::new(buf);
    w.put_u16(OP_DATA);
    w.put_u16(block);
    w.finish()
}

pub fn encode_ack(buf: &mut [u8], block: u16) -> Result<usize, BufferTooSmall> {
    let mut w = Writer::new(buf);
    w.put_u16(OP_ACK);
    w.put_u16(block);
    w.finish()
}

pub fn encode_error(buf: &mut [u8], code: u16, message: &str) -> Result<usize, BufferTooSmall> {
    let mut w = Writer::new(buf);
    w.put_u16(OP_ERROR);
    w.put_u16(code);
    w.put_str0(message);
    w.finish()
}

/// Decimal without allocating; `u64::MAX` fits in 20 digits.
fn fmt_u64(out: &mut [u8; 20], mut v: u64) -> &str {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&out[i..]).unwrap_or("0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrq_layout_with_all_options() {
        let mut buf = [0u8; 128];
        let opts = RequestOptions {
            blksize: Some(1468),
            windowsize: Some(16),
            tsize: true,
            timeout: Some(3),
        };
        let n = encode_rrq(&mut buf, "pxelinux.0", &opts).unwrap();
        assert_eq!(
            &buf[..n],
            b"\x00\x01pxelinux.0\0octet\0blksize\x001468\0timeout\x003\0tsize\x000\0windowsize\x0016\0"
        );
    }

    #[test]
    fn wrq_states_its_size_and_data_header() {
        let mut buf = [0u8; 128];
        let opts = RequestOptions {
            blksize: Some(1428),
            tsize: true,
            ..RequestOptions::default()
        };
        let n = encode_wrq(&mut buf, "up-1", &opts, 1_048_576).unwrap();
        assert_eq!(
            &buf[..n],
            b"\x00\x02up-1\0octet\0blksize\x001428\0tsize\x001048576\0"
        );
        let n = encode_wrq(&mut buf, "u", &RequestOptions::default(), 9).unwrap();
        assert_eq!(&buf[..n], b"\x00\x02u\0octet\0");
        let n = encode_data_header(&mut buf, 0x0102).unwrap();
        assert_eq!(&buf[..n], b"\x00\x03\x01\x02");
    }

    #[test]
    fn rrq_without_options_and_too_small_buffer() {
        let mut buf = [0u8; 64];
        let n = encode_rrq(&mut buf, "a", &RequestOptions::default()).unwrap();
        assert_eq!(&buf[..n], b"\x00\x01a\0octet\0");
        let mut small = [0u8; 5];
        assert_eq!(
            encode_rrq(&mut small, "a", &RequestOptions::default()),
            Err(BufferTooSmall { needed: 10 })
        );
    }

    #[test]
    fn ack_and_error_encode() {
        let mut buf = [0u8; 32];
        let n = encode_ack(&mut buf, 0xfffe).unwrap();
        assert_eq!(&buf[..n], b"\x00\x04\xff\xfe");
        let n = encode_error(&mut buf, 5, "Unknown transfer ID").unwrap();
        assert_eq!(&buf[..n], b"\x00\x05\x00\x05Unknown transfer ID\0");
    }

    #[test]
    fn parse_data_ack_error() {
        assert_eq!(
            parse(b"\x00\x03\x01\x02abc"),
            Ok(Packet::Data {
                block: 0x0102,
                payload: b"abc"
            })
        );
        assert_eq!(
            parse(b"\x00\x03\x00\x07"),
            Ok(Packet::Data {
                block: 7,
                payload: b""
            })
        );
        assert_eq!(parse(b"\x00\x04\x00\x09"), Ok(Packet::Ack { block: 9 }));
        assert_eq!(
            parse(b"\x00\x05\x00\x01File not found\0"),
            Ok(Packet::Error {
                code: 1,
                message: "File not found"
            })
        );
        assert_eq!(
            parse(b"\x00\x05\x00\x02no nul"),
            Ok(Packet::Error {
                code: 2,
                message: "no nul"
            })
        );
        assert_eq!(
            parse(b"\x00\x01x\0octet\0"),
            Ok(Packet::Other { opcode: 1 })
        );
    }

    #[test]
    fn parse_rejects_truncated_and_bad_strings() {
        assert_eq!(parse(b""), Err(ParseError::Truncated));
        assert_eq!(parse(b"\x00"), Err(ParseError::Truncated));
        assert_eq!(parse(b"\x00\x03\x00"), Err(ParseError::Truncated));
        assert_eq!(parse(b"\x00\x05\x00\x01\xff\0"), Err(ParseError::BadString));
        assert_eq!(parse(b"\x00\x06blksize\x00512"), Err(ParseError::BadString));
        assert_eq!(parse(b"\x00\x06blksize\0"), Err(ParseError::BadString));
    }

    #[test]
    fn oack_walks_pairs() {
        let pkt = parse(b"\x00\x06blksize\x001468\0tsize\x0065536\0").unwrap();
        let Packet::Oack { options } = pkt else {
            panic!("not an OACK: {pkt:?}");
        };
        let v: Vec<_> = oack_options(options).collect();
        assert_eq!(v, vec![("blksize", "1468"), ("tsize", "65536")]);
        let Packet::Oack { options } = parse(b"\x00\x06").unwrap() else {
            panic!("empty OACK must parse");
        };
        assert_eq!(oack_options(options).count(), 0);
    }

    #[test]
    fn fmt_u64_digits() {
        let mut b = [0u8; 20];
        assert_eq!(fmt_u64(&mut b, 0), "0");
        assert_eq!(fmt_u64(&mut b, 65535), "65535");
        assert_eq!(fmt_u64(&mut b, u64::MAX), "18446744073709551615");
    }
}

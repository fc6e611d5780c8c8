//! `packet`: the input is one datagram. Parsing never panics; what parses
//! re-emits to the size `buffer_len` promised and parses back equal; a
//! buffer one byte short is refused with that size. ERROR packets cut to a
//! small buffer stay well-formed.

use ringtftpd::proto::{self, BufferTooSmall, ErrorCode, Packet};

pub fn run(data: &[u8]) {
    if let Ok(packet) = Packet::parse(data) {
        roundtrip(&packet);
    }
    cut_error(data);
}

fn roundtrip(packet: &Packet<'_>) {
    let len = packet.buffer_len();
    let mut buf = vec![0u8; len];
    let n = match packet.emit(&mut buf) {
        Ok(n) => n,
        Err(e) => panic!("emit into buffer_len() bytes failed: {e} for {packet:?}"),
    };
    assert_eq!(n, len, "emit wrote other than buffer_len() for {packet:?}");
    match Packet::parse(&buf[..n]) {
        Ok(again) => assert_eq!(&again, packet, "re-parse differs; wire {:?}", &buf[..n]),
        Err(e) => panic!(
            "emitted packet does not parse ({e}): {packet:?} as {:?}",
            &buf[..n]
        ),
    }
    if let Some(short) = n.checked_sub(1) {
        let mut small = vec![0u8; short];
        assert_eq!(
            packet.emit(&mut small),
            Err(BufferTooSmall { required: n }),
            "a buffer one byte short must be refused"
        );
    }
}

/// `emit_error` with a message and a buffer size taken from the input.
fn cut_error(data: &[u8]) {
    let (head, rest) = data.split_at(data.len().min(3));
    let code = ErrorCode::from_u16(u16::from_be_bytes([
        head.first().copied().unwrap_or(0),
        head.get(1).copied().unwrap_or(0),
    ]));
    let size = usize::from(head.get(2).copied().unwrap_or(0)) * 3;
    let message = String::from_utf8_lossy(rest);
    let mut buf = vec![0u8; size];
    match proto::emit_error(code, &message, &mut buf) {
        Ok(n) => {
            assert!(n <= size);
            match Packet::parse(&buf[..n]) {
                Ok(Packet::Error {
                    code: got,
                    message: sent,
                }) => {
                    assert_eq!(got, code);
                    // Cut, never altered (the first NUL, if any, ends it).
                    let raw = message.as_bytes();
                    let expect = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
                    assert!(expect.starts_with(sent), "message altered: {sent:?}");
                }
                other => panic!("emit_error wrote {other:?}"),
            }
        }
        Err(BufferTooSmall { required }) => {
            // Only a buffer without room for the header and NUL is refused.
            assert!(size < 5, "refused a {size}-byte buffer (needs {required})");
        }
    }
}

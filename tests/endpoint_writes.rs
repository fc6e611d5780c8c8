//! `Endpoint` and write requests, sans-IO: the upload policy (off, the
//! size limit, the sink's refusals), negotiation, the bytes handed out to
//! store, and the final ACK held back until the file is stored.

mod sim;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ringtftpd::endpoint::{DatagramOutcome, EndpointConfig, RequestOutcome, SessionId};
use ringtftpd::files::{OpenError, Sink, Source};
use ringtftpd::proto::{ErrorCode, Mode, Packet};
use ringtftpd::session::Outcome;
use sim::*;

fn peer(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), port)
}

fn wrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    request(2, name, "octet", options)
}

fn data(block: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![0, 3];
    d.extend_from_slice(&block.to_be_bytes());
    d.extend_from_slice(payload);
    d
}

/// Names the sink refuses, and with what.
const REFUSED: &[(&str, OpenError)] = &[
    ("missing/x", OpenError::NotFound),
    ("locked", OpenError::NotReadable),
    ("full/x", OpenError::DiskFull),
    ("dir", OpenError::NotRegular),
];

/// A sink that records what it was asked; handles number the uploads.
#[derive(Default)]
struct Recorder {
    asked: Vec<(String, Option<u64>)>,
}

impl Source for Recorder {
    type Handle = usize;

    fn open_read(&mut self, _: &[u8], _: Mode) -> Result<(usize, u64), OpenError> {
        Err(OpenError::NotFound)
    }
}

impl Sink for Recorder {
    fn open_write(
        &mut self,
        filename: &[u8],
        _mode: Mode,
        tsize: Option<u64>,
    ) -> Result<usize, OpenError> {
        let name = String::from_utf8_lossy(filename).into_owned();
        self.asked.push((name.clone(), tsize));
        match REFUSED.iter().find(|(n, _)| *n == name) {
            Some((_, e)) => Err(e.clone()),
            None => Ok(self.asked.len()),
        }
    }
}

type Fixture = Desk<Recorder>;

impl Fixture {
    fn recording(config: EndpointConfig) -> Self {
        let mut f = Desk::new(config, Recorder::default());
        f.mtu = Some(9000);
        f
    }

    fn uploads() -> Self {
        Self::recording(EndpointConfig {
            max_upload_blksize: 1000,
            settings: Settings {
                uploads: true,
                max_upload: Some(10_000),
                ..settings()
            },
            ..config()
        })
    }

    /// Everything session `id` sends now, parsed.
    fn sent(&mut self, id: SessionId) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(t) = self.endpoint.poll_transmit(self.now, id, &mut self.buf) {
            assert!(t.payload().is_none(), "an upload's session sent file bytes");
            out.push(format!(
                "{:?}",
                Packet::parse(&self.buf[..t.header_len()]).unwrap()
            ));
        }
        out
    }

    /// DATA `block` from `from`: the bytes to store, as (offset, len, last).
    fn deliver(
        &mut self,
        id: SessionId,
        from: SocketAddr,
        block: u16,
        payload: &[u8],
    ) -> Option<(u64, usize, bool)> {
        let d = data(block, payload);
        match self
            .endpoint
            .handle_datagram(self.now, id, from, &d, &mut self.buf)
        {
            DatagramOutcome::Received(r) => {
                assert_eq!(r.bytes, payload, "the bytes handed out are the DATA's");
                Some((r.offset, r.bytes.len(), r.last))
            }
            DatagramOutcome::Delivered => None,
            other => panic!("DATA from the peer: {other:?}"),
        }
    }
}

#[test]
fn write_requests_are_refused_with_error_2_while_uploads_are_off() {
    let mut f = Fixture::recording(config());
    let (code, message) = f.refused(peer(1), &wrq("new.cfg", &[]));
    assert_eq!(code, ErrorCode::AccessViolation);
    assert!(message.contains("uploads are disabled"), "{message}");
    assert!(f.files.asked.is_empty(), "the sink was asked");
}

#[test]
fn a_tsize_over_the_limit_is_refused_with_error_3_before_the_sink_is_asked() {
    let mut f = Fixture::uploads();
    let (code, _) = f.refused(peer(1), &wrq("big.img", &[("tsize", "10001")]));
    assert_eq!(code, ErrorCode::DiskFull);
    assert!(f.files.asked.is_empty(), "refused before any file was made");
    // At the limit it starts, and the sink hears the size announced.
    f.started(peer(2), &wrq("ok.img", &[("tsize", "10000")]));
    assert_eq!(f.files.asked, [("ok.img".to_string(), Some(10_000))]);
}

#[test]
fn the_sinks_refusals_keep_their_codes() {
    let mut f = Fixture::uploads();
    for (i, (name, error)) in REFUSED.iter().enumerate() {
        let (code, message) = f.refused(peer(10 + i as u16), &wrq(name, &[]));
        let want = match error {
            OpenError::NotFound => ErrorCode::FileNotFound,
            OpenError::DiskFull => ErrorCode::DiskFull,
            _ => ErrorCode::AccessViolation,
        };
        assert_eq!(code, want, "{name}: {message}");
    }
    assert!(f.endpoint.is_empty());
}

#[test]
fn an_upload_is_negotiated_handed_out_in_order_and_acked_only_once_stored() {
    let mut f = Fixture::uploads();
    let client = peer(7);
    let id = f.started(
        client,
        &wrq(
            "cfg.bak",
            &[("blksize", "1468"), ("tsize", "3000"), ("windowsize", "2")],
        ),
    );
    // blksize lowered to what the driver can receive; tsize echoed.
    let oack = f.sent(id);
    assert_eq!(oack.len(), 1, "{oack:?}");
    for part in [
        "blksize: Some(1000)",
        "tsize: Some(3000)",
        "windowsize: Some(2)",
    ] {
        assert!(oack[0].contains(part), "{oack:?}");
    }
    let block = vec![0x5a; 1000];
    assert_eq!(f.deliver(id, client, 1, &block), Some((0, 1000, false)));
    assert!(f.sent(id).is_empty(), "ACK before the window is full");
    // A stranger's DATA is answered with ERROR 5 and stored nowhere.
    assert!(matches!(
        f.deliver_from_stranger(id),
        DatagramOutcome::Reply(_)
    ));
    assert_eq!(f.deliver(id, client, 2, &block), Some((1000, 1000, false)));
    assert_eq!(f.sent(id), ["Ack { block: 2 }"]);
    // A repeat is acknowledged by nothing new and handed out never again.
    assert_eq!(f.deliver(id, client, 2, &block), None);
    assert_eq!(f.deliver(id, client, 3, &block), Some((2000, 1000, false)));
    // Exactly 3000 bytes: an empty DATA 4 ends it.
    assert_eq!(f.deliver(id, client, 4, &[]), Some((3000, 0, true)));
    assert!(
        f.sent(id).is_empty(),
        "final ACK before the file was stored"
    );
    f.endpoint.commit_done(f.now, id);
    assert_eq!(f.sent(id), ["Ack { block: 4 }"]);
    // It dallies, answering a repeat of the final DATA, then ends.
    assert!(f.endpoint.poll_event(id).is_none(), "ended while dallying");
    f.now = f.endpoint.poll_timeout(id).expect("dally deadline");
    f.endpoint.handle_timeout(f.now, id);
    assert!(f.sent(id).is_empty());
    let done = f.endpoint.poll_event(id).expect("ended after the dally");
    assert!(done.write);
    assert_eq!(done.outcome, Outcome::Completed);
    assert_eq!(done.stats.bytes_acked, 3000);
    let line = done.to_string();
    assert!(line.contains("direction=write bytes=3000"), "{line}");
}

#[test]
fn more_than_the_announced_tsize_ends_the_upload_with_error_3() {
    let mut f = Fixture::uploads();
    let client = peer(8);
    let id = f.started(client, &wrq("liar", &[("tsize", "600")]));
    assert_eq!(f.sent(id).len(), 1); // OACK
    assert!(f.deliver(id, client, 1, &[1; 512]).is_some());
    assert_eq!(f.sent(id), ["Ack { block: 1 }"]);
    assert_eq!(f.deliver(id, client, 2, &[2; 512]), None);
    let sent = f.sent(id);
    assert_eq!(sent.len(), 1);
    assert!(sent[0].contains("DiskFull"), "{sent:?}");
    let done = f.endpoint.poll_event(id).expect("ended with the ERROR");
    assert_eq!(done.outcome, Outcome::Aborted(ErrorCode::DiskFull));
}

#[test]
fn a_retransmitted_wrq_starts_no_second_upload() {
    let mut f = Fixture::uploads();
    let client = peer(9);
    let id = f.started(client, &wrq("again", &[]));
    assert_eq!(f.sent(id), ["Ack { block: 0 }"]);
    assert_eq!(
        f.request(client, &wrq("again", &[])),
        RequestOutcome::Ignored
    );
    assert_eq!(f.files.asked.len(), 1);
    // Its lost ACK 0 is resent by the session's own timer.
    f.now = f.endpoint.poll_timeout(id).expect("ACK 0 timer");
    f.endpoint.handle_timeout(f.now, id);
    assert_eq!(f.sent(id), ["Ack { block: 0 }"]);
}

impl Fixture {
    fn deliver_from_stranger(&mut self, id: SessionId) -> DatagramOutcome<'static> {
        let d = data(2, &[0; 10]);
        match self
            .endpoint
            .handle_datagram(self.now, id, peer(9999), &d, &mut self.buf)
        {
            DatagramOutcome::Reply(n) => DatagramOutcome::Reply(n),
            DatagramOutcome::Ignored => DatagramOutcome::Ignored,
            _ => DatagramOutcome::Delivered,
        }
    }
}

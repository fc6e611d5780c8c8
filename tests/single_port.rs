//! `--single-port`, sans-IO: the endpoint tells the datagrams at the
//! listener apart by client address and port (`Endpoint::route`), keeps
//! that map in step with its sessions, answers strangers' ACKs with
//! ERROR 5 within the limit for unconfirmed sources, and decides what a
//! second request from the address and port of a running transfer means.

mod sim;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ringtftpd::endpoint::{DatagramOutcome, EndpointConfig, RequestOutcome, Route, SessionId};
use ringtftpd::files::{OpenError, Sink, Source};
use ringtftpd::proto::{ErrorCode, Mode, Packet};
use ringtftpd::refusal::RefusalKind;
use ringtftpd::session::Outcome;
use sim::*;

fn peer(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), port)
}

fn rrq(name: &str) -> Vec<u8> {
    request(1, name, "octet", &[])
}

fn ack(block: u16) -> Vec<u8> {
    let b = block.to_be_bytes();
    vec![0, 4, b[0], b[1]]
}

fn single_port() -> EndpointConfig {
    EndpointConfig {
        single_port: true,
        ..config()
    }
}

/// An endpoint serving a.bin (3000 bytes) and b.bin (1500 bytes).
fn fixture(config: EndpointConfig) -> Desk<MemFiles> {
    let mut files = MemFiles::default();
    files.insert("a.bin", content(3000, 1));
    files.insert("b.bin", content(1500, 2));
    Desk::new(config, files)
}

/// What session `id` sends now: (block, payload) of each DATA, and
/// anything else as its parsed form.
fn drain(f: &mut Desk<MemFiles>, id: SessionId) -> Vec<Result<(u16, Vec<u8>), String>> {
    let mut out = Vec::new();
    while let Some(t) = f.endpoint.poll_transmit(f.now, id, &mut f.buf) {
        let header = f.buf[..t.header_len()].to_vec();
        match t.payload() {
            Some(p) => {
                let data = f.endpoint.session(id).unwrap().handle.clone();
                let block = u16::from_be_bytes([header[2], header[3]]);
                out.push(Ok((
                    block,
                    data[p.offset as usize..p.offset as usize + p.len].to_vec(),
                )));
            }
            None => out.push(Err(format!("{:?}", Packet::parse(&header).unwrap()))),
        }
    }
    out
}

/// A datagram from `from` at the listener, routed as the driver does.
fn at_listener(f: &mut Desk<MemFiles>, from: SocketAddr, datagram: &[u8]) -> Route {
    let route = f.endpoint.route(from, datagram);
    if let Route::Session(id) = route {
        let outcome = f
            .endpoint
            .handle_datagram(f.now, id, from, datagram, &mut f.buf);
        assert_eq!(outcome, DatagramOutcome::Delivered);
    }
    route
}

/// The ERROR in the reply buffer after `Reply(n)`.
fn error_in(f: &Desk<MemFiles>, outcome: RequestOutcome) -> ErrorCode {
    match outcome {
        RequestOutcome::Reply(n) => match Packet::parse(&f.buf[..n]) {
            Ok(Packet::Error { code, .. }) => code,
            other => panic!("not an ERROR: {other:?}"),
        },
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn two_clients_on_one_address_are_told_apart_by_port() {
    let mut f = fixture(single_port());
    let (pa, pb) = (peer(5000), peer(5001));
    let a = f.started(pa, &rrq("a.bin"));
    let b = f.started(pb, &rrq("b.bin"));
    let mut got = [Vec::new(), Vec::new()];
    let mut pending = [drain(&mut f, a), drain(&mut f, b)];
    // Lock step, the two interleaved: every ACK reaches its own session.
    for _ in 0..20 {
        for (k, (p, id)) in [(pa, a), (pb, b)].into_iter().enumerate() {
            let Some(Ok((block, bytes))) = pending[k].pop() else {
                continue;
            };
            got[k].extend_from_slice(&bytes);
            assert_eq!(at_listener(&mut f, p, &ack(block)), Route::Session(id));
            pending[k] = drain(&mut f, id);
        }
    }
    assert_eq!(got[0], content(3000, 1));
    assert_eq!(got[1], content(1500, 2));
    // Both ended with their final ACK, and freed their routes.
    assert_eq!(
        f.endpoint.poll_event(a).unwrap().outcome,
        Outcome::Completed
    );
    assert_eq!(
        f.endpoint.poll_event(b).unwrap().outcome,
        Outcome::Completed
    );
    assert_eq!(f.endpoint.route(pa, &ack(6)), Route::Request { live: None });
    assert_eq!(f.endpoint.route(pb, &ack(3)), Route::Request { live: None });
}

#[test]
fn requests_go_to_the_listener_and_acks_to_their_session() {
    let mut f = fixture(single_port());
    let p = peer(6000);
    let id = f.started(p, &rrq("a.bin"));
    assert_eq!(f.endpoint.route(p, &ack(1)), Route::Session(id));
    // DATA and ERROR of the peer are its session's too; a request is not.
    assert_eq!(f.endpoint.route(p, &[0, 5, 0, 0, 0]), Route::Session(id));
    assert_eq!(
        f.endpoint.route(p, &rrq("b.bin")),
        Route::Request { live: Some(id) }
    );
    assert_eq!(
        f.endpoint.route(p, &request(2, "x", "octet", &[])),
        Route::Request { live: Some(id) }
    );
    // Same address, another port: a stranger.
    assert_eq!(
        f.endpoint.route(peer(6001), &ack(1)),
        Route::Request { live: None }
    );
    // Without --single-port nothing at the listener belongs to a session.
    let mut normal = fixture(config());
    normal.started(p, &rrq("a.bin"));
    assert_eq!(
        normal.endpoint.route(p, &ack(1)),
        Route::Request { live: None }
    );
}

#[test]
fn every_way_a_session_ends_removes_its_route() {
    let mut f = fixture(single_port());
    // Completed.
    let p = peer(7000);
    let id = f.started(p, &rrq("b.bin"));
    for block in 1..=3 {
        drain(&mut f, id);
        at_listener(&mut f, p, &ack(block));
    }
    drain(&mut f, id);
    assert!(f.endpoint.poll_event(id).is_some());
    assert_eq!(f.endpoint.route(p, &ack(3)), Route::Request { live: None });
    // Removed by the driver.
    let p = peer(7001);
    let id = f.started(p, &rrq("a.bin"));
    assert!(f.endpoint.remove(id).is_some());
    assert_eq!(f.endpoint.route(p, &ack(1)), Route::Request { live: None });
    // Given up after its retries.
    let p = peer(7002);
    let id = f.started(p, &rrq("a.bin"));
    for _ in 0..100 {
        drain(&mut f, id);
        let Some(deadline) = f.endpoint.poll_timeout(id) else {
            break;
        };
        f.now = deadline;
        f.endpoint.handle_timeout(f.now, id);
    }
    drain(&mut f, id);
    assert_eq!(
        f.endpoint.poll_event(id).unwrap().outcome,
        Outcome::TimedOut
    );
    assert_eq!(f.endpoint.route(p, &ack(1)), Route::Request { live: None });
    // The peer's ERROR.
    let p = peer(7003);
    let id = f.started(p, &rrq("a.bin"));
    drain(&mut f, id);
    at_listener(&mut f, p, &[0, 5, 0, 0, b'x', 0]);
    assert!(f.endpoint.poll_event(id).is_some());
    assert_eq!(f.endpoint.route(p, &ack(1)), Route::Request { live: None });
    // Shutting down ends no session: its ACKs are still routed, new
    // requests refused.
    let p = peer(7004);
    let id = f.started(p, &rrq("a.bin"));
    f.endpoint.shut_down();
    assert_eq!(f.endpoint.route(p, &ack(1)), Route::Session(id));
    let refused = f.request(peer(7005), &rrq("a.bin"));
    assert_eq!(error_in(&f, refused), ErrorCode::NotDefined);
    assert!(f.endpoint.remove(id).is_some());
    assert!(f.endpoint.is_empty());
    assert_eq!(f.endpoint.route(p, &ack(1)), Route::Request { live: None });
}

#[test]
fn a_strangers_ack_gets_error_5_within_the_limit_for_unconfirmed_sources() {
    let mut f = fixture(single_port());
    // settings(): a burst of 5 replies to input that may be forged.
    for _ in 0..5 {
        let outcome = f.request(peer(8000), &ack(3));
        assert_eq!(error_in(&f, outcome), ErrorCode::UnknownTid);
    }
    assert_eq!(f.request(peer(8000), &ack(3)), RequestOutcome::Ignored);
    // Garbage shares that limit; an ERROR is never answered.
    assert_eq!(f.request(peer(8001), b"\x00"), RequestOutcome::Ignored);
    assert_eq!(
        f.request(peer(8002), &[0, 5, 0, 1, 0]),
        RequestOutcome::Ignored
    );
    let refusals = f.endpoint.refusals();
    assert_eq!(refusals.get(RefusalKind::Stranger), 6);
    assert_eq!(refusals.replies_suppressed, 2);
    // Without --single-port an ACK at the listener is not a request: ERROR 4.
    let mut normal = fixture(config());
    let outcome = normal.request(peer(8000), &ack(3));
    assert_eq!(error_in(&normal, outcome), ErrorCode::IllegalOperation);
}

#[test]
fn the_same_request_again_is_a_repeat_even_after_progress() {
    let mut f = fixture(single_port());
    let p = peer(9000);
    let id = f.started(p, &rrq("a.bin"));
    assert_eq!(f.request(p, &rrq("a.bin")), RequestOutcome::Ignored);
    drain(&mut f, id);
    at_listener(&mut f, p, &ack(1));
    // A late copy of the request must not restart the transfer under way.
    assert_eq!(f.request(p, &rrq("a.bin")), RequestOutcome::Ignored);
    assert_eq!(f.endpoint.route(p, &ack(2)), Route::Session(id));
    assert_eq!(f.endpoint.len(), 1);
    // With a port per transfer the same request after progress is a new
    // transfer (its copies are told apart by their TIDs).
    let mut normal = fixture(config());
    let first = normal.started(p, &rrq("a.bin"));
    drain(&mut normal, first);
    normal
        .endpoint
        .handle_datagram(normal.now, first, p, &ack(1), &mut normal.buf);
    assert!(matches!(
        normal.request(p, &rrq("a.bin")),
        RequestOutcome::Started(_)
    ));
}

#[test]
fn another_request_from_a_running_transfers_port_replaces_it_silently() {
    let mut f = fixture(single_port());
    let p = peer(9100);
    let old = f.started(p, &rrq("a.bin"));
    drain(&mut f, old);
    at_listener(&mut f, p, &ack(1));
    let Route::Request { live } = f.endpoint.route(p, &rrq("b.bin")) else {
        panic!("a request must go to handle_request");
    };
    assert_eq!(live, Some(old));
    let new = f.started(p, &rrq("b.bin"));
    // The old one ends without an ERROR (the client would take it for the
    // answer to its new request) and frees its slot.
    assert_eq!(drain(&mut f, old), vec![]);
    let finished = f.endpoint.poll_event(old).expect("the old transfer ended");
    assert_eq!(finished.filename, "a.bin");
    assert!(matches!(finished.outcome, Outcome::Aborted(_)));
    assert_eq!(f.endpoint.len(), 1);
    // The client's ACKs now reach the new transfer.
    let sent = drain(&mut f, new);
    assert_eq!(sent, vec![Ok((1, content(1500, 2)[..512].to_vec()))]);
    assert_eq!(at_listener(&mut f, p, &ack(1)), Route::Session(new));
    // A refused request ends the old transfer all the same: the client
    // gave it up.
    let p = peer(9101);
    let old = f.started(p, &rrq("a.bin"));
    let refused = f.request(p, &rrq("missing"));
    assert_eq!(error_in(&f, refused), ErrorCode::FileNotFound);
    assert!(f.endpoint.poll_event(old).is_some());
    assert_eq!(f.endpoint.route(p, &ack(1)), Route::Request { live: None });
}

/// A sink taking every upload; handles number them.
#[derive(Default)]
struct Uploads(usize);

impl Source for Uploads {
    type Handle = usize;

    fn open_read(&mut self, _: &[u8], _: Mode) -> Result<(usize, u64), OpenError> {
        Err(OpenError::NotFound)
    }
}

impl Sink for Uploads {
    fn open_write(&mut self, _: &[u8], _: Mode, _: Option<u64>) -> Result<usize, OpenError> {
        self.0 += 1;
        Ok(self.0)
    }
}

#[test]
fn an_upload_takes_its_data_at_the_listener_and_its_port_is_free_after_the_dally() {
    let mut f = Desk::new(
        EndpointConfig {
            single_port: true,
            settings: Settings {
                uploads: true,
                ..settings()
            },
            ..config()
        },
        Uploads::default(),
    );
    let p = peer(9200);
    let id = f.started(p, &request(2, "up.bin", "octet", &[]));
    let acks = |f: &mut Desk<Uploads>| {
        let mut out = Vec::new();
        while let Some(t) = f.endpoint.poll_transmit(f.now, id, &mut f.buf) {
            out.push(format!(
                "{:?}",
                Packet::parse(&f.buf[..t.header_len()]).unwrap()
            ));
        }
        out
    };
    assert_eq!(acks(&mut f), ["Ack { block: 0 }"]);
    let body = content(700, 3);
    for (block, chunk) in [(1u16, &body[..512]), (2, &body[512..])] {
        let mut d = vec![0, 3, 0, block as u8];
        d.extend_from_slice(chunk);
        assert_eq!(f.endpoint.route(p, &d), Route::Session(id));
        match f.endpoint.handle_datagram(f.now, id, p, &d, &mut f.buf) {
            DatagramOutcome::Received(r) => assert_eq!(r.bytes, chunk),
            other => panic!("DATA {block}: {other:?}"),
        }
        if block == 1 {
            assert_eq!(acks(&mut f), ["Ack { block: 1 }"]);
        }
    }
    // The final ACK waits until the file is stored.
    assert_eq!(acks(&mut f), Vec::<String>::new());
    f.endpoint.commit_done(f.now, id);
    assert_eq!(acks(&mut f), ["Ack { block: 2 }"]);
    // Dallying for a repeat of the final DATA, the client starts its next
    // upload from the same port: the stored one ends complete.
    f.now += Duration::from_millis(1);
    let next = f.started(p, &request(2, "up2.bin", "octet", &[]));
    assert_eq!(acks(&mut f), Vec::<String>::new());
    let done = f.endpoint.poll_event(id).expect("the dally ended");
    assert_eq!(done.outcome, Outcome::Completed);
    assert_eq!(f.endpoint.route(p, &ack(0)), Route::Session(next));
}

#[test]
fn a_lossy_transfer_runs_to_the_end_through_the_listener() {
    let file = content(200_000, 4);
    // The RRQ twice, its first answer lost, ACKs and DATA lost or doubled
    // here and there: the second RRQ and every ACK go through `route`
    // (see Sim).
    let mut sim = Sim::with_config(
        &file,
        &[("blksize", "1024"), ("windowsize", "8")],
        single_port(),
    )
    .link(|dir, p, i| match (dir, p) {
        (Dir::ToServer, Packet::Rrq(_)) => Fate::Duplicate,
        (Dir::ToClient, Packet::Oack(_)) if i == 0 => Fate::Drop,
        (Dir::ToClient, Packet::Data { .. }) if i % 17 == 5 => Fate::Drop,
        (Dir::ToServer, Packet::Ack { .. }) if i % 11 == 3 => Fate::Drop,
        (Dir::ToServer, Packet::Ack { .. }) if i % 13 == 4 => Fate::Duplicate,
        _ => Fate::Deliver,
    });
    sim.drive();
    assert_eq!(sim.outcome, Some(Outcome::Completed));
    assert_eq!(sim.client.received, file);
    assert!(sim.data_sent() > 200_000 / 1024 + 1, "no DATA was resent");
    assert!(sim.endpoint.is_empty());
    assert_eq!(
        sim.endpoint.route(sim.peer, &ack(1)),
        Route::Request { live: None }
    );
}

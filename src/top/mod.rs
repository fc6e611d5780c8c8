//! `ringtftpd top`: the running server at a terminal. It polls the
//! `--metrics` endpoint (`/metrics` for the totals, `/transfers` for the
//! live transfers, see [`live`]) every `--interval` and redraws in place
//! with ratatui: active transfers (sortable), totals and rates per
//! second, refusals by reason, per-shard load.
//!
//! The command line: `ringtftpd top [ADDR] [--metrics ADDR] [--interval
//! SECS] [--sort COLUMN]` is the viewer only when `top` is the first
//! argument, standard input is not a socket (inetd hands tftpd its socket
//! there), and every argument after it is the viewer's own (its one
//! positional must look like `HOST:PORT`). Anything else is the server's
//! command line as before: a directory named `top` is served by
//! `ringtftpd ./top`, `ringtftpd -L top` or `ringtftpd top -L ...`.
//!
//! Rooms: [`live`] (the shards' side and `/transfers`), [`model`] (the
//! pure parts: text format, rates, sorting, percentiles), `screen` (the
//! drawing), and here the polling thread and the key loop.

pub mod live;
pub mod model;
mod screen;

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use live::Transfers;
use model::{Counters, Metrics, RowRates, SortKey, ViewRow};

/// The `--metrics` address `ringtftpd top` reads by default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9469";

/// `ringtftpd top`: the live view of a server started with `--metrics`.
#[derive(Debug, Clone, Parser, PartialEq)]
#[command(
    name = "ringtftpd top",
    about = "Live view of a running ringtftpd (reads its --metrics endpoint)",
    after_help = "Keys: p r t b e f c s sort by progress, rate, retransmits, bytes, elapsed, \
                  file, client, shard; i inverts the order; q (or Esc, Ctrl-C) quits."
)]
pub struct TopArgs {
    /// The server's --metrics address, HOST:PORT [default: 127.0.0.1:9469].
    #[arg(value_name = "ADDR")]
    pub addr: Option<String>,
    /// The same, as the server spells it.
    #[arg(long = "metrics", value_name = "ADDR", conflicts_with = "addr")]
    pub metrics: Option<String>,
    /// Seconds between polls (0.2 to 60).
    #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,
    /// The column to sort the transfers by at start.
    #[arg(long, value_enum, default_value_t = SortKey::Progress)]
    pub sort: SortKey,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.2..=60.0).contains(&v) {
        Ok(v)
    } else {
        Err("between 0.2 and 60 seconds".to_string())
    }
}

/// Whether `s` looks like `HOST:PORT` (so that it cannot be the server's
/// relative directory by mistake: a server given two directories needs
/// them absolute).
fn looks_like_address(s: &str) -> bool {
    s.parse::<SocketAddr>().is_ok()
        || s.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok()
        })
}

/// What argv means for `main`.
#[derive(Debug)]
pub enum Invocation {
    /// The live view.
    Top(TopArgs),
    /// `ringtftpd top --help` and the like: print this, exit 0.
    Help(clap::Error),
    /// The server's command line.
    Server,
}

/// Reads argv (program name first) as described in the module docs;
/// `stdin_is_socket` is whether inetd may have started us.
pub fn invocation(argv: &[OsString], stdin_is_socket: bool) -> Invocation {
    if stdin_is_socket || argv.get(1).map(|a| a.as_os_str()) != Some("top".as_ref()) {
        return Invocation::Server;
    }
    let rest = std::iter::once(OsString::from("ringtftpd top")).chain(argv[2..].iter().cloned());
    match TopArgs::try_parse_from(rest) {
        Ok(args) if args.addr.as_deref().is_none_or(looks_like_address) => Invocation::Top(args),
        Ok(_) => Invocation::Server,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            Invocation::Help(e)
        }
        Err(_) => Invocation::Server,
    }
}

impl TopArgs {
    /// The endpoint to read, resolved.
    pub fn endpoint(&self) -> io::Result<SocketAddr> {
        let spelled = self
            .metrics
            .as_deref()
            .or(self.addr.as_deref())
            .unwrap_or(DEFAULT_ADDR);
        spelled
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other(format!("{spelled}: no address")))
    }
}

/// `GET path` over HTTP/1.0 (tiny_http answers and closes): the body of
/// a 200, else an error naming the status.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    // Bounded: /transfers is capped at a few thousand rows.
    s.take(64 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("no HTTP header"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(io::Error::other(format!("GET {path}: HTTP {status}")));
    }
    Ok(body.to_string())
}

/// One poll of the endpoint, or why it failed.
#[derive(Debug)]
pub struct Poll {
    pub at: Instant,
    pub result: Result<(Metrics, Transfers), String>,
}

fn poll(addr: SocketAddr) -> Poll {
    let timeout = Duration::from_secs(2);
    let result = (|| {
        let metrics = http_get(addr, "/metrics", timeout).map_err(|e| e.to_string())?;
        let transfers = http_get(addr, "/transfers", timeout).map_err(|e| e.to_string())?;
        let transfers: Transfers =
            serde_json::from_str(&transfers).map_err(|e| format!("/transfers: {e}"))?;
        Ok((Metrics::parse(&metrics), transfers))
    })();
    Poll {
        at: Instant::now(),
        result,
    }
}

/// What the screen shows; updated by polls and keys.
#[derive(Debug)]
pub struct View {
    pub addr: SocketAddr,
    pub counters: Counters,
    pub transfers: Transfers,
    pub rows: Vec<ViewRow>,
    rates: RowRates,
    pub sort: SortKey,
    pub reversed: bool,
    pub error: Option<String>,
    pub polls: u64,
    last_poll: Option<Instant>,
    /// The first active-transfer row shown (scrolled with the arrow keys,
    /// PgUp, PgDn, Home and End).
    pub scroll: usize,
    /// Rows the table showed at the last draw: a page.
    pub page: std::cell::Cell<usize>,
}

impl View {
    pub fn new(addr: SocketAddr, sort: SortKey) -> View {
        View {
            addr,
            counters: Counters::default(),
            transfers: Transfers::default(),
            rows: Vec::new(),
            rates: RowRates::default(),
            sort,
            reversed: false,
            error: None,
            polls: 0,
            last_poll: None,
            scroll: 0,
            page: std::cell::Cell::new(1),
        }
    }

    pub fn apply(&mut self, poll: Poll) {
        match poll.result {
            Ok((metrics, transfers)) => {
                let dt = self
                    .last_poll
                    .map_or(Duration::ZERO, |t| poll.at.saturating_duration_since(t));
                self.counters.push(metrics, dt);
                self.rows = self.rates.update(&transfers);
                self.transfers = transfers;
                self.last_poll = Some(poll.at);
                self.error = None;
                self.polls += 1;
                self.resort();
            }
            Err(e) => self.error = Some(e),
        }
    }

    fn resort(&mut self) {
        model::sort_rows(&mut self.rows, self.sort, self.reversed);
    }

    /// A key: false to quit.
    pub fn key(&mut self, code: KeyCode, modifiers: KeyModifiers) -> bool {
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => return false,
            KeyCode::Char('i') => self.reversed = !self.reversed,
            KeyCode::Up => self.scroll = self.scroll.saturating_sub(1),
            KeyCode::Down => self.scroll += 1,
            KeyCode::PageUp => self.scroll = self.scroll.saturating_sub(self.page.get()),
            KeyCode::PageDown => self.scroll += self.page.get(),
            KeyCode::Home => self.scroll = 0,
            KeyCode::End => self.scroll = usize::MAX,
            KeyCode::Char(c) => {
                if let Some(key) = SortKey::from_key(c) {
                    if key == self.sort {
                        self.reversed = !self.reversed;
                    } else {
                        self.sort = key;
                        self.reversed = false;
                    }
                }
            }
            _ => {}
        }
        self.resort();
        self.scroll = self.first_row();
        true
    }

    /// The first row to show: `scroll`, held so the last page is full.
    pub fn first_row(&self) -> usize {
        self.scroll
            .min(self.rows.len().saturating_sub(self.page.get().max(1)))
    }
}

/// Runs the viewer until q; the exit status.
pub fn main(args: TopArgs) -> i32 {
    let addr = match args.endpoint() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("ringtftpd top: {e}");
            return 2;
        }
    };
    match run(addr, &args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ringtftpd top: {e}");
            1
        }
    }
}

fn run(addr: SocketAddr, args: &TopArgs) -> io::Result<()> {
    let interval = Duration::from_secs_f64(args.interval);
    let (tx, polls) = mpsc::sync_channel::<Poll>(1);
    // Polls off the key loop, so keys answer while a request is slow; it
    // ends when the receiver is gone.
    std::thread::Builder::new()
        .name("top-poll".into())
        .spawn(move || {
            loop {
                let started = Instant::now();
                if tx.send(poll(addr)).is_err() {
                    return;
                }
                std::thread::sleep(interval.saturating_sub(started.elapsed()));
            }
        })?;
    let mut view = View::new(addr, args.sort);
    let mut terminal = ratatui::try_init()?;
    let result = (|| -> io::Result<()> {
        loop {
            terminal.draw(|frame| screen::draw(frame, &view))?;
            if event::poll(Duration::from_millis(100))?
                && let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
                && !view.key(key.code, key.modifiers)
            {
                return Ok(());
            }
            while let Ok(p) = polls.try_recv() {
                view.apply(p);
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("ringtftpd")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn is_top(args: &[&str]) -> Option<TopArgs> {
        match invocation(&argv(args), false) {
            Invocation::Top(a) => Some(a),
            _ => None,
        }
    }

    #[test]
    fn top_is_dispatched_only_when_it_is_the_whole_command_line() {
        let a = is_top(&["top"]).unwrap();
        assert_eq!(a.endpoint().unwrap(), DEFAULT_ADDR.parse().unwrap());
        let a = is_top(&["top", "127.0.0.1:9000"]).unwrap();
        assert_eq!(a.endpoint().unwrap().port(), 9000);
        let a = is_top(&["top", "--metrics", "[::1]:9001", "--sort", "file"]).unwrap();
        assert_eq!(
            (a.endpoint().unwrap().port(), a.sort),
            (9001, SortKey::File)
        );
        assert!(is_top(&["top", "localhost:9469", "--interval", "0.5"]).is_some());
        // The server's command lines, a directory named top among them.
        for server in [
            &["-L", "top"][..],
            &["./top"],
            &["top", "-L"],
            &["top", "--address", "127.0.0.1:69"],
            &["top", "/srv/tftp"],
            &["top", "other"],
            &["top", "--interval", "1000"],
            &["/srv/tftp", "top"],
            &[],
        ] {
            assert!(
                matches!(invocation(&argv(server), false), Invocation::Server),
                "{server:?}"
            );
        }
        // Under inetd (a socket on stdin) it is always the server.
        assert!(matches!(
            invocation(&argv(&["top"]), true),
            Invocation::Server
        ));
        assert!(matches!(
            invocation(&argv(&["top", "--help"]), false),
            Invocation::Help(_)
        ));
    }

    #[test]
    fn keys_change_the_sort_and_quit() {
        let mut v = View::new(DEFAULT_ADDR.parse().unwrap(), SortKey::Progress);
        assert!(v.key(KeyCode::Char('f'), KeyModifiers::NONE));
        assert_eq!((v.sort, v.reversed), (SortKey::File, false));
        assert!(v.key(KeyCode::Char('f'), KeyModifiers::NONE));
        assert!(v.reversed, "the same key again inverts");
        assert!(v.key(KeyCode::Char('r'), KeyModifiers::NONE));
        assert_eq!((v.sort, v.reversed), (SortKey::Rate, false));
        assert!(v.key(KeyCode::Char('i'), KeyModifiers::NONE));
        assert!(v.reversed);
        // Scrolling stays within the rows, a page at a time.
        v.page.set(1);
        assert!(v.key(KeyCode::End, KeyModifiers::NONE));
        assert_eq!(v.scroll, v.rows.len().saturating_sub(1));
        assert!(v.key(KeyCode::Down, KeyModifiers::NONE));
        assert_eq!(v.scroll, v.rows.len().saturating_sub(1));
        assert!(v.key(KeyCode::Home, KeyModifiers::NONE));
        assert_eq!(v.scroll, 0);
        assert!(v.key(KeyCode::Up, KeyModifiers::NONE));
        assert_eq!(v.scroll, 0);
        assert!(!v.key(KeyCode::Char('q'), KeyModifiers::NONE));
        assert!(!v.key(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(!v.key(KeyCode::Esc, KeyModifiers::NONE));
    }
}

//! Drawing one frame of `ringtftpd top` from a [`View`].

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};

use super::View;
use super::model::{SortKey, human_bytes, human_duration, percentiles};

const BAR: usize = 10;

/// `fraction` as a text bar of `BAR` cells.
fn bar(fraction: f64) -> String {
    let full = ((fraction.clamp(0.0, 1.0)) * BAR as f64).round() as usize;
    format!("{}{}", "#".repeat(full), ".".repeat(BAR - full))
}

fn per_sec(v: f64) -> String {
    if v == 0.0 {
        "0/s".to_string()
    } else if v < 10.0 {
        format!("{v:.1}/s")
    } else {
        format!("{v:.0}/s")
    }
}

pub(super) fn draw(frame: &mut Frame, view: &View) {
    let [title, summary, table, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(12),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let status = match &view.error {
        Some(e) => format!("ERROR: {e}"),
        None if view.polls == 0 => "connecting...".to_string(),
        None => format!("poll {}", view.polls),
    };
    let c = &view.counters;
    let mut process = String::new();
    if c.now.has("process_cpu_seconds_total") {
        let cpu = c.rate("process_cpu_seconds_total", &[]) * 100.0;
        process += &format!(" - cpu {cpu:.0}%");
    }
    if c.now.has("process_resident_memory_bytes") {
        let rss = c.total("process_resident_memory_bytes", &[]);
        process += &format!(" rss {}", human_bytes(rss));
    }
    if c.now.has("process_open_fds") {
        process += &format!(" fds {:.0}", c.total("process_open_fds", &[]));
    }
    frame.render_widget(
        Paragraph::new(format!(
            "ringtftpd top - http://{} - {status}{process}",
            view.addr
        ))
        .style(Style::new().add_modifier(Modifier::BOLD)),
        title,
    );
    let [totals, refusals, shards] = Layout::horizontal([
        Constraint::Percentage(38),
        Constraint::Percentage(26),
        Constraint::Percentage(36),
    ])
    .areas(summary);
    frame.render_widget(totals_widget(view), totals);
    frame.render_widget(refusals_widget(view), refusals);
    frame.render_widget(shards_widget(view), shards);
    // Borders and the header row take three lines.
    view.page
        .set(usize::from(table.height.saturating_sub(3)).max(1));
    frame.render_widget(transfers_widget(view), table);
    let order = if view.sort.descending() != view.reversed {
        "v"
    } else {
        "^"
    };
    frame.render_widget(
        Paragraph::new(format!(
            "sort: {} {order}   keys: p progress  r rate  t retransmits  b bytes  e elapsed  f file  c client  s shard  i invert  Up/Down PgUp/PgDn Home/End scroll  q quit",
            view.sort.name()
        )),
        footer,
    );
}

fn totals_widget(view: &View) -> Paragraph<'static> {
    let c = &view.counters;
    let line = |name: &str, total: String, rate: String| {
        Line::from(format!("{name:<12}{total:>12}  {rate:>10}"))
    };
    let count = |v: f64| format!("{v:.0}");
    let active_down = c.total("ringtftpd_transfers_active", &[("direction", "download")]);
    let active_up = c.total("ringtftpd_transfers_active", &[("direction", "upload")]);
    let failed = ["timed_out", "aborted", "client_error"]
        .iter()
        .map(|o| c.total("ringtftpd_transfers_finished_total", &[("outcome", o)]))
        .sum::<f64>();
    let failed_rate = ["timed_out", "aborted", "client_error"]
        .iter()
        .map(|o| c.rate("ringtftpd_transfers_finished_total", &[("outcome", o)]))
        .sum::<f64>();
    let pair = |name: &str, filter: &[(&str, &str)]| (c.total(name, filter), c.rate(name, filter));
    let (requests, requests_rate) = pair("ringtftpd_requests_total", &[]);
    let (started, started_rate) = pair("ringtftpd_transfers_started_total", &[]);
    let (completed, completed_rate) = pair(
        "ringtftpd_transfers_finished_total",
        &[("outcome", "completed")],
    );
    let (sent, sent_rate) = pair("ringtftpd_data_bytes_total", &[("direction", "sent")]);
    let (received, received_rate) =
        pair("ringtftpd_data_bytes_total", &[("direction", "received")]);
    let (retransmits, retransmits_rate) = pair("ringtftpd_retransmissions_total", &[]);
    let (timeouts, timeouts_rate) = pair("ringtftpd_timeouts_total", &[]);
    let mut lines = vec![
        Line::from(format!(
            "{:<12}{:>12}  ({active_down:.0} down, {active_up:.0} up)",
            "active",
            count(active_down + active_up)
        )),
        line("requests", count(requests), per_sec(requests_rate)),
        line("started", count(started), per_sec(started_rate)),
        line("completed", count(completed), per_sec(completed_rate)),
        line("failed", count(failed), per_sec(failed_rate)),
        line(
            "sent",
            human_bytes(sent),
            format!("{}/s", human_bytes(sent_rate)),
        ),
        line(
            "received",
            human_bytes(received),
            format!("{}/s", human_bytes(received_rate)),
        ),
        line("retransmits", count(retransmits), per_sec(retransmits_rate)),
        line("timeouts", count(timeouts), per_sec(timeouts_rate)),
    ];
    let rates = percentiles(view.rows.iter().map(|r| r.rate));
    lines.push(Line::from(match rates {
        Some([p50, p90, p99]) => format!(
            "live rate   p50 {}/s  p90 {}/s  p99 {}/s",
            human_bytes(p50),
            human_bytes(p90),
            human_bytes(p99)
        ),
        None => "live rate   -".to_string(),
    }));
    Paragraph::new(lines).block(Block::bordered().title(" Totals (total, per second) "))
}

fn refusals_widget(view: &View) -> Paragraph<'static> {
    let c = &view.counters;
    let mut reasons = c.now.by_label("ringtftpd_refusals_total", "reason");
    reasons.retain(|(_, v)| *v > 0.0);
    reasons.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut lines: Vec<Line> = reasons
        .iter()
        .map(|(reason, total)| {
            let rate = c.rate("ringtftpd_refusals_total", &[("reason", reason)]);
            Line::from(format!("{reason:<15}{total:>7.0} {:>8}", per_sec(rate)))
        })
        .collect();
    if lines.is_empty() {
        lines.push(Line::from("none"));
    }
    Paragraph::new(lines).block(Block::bordered().title(" Refusals by reason "))
}

fn shards_widget(view: &View) -> Table<'static> {
    let c = &view.counters;
    let shards = c.now.by_label("ringtftpd_transfers_active", "shard");
    let busiest = shards.iter().map(|s| s.1).fold(1.0f64, f64::max);
    let rows: Vec<Row> = shards
        .iter()
        .map(|(shard, active)| {
            let down = c.total(
                "ringtftpd_transfers_active",
                &[("shard", shard), ("direction", "download")],
            );
            let rate: f64 = view
                .rows
                .iter()
                .filter(|r| r.row.shard.to_string() == *shard)
                .map(|r| r.rate)
                .sum();
            Row::new(vec![
                shard.clone(),
                format!("{active:.0}"),
                format!("{down:.0}"),
                format!("{:.0}", active - down),
                format!("{}/s", human_bytes(rate)),
                bar(active / busiest),
            ])
        })
        .collect();
    Table::new(
        rows,
        [
            Constraint::Length(5),
            Constraint::Length(6),
            Constraint::Length(5),
            Constraint::Length(4),
            Constraint::Length(9),
            Constraint::Fill(1),
        ],
    )
    .header(
        Row::new(["shard", "active", "down", "up", "rate", "load"])
            .style(Style::new().add_modifier(Modifier::BOLD)),
    )
    .block(Block::bordered().title(" Shards "))
}

fn transfers_widget(view: &View) -> Table<'static> {
    let shown = view.rows.len();
    let left_out = view.transfers.left_out;
    let first = view.first_row();
    let last = (first + view.page.get()).min(shown);
    let rows_seen = if shown > last - first {
        format!(", rows {}-{last}", first + 1)
    } else {
        String::new()
    };
    let title = if left_out > 0 {
        format!(" Active transfers ({shown} shown, {left_out} more{rows_seen}) ")
    } else {
        format!(" Active transfers ({shown}{rows_seen}) ")
    };
    let mark = |key: SortKey, name: &str| {
        if key == view.sort {
            let arrow = if key.descending() != view.reversed {
                "v"
            } else {
                "^"
            };
            format!("{name} {arrow}")
        } else {
            name.to_string()
        }
    };
    let header = Row::new(vec![
        mark(SortKey::Client, "client"),
        mark(SortKey::File, "file"),
        "dir".to_string(),
        mark(SortKey::Progress, "progress"),
        mark(SortKey::Bytes, "bytes"),
        "size".to_string(),
        mark(SortKey::Rate, "rate"),
        mark(SortKey::Retransmits, "retr"),
        "blk/win".to_string(),
        mark(SortKey::Elapsed, "elapsed"),
        mark(SortKey::Shard, "sh"),
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let ages: Vec<u64> = view
        .transfers
        .shards
        .iter()
        .map(|s| s.age_ms.unwrap_or(0))
        .collect();
    let rows: Vec<Row> = view
        .rows
        .iter()
        .skip(first)
        .take(last - first)
        .map(|r| {
            let t = &r.row;
            let progress = match t.progress() {
                Some(p) => format!("{:>5.1}% {}", p * 100.0, bar(p)),
                None => "    ?".to_string(),
            };
            let age = ages.get(usize::from(t.shard)).copied().unwrap_or(0);
            Row::new(vec![
                t.client.to_string(),
                t.file.clone(),
                if t.direction == "upload" {
                    "up"
                } else {
                    "down"
                }
                .to_string(),
                progress,
                human_bytes(t.bytes as f64),
                t.total.map_or("?".to_string(), |n| human_bytes(n as f64)),
                format!("{}/s", human_bytes(r.rate)),
                t.retransmits.to_string(),
                format!("{}/{}", t.blksize, t.windowsize),
                human_duration(t.elapsed_ms + age),
                t.shard.to_string(),
            ])
        })
        .collect();
    Table::new(
        rows,
        [
            Constraint::Length(21),
            Constraint::Fill(1),
            Constraint::Length(4),
            Constraint::Length(17),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(4),
        ],
    )
    .header(header)
    .block(Block::bordered().title(title))
}

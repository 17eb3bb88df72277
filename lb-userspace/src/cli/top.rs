//! `lb top`: a live view of `lb stats` in the terminal (ratatui), refreshed
//! every interval: per VIP and per backend packets/s, bytes/s, active
//! flows, health and drops. q, Esc or Ctrl-C quits.

use std::path::Path;
use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Row, Table};

use super::{Failure, ask};
use crate::api::{Body, Request, StatsView};

/// What the screen shows: the last stats, and the last refresh's error.
struct Screen {
    stats: StatsView,
    /// Datapath drops per second over all reasons, from the last two refreshes.
    drops_per_second: f64,
    last_drops: (Instant, u64),
    error: Option<String>,
    socket: String,
}

pub fn run(socket: &Path, interval: f64, json: bool) -> Result<(), Failure> {
    // The first read happens before the screen is taken, so that a daemon
    // that is not running is reported (and exits) as for any command.
    let stats = fetch(socket)?;
    // Without a terminal to draw on (a pipe, a script, cron), or with
    // --json, one snapshot: what `lb stats` prints.
    if json || !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        if !json {
            eprintln!("lb top: standard output is not a terminal: one snapshot, as `lb stats`");
        }
        return Ok(super::output::print_body(&Body::Stats(Box::new(stats)), json)?);
    }
    let mut screen = Screen {
        last_drops: (Instant::now(), total_drops(&stats)),
        stats,
        drops_per_second: 0.0,
        error: None,
        socket: socket.display().to_string(),
    };
    let mut terminal = ratatui::init();
    let shown = show(&mut terminal, &mut screen, socket, Duration::from_secs_f64(interval));
    ratatui::restore();
    shown.map_err(|error| Failure::Other(error.into()))
}

fn show(
    terminal: &mut ratatui::DefaultTerminal,
    screen: &mut Screen,
    socket: &Path,
    interval: Duration,
) -> std::io::Result<()> {
    loop {
        terminal.draw(|frame| draw(frame, screen))?;
        let next = Instant::now() + interval;
        while let Some(left) = next.checked_duration_since(Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            if let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
            {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                    return Ok(());
                }
            }
        }
        match fetch(socket) {
            Ok(stats) => {
                let now = (Instant::now(), total_drops(&stats));
                let seconds = now.0.duration_since(screen.last_drops.0).as_secs_f64().max(1e-3);
                screen.drops_per_second =
                    now.1.saturating_sub(screen.last_drops.1) as f64 / seconds;
                screen.last_drops = now;
                screen.stats = stats;
                screen.error = None;
            }
            // A daemon restarting is shown, not fatal: the view resumes.
            Err(error) => screen.error = Some(error.to_string()),
        }
    }
}

fn fetch(socket: &Path) -> Result<StatsView, Failure> {
    match ask(socket, &Request::Stats)? {
        Body::Stats(stats) => Ok(*stats),
        other => Err(Failure::Other(anyhow::anyhow!("unexpected reply to stats: {other:?}"))),
    }
}

fn total_drops(stats: &StatsView) -> u64 {
    stats.reasons.iter().filter(|(reason, _)| reason.starts_with("drop_")).map(|(_, n)| n).sum()
}

/// 1234567 -> "1.2M": rates fit a column.
fn si(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn draw(frame: &mut Frame, screen: &Screen) {
    let stats = &screen.stats;
    let [header, vips, backends, footer] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(stats.vips.len() as u16 + 3),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let forwarded = stats.reasons.get("forwarded").copied().unwrap_or_default();
    let status = match &screen.error {
        Some(error) => format!("refresh failed: {error}"),
        None => format!(
            "{} VIPs, {} backends, {} packets forwarded, {}/s dropped by the datapath",
            stats.vips.len(),
            stats.backends.len(),
            forwarded,
            si(screen.drops_per_second)
        ),
    };
    frame.render_widget(
        ratatui::widgets::Paragraph::new(vec![
            Line::from(format!("lb top: {} (q quits)", screen.socket))
                .style(Style::new().add_modifier(Modifier::BOLD)),
            Line::from(status),
        ]),
        header,
    );

    let vip_rows = stats.vips.iter().map(|vip| {
        let active: u64 =
            stats.backends.iter().filter(|b| b.vip == vip.vip).map(|b| b.active_flows).sum();
        let health = if vip.all_down {
            Cell::from("ALL-DOWN").style(Style::new().fg(Color::Red))
        } else {
            Cell::from(format!("{}/{} up", vip.serving_backends, vip.backends))
        };
        Row::new(vec![
            Cell::from(vip.vip.clone()),
            health,
            Cell::from(si(vip.packets_per_second)),
            Cell::from(si(vip.bytes_per_second)),
            Cell::from(active.to_string()),
            Cell::from(si(vip.dropped_per_second)),
            Cell::from(vip.scheduler.to_string()),
            Cell::from(if vip.rebalance.is_on() {
                vip.rebalancing.clone()
            } else {
                "-".to_owned()
            }),
        ])
    });
    let vip_columns = [
        ("VIP", Constraint::Min(28)),
        ("HEALTH", Constraint::Length(10)),
        ("PKT/S", Constraint::Length(9)),
        ("BYTES/S", Constraint::Length(9)),
        ("ACTIVE FLOWS", Constraint::Length(12)),
        ("DROP/S", Constraint::Length(8)),
        ("SCHEDULER", Constraint::Length(17)),
        ("REBALANCE", Constraint::Min(10)),
    ];
    frame.render_widget(table("VIPs", &vip_columns, vip_rows), vips);

    let backend_rows = stats.backends.iter().map(|backend| {
        let colour = match backend.state.as_str() {
            "up" => Color::Green,
            "down" => Color::Red,
            _ => Color::Yellow,
        };
        Row::new(vec![
            Cell::from(backend.vip.clone()),
            Cell::from(backend.address.to_string()),
            Cell::from(backend.state.clone()).style(Style::new().fg(colour)),
            Cell::from(backend.weight.to_string()),
            Cell::from(si(backend.packets_per_second)),
            Cell::from(si(backend.bytes_per_second)),
            Cell::from(backend.active_flows.to_string()),
            Cell::from(format!("{:.1}%", backend.new_flow_share * 100.0)),
            Cell::from(match backend.rebalance_target {
                Some(_) => backend.rebalance_closed.to_string(),
                None => "-".to_owned(),
            }),
        ])
    });
    let backend_columns = [
        ("VIP", Constraint::Min(28)),
        ("BACKEND", Constraint::Min(16)),
        ("STATE", Constraint::Length(9)),
        ("WEIGHT", Constraint::Length(6)),
        ("PKT/S", Constraint::Length(9)),
        ("BYTES/S", Constraint::Length(9)),
        ("ACTIVE FLOWS", Constraint::Length(12)),
        ("NEW SHARE", Constraint::Length(9)),
        ("CLOSED", Constraint::Length(7)),
    ];
    frame.render_widget(table("Backends", &backend_columns, backend_rows), backends);

    let occupancy = format!(
        "flow table: {} flows capacity; Maglev tables installed since start: {}",
        stats.flow_table_size, stats.tables_built
    );
    frame.render_widget(Line::from(occupancy), footer);
}

/// A bordered table titled `title`, each column given as its header and
/// its width, so that the two cannot drift apart.
fn table<'a>(
    title: &'a str,
    columns: &[(&'a str, Constraint)],
    rows: impl IntoIterator<Item = Row<'a>>,
) -> Table<'a> {
    let (headers, widths): (Vec<&str>, Vec<Constraint>) = columns.iter().copied().unzip();
    Table::new(rows, widths)
        .header(Row::new(headers).style(Style::new().add_modifier(Modifier::BOLD)))
        .block(Block::bordered().title(title))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_fit_a_column() {
        assert_eq!(si(0.0), "0");
        assert_eq!(si(999.0), "999");
        assert_eq!(si(1_500.0), "1.5k");
        assert_eq!(si(2_340_000.0), "2.3M");
        assert_eq!(si(5e9), "5.0G");
    }
}

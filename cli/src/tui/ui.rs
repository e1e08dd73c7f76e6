//! Rendering: a pure function of [`App`] into a frame. Lists on the left (inbox, outbox, peers), the
//! selected item on the right, a status line at the bottom, overlays for help, compose, filter and
//! confirmation. Fits 80×24.

use mesh_ipc::api::{InboxStatus, LinkState, OutboxStatus, TargetKind};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, BorderType, Borders, Clear, List, ListItem, ListState, Paragraph, Wrap};

use super::app::{App, Daemon, Field, Mode, Pane};
use crate::output;

pub fn render(frame: &mut Frame<'_>, app: &App) {
    let [main, status] = Layout::vertical([Constraint::Min(0), Constraint::Length(1)]).areas(frame.area());
    let [left, right] = Layout::horizontal([Constraint::Percentage(58), Constraint::Percentage(42)]).areas(main);
    let [inbox, outbox, peers] =
        Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(30), Constraint::Percentage(20)])
            .areas(left);
    render_inbox(frame, app, inbox);
    render_outbox(frame, app, outbox);
    if app.show_webhooks {
        render_webhooks(frame, app, peers);
    } else {
        render_peers(frame, app, peers);
    }
    render_detail(frame, app, right);
    render_status(frame, app, status);
    match &app.mode {
        Mode::Normal => {}
        Mode::Help => render_help(frame),
        Mode::Compose(c) => render_compose(frame, c),
        Mode::Filter(text) => {
            render_prompt(frame, "Filter messages (sender or text; Enter to apply, Esc to cancel)", text)
        }
        Mode::ConfirmFlush => render_prompt(frame, "Delete every read message in this view? y / n", ""),
    }
}

fn pane_block(title: String, focused: bool) -> Block<'static> {
    let style = if focused { Style::new().fg(Color::Cyan).bold() } else { Style::new().fg(Color::Gray) };
    Block::new()
        .borders(Borders::ALL)
        .border_type(if focused { BorderType::Thick } else { BorderType::Plain })
        .border_style(style)
        .title(Span::styled(title, style))
}

fn list_state(app: &App, pane: Pane, len: usize) -> ListState {
    let mut state = ListState::default();
    if len > 0 {
        state.select(Some(app.selection(pane)));
    }
    state
}

fn clock(ms: u64) -> String {
    // HH:MM:SS (UTC) from the RFC 3339 time.
    output::time(ms).get(11..19).unwrap_or("--:--:--").to_owned()
}

fn render_inbox(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let rows = app.visible_inbox();
    let mut title = format!(" Inbox · {} · {} unread ", app.viewer().label, app.unread());
    if app.filter != Default::default() {
        title.push_str("· filtered ");
    }
    let block = pane_block(title, app.focus == Pane::Inbox);
    if rows.is_empty() {
        let empty = if app.data.inbox.is_empty() { "No messages yet." } else { "No message matches the filter." };
        frame.render_widget(Paragraph::new(empty).style(Style::new().dark_gray()).block(block), area);
        return;
    }
    let items: Vec<ListItem<'_>> = rows
        .iter()
        .map(|m| {
            let unread = m.read_at.is_none();
            let marker = if unread { Span::styled("● ", Style::new().fg(Color::Yellow)) } else { Span::raw("  ") };
            let to = match m.kind {
                TargetKind::Direct => String::new(),
                TargetKind::Broadcast => " →*".to_owned(),
                TargetKind::Group => format!(" →{}", m.to),
            };
            let body = match (m.status, &m.body) {
                (InboxStatus::Ready, Some(b)) => Span::raw(output::preview(b, 200)),
                (InboxStatus::Failed, _) => Span::styled("[unreadable]", Style::new().fg(Color::Red)),
                _ => Span::styled("[processing]", Style::new().dark_gray()),
            };
            let name_style = if unread { Style::new().bold() } else { Style::new() };
            ListItem::new(Line::from(vec![
                marker,
                Span::styled(clock(m.sent_at), Style::new().dark_gray()),
                Span::raw(" "),
                Span::styled(format!("{:<10.10}", output::clean(&m.from_name)), name_style),
                // The key beside the name: a look-alike name never hides whose message it is.
                Span::styled(format!(" {}", output::short(&m.from)), Style::new().dark_gray()),
                Span::styled(to, Style::new().fg(Color::Magenta)),
                Span::raw(" "),
                body,
            ]))
        })
        .collect();
    let mut state = list_state(app, Pane::Inbox, items.len());
    let list = List::new(items).block(block).highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    frame.render_stateful_widget(list, area, &mut state);
}

fn outbox_style(status: OutboxStatus) -> Style {
    match status {
        OutboxStatus::Dead => Style::new().fg(Color::Red).bold(),
        OutboxStatus::Aborted => Style::new().dark_gray(),
        OutboxStatus::Pending | OutboxStatus::Inflight => Style::new().fg(Color::Yellow),
        OutboxStatus::Done => Style::new().fg(Color::Green),
    }
}

fn target_label(kind: TargetKind, name: Option<&str>, address: &str) -> String {
    match (kind, name) {
        (TargetKind::Direct, Some(n)) => output::clean(n),
        (TargetKind::Broadcast, _) => "everyone".to_owned(),
        _ => address.to_owned(),
    }
}

fn render_outbox(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let rows = app.visible_outbox();
    let dead = rows.iter().filter(|o| o.status == OutboxStatus::Dead).count();
    let title = if dead > 0 { format!(" Outbox · {dead} dead ") } else { " Outbox ".to_owned() };
    let block = pane_block(title, app.focus == Pane::Outbox);
    if rows.is_empty() {
        frame.render_widget(Paragraph::new("Nothing sent yet.").style(Style::new().dark_gray()).block(block), area);
        return;
    }
    let items: Vec<ListItem<'_>> = rows
        .iter()
        .map(|o| {
            let to = target_label(o.target.kind, o.target.name.as_deref(), &o.target.address);
            ListItem::new(Line::from(vec![
                Span::styled(format!("#{:<4}", o.id), Style::new().dark_gray()),
                Span::raw(format!("→ {:<9.9} ", to)),
                Span::styled(format!("{:<14}", App::outbox_state(o)), outbox_style(o.status)),
                Span::raw(output::preview(&o.body, 200)),
            ]))
        })
        .collect();
    let mut state = list_state(app, Pane::Outbox, items.len());
    let list = List::new(items).block(block).highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    frame.render_stateful_widget(list, area, &mut state);
}

fn render_peers(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let rows = app.visible_peers();
    let online = rows.iter().filter(|p| p.online && !p.is_self).count();
    let mut block = pane_block(format!(" Peers · {online} online "), app.focus == Pane::Peers);
    if let Some(change) = &app.membership {
        // Already cleaned (names and keys of peers): a change of who belongs, as it happened.
        block = block
            .title_bottom(Line::from(format!(" {} ", output::preview(change, 200))).style(Style::new().dark_gray()));
    }
    if rows.is_empty() {
        frame.render_widget(Paragraph::new("No peers known yet.").style(Style::new().dark_gray()).block(block), area);
        return;
    }
    let items: Vec<ListItem<'_>> = rows
        .iter()
        .map(|p| {
            let dot = if p.online {
                Span::styled("● ", Style::new().fg(Color::Green))
            } else {
                Span::styled("○ ", Style::new().dark_gray())
            };
            let me = if p.is_self { " (you)" } else { "" };
            // A member's role when it has rights over the mesh.
            let role = match p.role {
                mesh_proto::wire::Role::Member => String::new(),
                other => format!(" · {}", other.as_str()),
            };
            ListItem::new(Line::from(vec![
                dot,
                // Cut so that the key beside it always shows.
                Span::raw(format!("{}{me}", output::preview(&p.name, NAME_SHOWN))),
                Span::styled(
                    format!("  {} · {}{role} · {}", output::short(&p.key), p.kind.as_str(), p.mesh),
                    Style::new().dark_gray(),
                ),
            ]))
        })
        .collect();
    let mut state = list_state(app, Pane::Peers, items.len());
    let list = List::new(items).block(block).highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    frame.render_stateful_widget(list, area, &mut state);
}

fn render_webhooks(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let rows = &app.data.webhooks;
    let disabled = rows.iter().filter(|w| !w.enabled).count();
    let dead: u64 = rows.iter().map(|w| w.deliveries.dead).sum();
    let mut title = format!(" Webhooks · {} ", rows.len());
    if disabled > 0 {
        title.push_str(&format!("· {disabled} disabled "));
    }
    if dead > 0 {
        title.push_str(&format!("· {dead} dead "));
    }
    let block = pane_block(title, app.focus == Pane::Webhooks);
    if rows.is_empty() {
        let text = "No webhooks. `mesh webhook add URL` adds one (w: peers).";
        frame.render_widget(Paragraph::new(text).style(Style::new().dark_gray()).block(block), area);
        return;
    }
    let items: Vec<ListItem<'_>> = rows
        .iter()
        .map(|w| {
            let state = if !w.enabled {
                Span::styled("✗ ", Style::new().fg(Color::Red))
            } else if w.failing_since.is_some() {
                Span::styled("● ", Style::new().fg(Color::Yellow))
            } else {
                Span::styled("● ", Style::new().fg(Color::Green))
            };
            let d = &w.deliveries;
            let dead = if d.dead > 0 {
                Span::styled(format!(" · {} dead", d.dead), Style::new().fg(Color::Red))
            } else {
                Span::raw("")
            };
            ListItem::new(Line::from(vec![
                state,
                Span::styled(format!("#{:<3}", w.id), Style::new().dark_gray()),
                Span::raw(output::preview(&w.url, 40)),
                Span::styled(format!("  {} pending", d.pending), Style::new().dark_gray()),
                dead,
            ]))
        })
        .collect();
    let mut state = list_state(app, Pane::Webhooks, items.len());
    let list = List::new(items).block(block).highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    frame.render_stateful_widget(list, area, &mut state);
}

/// A message body in the detail pane, `width` columns wide: every line behind a gutter, wrapped here
/// so that a wrapped piece has its gutter too. No line of a body can pass for one of the pane's own
/// (`From  bob (dde79c1a)`).
fn body_lines(body: &str, width: u16) -> Vec<Line<'static>> {
    use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};
    let room = usize::from(width).saturating_sub(GUTTER.width()).max(1);
    let gutter = || Span::styled(GUTTER, Style::new().dark_gray());
    let mut lines = Vec::new();
    for line in body.lines() {
        let mut piece = String::new();
        for c in output::clean(line).chars() {
            if piece.width() + c.width().unwrap_or(0) > room && !piece.is_empty() {
                // Break after the last space when there is one, else where the room ends.
                let rest = match piece.rfind(' ') {
                    Some(i) if i > 0 => piece.split_off(i + 1),
                    _ => String::new(),
                };
                lines.push(Line::from(vec![gutter(), Span::raw(std::mem::replace(&mut piece, rest))]));
            }
            piece.push(c);
        }
        lines.push(Line::from(vec![gutter(), Span::raw(piece)]));
    }
    lines
}

const GUTTER: &str = "│ ";

/// A name is cut to this many characters wherever a key follows it, so the key always shows.
const NAME_SHOWN: usize = 20;

fn field(name: &str, value: String) -> Line<'static> {
    Line::from(vec![Span::styled(format!("{name:<10}"), Style::new().dark_gray()), Span::raw(value)])
}

fn opt_time(t: Option<u64>) -> String {
    t.map(output::time).unwrap_or_else(|| "—".to_owned())
}

fn render_detail(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let inner_width = area.width.saturating_sub(2);
    let (title, text) = match app.focus {
        Pane::Inbox => match app.selected_message() {
            None => (" Message ", Text::from("Select a message.")),
            Some(m) => {
                let mut lines = vec![
                    field(
                        "From",
                        format!("{} ({})", output::preview(&m.from_name, NAME_SHOWN), output::short(&m.from)),
                    ),
                    field(
                        "To",
                        match m.kind {
                            TargetKind::Direct => "you".to_owned(),
                            TargetKind::Broadcast => "everyone".to_owned(),
                            TargetKind::Group => m.to.clone(),
                        },
                    ),
                    field("Mesh", m.mesh.clone()),
                    field("Sent", output::time(m.sent_at)),
                    field("Read", opt_time(m.read_at)),
                    Line::raw(""),
                ];
                match (m.status, &m.body) {
                    (InboxStatus::Ready, Some(b)) => lines.extend(body_lines(b, inner_width)),
                    (InboxStatus::Failed, _) => lines.push(Line::styled(
                        format!("Unreadable: {}", output::clean(m.error.as_deref().unwrap_or("unknown reason"))),
                        Style::new().fg(Color::Red),
                    )),
                    _ => lines.push(Line::styled("Not processed yet.", Style::new().dark_gray())),
                }
                (" Message · r reply · a mark read ", Text::from(lines))
            }
        },
        Pane::Outbox => match app.selected_outbox() {
            None => (" Sent message ", Text::from("Select a sent message.")),
            Some(o) => {
                let mut lines = vec![
                    field("To", target_label(o.target.kind, o.target.name.as_deref(), &o.target.address)),
                    field("Mesh", o.mesh.clone()),
                    field("Status", App::outbox_state(o)).style(outbox_style(o.status)),
                    field("Attempts", o.attempts.to_string()),
                    field("Queued", output::time(o.enqueued_at)),
                    field("Delivered", opt_time(o.delivered_at)),
                    field("Read", opt_time(o.read_at)),
                ];
                if let Some(e) = &o.last_error {
                    lines.push(Line::styled(format!("Last error: {}", output::clean(e)), Style::new().fg(Color::Red)));
                }
                lines.push(Line::raw(""));
                lines.extend(body_lines(&o.body, inner_width));
                let title = match o.status {
                    OutboxStatus::Dead | OutboxStatus::Aborted => " Sent message · R retry ",
                    OutboxStatus::Pending => " Sent message · x abort ",
                    _ => " Sent message ",
                };
                (title, Text::from(lines))
            }
        },
        Pane::Peers => match app.selected_peer() {
            None => (" Peer ", Text::from("Select a peer.")),
            Some(p) => {
                let lines = vec![
                    field("Name", output::clean(&p.name)),
                    field("Kind", p.kind.as_str().to_owned()),
                    field("Role", p.role.as_str().to_owned()),
                    field("Mesh", p.mesh.clone()),
                    field(
                        "State",
                        if p.online { "online".to_owned() } else { format!("offline, seen {}", opt_time(p.last_seen)) },
                    ),
                    field("Key", p.key.clone()),
                ];
                (" Peer · c write ", Text::from(lines))
            }
        },
        Pane::Webhooks => match app.selected_webhook() {
            None => (" Webhook ", Text::from("Select an endpoint.")),
            Some(w) => {
                let state = match (w.enabled, &w.disabled_reason) {
                    (true, _) if w.failing_since.is_some() => {
                        format!("failing since {} ({} attempts)", opt_time(w.failing_since), w.failures)
                    }
                    (true, _) => "enabled".to_owned(),
                    (false, r) => format!("DISABLED: {}", r.as_deref().unwrap_or("")),
                };
                let d = &w.deliveries;
                let owner = match &w.session {
                    Some(s) => format!("session {s}"),
                    None => format!("member {}", w.owner_name),
                };
                let mut lines = vec![
                    field("URL", output::clean(&w.url)),
                    field("State", output::clean(&state)).style(if w.enabled {
                        Style::new()
                    } else {
                        Style::new().fg(Color::Red)
                    }),
                    field("Events", format!("{} of {}", w.events.join(", "), output::clean(&owner))),
                    field("Pending", format!("{} ({} after a failed attempt)", d.pending, d.failing)),
                    field("Delivered", d.delivered.to_string()),
                    field("Dead", d.dead.to_string()),
                    field("Last 2xx", opt_time(w.last_success_at)),
                ];
                let dead = app.dead_of(w.id);
                if !dead.is_empty() {
                    lines.push(Line::raw(""));
                    lines.push(Line::styled("Dead deliveries (newest first)", Style::new().fg(Color::Red)));
                    for x in dead {
                        lines.push(Line::raw(format!(
                            "#{} {} · {} attempts · {}",
                            x.id,
                            x.event_type,
                            x.attempts,
                            output::clean(x.last_error.as_deref().unwrap_or("—"))
                        )));
                    }
                }
                let title =
                    if w.enabled { " Webhook · R redeliver · e off " } else { " Webhook · R redeliver · e on " };
                (title, Text::from(lines))
            }
        },
    };
    let block = Block::new().borders(Borders::ALL).title(title);
    frame.render_widget(Paragraph::new(text).wrap(Wrap { trim: false }).block(block), area);
}

fn render_status(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let mut spans = vec![match &app.daemon {
        Daemon::Connected => Span::styled(" daemon ● ", Style::new().fg(Color::Green)),
        Daemon::Connecting => Span::styled(" daemon … ", Style::new().fg(Color::Yellow)),
        Daemon::Lost(_) => {
            Span::styled(" daemon ✗ unreachable, retrying ", Style::new().fg(Color::White).bg(Color::Red))
        }
    }];
    if let (Daemon::Connected, Some(s)) = (&app.daemon, &app.data.status) {
        for m in &s.meshes {
            let style = match m.connection.state {
                LinkState::Online => Style::new().fg(Color::Green),
                LinkState::Rejected => Style::new().fg(Color::Red),
                LinkState::Offline | LinkState::Connecting => Style::new().fg(Color::Yellow),
            };
            spans.push(Span::styled(format!("│ {} {} ", output::clean(&m.name), m.connection.state.as_str()), style));
        }
    }
    if let Some(mesh) = &app.mesh {
        spans.push(Span::styled(format!("│ only {mesh} "), Style::new().fg(Color::Cyan)));
    }
    match &app.notice {
        Some(n) => spans.push(Span::styled(format!("│ {n} "), Style::new().fg(Color::Cyan))),
        None => spans.push(Span::styled("│ ? help · q quit", Style::new().dark_gray())),
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// A rectangle of `w`×`h` cells centred in `area` (clipped to it).
fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h }
}

const HELP: &[(&str, &str)] = &[
    ("↑/↓ j/k", "move"),
    ("Tab", "next pane (inbox, outbox, peers or webhooks)"),
    ("w", "peers / webhooks in the third pane"),
    ("Enter / r", "reply to the selected message"),
    ("a / A", "mark read (sends a read receipt) / all"),
    ("d", "delete the selected message"),
    ("F", "flush read messages (asks first)"),
    ("c", "compose (to the selected peer in Peers)"),
    ("R / x", "retry / abort the selected sent message"),
    ("R / e", "webhooks: redeliver dead / enable or disable"),
    ("/", "filter by sender or text"),
    ("u / s", "unread only / only this sender"),
    ("v / m", "switch identity (member, sessions) / mesh"),
    ("l", "reload"),
    ("q / Esc", "quit"),
];

fn render_help(frame: &mut Frame<'_>) {
    let area = centered(frame.area(), 60, HELP.len() as u16 + 4);
    let lines: Vec<Line<'_>> = HELP
        .iter()
        .map(|(k, v)| Line::from(vec![Span::styled(format!(" {k:<12}"), Style::new().fg(Color::Cyan)), Span::raw(*v)]))
        .chain([Line::raw(""), Line::styled(" any key closes this", Style::new().dark_gray())])
        .collect();
    frame.render_widget(Clear, area);
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(" Keys ")), area);
}

fn render_compose(frame: &mut Frame<'_>, c: &super::app::Compose) {
    let full = frame.area();
    let area = Rect { x: full.x, y: full.height.saturating_sub(6), width: full.width, height: 5.min(full.height) };
    let cursor = |f: Field| if c.field == f { "▏" } else { "" };
    let to = if c.to.len() == 64 { format!("{}… (reply)", &c.to[..8]) } else { c.to.clone() };
    let lines = vec![
        Line::from(vec![Span::styled(" To:  ", Style::new().dark_gray()), Span::raw(to), Span::raw(cursor(Field::To))]),
        Line::from(vec![
            Span::styled(" Msg: ", Style::new().dark_gray()),
            Span::raw(c.body.clone()),
            Span::raw(cursor(Field::Body)),
        ]),
        Line::styled(" Enter send · Tab switch field · Esc discard", Style::new().dark_gray()),
    ];
    frame.render_widget(Clear, area);
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(" New message ")), area);
}

fn render_prompt(frame: &mut Frame<'_>, title: &str, text: &str) {
    let area = centered(frame.area(), 70, 3);
    frame.render_widget(Clear, area);
    frame.render_widget(Paragraph::new(format!(" {text}▏")).block(Block::bordered().title(format!(" {title} "))), area);
}

#[cfg(test)]
mod tests {
    //! Every screen rendered into a `TestBackend` at 80×24 and 120×40, and compared with the reviewed
    //! snapshot in `snapshots/`.

    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use mesh_ipc::api::*;
    use mesh_proto::wire::{PeerKind, Role};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::super::app::{App, Daemon, Snapshot, Viewer};
    use super::render;

    const T0: u64 = 1_795_000_000_000;
    const ALICE: &str = "a11ce000000000000000000000000000000000000000000000000000000000a1";
    const BOB: &str = "b0b00000000000000000000000000000000000000000000000000000000000b0";

    fn message(
        id: i64,
        from: &str,
        kind: TargetKind,
        body: Option<&str>,
        read: bool,
        status: InboxStatus,
    ) -> InboxMessage {
        InboxMessage {
            id,
            mesh: "team".into(),
            message_id: format!("m{id}"),
            from: BOB.into(),
            from_name: from.into(),
            kind,
            to: if kind == TargetKind::Group { "@ops".into() } else { "*".into() },
            status,
            body: body.map(str::to_owned),
            error: (status == InboxStatus::Failed).then(|| "decrypt_failed: no key for this recipient".into()),
            sent_at: T0 + id as u64 * 60_000,
            received_at: T0 + id as u64 * 60_000 + 5,
            read_at: read.then_some(T0 + 3_600_000),
            deleted: false,
        }
    }

    fn sent(
        id: i64,
        to: &str,
        status: OutboxStatus,
        delivered: u32,
        read: u32,
        error: Option<&str>,
        body: &str,
    ) -> OutboxEntry {
        OutboxEntry {
            id,
            client_message_id: format!("c{id}"),
            mesh: "team".into(),
            session: None,
            target: TargetInfo {
                kind: TargetKind::Direct,
                label: to.into(),
                address: BOB.into(),
                name: Some(to.into()),
            },
            body: body.into(),
            status,
            attempts: if status == OutboxStatus::Dead { 25 } else { 1 },
            last_error: error.map(str::to_owned),
            message_id: (status == OutboxStatus::Done).then(|| format!("m{id}")),
            enqueued_at: T0 + id as u64 * 1000,
            sent_at: Some(T0 + id as u64 * 1000),
            delivered_at: (delivered > 0).then_some(T0 + id as u64 * 1000 + 40),
            delivered_count: delivered,
            read_at: (read > 0).then_some(T0 + id as u64 * 1000 + 90_000),
            recipients: Some(1),
            expired_count: 0,
            revoked_count: 0,
            read_count: read,
            mesh_id: "00".into(),
            sender: ALICE.into(),
            next_attempt_at: None,
            link: None,
        }
    }

    fn peer(name: &str, key: &str, kind: PeerKind, online: bool, me: bool) -> PeerInfo {
        PeerInfo {
            mesh: "team".into(),
            key: key.into(),
            name: name.into(),
            kind,
            member: key.into(),
            role: Role::Member,
            online,
            last_seen: Some(T0),
            is_self: me,
            groups: vec![],
            ended_at: None,
            joined_at: Some(T0),
            invited_by: None,
        }
    }

    fn status(state: LinkState) -> Status {
        Status {
            pid: 1,
            version: "0.1.0".into(),
            socket: "/run/mesh.sock".into(),
            started_at: T0,
            member: MemberInfo { key: ALICE.into(), name: "alice".into() },
            meshes: vec![MeshStatus {
                id: "00".into(),
                name: "team".into(),
                my_name: "alice".into(),
                broker: "ws://broker:7777".into(),
                transport: mesh_ipc::api::Transport::Unencrypted,
                tls_pin: None,
                connection: LinkStatus {
                    state,
                    since: T0,
                    last_error: None,
                    clock_skew_ms: None,
                    certificate: None,
                    address: None,
                },
                peers_online: 1,
                peers_total: 2,
                outbox: OutboxCounts::default(),
            }],
            outbox: OutboxCounts::default(),
            inbox: InboxCounts::default(),
            embedded_broker: None,
            webhooks: WebhookStatus::default(),
        }
    }

    fn empty_app() -> App {
        let mut app = App::new(Viewer { label: "member alice".into(), session_key: None }, false);
        app.apply(Snapshot {
            peers: vec![peer("alice", ALICE, PeerKind::Member, true, true)],
            status: Some(status(LinkState::Online)),
            ..Snapshot::default()
        });
        app.now = T0 + 7_200_000;
        app
    }

    fn busy_app() -> App {
        let mut app = empty_app();
        app.apply(Snapshot {
            inbox: vec![
                message(
                    1,
                    "carol",
                    TargetKind::Broadcast,
                    Some("standup in 5 minutes, everyone"),
                    true,
                    InboxStatus::Ready,
                ),
                message(2, "bob", TargetKind::Direct, None, false, InboxStatus::Failed),
                message(3, "bob", TargetKind::Group, Some("deploy is green"), false, InboxStatus::Ready),
                message(
                    4,
                    "bob",
                    TargetKind::Direct,
                    Some("the API is merged, rebase please\nthen ping me"),
                    false,
                    InboxStatus::Ready,
                ),
            ],
            outbox: vec![
                sent(1, "bob", OutboxStatus::Done, 1, 1, None, "on it"),
                sent(2, "bob", OutboxStatus::Done, 1, 0, None, "rebased"),
                sent(
                    3,
                    "ghost",
                    OutboxStatus::Dead,
                    0,
                    0,
                    Some("recipient_unknown: no such recipient in this mesh"),
                    "hello?",
                ),
                sent(4, "bob", OutboxStatus::Pending, 0, 0, Some("unavailable: broker restarting"), "tests pass"),
            ],
            peers: vec![
                peer("alice", ALICE, PeerKind::Member, true, true),
                peer("bob", BOB, PeerKind::Member, true, false),
                peer("reviewer", BOB, PeerKind::Session, false, false),
            ],
            status: Some(status(LinkState::Online)),
            ..Snapshot::default()
        });
        app
    }

    fn webhook(id: i64, url: &str, enabled: bool, dead: u64) -> WebhookInfo {
        WebhookInfo {
            id,
            url: url.into(),
            events: vec!["message".into(), "receipt".into()],
            mesh: None,
            from: None,
            from_name: None,
            description: None,
            owner: ALICE.into(),
            owner_name: "alice".into(),
            session: None,
            enabled,
            disabled_reason: (!enabled).then(|| "it answered 410 Gone".to_owned()),
            allow_insecure_http: false,
            created_at: T0,
            failing_since: None,
            failures: 0,
            last_success_at: Some(T0),
            previous_secret_until: None,
            deliveries: WebhookDeliveryCounts { pending: 1, failing: 0, delivered: 40, dead },
        }
    }

    fn key(app: &mut App, code: KeyCode) {
        app.on_key(KeyEvent::new(code, KeyModifiers::NONE));
    }

    fn screen(app: &App, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("terminal");
        terminal.draw(|f| render(f, app)).expect("draw");
        terminal.backend().to_string()
    }

    fn both_sizes(name: &str, app: &App) {
        insta::assert_snapshot!(format!("{name}_80x24"), screen(app, 80, 24));
        insta::assert_snapshot!(format!("{name}_120x40"), screen(app, 120, 40));
    }

    #[test]
    fn empty_screens() {
        both_sizes("empty", &empty_app());
    }

    #[test]
    fn inbox_with_unread_failed_and_group_messages() {
        both_sizes("inbox", &busy_app());
    }

    #[test]
    fn outbox_with_a_dead_letter_selected() {
        let mut app = busy_app();
        key(&mut app, KeyCode::Tab);
        key(&mut app, KeyCode::Down);
        both_sizes("dead_letter", &app);
    }

    #[test]
    fn every_line_of_a_body_is_behind_the_gutter_even_when_wrapped() {
        // A line long enough to wrap right before a forged header, and a forged header of its own.
        let body = format!("{}From      bob (b0b00000)\nFrom      bob (b0b00000)\n\u{1b}]0;t\u{7}", "x".repeat(28));
        let lines = super::body_lines(&body, 32);
        assert!(lines.len() >= 4, "{lines:?}");
        for line in &lines {
            assert_eq!(line.spans[0].content, super::GUTTER, "{line:?}");
            assert!(line.width() <= 32, "{line:?}");
            assert!(!line.to_string().contains('\u{1b}'));
        }
    }

    #[test]
    fn peers_pane() {
        let mut app = busy_app();
        key(&mut app, KeyCode::BackTab);
        key(&mut app, KeyCode::Down);
        both_sizes("peers", &app);
    }

    #[test]
    fn peers_pane_shows_roles_and_the_latest_membership_change() {
        let mut app = busy_app();
        let mut data = app.data.clone();
        if let Some(first) = data.peers.first_mut() {
            first.role = Role::Owner;
        }
        app.data = data;
        app.membership = Some("[team] carol (c4a1f0e2) was removed by alice (a11ce000)".into());
        key(&mut app, KeyCode::BackTab);
        both_sizes("peers_membership", &app);
    }

    #[test]
    fn webhooks_pane_with_a_disabled_endpoint_and_its_dead_deliveries() {
        let mut app = busy_app();
        let mut data = app.data.clone();
        data.webhooks = vec![
            webhook(1, "https://hooks.example.com/mesh", true, 0),
            webhook(2, "http://127.0.0.1:8080/agent", false, 2),
        ];
        data.dead_deliveries = [7, 5]
            .into_iter()
            .map(|id| DeliveryInfo {
                id,
                webhook_id: 2,
                message_id: format!("msg_{id}"),
                event_type: "message".into(),
                event_id: Some(id * 10),
                status: DeliveryStatus::Dead,
                attempts: 9,
                created_at: T0,
                next_attempt_at: None,
                deadline: T0,
                last_attempt_at: Some(T0),
                last_status: Some(503),
                last_error: Some("503 Service Unavailable".into()),
                delivered_at: None,
            })
            .collect();
        app.apply(data);
        key(&mut app, KeyCode::Char('w'));
        key(&mut app, KeyCode::BackTab);
        key(&mut app, KeyCode::Down);
        assert_eq!(app.focus, super::Pane::Webhooks);
        let actions = app.on_key(KeyEvent::new(KeyCode::Char('R'), KeyModifiers::NONE));
        assert_eq!(actions, vec![super::super::app::Action::RedeliverDead(2)]);
        let actions = app.on_key(KeyEvent::new(KeyCode::Char('e'), KeyModifiers::NONE));
        assert_eq!(actions, vec![super::super::app::Action::EnableWebhook(2, true)]);
        both_sizes("webhooks", &app);
    }

    #[test]
    fn help_overlay() {
        let mut app = busy_app();
        key(&mut app, KeyCode::Char('?'));
        both_sizes("help", &app);
    }

    #[test]
    fn replying_to_a_message() {
        let mut app = busy_app();
        key(&mut app, KeyCode::Char('r'));
        for c in "ok, rebasing".chars() {
            key(&mut app, KeyCode::Char(c));
        }
        both_sizes("compose", &app);
    }

    #[test]
    fn a_reply_goes_to_the_sender_s_key_in_the_message_s_mesh() {
        let mut app = busy_app();
        app.mesh = None;
        key(&mut app, KeyCode::Char('r'));
        for c in "ok".chars() {
            key(&mut app, KeyCode::Char(c));
        }
        let actions = app.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        let [super::super::app::Action::Send { to, mesh, body }] = actions.as_slice() else {
            panic!("expected one send, got {actions:?}")
        };
        let selected = app.selected_message().expect("a selected message");
        assert_eq!((to.as_str(), mesh.as_deref(), body.as_str()), (selected.from.as_str(), Some("team"), "ok"));
    }

    #[test]
    fn a_peer_s_controls_and_bidi_overrides_are_shown_not_obeyed() {
        let mut app = empty_app();
        let mut m = message(
            1,
            "evil\u{202E}name",
            TargetKind::Direct,
            Some("x\u{202E}gnp.exe\x1b]0;t\x07"),
            false,
            InboxStatus::Ready,
        );
        m.from_name = "evil\u{202E}name".into();
        app.apply(Snapshot { inbox: vec![m], status: Some(status(LinkState::Online)), ..Snapshot::default() });
        let shown = screen(&app, 120, 40);
        assert!(!shown.contains('\u{202E}') && !shown.contains('\x1b') && !shown.contains('\x07'), "{shown}");
        assert!(shown.contains("<U+202E>"), "{shown}");
    }

    #[test]
    fn flush_asks_first() {
        let mut app = busy_app();
        key(&mut app, KeyCode::Char('F'));
        both_sizes("confirm_flush", &app);
    }

    #[test]
    fn filtered_to_unread_from_one_sender() {
        let mut app = busy_app();
        key(&mut app, KeyCode::Char('u'));
        key(&mut app, KeyCode::Char('/'));
        for c in "rebase".chars() {
            key(&mut app, KeyCode::Char(c));
        }
        key(&mut app, KeyCode::Enter);
        both_sizes("filtered", &app);
    }

    #[test]
    fn daemon_unreachable() {
        let mut app = busy_app();
        app.daemon = Daemon::Lost("connection refused".into());
        both_sizes("daemon_lost", &app);
    }
}

//! The TUI's state and its reaction to keys: pure, no I/O, so every screen can be rendered and tested
//! from a value. Key handling returns [`Action`]s for the I/O side to carry out.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use mesh_ipc::api::{
    DeliveryInfo, InboxMessage, InboxStatus, OutboxEntry, OutboxStatus, PeerInfo, SessionInfo, Status, WebhookInfo,
};

/// Whose messages the screen shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viewer {
    pub label: String,
    /// A session's key, when viewing a session from outside it.
    pub session_key: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pane {
    Inbox,
    Outbox,
    Peers,
    /// In the peers' place when `w` switched to it: the viewer's webhook endpoints.
    Webhooks,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    To,
    Body,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compose {
    pub to: String,
    pub body: String,
    pub field: Field,
    /// The mesh it goes in: a reply's or a chosen peer's; `None` follows the context rule.
    pub mesh: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Help,
    Compose(Compose),
    /// Typing a text filter.
    Filter(String),
    /// Asking before flushing the read messages.
    ConfirmFlush,
}

/// What the list of messages is narrowed to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub text: String,
    pub unread_only: bool,
    /// A sender's key.
    pub sender: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Daemon {
    Connected,
    Connecting,
    Lost(String),
}

/// What the I/O side must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Refresh,
    Ack(Vec<i64>),
    AckAll,
    Delete(i64),
    Flush,
    Send {
        to: String,
        body: String,
        mesh: Option<String>,
    },
    Retry(i64),
    Abort(i64),
    /// Every dead delivery of this endpoint due again.
    RedeliverDead(i64),
    EnableWebhook(i64, bool),
    Quit,
}

/// Everything fetched from the daemon for the current view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub inbox: Vec<InboxMessage>,
    pub outbox: Vec<OutboxEntry>,
    pub peers: Vec<PeerInfo>,
    pub status: Option<Status>,
    pub sessions: Vec<SessionInfo>,
    pub webhooks: Vec<WebhookInfo>,
    /// Dead deliveries of those endpoints, newest first.
    pub dead_deliveries: Vec<DeliveryInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct App {
    pub data: Snapshot,
    pub viewers: Vec<Viewer>,
    pub viewer: usize,
    /// Inside a session: its view only, no switcher.
    pub locked: bool,
    /// `None`: every mesh.
    pub mesh: Option<String>,
    pub focus: Pane,
    pub selected: [usize; 4],
    /// The third pane shows webhooks instead of peers.
    pub show_webhooks: bool,
    pub mode: Mode,
    pub filter: Filter,
    pub daemon: Daemon,
    /// The outcome of the last action, shown in the status line.
    pub notice: Option<String>,
    /// The latest change to who belongs to a mesh (a member removed, left, given a role; a new mesh
    /// key), in words, shown under the peers.
    pub membership: Option<String>,
    /// Now (ms), for relative times; set by the loop, fixed in tests.
    pub now: u64,
    pub quit: bool,
}

impl App {
    pub fn new(viewer: Viewer, locked: bool) -> App {
        App {
            data: Snapshot::default(),
            viewers: vec![viewer],
            viewer: 0,
            locked,
            mesh: None,
            focus: Pane::Inbox,
            selected: [0; 4],
            show_webhooks: false,
            mode: Mode::Normal,
            filter: Filter::default(),
            daemon: Daemon::Connecting,
            notice: None,
            membership: None,
            now: 0,
            quit: false,
        }
    }

    pub fn viewer(&self) -> &Viewer {
        &self.viewers[self.viewer.min(self.viewers.len() - 1)]
    }

    /// Takes a new snapshot; the member's view also learns the sessions it can switch to.
    pub fn apply(&mut self, data: Snapshot) {
        if !self.locked {
            let current = self.viewer().clone();
            let mut viewers = vec![self.viewers[0].clone()];
            viewers.extend(
                data.sessions
                    .iter()
                    .map(|s| Viewer { label: format!("session {}", s.name), session_key: Some(s.key.clone()) }),
            );
            self.viewer = viewers.iter().position(|v| *v == current).unwrap_or(0);
            self.viewers = viewers;
        }
        self.data = data;
        self.daemon = Daemon::Connected;
        self.clamp();
    }

    /// The inbox rows the filters let through, newest first.
    pub fn visible_inbox(&self) -> Vec<&InboxMessage> {
        let f = &self.filter;
        let text = f.text.to_lowercase();
        self.data
            .inbox
            .iter()
            .rev()
            .filter(|m| self.mesh.as_ref().is_none_or(|mesh| m.mesh == *mesh))
            .filter(|m| !f.unread_only || m.read_at.is_none())
            .filter(|m| f.sender.as_ref().is_none_or(|s| m.from == *s))
            .filter(|m| {
                text.is_empty()
                    || m.from_name.to_lowercase().contains(&text)
                    || m.body.as_deref().is_some_and(|b| b.to_lowercase().contains(&text))
            })
            .collect()
    }

    pub fn visible_outbox(&self) -> Vec<&OutboxEntry> {
        self.data.outbox.iter().rev().filter(|o| self.mesh.as_ref().is_none_or(|mesh| o.mesh == *mesh)).collect()
    }

    pub fn visible_peers(&self) -> Vec<&PeerInfo> {
        self.data.peers.iter().filter(|p| self.mesh.as_ref().is_none_or(|mesh| p.mesh == *mesh)).collect()
    }

    pub fn unread(&self) -> usize {
        self.data.inbox.iter().filter(|m| m.read_at.is_none() && m.status == InboxStatus::Ready).count()
    }

    fn len(&self, pane: Pane) -> usize {
        match pane {
            Pane::Inbox => self.visible_inbox().len(),
            Pane::Outbox => self.visible_outbox().len(),
            Pane::Peers => self.visible_peers().len(),
            Pane::Webhooks => self.data.webhooks.len(),
        }
    }

    fn index(pane: Pane) -> usize {
        match pane {
            Pane::Inbox => 0,
            Pane::Outbox => 1,
            Pane::Peers => 2,
            Pane::Webhooks => 3,
        }
    }

    /// The third pane: peers, or webhooks after `w`.
    pub fn third(&self) -> Pane {
        if self.show_webhooks { Pane::Webhooks } else { Pane::Peers }
    }

    pub fn selection(&self, pane: Pane) -> usize {
        self.selected[Self::index(pane)]
    }

    fn clamp(&mut self) {
        for pane in [Pane::Inbox, Pane::Outbox, Pane::Peers, Pane::Webhooks] {
            let n = self.len(pane);
            let s = &mut self.selected[Self::index(pane)];
            *s = (*s).min(n.saturating_sub(1));
        }
    }

    pub fn selected_message(&self) -> Option<&InboxMessage> {
        self.visible_inbox().get(self.selection(Pane::Inbox)).copied()
    }

    pub fn selected_outbox(&self) -> Option<&OutboxEntry> {
        self.visible_outbox().get(self.selection(Pane::Outbox)).copied()
    }

    pub fn selected_peer(&self) -> Option<&PeerInfo> {
        self.visible_peers().get(self.selection(Pane::Peers)).copied()
    }

    pub fn selected_webhook(&self) -> Option<&WebhookInfo> {
        self.data.webhooks.get(self.selection(Pane::Webhooks))
    }

    /// The dead deliveries of an endpoint, newest first.
    pub fn dead_of(&self, webhook: i64) -> Vec<&DeliveryInfo> {
        self.data.dead_deliveries.iter().filter(|d| d.webhook_id == webhook).collect()
    }

    fn meshes(&self) -> Vec<String> {
        let mut m: Vec<String> = match &self.data.status {
            Some(s) => s.meshes.iter().map(|m| m.name.clone()).collect(),
            None => self.data.peers.iter().map(|p| p.mesh.clone()).collect(),
        };
        m.sort();
        m.dedup();
        m
    }

    fn move_by(&mut self, delta: isize) {
        let n = self.len(self.focus);
        let s = &mut self.selected[Self::index(self.focus)];
        *s = (*s as isize + delta).clamp(0, n.saturating_sub(1) as isize) as usize;
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Vec<Action> {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.quit = true;
            return vec![Action::Quit];
        }
        match std::mem::replace(&mut self.mode, Mode::Normal) {
            Mode::Normal => self.on_normal_key(key),
            Mode::Help => vec![],
            Mode::ConfirmFlush => match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => vec![Action::Flush],
                _ => {
                    self.notice = Some("flush cancelled".into());
                    vec![]
                }
            },
            Mode::Filter(mut text) => {
                match key.code {
                    KeyCode::Enter => self.filter.text = text,
                    KeyCode::Esc => {}
                    KeyCode::Backspace => {
                        text.pop();
                        self.mode = Mode::Filter(text);
                    }
                    KeyCode::Char(c) => {
                        text.push(c);
                        self.mode = Mode::Filter(text);
                    }
                    _ => self.mode = Mode::Filter(text),
                }
                self.clamp();
                vec![]
            }
            Mode::Compose(c) => self.on_compose_key(c, key),
        }
    }

    fn on_compose_key(&mut self, mut c: Compose, key: KeyEvent) -> Vec<Action> {
        match key.code {
            KeyCode::Esc => {
                self.notice = Some("message discarded".into());
                return vec![];
            }
            KeyCode::Tab | KeyCode::BackTab => c.field = if c.field == Field::To { Field::Body } else { Field::To },
            KeyCode::Enter if c.field == Field::To => c.field = Field::Body,
            KeyCode::Enter => {
                if c.to.trim().is_empty() || c.body.trim().is_empty() {
                    self.notice = Some("a message needs a recipient and some text".into());
                } else {
                    return vec![Action::Send { to: c.to.trim().to_owned(), body: c.body, mesh: c.mesh }];
                }
            }
            KeyCode::Backspace => {
                match c.field {
                    Field::To => c.to.pop(),
                    Field::Body => c.body.pop(),
                };
            }
            KeyCode::Char(ch) => match c.field {
                Field::To => c.to.push(ch),
                Field::Body => c.body.push(ch),
            },
            _ => {}
        }
        self.mode = Mode::Compose(c);
        vec![]
    }

    fn on_normal_key(&mut self, key: KeyEvent) -> Vec<Action> {
        self.notice = None;
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => {
                self.quit = true;
                vec![Action::Quit]
            }
            KeyCode::Char('?') => {
                self.mode = Mode::Help;
                vec![]
            }
            KeyCode::Tab => {
                self.focus = match self.focus {
                    Pane::Inbox => Pane::Outbox,
                    Pane::Outbox => self.third(),
                    Pane::Peers | Pane::Webhooks => Pane::Inbox,
                };
                vec![]
            }
            KeyCode::BackTab => {
                self.focus = match self.focus {
                    Pane::Inbox => self.third(),
                    Pane::Outbox => Pane::Inbox,
                    Pane::Peers | Pane::Webhooks => Pane::Outbox,
                };
                vec![]
            }
            KeyCode::Char('w') => {
                self.show_webhooks = !self.show_webhooks;
                if matches!(self.focus, Pane::Peers | Pane::Webhooks) {
                    self.focus = self.third();
                }
                vec![]
            }
            KeyCode::Char('R') if self.focus == Pane::Webhooks => match self.selected_webhook() {
                Some(w) if w.deliveries.dead > 0 => vec![Action::RedeliverDead(w.id)],
                Some(_) => {
                    self.notice = Some("this endpoint has no dead delivery".into());
                    vec![]
                }
                None => vec![],
            },
            KeyCode::Char('e') if self.focus == Pane::Webhooks => {
                self.selected_webhook().map(|w| vec![Action::EnableWebhook(w.id, !w.enabled)]).unwrap_or_default()
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.move_by(1);
                vec![]
            }
            KeyCode::Up | KeyCode::Char('k') => {
                self.move_by(-1);
                vec![]
            }
            KeyCode::PageDown => {
                self.move_by(10);
                vec![]
            }
            KeyCode::PageUp => {
                self.move_by(-10);
                vec![]
            }
            KeyCode::Home | KeyCode::Char('g') => {
                self.selected[Self::index(self.focus)] = 0;
                vec![]
            }
            KeyCode::Char('a') if self.focus == Pane::Inbox => match self.selected_message() {
                Some(m) if m.read_at.is_none() => vec![Action::Ack(vec![m.id])],
                Some(_) => {
                    self.notice = Some("already read".into());
                    vec![]
                }
                None => vec![],
            },
            KeyCode::Char('A') => vec![Action::AckAll],
            KeyCode::Char('d') if self.focus == Pane::Inbox => {
                self.selected_message().map(|m| vec![Action::Delete(m.id)]).unwrap_or_default()
            }
            KeyCode::Char('F') => {
                self.mode = Mode::ConfirmFlush;
                vec![]
            }
            KeyCode::Char('c') => {
                // From the peers pane, to the selected peer; else to whoever is typed.
                let (to, mesh) = match (self.focus, self.selected_peer()) {
                    (Pane::Peers, Some(p)) => (Some(p.key.clone()), Some(p.mesh.clone())),
                    _ => (None, self.mesh.clone()),
                };
                let field = if to.is_some() { Field::Body } else { Field::To };
                self.mode = Mode::Compose(Compose { to: to.unwrap_or_default(), body: String::new(), field, mesh });
                vec![]
            }
            KeyCode::Char('r') | KeyCode::Enter if self.focus == Pane::Inbox => {
                if let Some(m) = self.selected_message() {
                    // Reply to the sender by key (names can be ambiguous, keys cannot), in its mesh.
                    self.mode = Mode::Compose(Compose {
                        to: m.from.clone(),
                        body: String::new(),
                        field: Field::Body,
                        mesh: Some(m.mesh.clone()),
                    });
                }
                vec![]
            }
            KeyCode::Enter if self.focus == Pane::Peers => {
                if let Some(p) = self.selected_peer() {
                    self.mode = Mode::Compose(Compose {
                        to: p.key.clone(),
                        body: String::new(),
                        field: Field::Body,
                        mesh: Some(p.mesh.clone()),
                    });
                }
                vec![]
            }
            KeyCode::Char('R') if self.focus == Pane::Outbox => {
                self.selected_outbox().map(|o| vec![Action::Retry(o.id)]).unwrap_or_default()
            }
            KeyCode::Char('x') if self.focus == Pane::Outbox => {
                self.selected_outbox().map(|o| vec![Action::Abort(o.id)]).unwrap_or_default()
            }
            KeyCode::Char('/') => {
                self.mode = Mode::Filter(self.filter.text.clone());
                vec![]
            }
            KeyCode::Char('u') => {
                self.filter.unread_only = !self.filter.unread_only;
                self.clamp();
                vec![]
            }
            KeyCode::Char('s') => {
                self.filter.sender = match (&self.filter.sender, self.selected_message()) {
                    (Some(_), _) => None,
                    (None, Some(m)) => Some(m.from.clone()),
                    (None, None) => None,
                };
                self.clamp();
                vec![]
            }
            KeyCode::Char('v') if !self.locked => {
                self.viewer = (self.viewer + 1) % self.viewers.len();
                self.selected = [0; 4];
                vec![Action::Refresh]
            }
            KeyCode::Char('m') => {
                let meshes = self.meshes();
                self.mesh = match &self.mesh {
                    None => meshes.first().cloned(),
                    Some(cur) => meshes.iter().position(|m| m == cur).and_then(|i| meshes.get(i + 1)).cloned(),
                };
                self.clamp();
                vec![]
            }
            KeyCode::Char('l') => vec![Action::Refresh],
            _ => vec![],
        }
    }

    /// A short state of an outbox row, for lists.
    pub fn outbox_state(o: &OutboxEntry) -> String {
        match o.status {
            OutboxStatus::Done if o.read_count > 0 => format!("read {}/{}", o.read_count, o.recipients.unwrap_or(1)),
            OutboxStatus::Done if o.delivered_count > 0 => {
                format!("delivered {}/{}", o.delivered_count, o.recipients.unwrap_or(1))
            }
            OutboxStatus::Done => "accepted".to_owned(),
            other => other.as_str().to_owned(),
        }
    }
}

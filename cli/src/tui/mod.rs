//! `mesh tui`: a live screen over the daemon, through IPC and the event stream only.
//!
//! Inside a session it shows that session; outside, the member, with `v` switching to any session
//! (the member's token authorises that view) and `m` narrowing to one mesh. Every event on the stream
//! (and a 2 s tick, which also notices a daemon coming back) reloads the view from the daemon. The
//! terminal is restored on every exit, panics included (ratatui's hook).

pub mod app;
mod io;
pub mod ui;

use std::time::Duration;

use anyhow::Context;
use crossterm::event::{Event as TermEvent, EventStream, KeyEventKind};
use futures_util::StreamExt;
use mesh_ipc::api::{EventScope, SessionInfo};
use mesh_ipc::events::{self, StreamItem};
use mesh_ipc::{IpcClient, routes};

use app::{Action, App, Daemon, Viewer};

const TICK: Duration = Duration::from_secs(2);

pub fn run() -> anyhow::Result<()> {
    let home = crate::cmd::home()?;
    // A daemon that is down is said so (exit 3) before anything else is read.
    crate::cmd::block_on(IpcClient::new(&home).get::<mesh_ipc::api::VersionInfo>(routes::VERSION))??;
    let token = crate::cmd::stream_token(&home)?;
    let in_session = std::env::var_os(mesh_ipc::SESSION_FILE_ENV).is_some_and(|v| !v.is_empty());
    let client = IpcClient::new(&home).with_bearer(Some(token.clone()));
    crate::cmd::block_on(async move {
        let first = if in_session {
            let me: SessionInfo = client.get(routes::SESSION).await?;
            Viewer { label: format!("session {}", me.name), session_key: None }
        } else {
            let status: mesh_ipc::api::Status = client.get(routes::STATUS).await?;
            Viewer { label: format!("member {}", status.member.name), session_key: None }
        };
        let mut app = App::new(first, in_session);
        let scope = if in_session { EventScope::Own } else { EventScope::All };
        let stream = events::follow(home.socket_path(), &token, scope, None, true).map_err(anyhow::Error::msg)?;
        let mut terminal = ratatui::try_init().context("setting up the terminal")?;
        let result = event_loop(&mut terminal, &mut app, &client, stream).await;
        ratatui::restore();
        result
    })?
}

async fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    app: &mut App,
    member: &IpcClient,
    stream: impl futures_util::Stream<Item = StreamItem>,
) -> anyhow::Result<()> {
    let mut stream = std::pin::pin!(stream);
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(TICK);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut dirty = true;
    loop {
        let client = member.clone().as_session(app.viewer().session_key.clone());
        if dirty {
            dirty = false;
            match io::snapshot(&client).await {
                Ok(s) => app.apply(s),
                Err(e) => app.daemon = Daemon::Lost(e.to_string()),
            }
        }
        app.now = mesh_proto::now_ms();
        terminal.draw(|f| ui::render(f, app))?;
        tokio::select! {
            key = keys.next() => match key {
                Some(Ok(TermEvent::Key(k))) if k.kind == KeyEventKind::Press => {
                    for action in app.on_key(k) {
                        if action == Action::Quit {
                            break;
                        }
                        match io::perform(&client, action).await {
                            Ok(notice) => app.notice = notice.or(app.notice.take()),
                            Err(e) => app.notice = Some(format!("failed: {e}")),
                        }
                        dirty = true;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("reading the terminal"),
                None => return Ok(()),
            },
            item = stream.next() => match item {
                Some(StreamItem::Event(e)) => {
                    if let mesh_ipc::api::EventBody::Membership(m) = &e.body {
                        let mesh = e.mesh.as_deref().unwrap_or("-");
                        app.membership = Some(format!("[{mesh}] {}", crate::output::membership_change(m)));
                    }
                    dirty = true;
                }
                Some(StreamItem::Connected) => dirty = true,
                Some(StreamItem::Interrupted(why)) => app.daemon = Daemon::Lost(why),
                Some(StreamItem::Refused { status, message }) => app.notice = Some(format!("event stream refused ({status}): {message}")),
                Some(StreamItem::End) | None => {}
            },
            _ = tick.tick() => dirty = true,
            _ = term.recv() => app.quit = true,
            _ = hangup.recv() => app.quit = true,
        }
        if app.quit {
            return Ok(());
        }
    }
}

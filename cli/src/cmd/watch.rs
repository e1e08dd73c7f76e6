//! `mesh watch`: follow the event stream, resuming after interruptions without losing events.

use anyhow::{Context, bail};
use futures_util::StreamExt;
use mesh_ipc::api::{Event, EventBody, EventScope, ReceiptKindName};
use mesh_ipc::events::{self, StreamItem};

use crate::output;

#[derive(clap::Args, Debug)]
pub struct WatchArgs {
    /// Start from the first kept event
    #[arg(long, conflicts_with = "since")]
    pub replay: bool,
    /// Start after this event id
    #[arg(long)]
    pub since: Option<i64>,
    /// Every session's events and the member's (needs the member's token; not inside a session)
    #[arg(long)]
    pub all: bool,
    /// Stop after this many events (default: follow until interrupted)
    #[arg(long)]
    pub count: Option<usize>,
    /// Print what is there and exit instead of following new events
    #[arg(long)]
    pub no_follow: bool,
}

pub fn run(args: WatchArgs) -> anyhow::Result<()> {
    let home = super::home()?;
    // A daemon that is down is said so (exit 3), not waited for in silence.
    let probe = mesh_ipc::IpcClient::new(&home);
    super::block_on(probe.get::<mesh_ipc::api::VersionInfo>(mesh_ipc::routes::VERSION))??;
    let token = super::stream_token(&home)?;
    let scope = if args.all { EventScope::All } else { EventScope::Own };
    let since = if args.replay { Some(0) } else { args.since };
    crate::output::exit_when_stdout_closes();
    super::block_on(async move {
        let stream =
            events::follow(home.socket_path(), &token, scope, since, !args.no_follow).map_err(anyhow::Error::msg)?;
        let mut stream = std::pin::pin!(stream);
        let mut seen = 0usize;
        let mut interrupted = false;
        while let Some(item) = stream.next().await {
            match item {
                StreamItem::Event(e) => {
                    if crate::output::json() {
                        outln!("{}", serde_json::to_string(&e).context("encoding an event")?);
                    } else {
                        outln!("{}", output::clean(&describe(&e)));
                    }
                    seen += 1;
                    if args.count.is_some_and(|n| seen >= n) {
                        return Ok(());
                    }
                }
                StreamItem::Connected => {
                    if interrupted {
                        errln!("mesh watch: reconnected; resuming after the last event seen");
                        interrupted = false;
                    }
                }
                StreamItem::Interrupted(why) if args.no_follow => bail!("the event stream broke off: {why}"),
                StreamItem::Interrupted(why) => {
                    if !interrupted {
                        errln!("mesh watch: connection to the daemon lost ({why}); reconnecting");
                        interrupted = true;
                    }
                }
                StreamItem::Refused { status, message } => {
                    bail!("the daemon refused the event stream ({status}): {message}")
                }
                StreamItem::End => return Ok(()),
            }
        }
        Ok(())
    })?
}

fn describe(e: &Event) -> String {
    let mesh = e.mesh.as_deref().unwrap_or("-");
    let what = match &e.body {
        EventBody::Message(m) if m.deleted => {
            format!("message #{} from {} ({}) [deleted]", m.id, m.from_name, output::short(&m.from))
        }
        EventBody::Message(m) => match &m.body {
            Some(b) => format!(
                "message #{} from {} ({}): {}",
                m.id,
                m.from_name,
                output::short(&m.from),
                output::preview(b, 120)
            ),
            None => {
                format!("message #{} from {} [unreadable: {}]", m.id, m.from_name, m.error.as_deref().unwrap_or("?"))
            }
        },
        EventBody::Read { ids } => format!("marked read: {ids:?}"),
        EventBody::Receipt(r) => {
            let who = match &r.recipient_name {
                Some(name) => format!("{name} ({})", output::short(&r.recipient)),
                None => output::short(&r.recipient).to_owned(),
            };
            match r.kind {
                ReceiptKindName::Expired => format!("outbox #{} expired before {who} took it", r.outbox_id),
                ReceiptKindName::Revoked => format!("outbox #{} not delivered: {who} left the mesh", r.outbox_id),
                ReceiptKindName::Delivered => format!("outbox #{} delivered by {who}", r.outbox_id),
                ReceiptKindName::Read => format!("outbox #{} read by {who}", r.outbox_id),
            }
        }
        EventBody::Outbox(o) => format!(
            "outbox #{} is {}{}",
            o.id,
            o.status.as_str(),
            o.last_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
        ),
        EventBody::Presence(p) => {
            let state = match (p.removed, p.ended_at, p.online) {
                (true, _, _) => "gone from the roster",
                (false, Some(_), _) => "ended",
                (false, None, true) => "online",
                (false, None, false) => "offline",
            };
            format!("{} {} ({}) is {state}", p.kind.as_str(), p.name, output::short(&p.key))
        }
        EventBody::Membership(m) => output::membership_change(m),
        EventBody::Connection(c) => format!(
            "connection {}{}",
            c.state.as_str(),
            c.last_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
        ),
        EventBody::Webhook(w) => format!(
            "webhook #{} {} is {}{}",
            w.id,
            output::clean(&w.url),
            if w.enabled { "enabled" } else { "disabled" },
            w.reason.as_deref().map(|r| format!(" ({})", output::clean(r))).unwrap_or_default()
        ),
        EventBody::Resync { first_id } => {
            format!("events before #{first_id} were pruned; re-read the inbox and outbox")
        }
    };
    format!("{:>6} {} [{mesh}] {what}", e.id, output::time(e.at))
}

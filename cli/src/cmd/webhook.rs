//! `mesh webhook …`: endpoints your messages and receipts are POSTed to (docs/webhooks.md).

use mesh_ipc::api::{
    AddWebhookRequest, AddWebhookResponse, DeliveriesQuery, DeliveryFilter, DeliveryInfo, DeliveryStatus,
    RedeliverResponse, RotateWebhookResponse, TestWebhookResponse, WebhookInfo,
};
use mesh_ipc::routes::{self, with_id};

use crate::output::{self, clean};

#[derive(clap::Subcommand, Debug)]
pub enum WebhookCommand {
    /// Register URL: your events (or, inside a session, the session's) are POSTed to it, signed.
    /// Prints its signing secret once.
    Add(AddArgs),
    /// Your endpoints
    List,
    /// One endpoint: filters, state, deliveries
    Show(IdArg),
    /// Send a test delivery now and show how the endpoint answered
    Test(IdArg),
    /// A new signing secret (printed once); the old one keeps signing too for 24 h
    Rotate(IdArg),
    /// Stop posting to it; deliveries keep queueing until `enable`
    Disable(IdArg),
    /// Post to it again, its waiting deliveries first
    Enable(IdArg),
    /// Remove it, with its deliveries
    Remove(IdArg),
    /// An endpoint's deliveries, newest first
    Deliveries(DeliveriesArgs),
    /// Make a delivery (or every dead one of an endpoint) due again now
    Redeliver(RedeliverArgs),
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The endpoint: https://…, or http:// to this machine (localhost, 127.0.0.1, ::1)
    pub url: String,
    /// Event kinds, comma-separated: message, receipt, read, presence, outbox, connection
    /// (default: message,receipt)
    #[arg(long, value_delimiter = ',')]
    pub events: Vec<String>,
    /// Only events of this mesh (default: every mesh you are in; MESH_CONTEXT and `mesh use` do not apply)
    #[arg(long)]
    pub mesh: Option<String>,
    /// Only events concerning this peer (name, key prefix or key): its messages, receipts, presence
    #[arg(long)]
    pub from: Option<String>,
    /// A note for yourself, shown by `list`
    #[arg(long)]
    pub description: Option<String>,
    /// Allow plain http:// to another machine (messages then cross the network unencrypted)
    #[arg(long)]
    pub allow_insecure_http: bool,
}

#[derive(clap::Args, Debug)]
pub struct IdArg {
    /// The endpoint's id (from `mesh webhook list`)
    pub id: i64,
}

#[derive(clap::Args, Debug)]
pub struct DeliveriesArgs {
    /// The endpoint's id
    pub id: i64,
    /// Only these: pending, failed (pending after a failed attempt), delivered, dead
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
    /// At most this many (default 50)
    #[arg(long)]
    pub limit: Option<u32>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum StatusArg {
    Pending,
    Failed,
    Delivered,
    Dead,
}

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["delivery", "all_dead"]))]
pub struct RedeliverArgs {
    /// The delivery's id (from `mesh webhook deliveries`)
    pub delivery: Option<i64>,
    /// Every dead delivery of this endpoint instead
    #[arg(long, value_name = "WEBHOOK_ID")]
    pub all_dead: Option<i64>,
}

pub fn run(cmd: WebhookCommand) -> anyhow::Result<()> {
    let client = super::client()?;
    match cmd {
        WebhookCommand::Add(a) => {
            let req = AddWebhookRequest {
                url: a.url,
                events: a.events,
                mesh: a.mesh,
                from: a.from,
                description: a.description,
                allow_insecure_http: a.allow_insecure_http,
            };
            let r: AddWebhookResponse = super::block_on(client.post(routes::WEBHOOKS, &req))??;
            if output::json() {
                return super::print_json(&r);
            }
            print_webhook(&r.webhook);
            outln!("signing secret (shown this once; keep it with your receiver): {}", r.secret);
            outln!("try it: mesh webhook test {}", r.webhook.id);
        }
        WebhookCommand::List => {
            let list: Vec<WebhookInfo> = super::block_on(client.get(routes::WEBHOOKS))??;
            if output::json() {
                return super::print_json(&list);
            }
            if list.is_empty() {
                outln!("no webhooks; add one with `mesh webhook add URL`");
            }
            for w in &list {
                let state = if w.enabled { "enabled" } else { "DISABLED" };
                let d = &w.deliveries;
                let mut filters = String::new();
                if let Some(m) = &w.mesh {
                    filters.push_str(&format!(" in {m}"));
                }
                if let Some(f) = &w.from {
                    filters.push_str(&format!(
                        " from {}",
                        w.from_name.clone().unwrap_or_else(|| output::short(f).to_owned())
                    ));
                }
                outln!(
                    "{}",
                    clean(&format!(
                        "#{:<4} {state:<8} {}  [{}{filters}] for {}  pending {} (failing {}), dead {}{}",
                        w.id,
                        w.url,
                        w.events.join(","),
                        owner(w),
                        d.pending,
                        d.failing,
                        d.dead,
                        w.description.as_deref().map(|t| format!("  — {t}")).unwrap_or_default()
                    ))
                );
            }
        }
        WebhookCommand::Show(a) => {
            let w: WebhookInfo = super::block_on(client.get(&with_id(routes::WEBHOOK, a.id)))??;
            if output::json() {
                return super::print_json(&w);
            }
            print_webhook(&w);
        }
        WebhookCommand::Test(a) => {
            let r: TestWebhookResponse =
                super::block_on(client.post(&with_id(routes::WEBHOOK_TEST, a.id), &serde_json::json!({})))??;
            let w: WebhookInfo = super::block_on(client.get(&with_id(routes::WEBHOOK, a.id)))??;
            if output::json() {
                super::print_json(&r)?;
            } else {
                print_delivery(&r.delivery, w.enabled);
            }
            let d = &r.delivery;
            if d.status != DeliveryStatus::Delivered {
                let last = d.last_error.as_deref().map(clean).unwrap_or_else(|| "it failed".to_owned());
                let (why, hint) = match (d.status, d.last_attempt_at) {
                    (_, None) => (
                        "no attempt finished in time (earlier deliveries to this endpoint go first, or it is slow to answer)"
                            .to_owned(),
                        format!("`mesh webhook deliveries {}` follows it", a.id),
                    ),
                    _ if !w.enabled => (
                        format!("{last}; the endpoint is now disabled ({})", clean(w.disabled_reason.as_deref().unwrap_or(""))),
                        format!("fix the endpoint, then `mesh webhook enable {}`", a.id),
                    ),
                    (DeliveryStatus::Dead, _) => (
                        format!("{last}; the endpoint refused it, so it is dead"),
                        format!("fix the endpoint, then `mesh webhook redeliver {}`", d.id),
                    ),
                    _ => (
                        format!(
                            "{last}; it is retried on the schedule (next attempt {})",
                            d.next_attempt_at.map(output::until).unwrap_or_default()
                        ),
                        format!("`mesh webhook deliveries {}` follows it", a.id),
                    ),
                };
                return Err(output::fail(
                    "webhook_test_failed",
                    format!("the test delivery #{} was not delivered: {why}", d.id),
                    Some(hint),
                ));
            }
        }
        WebhookCommand::Rotate(a) => {
            let r: RotateWebhookResponse =
                super::block_on(client.post(&with_id(routes::WEBHOOK_ROTATE, a.id), &serde_json::json!({})))??;
            if output::json() {
                return super::print_json(&r);
            }
            outln!("new signing secret for #{} (shown this once): {}", a.id, r.secret);
            outln!(
                "the previous secret also signs until {} ({}); give your receiver the new one before then",
                output::time(r.previous_valid_until),
                output::until(r.previous_valid_until)
            );
        }
        WebhookCommand::Disable(a) => change(
            &client,
            routes::WEBHOOK_DISABLE,
            a.id,
            "disabled; its deliveries keep queueing until it is enabled",
        )?,
        WebhookCommand::Enable(a) => change(&client, routes::WEBHOOK_ENABLE, a.id, "enabled")?,
        WebhookCommand::Remove(a) => change(&client, routes::WEBHOOK_REMOVE, a.id, "removed, with its deliveries")?,
        WebhookCommand::Deliveries(a) => {
            let q = DeliveriesQuery {
                status: a.status.map(|s| match s {
                    StatusArg::Pending => DeliveryFilter::Pending,
                    StatusArg::Failed => DeliveryFilter::Failed,
                    StatusArg::Delivered => DeliveryFilter::Delivered,
                    StatusArg::Dead => DeliveryFilter::Dead,
                }),
                limit: a.limit,
            };
            let rows: Vec<DeliveryInfo> =
                super::block_on(client.get_query(&with_id(routes::WEBHOOK_DELIVERIES, a.id), &q))??;
            if output::json() {
                return super::print_json(&rows);
            }
            let w: WebhookInfo = super::block_on(client.get(&with_id(routes::WEBHOOK, a.id)))??;
            if !w.enabled {
                outln!(
                    "{}",
                    clean(&format!(
                        "webhook #{} is DISABLED ({}): pending deliveries wait for `mesh webhook enable {}`",
                        w.id,
                        w.disabled_reason.as_deref().unwrap_or(""),
                        w.id
                    ))
                );
            }
            if rows.is_empty() {
                outln!("no deliveries");
            }
            for d in &rows {
                print_delivery(d, w.enabled);
            }
        }
        WebhookCommand::Redeliver(a) => {
            let route = match (a.delivery, a.all_dead) {
                (Some(id), _) => with_id(routes::DELIVERY_REDELIVER, id),
                (None, Some(webhook)) => with_id(routes::WEBHOOK_REDELIVER, webhook),
                (None, None) => unreachable!("clap requires one"),
            };
            let r: RedeliverResponse = super::block_on(client.post(&route, &serde_json::json!({})))??;
            if output::json() {
                super::print_json(&r)?;
            }
            let what = if r.redelivered == 1 { "delivery is" } else { "deliveries are" };
            if !r.endpoint_enabled {
                return Err(output::fail(
                    "webhook_disabled",
                    format!(
                        "{} {what} pending again, but the endpoint is disabled: nothing is posted until it is enabled",
                        r.redelivered
                    ),
                    Some(
                        "`mesh webhook enable ID` (the endpoint's id, from `mesh webhook list`), once it is fixed"
                            .to_owned(),
                    ),
                ));
            }
            if output::json() {
                return Ok(());
            }
            outln!("{} {what} due again now", r.redelivered);
        }
    }
    Ok(())
}

fn change(client: &mesh_ipc::IpcClient, route: &str, id: i64, done: &str) -> anyhow::Result<()> {
    let w: WebhookInfo = super::block_on(client.post(&with_id(route, id), &serde_json::json!({})))??;
    if output::json() {
        return super::print_json(&w);
    }
    outln!("{}", clean(&format!("webhook #{} {} is {done}", w.id, w.url)));
    let n = w.deliveries.pending;
    if route == routes::WEBHOOK_ENABLE && n > 0 {
        outln!("{n} waiting {} due now", if n == 1 { "delivery is" } else { "deliveries are" });
    }
    Ok(())
}

/// Whose events an endpoint receives, for people.
fn owner(w: &WebhookInfo) -> String {
    match &w.session {
        Some(s) => format!("session {s}"),
        None if w.owner_name.is_empty() => format!("member {}", output::short(&w.owner)),
        None => format!("member {}", w.owner_name),
    }
}

fn print_webhook(w: &WebhookInfo) {
    let state = match (&w.enabled, &w.disabled_reason) {
        (true, _) => "enabled".to_owned(),
        (false, Some(r)) => format!("DISABLED: {r}"),
        (false, None) => "DISABLED".to_owned(),
    };
    outln!("{}", clean(&format!("webhook #{} {}", w.id, w.url)));
    outln!("{}", clean(&format!("  state:      {state}")));
    outln!("{}", clean(&format!("  events:     {} of {}", w.events.join(", "), owner(w))));
    if let Some(m) = &w.mesh {
        outln!("{}", clean(&format!("  mesh:       {m}")));
    }
    if let Some(from) = &w.from {
        let name = w.from_name.as_deref().map(|n| format!("{n} ")).unwrap_or_default();
        outln!("{}", clean(&format!("  from:       {name}({})", output::short(from))));
    }
    if let Some(t) = &w.description {
        outln!("{}", clean(&format!("  note:       {t}")));
    }
    let d = &w.deliveries;
    outln!(
        "  deliveries: {} pending ({} after a failed attempt), {} delivered, {} dead",
        d.pending,
        d.failing,
        d.delivered,
        d.dead
    );
    if let Some(since) = w.failing_since {
        outln!("  failing:    every attempt since {} ({} attempts)", output::ago(since), w.failures);
    }
    if let Some(at) = w.last_success_at {
        outln!("  last 2xx:   {}", output::ago(at));
    }
    if let Some(until) = w.previous_secret_until {
        outln!("  rotation:   the previous secret also signs until {}", output::time(until));
    }
}

fn print_delivery(d: &DeliveryInfo, endpoint_enabled: bool) {
    let state = match d.status {
        DeliveryStatus::Pending if !endpoint_enabled => "waiting (the endpoint is disabled)".to_owned(),
        DeliveryStatus::Delivered => format!("delivered {}", d.delivered_at.map(output::ago).unwrap_or_default()),
        DeliveryStatus::Dead => "dead".to_owned(),
        DeliveryStatus::Pending if d.deadline < mesh_proto::now_ms() => {
            "past its deadline (dead at the next sweep)".to_owned()
        }
        DeliveryStatus::Pending if d.attempts == 0 => "pending".to_owned(),
        DeliveryStatus::Pending => {
            format!("failing, next attempt {}", d.next_attempt_at.map(output::until).unwrap_or_default())
        }
    };
    let last = match (d.last_status, &d.last_error) {
        (_, Some(e)) if d.status != DeliveryStatus::Delivered => format!("  last: {e}"),
        (Some(s), _) => format!("  last: {s}"),
        _ => String::new(),
    };
    outln!(
        "{}",
        clean(&format!(
            "#{:<6} {:<14} {} attempt{}  {state}  id {}{last}",
            d.id,
            d.event_type,
            d.attempts,
            if d.attempts == 1 { "" } else { "s" },
            d.message_id
        ))
    );
}

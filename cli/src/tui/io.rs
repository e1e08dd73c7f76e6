//! The TUI's I/O: loading a snapshot of the current view and carrying out actions, through IPC only.

use mesh_ipc::api::{DeliveriesQuery, DeliveryFilter, DeliveryInfo, RedeliverResponse, WebhookInfo};
use mesh_ipc::api::{
    InboxAckRequest, InboxAckResponse, InboxDeleteRequest, InboxDeleteResponse, InboxFlushRequest, InboxFlushResponse,
    InboxQuery, OutboxEntry, OutboxQuery, SendRequest, SendResponse,
};
use mesh_ipc::{IpcClient, IpcError, routes};

use super::app::{Action, Snapshot};

/// Dead deliveries shown per endpoint.
const DEAD_SHOWN: u32 = 20;

pub async fn snapshot(client: &IpcClient) -> Result<Snapshot, IpcError> {
    let webhooks: Vec<WebhookInfo> = client.get(routes::WEBHOOKS).await?;
    let mut dead_deliveries = Vec::new();
    for w in webhooks.iter().filter(|w| w.deliveries.dead > 0) {
        let q = DeliveriesQuery { status: Some(DeliveryFilter::Dead), limit: Some(DEAD_SHOWN) };
        let rows: Vec<DeliveryInfo> = client.get_query(&routes::with_id(routes::WEBHOOK_DELIVERIES, w.id), &q).await?;
        dead_deliveries.extend(rows);
    }
    Ok(Snapshot {
        webhooks,
        dead_deliveries,
        inbox: client.get_query(routes::INBOX, &InboxQuery { limit: Some(500), ..InboxQuery::default() }).await?,
        outbox: client.get_query(routes::OUTBOX, &OutboxQuery { limit: Some(200), ..OutboxQuery::default() }).await?,
        peers: client.get(routes::PEERS).await?,
        status: Some(client.get(routes::STATUS).await?),
        sessions: client.get(routes::SESSIONS).await?,
    })
}

/// Carries out an action; returns the line to show in the status bar.
pub async fn perform(client: &IpcClient, action: Action) -> Result<Option<String>, IpcError> {
    let empty = serde_json::json!({});
    Ok(match action {
        Action::Refresh | Action::Quit => None,
        Action::Ack(ids) => {
            let r: InboxAckResponse = client.post(routes::INBOX_ACK, &InboxAckRequest { ids, all: false }).await?;
            Some(format!("marked {} read", r.acked.len()))
        }
        Action::AckAll => {
            let r: InboxAckResponse =
                client.post(routes::INBOX_ACK, &InboxAckRequest { ids: vec![], all: true }).await?;
            Some(format!("marked {} read", r.acked.len()))
        }
        Action::Delete(id) => {
            let r: InboxDeleteResponse =
                client.post(routes::INBOX_DELETE, &InboxDeleteRequest { ids: vec![id] }).await?;
            Some(format!("deleted {} message(s)", r.deleted.len()))
        }
        Action::Flush => {
            let r: InboxFlushResponse = client.post(routes::INBOX_FLUSH, &InboxFlushRequest::default()).await?;
            Some(format!("flushed {} read message(s)", r.deleted))
        }
        Action::Send { to, body, mesh } => {
            let req = SendRequest { client_message_id: uuid::Uuid::now_v7().to_string(), to, body, mesh };
            let r: SendResponse = client.post(routes::SEND, &req).await?;
            Some(format!("queued as outbox #{}", r.outbox_id))
        }
        Action::Retry(id) => {
            let r: OutboxEntry = client.post(&routes::with_id(routes::OUTBOX_RETRY, id), &empty).await?;
            Some(format!("outbox #{} is {} again", r.id, r.status.as_str()))
        }
        Action::RedeliverDead(id) => {
            let r: RedeliverResponse = client.post(&routes::with_id(routes::WEBHOOK_REDELIVER, id), &empty).await?;
            Some(format!("webhook #{id}: {} dead deliveries due again", r.redelivered))
        }
        Action::EnableWebhook(id, on) => {
            let route = if on { routes::WEBHOOK_ENABLE } else { routes::WEBHOOK_DISABLE };
            let w: WebhookInfo = client.post(&routes::with_id(route, id), &empty).await?;
            Some(format!("webhook #{} {}", w.id, if w.enabled { "enabled" } else { "disabled" }))
        }
        Action::Abort(id) => {
            let r: OutboxEntry = client.post(&routes::with_id(routes::OUTBOX_ABORT, id), &empty).await?;
            Some(format!("outbox #{} aborted", r.id))
        }
    })
}

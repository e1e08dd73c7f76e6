//! The outbox drain of one link: claims this identity's due rows, sends them on this link's socket
//! only, and records each answer. It keeps at most [`WINDOW`] sends unanswered; it wakes on new rows,
//! on answers, and on a timer for the next row whose backoff ends. When the link goes down, the rows it
//! still had in flight go back to pending at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::wire::{Accepted, ClientFrame, ErrorCode, ErrorFrame, SendMessage};
use mesh_proto::{MeshId, PublicKey};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use mesh_broker::sqlite::Db;

use crate::outbox;

/// Sends in flight per connection.
pub const WINDOW: usize = 64;

/// The broker's answer to one `send`, routed here by the link's reader.
#[derive(Debug)]
pub enum Reply {
    Accepted(Accepted),
    Error(ErrorFrame),
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    db: Db,
    changes: Arc<outbox::Changes>,
    mesh: MeshId,
    sender: PublicKey,
    out: mpsc::Sender<String>,
    mut replies: mpsc::UnboundedReceiver<Reply>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut inflight: HashMap<u64, i64> = HashMap::new();
    let mut next_request: u64 = 1;
    loop {
        let mut due = None;
        if inflight.len() < WINDOW {
            let room = WINDOW - inflight.len();
            let claimed = db.call(move |c| outbox::claim(c, &mesh, &sender, room, now_ms())).await;
            match claimed {
                Ok(rows) => {
                    for row in rows {
                        let id = next_request;
                        next_request += 1;
                        let frame = ClientFrame::Send(SendMessage {
                            id,
                            client_message_id: row.client_message_id,
                            to: row.target,
                            nonce: row.nonce,
                            ciphertext: row.ciphertext,
                            sig: row.sig,
                            ttl_ms: Some(row.expires_at.saturating_sub(now_ms()).max(1)),
                        });
                        inflight.insert(id, row.id);
                        if out.send(frame.to_json()).await.is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %mesh_proto::error::chain(&e), "claiming outbox rows; retrying in 1 s");
                    due = Some(now_ms() + 1000);
                }
            }
            if due.is_none() && inflight.len() < WINDOW {
                due = db.call(move |c| outbox::next_due(c, &mesh, &sender)).await.ok().flatten();
            }
        }
        let sleep = due.map(|t| Duration::from_millis(t.saturating_sub(now_ms()).max(1)));
        tokio::select! {
            () = stop.cancelled() => break,
            () = wake.notified() => {}
            reply = replies.recv() => match reply {
                Some(reply) => {
                    let mut batch = vec![reply];
                    while let Ok(more) = replies.try_recv() {
                        batch.push(more);
                    }
                    record(&db, &mut inflight, batch).await;
                    changes.bump();
                }
                None => break,
            },
            () = sleep_opt(sleep) => {}
        }
    }
    let orphaned: Vec<i64> = inflight.into_values().collect();
    if !orphaned.is_empty() {
        tracing::info!(rows = orphaned.len(), "connection ended with sends unanswered; back to pending");
        if let Err(e) = db.call(move |c| outbox::release(c, &orphaned)).await {
            tracing::error!(error = %mesh_proto::error::chain(&e), "releasing inflight rows; their leases will return them");
        }
    }
}

async fn record(db: &Db, inflight: &mut HashMap<u64, i64>, replies: Vec<Reply>) {
    let mut updates = Vec::with_capacity(replies.len());
    for reply in replies {
        let id = match &reply {
            Reply::Accepted(a) => a.id,
            Reply::Error(e) => e.id.unwrap_or_default(),
        };
        match inflight.remove(&id) {
            Some(row) => updates.push((row, reply)),
            None => tracing::warn!(request = id, "answer for a request not in flight; ignored"),
        }
    }
    let result = db
        .call(move |c| {
            let now = now_ms();
            let tx = c.transaction()?;
            for (row, reply) in updates {
                match reply {
                    Reply::Accepted(a) => outbox::mark_done(&tx, row, &a.message_id, a.recipients)?,
                    Reply::Error(e) => {
                        // Being told to slow down is not a failed attempt: it never uses up the cap.
                        let counts = e.code != ErrorCode::RateLimited;
                        let status =
                            outbox::mark_failed(&tx, row, &e.to_string(), e.permanent, e.retry_after_ms, counts, now)?;
                        tracing::info!(row, code = e.code.as_str(), status = status.as_str(), "send refused");
                    }
                }
            }
            tx.commit()
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %mesh_proto::error::chain(&e), "recording broker answers; the rows' leases will return them");
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

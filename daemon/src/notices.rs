//! Announcing messages to agents: which unread messages were pushed to an agent or woke it.
//!
//! A claim records, in one statement, each unread message of a recipient not yet announced on a
//! channel, and returns them: two claimants (a restarted MCP server and its predecessor, two copies
//! of a hook) never announce the same message, and a restart neither repeats nor skips one.
//! Claiming never marks a message read. A waiting claim can be superseded by a newer one for the same
//! recipient and channel ([`Claimants`]), which is how an older copy of a hook learns to step aside.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use mesh_ipc::api::{InboxMessage, NoticeChannel};
use mesh_proto::PublicKey;
use rusqlite::{Connection, params};
use tokio::sync::Notify;

use crate::inbox;

/// Who claims, for a claim that is confirmed once the claimant has delivered what it claimed: its
/// unconfirmed claims go to the next claimant that is not it (it died before delivering them).
pub type Claimant<'a> = Option<&'a str>;

/// Whether a message still waits to be announced on a channel (for claimant `?3`): no notice there, or
/// one another claimant took and never confirmed.
const WAITING: &str = "NOT EXISTS (SELECT 1 FROM notices n WHERE n.inbox_id = i.id AND n.channel = ?2
                         AND (n.confirmed = 1 OR n.claimant IS ?3))";

/// Claims up to `limit` of `recipient`'s unread, filed messages still waiting to be announced on
/// `channel`, the oldest first. Without a claimant the claim is final; with one, it stands once the
/// claimant [`confirm`]s it. Returns them, and how many more are waiting.
pub fn claim(
    conn: &Connection,
    recipient: &PublicKey,
    channel: NoticeChannel,
    claimant: Claimant<'_>,
    limit: u32,
    now: u64,
) -> rusqlite::Result<(Vec<InboxMessage>, u64)> {
    let tx = conn.unchecked_transaction()?;
    let ids: Vec<i64> = tx
        .prepare_cached(&format!(
            "INSERT INTO notices (inbox_id, channel, at, claimant, confirmed)
             SELECT i.id, ?2, ?4, ?3, ?3 IS NULL FROM inbox i
             WHERE i.recipient = ?1 AND i.read_at IS NULL AND i.status = 'ready' AND {WAITING}
             ORDER BY i.id LIMIT ?5
             ON CONFLICT (inbox_id, channel) DO UPDATE SET
               at = excluded.at, claimant = excluded.claimant, confirmed = excluded.confirmed
             RETURNING inbox_id"
        ))?
        .query_map(params![recipient.to_string(), channel.as_str(), claimant, now as i64, limit], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let more: i64 = tx
        .prepare_cached(&format!(
            "SELECT COUNT(*) FROM inbox i
             WHERE i.recipient = ?1 AND i.read_at IS NULL AND i.status = 'ready' AND {WAITING}"
        ))?
        .query_row(params![recipient.to_string(), channel.as_str(), claimant], |r| r.get(0))?;
    let mut messages = ids.into_iter().map(|id| inbox::get(&tx, id)).collect::<Result<Vec<_>, _>>()?;
    messages.sort_by_key(|m| m.id);
    tx.commit()?;
    Ok((messages, more.max(0) as u64))
}

/// `claimant` delivered these messages it claimed on `channel`: they are announced for good.
pub fn confirm(
    conn: &Connection,
    recipient: &PublicKey,
    channel: NoticeChannel,
    claimant: &str,
    ids: &[i64],
) -> rusqlite::Result<usize> {
    let ids = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
    conn.prepare_cached(
        "UPDATE notices SET confirmed = 1
         WHERE channel = ?2 AND claimant = ?3 AND confirmed = 0
           AND inbox_id IN (SELECT value FROM json_each(?4))
           AND inbox_id IN (SELECT id FROM inbox WHERE recipient = ?1)",
    )?
    .execute(params![recipient.to_string(), channel.as_str(), claimant, ids])
}

/// The current waiting claim of each (recipient, channel): its number, and how to tell it it was
/// superseded.
type Current = HashMap<(PublicKey, NoticeChannel), (u64, Arc<Notify>)>;

/// The waiting claims, one current per (recipient, channel): a newer one supersedes the older.
#[derive(Default)]
pub struct Claimants {
    current: Mutex<Current>,
    next: std::sync::atomic::AtomicU64,
}

/// A waiting claim's place; it is current until a newer one for the same recipient and channel.
pub struct Waiter<'a> {
    claimants: &'a Claimants,
    key: (PublicKey, NoticeChannel),
    id: u64,
    pub superseded: Arc<Notify>,
}

impl Claimants {
    /// Registers a waiting claim; the one it replaces is told at once.
    pub fn enter(&self, recipient: PublicKey, channel: NoticeChannel) -> Waiter<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        let key = (recipient, channel);
        let old = self.lock().insert(key, (id, notify.clone()));
        if let Some((_, older)) = old {
            // notify_one stores a permit: the older claim sees it even if not waiting at this instant.
            older.notify_one();
        }
        Waiter { claimants: self, key, id, superseded: notify }
    }

    /// How many claims are waiting.
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Waiter<'_> {
    /// Whether a newer claim took this one's place.
    pub fn is_current(&self) -> bool {
        self.claimants.lock().get(&self.key).is_some_and(|(id, _)| *id == self.id)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut current = self.claimants.lock();
        if current.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            current.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_ipc::api::{ClaimNoticesRequest, ClaimNoticesResponse};

    use super::*;
    use crate::daemon::for_tests;
    use crate::ipc_server::{Caller, test_call_claim};

    fn insert(c: &Connection, recipient: &PublicKey, n: u32, status: &str) -> rusqlite::Result<i64> {
        c.execute(
            "INSERT INTO inbox (mesh_id, recipient, message_id, sender, sender_name, client_message_id, target, raw,
               status, body, sent_at, received_at)
             VALUES ('m', ?1, ?2, 's', 'bob', ?2, ?1, '', ?3, 'hello', 1, 1)",
            params![recipient.to_string(), format!("msg-{n}"), status],
        )?;
        Ok(c.last_insert_rowid())
    }

    #[test]
    fn each_unread_message_is_claimed_once_per_channel_and_never_marked_read() {
        let (_dir, d) = for_tests();
        let me = d.member.identity.key();
        let other = mesh_proto::Identity::generate().key();
        d.db.call_blocking(move |c| {
            let ids = [insert(c, &me, 1, "ready")?, insert(c, &me, 2, "ready")?, insert(c, &me, 3, "ready")?];
            insert(c, &me, 4, "failed")?; // not filed: never announced
            insert(c, &other, 5, "ready")?; // another recipient's
            c.execute("UPDATE inbox SET read_at = 5 WHERE id = ?1", [ids[2]])?; // read already
            let (first, more) = claim(c, &me, NoticeChannel::Push, None, 1, 10)?;
            assert_eq!((first.iter().map(|m| m.id).collect::<Vec<_>>(), more), (vec![ids[0]], 1));
            let (second, more) = claim(c, &me, NoticeChannel::Push, None, 100, 10)?;
            assert_eq!((second.iter().map(|m| m.id).collect::<Vec<_>>(), more), (vec![ids[1]], 0));
            assert!(claim(c, &me, NoticeChannel::Push, None, 100, 10)?.0.is_empty(), "never twice on a channel");
            // Another channel has its own record; nothing was marked read.
            assert_eq!(claim(c, &me, NoticeChannel::Wake, None, 100, 10)?.0.len(), 2);
            let unread: i64 =
                c.query_row("SELECT COUNT(*) FROM inbox WHERE read_at IS NULL AND status = 'ready'", [], |r| r.get(0))?;
            assert_eq!(unread, 3);
            // A deleted message takes its notices with it.
            c.execute("DELETE FROM inbox WHERE id = ?1", [ids[0]])?;
            let left: i64 = c.query_row("SELECT COUNT(*) FROM notices WHERE inbox_id = ?1", [ids[0]], |r| r.get(0))?;
            assert_eq!(left, 0);
            Ok(())
        })
        .expect("claims");
    }

    #[test]
    fn a_claim_never_confirmed_goes_to_the_next_claimant() {
        let (_dir, d) = for_tests();
        let me = d.member.identity.key();
        d.db.call_blocking(move |c| {
            let id = insert(c, &me, 1, "ready")?;
            let push = NoticeChannel::Push;
            assert_eq!(claim(c, &me, push, Some("a"), 100, 1)?.0.len(), 1, "a claims it");
            assert!(claim(c, &me, push, Some("a"), 100, 2)?.0.is_empty(), "a has it in hand");
            // a died before delivering: b gets it, delivers and confirms; nobody gets it again.
            let (taken, _) = claim(c, &me, push, Some("b"), 100, 3)?;
            assert_eq!(taken.iter().map(|m| m.id).collect::<Vec<_>>(), vec![id]);
            assert_eq!(confirm(c, &me, push, "a", &[id])?, 0, "a's confirmation is no longer a's to give");
            assert_eq!(confirm(c, &me, push, "b", &[id])?, 1);
            assert!(claim(c, &me, push, Some("c"), 100, 4)?.0.is_empty());
            assert!(claim(c, &me, push, None, 100, 5)?.0.is_empty());
            Ok(())
        })
        .expect("claims");
    }

    #[tokio::test]
    async fn a_waiting_claim_returns_when_a_message_arrives_or_a_newer_one_takes_over() {
        let (_dir, d) = for_tests();
        let me = d.member.identity.key();
        let wait = |d: Arc<crate::daemon::Daemon>| async move {
            let req =
                ClaimNoticesRequest { channel: NoticeChannel::Wake, wait_ms: 60_000, limit: None, claimant: None };
            test_call_claim(d, Caller::Member, req).await
        };
        // The first waits; a second supersedes it at once.
        let first = tokio::spawn(wait(d.clone()));
        while d.claimants.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn(wait(d.clone()));
        let ClaimNoticesResponse { superseded, messages, .. } = first.await.expect("first");
        assert!(superseded && messages.is_empty());
        // A message arrives: the current claim takes it.
        let id = d.db.call_blocking(move |c| insert(c, &me, 1, "ready")).expect("insert");
        d.notify_changed();
        let got = second.await.expect("second");
        assert_eq!((got.superseded, got.messages.iter().map(|m| m.id).collect::<Vec<_>>()), (false, vec![id]));
    }
}

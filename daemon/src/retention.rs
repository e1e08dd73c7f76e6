//! The retention janitor: how long handled rows are kept, and the sweep that enforces it.
//!
//! Defaults: read inbox rows 7 days after they were read, failed ones 30 days; settled outbox rows
//! (`done`, `aborted`) 7 days, dead ones 30 days; events 7 days. Unread messages are never deleted by
//! the janitor. Override in `config/daemon.json`:
//! `{"retention": {"read_days": 7, "failed_days": 30, "outbox_days": 7, "dead_days": 30, "events_days": 7}}`.
//! The same file's `webhooks` section configures webhook delivery ([`crate::webhooks::Config`]),
//! the retention of webhook deliveries included.

use std::time::Duration;

use mesh_ipc::Home;
use rusqlite::{Connection, params};
use serde::Deserialize;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// How often the janitor runs (and once at start-up).
pub const SWEEP_EVERY: Duration = Duration::from_secs(60 * 60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    pub read_days: u64,
    pub failed_days: u64,
    pub outbox_days: u64,
    pub dead_days: u64,
    pub events_days: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { read_days: 7, failed_days: 30, outbox_days: 7, dead_days: 30, events_days: 7 }
    }
}

/// `config/daemon.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct DaemonConfig {
    pub retention: Retention,
    pub webhooks: crate::webhooks::Config,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {detail}")]
pub struct ConfigError {
    path: String,
    detail: String,
}

/// Reads `config/daemon.json`; defaults when it does not exist.
pub fn load(home: &Home) -> Result<DaemonConfig, ConfigError> {
    let path = home.config_dir.join("daemon.json");
    let error = |detail: String| ConfigError { path: path.display().to_string(), detail };
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text).map_err(error),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DaemonConfig::default()),
        Err(e) => Err(error(e.to_string())),
    }
}

/// The settings `text` (a `daemon.json`) holds, checked.
pub fn parse(text: &str) -> Result<DaemonConfig, String> {
    let config = serde_json::from_str::<DaemonConfig>(text).map_err(|e| e.to_string())?;
    config.webhooks.check()?;
    Ok(config)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub inbox: usize,
    pub outbox: usize,
    pub events: usize,
    pub webhook_deliveries: usize,
}

/// Deletes what is past its retention.
pub fn sweep(conn: &mut Connection, config: &DaemonConfig, now: u64) -> rusqlite::Result<Swept> {
    let r = &config.retention;
    let before = |days: u64| now.saturating_sub(days.saturating_mul(DAY_MS)) as i64;
    let tx = conn.transaction()?;
    let mut swept = Swept::default();
    swept.inbox +=
        tx.execute("DELETE FROM inbox WHERE status = 'failed' AND received_at < ?1", [before(r.failed_days)])?;
    // A read row whose read receipt has not gone out yet stays until it has.
    swept.inbox += tx.execute(
        "DELETE FROM inbox WHERE read_at IS NOT NULL AND read_at < ?1 AND COALESCE(read_receipt, 'sent') = 'sent'",
        [before(r.read_days)],
    )?;
    swept.outbox += tx.execute(
        "DELETE FROM outbox WHERE status IN ('done', 'aborted') AND enqueued_at < ?1",
        [before(r.outbox_days)],
    )?;
    swept.outbox +=
        tx.execute("DELETE FROM outbox WHERE status = 'dead' AND enqueued_at < ?1", [before(r.dead_days)])?;
    tx.execute(
        "DELETE FROM receipts WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.client_message_id = receipts.client_message_id)",
        params![],
    )?;
    swept.events += crate::events::prune(&tx, before(r.events_days) as u64)?;
    swept.webhook_deliveries += crate::webhooks::prune(&tx, &config.webhooks, now)?;
    tx.commit()?;
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_is_past_its_retention_goes_and_unread_messages_stay() {
        let (_dir, db) = crate::store::temp_db();
        let now = 100 * DAY_MS;
        let insert = |c: &Connection,
                      id: i64,
                      status: &str,
                      received: u64,
                      read: Option<u64>,
                      receipt: Option<&str>| {
            c.execute(
                "INSERT INTO inbox (id, mesh_id, recipient, message_id, sender, sender_name, client_message_id, target, raw,
                   status, sent_at, received_at, read_at, read_receipt)
                 VALUES (?1, 'm', 'r', ?1, 's', 's', ?1, 't', '', ?2, ?3, ?3, ?4, ?5)",
                params![id, status, received as i64, read.map(|t| t as i64), receipt],
            )
        };
        db.call_blocking(|c| {
            insert(c, 1, "ready", now - 60 * DAY_MS, None, None)?; // unread, old: kept
            insert(c, 2, "ready", now - 10 * DAY_MS, Some(now - 8 * DAY_MS), Some("sent"))?; // read 8 days ago: gone
            insert(c, 3, "ready", now - 10 * DAY_MS, Some(now - 8 * DAY_MS), Some("pending"))?; // receipt unsent: kept
            insert(c, 4, "ready", now - 2 * DAY_MS, Some(now - DAY_MS), Some("sent"))?; // read yesterday: kept
            insert(c, 5, "failed", now - 31 * DAY_MS, None, None)?; // failed a month ago: gone
            insert(c, 6, "failed", now - 20 * DAY_MS, None, None)?; // failed 20 days ago: kept
            let swept = sweep(c, &DaemonConfig::default(), now)?;
            assert_eq!(swept.inbox, 2);
            let left: Vec<i64> = c
                .prepare("SELECT id FROM inbox ORDER BY id")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            assert_eq!(left, vec![1, 3, 4, 6]);
            Ok(())
        })
        .expect("db");
    }

    #[test]
    fn config_file_overrides_and_typos_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::at(dir.path());
        assert_eq!(load(&home).expect("defaults"), DaemonConfig::default());
        home.ensure_dirs().expect("dirs");
        let write = |text: &str| std::fs::write(home.config_dir.join("daemon.json"), text).expect("write");
        write(r#"{"retention": {"read_days": 1}, "webhooks": {"deadline": "2h", "retry_schedule": ["1s", "500ms"]}}"#);
        let config = load(&home).expect("parsed");
        assert_eq!(config.retention.read_days, 1);
        assert_eq!(config.webhooks.deadline, Duration::from_secs(7200));
        assert_eq!(config.webhooks.retry_schedule, [Duration::from_secs(1), Duration::from_millis(500)]);
        assert_eq!(config.webhooks.max_in_flight, 8, "the rest keeps its default");
        write(r#"{"retention": {"read_dayz": 1}}"#);
        assert!(load(&home).is_err());
        write(r#"{"webhooks": {"deadline": "two days"}}"#);
        assert!(load(&home).unwrap_err().to_string().contains("two days"));
        write(r#"{"webhooks": {"retry_schedule": []}}"#);
        assert!(load(&home).unwrap_err().to_string().contains("retry_schedule"));
        write(r#"{"webhooks": {"timeout": "99999999999d"}}"#);
        assert!(load(&home).unwrap_err().to_string().contains("timeout"), "bounded");
        write(r#"{"webhooks": {"disable_after_attempts": 0}}"#);
        assert!(load(&home).is_err());
    }
}

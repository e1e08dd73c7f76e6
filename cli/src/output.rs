//! Human output helpers: times and short keys.

use std::time::{Duration, UNIX_EPOCH};

/// A UTC timestamp to the second, for a time in ms since the epoch.
pub fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// "12s ago", "3m ago", "2h ago", "5d ago".
pub fn ago(ms: u64) -> String {
    let now = mesh_proto::now_ms();
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// The first 8 hex digits of a key, for tables (never for addressing).
pub fn short(key: &str) -> &str {
    key.get(..8).unwrap_or(key)
}

/// One line of a message body: newlines shown as ⏎, cut at `max` characters.
pub fn preview(body: &str, max: usize) -> String {
    let flat: String = body.chars().map(|c| if c == '\n' { '⏎' } else { c }).collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_cut_and_flatten() {
        assert_eq!(preview("a\nb", 10), "a⏎b");
        assert_eq!(preview("abcdefghij", 5), "abcd…");
        assert_eq!(short("0123456789abcdef"), "01234567");
    }
}

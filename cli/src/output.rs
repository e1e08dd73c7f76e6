//! Everything the CLI prints: the `--json` switch, standard output that a closed pipe ends quietly,
//! errors (as text, or as one JSON object on stderr), times and short keys.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use mesh_ipc::IpcError;
use mesh_ipc::api::ApiErrorCode;

static JSON: AtomicBool = AtomicBool::new(false);

/// Turns `--json` on for this process (set once, by `main`).
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

/// Whether to print JSON instead of text.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Writes to standard output at once. A reader that went away (`mesh watch | head -1`) ends the
/// process quietly with status 0, as git and gh do; any other write failure is reported and exits 1.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        stdout_failed(&e);
    }
}

/// Bytes to standard output, like [`write_stdout`].
pub fn write_stdout_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        stdout_failed(&e);
    }
}

fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    let _ = writeln!(std::io::stderr(), "mesh: writing to standard output: {e}");
    std::process::exit(1);
}

/// Ends the process quietly (status 0) as soon as standard output is a pipe whose reader has gone,
/// even while nothing is being written: a follower such as `mesh watch | head -1` then exits when
/// `head` does, not at the next event.
pub fn exit_when_stdout_closes() {
    use std::os::fd::AsFd;
    let spawned = std::thread::Builder::new().name("stdout-watch".into()).spawn(|| {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let stdout = std::io::stdout();
        let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::empty())];
        // Only errors and hang-ups are asked for, so a terminal or a file never wakes this thread.
        if let Ok(n) = poll(&mut fds, PollTimeout::NONE)
            && n > 0
            && fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
        {
            std::process::exit(0);
        }
    });
    drop(spawned);
}

/// `println!` to standard output through [`write_stdout`].
#[macro_export]
macro_rules! outln {
    () => { $crate::output::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` to standard output through [`write_stdout`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics (a closed standard error is not worth a crash).
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Prints `value` as pretty JSON on standard output.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_stdout(format_args!("{text}\n"));
    Ok(())
}

/// An error of the CLI itself, with its code for `--json` and what to do next.
#[derive(Debug)]
pub struct CliError {
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// A CLI error with a code and a hint, as an `anyhow::Error`.
pub fn fail(code: &'static str, message: impl Into<String>, hint: Option<String>) -> anyhow::Error {
    anyhow::Error::new(CliError { code, message: message.into(), hint })
}

/// The documented exit codes: 0 ok, 1 failure, 2 usage, 3 daemon unreachable.
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;

/// What an error is, for the exit code and the JSON `code`.
pub struct Described {
    pub code: String,
    pub message: String,
    pub hint: Option<String>,
    pub exit: u8,
    pub candidates: Vec<mesh_ipc::api::Candidate>,
    /// For a refused broker certificate: the one presented.
    pub certificate: Option<String>,
}

pub fn describe_error(err: &anyhow::Error) -> Described {
    let mut d = Described {
        code: "failed".into(),
        message: format!("{err:#}"),
        hint: None,
        exit: EXIT_FAILURE,
        candidates: Vec::new(),
        certificate: None,
    };
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<IpcError>() {
            match e {
                IpcError::Unreachable { .. } => {
                    d.code = "daemon_unreachable".into();
                    d.hint = Some("start it with `mesh daemon up`".into());
                    d.exit = EXIT_UNREACHABLE;
                }
                IpcError::Api { error, .. } => {
                    d.code = api_code(error.code);
                    d.hint = error.hint.clone();
                    d.candidates = error.candidates.clone();
                    d.certificate = error.certificate.clone();
                }
                IpcError::Protocol(_) => d.code = "protocol".into(),
            }
            break;
        }
        if let Some(e) = cause.downcast_ref::<CliError>() {
            d.code = e.code.into();
            d.hint = e.hint.clone();
            if e.code == "usage" {
                d.exit = EXIT_USAGE;
            }
            break;
        }
    }
    d
}

fn api_code(code: ApiErrorCode) -> String {
    serde_json::to_value(code).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_else(|| "unknown".into())
}

/// Reports a failed command on standard error: `mesh: …` and a hint, or with `--json` one object
/// `{"error": {"code", "message", "hint"}}`. Returns the exit code.
pub fn report_error(err: &anyhow::Error) -> u8 {
    let d = describe_error(err);
    if json() {
        let mut error = serde_json::json!({ "code": d.code, "message": d.message, "hint": d.hint });
        if !d.candidates.is_empty() {
            error["candidates"] = serde_json::to_value(&d.candidates).unwrap_or_default();
        }
        if let Some(certificate) = &d.certificate {
            error["certificate"] = certificate.as_str().into();
        }
        errln!("{}", serde_json::json!({ "error": error }));
    } else {
        // Messages can carry a peer's name or a broker's words: never raw to the terminal.
        errln!("mesh: {}", clean_lines(&d.message));
        if let Some(hint) = d.hint.filter(|h| !d.message.contains(h.as_str())) {
            errln!("hint: {}", clean_lines(&hint));
        }
    }
    d.exit
}

/// A UTC timestamp to the second, for a time in ms since the epoch.
/// A membership change in words (names cleaned, keys shown short beside them).
pub fn membership_change(m: &mesh_ipc::api::MembershipEvent) -> String {
    let who = format!("{} ({})", clean(&m.name), short(&m.key));
    let by = format!("{} ({})", clean(&m.by_name), short(&m.by));
    let said = match (m.change.as_str(), m.role) {
        ("leave", _) => format!("{who} left the mesh"),
        ("remove", _) => format!("{who} was removed by {by}"),
        ("rotate_key", _) => {
            format!("{by} gave the mesh a new key{}", m.key_epoch.map(|e| format!(" (epoch {e})")).unwrap_or_default())
        }
        (_, Some(mesh_proto::wire::Role::Owner)) => format!("{who} is the owner now (handed over by {by})"),
        (_, Some(role)) => format!("{who} is {} now (by {by})", role.as_str()),
        (change, None) => format!("{who}: {change} by {by}"),
    };
    if m.signed { said } else { format!("{said} [not signed by {by}: the broker's word]") }
}

/// A size for people: bytes, KiB or MiB.
pub fn bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} bytes"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

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

/// "in 12s", "in 3m", … for a time in the future (or "now").
pub fn until(ms: u64) -> String {
    let now = mesh_proto::now_ms();
    let secs = ms.saturating_sub(now) / 1000;
    match secs {
        0 => "now".to_owned(),
        1..60 => format!("in {secs}s"),
        60..3600 => format!("in {}m", secs / 60),
        3600..86400 => format!("in {}h", secs / 3600),
        _ => format!("in {}d", secs / 86400),
    }
}

/// The first 8 hex digits of a key, as shown in tables (and accepted as a target when unique).
pub fn short(key: &str) -> &str {
    key.get(..8).unwrap_or(key)
}

/// Text from a peer (a body, a name, a broker's error detail) made safe to print on one line of a
/// terminal: newlines as ⏎, tabs as spaces, other control characters (C0, DEL, C1) as `\xNN`, and
/// characters that reorder or hide text (bidirectional controls, zero-width characters) as `<U+NNNN>`,
/// so that a sender can neither forge lines, move the cursor, set the window title or clipboard, nor
/// make text read backwards. `--json` output keeps the exact text.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // What the last character written was, for the joiner and selectors an emoji may hold.
    #[derive(Clone, Copy, PartialEq)]
    enum Last {
        Other,
        /// A symbol an emoji sequence can start with or continue.
        Symbol,
        /// A presentation selector right after such a symbol.
        Selector,
    }
    let mut last = Last::Other;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let before = std::mem::replace(&mut last, Last::Other);
        match c {
            // Inside an emoji (`❤️`, `👩‍💻`) the joiner and one presentation selector stay; anywhere
            // else, and repeated, they could carry text a person cannot see.
            '\u{FE0E}' | '\u{FE0F}' if before == Last::Symbol => {
                last = Last::Selector;
                out.push(c)
            }
            '\u{200D}' if before != Last::Other && chars.peek().is_some_and(|&n| emoji_symbol(n)) => out.push(c),
            '\n' => out.push('⏎'),
            '\t' => out.push(' '),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if shown_as_code(c) => out.push_str(&format!("<U+{:04X}>", c as u32)),
            c => {
                if emoji_symbol(c) {
                    last = Last::Symbol;
                }
                out.push(c)
            }
        }
    }
    out
}

/// A visible symbol outside ASCII that is no letter or digit: what emoji are made of.
fn emoji_symbol(c: char) -> bool {
    !c.is_ascii() && !c.is_alphanumeric() && !c.is_control() && !shown_as_code(c) && !c.is_whitespace()
}

/// Characters that render as nothing, reorder text or break lines where a terminal would not (the
/// ones names may not hold, [`mesh_proto::names::invisible`]: zero-width and bidirectional controls,
/// soft hyphens, tag characters that can smuggle hidden text, fillers), and the other format and
/// separator characters: shown by their code point, so what a person reads is what was sent.
fn shown_as_code(c: char) -> bool {
    mesh_proto::names::invisible(c)
        // Private use (no meaning of their own), specials and blank format or filler characters.
        || matches!(
            c,
            '\u{E000}'..='\u{F8FF}'
                | '\u{F0000}'..='\u{10FFFF}'
                | '\u{FDD0}'..='\u{FDEF}'
                | '\u{FFF0}'..='\u{FFF8}'
                | '\u{FFFE}'
                | '\u{FFFF}'
                | '\u{13430}'..='\u{1343F}'
                | '\u{16FE4}'
                | '\u{1D159}'
        )
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{FFF9}'..='\u{FFFB}' | '\u{1D173}'..='\u{1D17A}')
}

/// Like [`clean`], keeping line breaks (for multi-line messages such as a daemon's start-up log).
pub fn clean_lines(text: &str) -> String {
    text.split('\n').map(clean).collect::<Vec<_>>().join("\n")
}

/// One line of a message body, cut at `max` characters of the original and made safe to print
/// ([`clean`]; cut first, so an escape is never shown in half).
pub fn preview(body: &str, max: usize) -> String {
    if body.chars().count() <= max {
        clean(body)
    } else {
        let cut: String = body.chars().take(max.saturating_sub(1)).collect();
        format!("{}…", clean(&cut))
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

    #[test]
    fn terminal_controls_from_peers_are_shown_not_obeyed() {
        assert_eq!(clean("red\x1b[31m!\x07\rover"), "red\\x1b[31m!\\x07\\x0dover");
        assert_eq!(clean("\x1b]52;c;aGk=\x07"), "\\x1b]52;c;aGk=\\x07", "OSC 52 clipboard write");
        assert_eq!(clean("\u{202E}txt.exe"), "<U+202E>txt.exe");
        assert_eq!(clean("a\u{200B}b\u{9b}c\u{7f}"), "a<U+200B>b\\x9bc\\x7f");
        assert_eq!(clean("café\tok"), "café ok");
        assert!(!clean("\u{1b}\u{9d}\u{85}").chars().any(char::is_control));
        // Invisible, smuggling and line-breaking characters: none reaches the terminal as itself.
        let hostile =
            "x\u{ad}\u{34f}\u{180e}\u{3164}\u{2800}\u{e0041}\u{206a}\u{1d173}\u{fff9}\u{2028}\u{2029}\u{200d}\u{fe0f}";
        assert_eq!(
            clean(hostile),
            "x<U+00AD><U+034F><U+180E><U+3164><U+2800><U+E0041><U+206A><U+1D173><U+FFF9><U+2028><U+2029><U+200D><U+FE0F>"
        );
        assert_eq!(clean("naïve 東京 😀 ok"), "naïve 東京 😀 ok", "letters and emoji stay as they are");
        assert_eq!(clean("\u{2764}\u{FE0F} \u{1F469}\u{200D}\u{1F4BB}"), "\u{2764}\u{FE0F} \u{1F469}\u{200D}\u{1F4BB}");
        assert_eq!(clean("a\u{200D}b\u{FE0F}"), "a<U+200D>b<U+FE0F>", "not inside an emoji");
        // A run of selectors or joiners after an emoji is a hidden channel: one selector stays.
        assert_eq!(clean("\u{1F600}\u{FE0E}\u{FE0F}\u{200D}\u{FE0E}"), "\u{1F600}\u{FE0E}<U+FE0F><U+200D><U+FE0E>");
        assert_eq!(clean("\u{1F44D}\u{1F3FD} \u{1F1EB}\u{1F1F7}"), "\u{1F44D}\u{1F3FD} \u{1F1EB}\u{1F1F7}");
        assert_eq!(
            clean("\u{E000}\u{FDD0}\u{FFF0}\u{16FE4}\u{1D159}\u{13430}"),
            "<U+E000><U+FDD0><U+FFF0><U+16FE4><U+1D159><U+13430>"
        );
    }
}

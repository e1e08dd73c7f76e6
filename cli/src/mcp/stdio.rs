//! Standard input and output for the MCP server, with every request answered: a line that is not
//! JSON (not UTF-8, a lone surrogate, cut short) or longer than [`MAX_LINE`] gets a JSON-RPC parse
//! error with its id when one can be read, instead of silence; every other line goes on to the
//! server. Both the server's answers and these errors go out through one writer, a whole line at a
//! time.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::Mutex;

/// The longest request line read whole; longer ones are answered with an error and skipped.
const MAX_LINE: usize = 4 * 1024 * 1024;

/// The server's side of standard input and output.
pub fn guarded() -> (DuplexStream, DuplexStream) {
    let (to_server, server_in) = tokio::io::duplex(64 * 1024);
    let (server_out, from_server) = tokio::io::duplex(64 * 1024);
    let stdout = Arc::new(Mutex::new(tokio::io::stdout()));
    tokio::spawn(requests(to_server, stdout.clone()));
    tokio::spawn(answers(from_server, stdout));
    (server_in, server_out)
}

/// Standard input to the server, line by line; bad lines answered here.
async fn requests(mut to_server: DuplexStream, stdout: Arc<Mutex<tokio::io::Stdout>>) {
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut stdin).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = line.ends_with(b"\n");
        if !complete && line.len() > MAX_LINE {
            // Too long: skip the rest of it, then say so.
            let mut rest = Vec::new();
            if stdin.read_until(b'\n', &mut rest).await.is_err() {
                return;
            }
            write_line(&stdout, &error(read_id(&line), -32600, "request too large (over 4 MiB)")).await;
            continue;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(&line) {
            Ok(_) => {
                if !complete {
                    line.push(b'\n');
                }
                if to_server.write_all(&line).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "a request that is not JSON");
                write_line(&stdout, &error(read_id(&line), -32700, &format!("parse error: {e}"))).await;
            }
        }
    }
}

/// The server's output to standard output, a whole line at a time.
async fn answers(from_server: DuplexStream, stdout: Arc<Mutex<tokio::io::Stdout>>) {
    let mut lines = BufReader::new(from_server).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        write_line(&stdout, &line).await;
    }
}

async fn write_line(stdout: &Mutex<tokio::io::Stdout>, line: &str) {
    let mut out = stdout.lock().await;
    let _ = out.write_all(format!("{line}\n").as_bytes()).await;
    let _ = out.flush().await;
}

fn error(id: Value, code: i64, message: &str) -> String {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } }).to_string()
}

/// The request's `id` read from a line that does not parse (a number or a plain string after
/// `"id":`), else `null`.
fn read_id(line: &[u8]) -> Value {
    let text = String::from_utf8_lossy(line);
    let Some(at) = text.find("\"id\"") else { return Value::Null };
    let rest = text[at + 4..].trim_start();
    let Some(rest) = rest.strip_prefix(':') else { return Value::Null };
    let rest = rest.trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        return s.find('"').map_or(Value::Null, |end| Value::String(s[..end].to_owned()));
    }
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '-').collect();
    digits.parse::<i64>().map_or(Value::Null, |n| json!(n))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn an_id_is_read_from_a_line_that_does_not_parse() {
        assert_eq!(super::read_id(br#"{"jsonrpc":"2.0","id": 7,"method":"x","params":{"a":"\ud800"}}"#), json!(7));
        assert_eq!(super::read_id(br#"{"id":"abc","method":"#), json!("abc"));
        assert_eq!(super::read_id(b"not json"), serde_json::Value::Null);
    }
}

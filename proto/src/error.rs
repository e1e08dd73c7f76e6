//! The error type of every fallible function in this crate.

/// What went wrong while decoding, verifying or opening something another process produced.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("bad encoding of {what}: {detail}")]
    Encoding { what: &'static str, detail: String },
    #[error("invalid public key")]
    BadKey,
    #[error("signature verification failed")]
    BadSignature,
    #[error("decryption failed (wrong key or corrupted ciphertext)")]
    DecryptFailed,
    #[error("invalid invite token: {0}")]
    BadToken(String),
    #[error("invalid name: {0}")]
    BadName(String),
    #[error("malformed claims")]
    Claims(#[source] serde_json::Error),
}

/// Formats an error with its sources, outermost first: `outer: inner: innermost`. For logs, where
/// only `Display` would otherwise be recorded. A source whose text its outer error already says (an
/// error that prints its source too) is not said again.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut said = out.clone();
    let mut next = err.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !said.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        said = text;
        next = e.source();
    }
    out
}

impl ProtoError {
    pub(crate) fn encoding(what: &'static str, detail: impl ToString) -> Self {
        ProtoError::Encoding { what, detail: detail.to_string() }
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("reading the file")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("protocol error: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn a_chain_says_each_cause_once() {
        let io = || std::io::Error::other("connection reset");
        assert_eq!(super::chain(&Outer(io())), "reading the file: connection reset");
        assert_eq!(super::chain(&Repeats(io())), "protocol error: connection reset");
    }
}

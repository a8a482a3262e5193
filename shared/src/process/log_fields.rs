//! How text logs (`LOG_FORMAT=text`) write the fields of an event: like
//! tracing-subscriber's default, but every value escaped and bounded, so a
//! name, path or error text that came from a client can neither forge a log
//! line (a newline, a carriage return, an escape sequence) nor flood the log
//! (JSON logs escape by construction).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// The longest value written whole; a longer one is cut and says by how much.
pub const MAX_VALUE_BYTES: usize = 8 << 10;

/// Field formatter for text logs (see the module comment).
#[derive(Debug, Default, Clone, Copy)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut v = Visitor { writer, first: true, result: Ok(()) };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'a> {
    writer: Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    fn write(&mut self, field: &Field, text: &str) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let sep = if self.first { "" } else { " " };
        self.first = false;
        let value = escaped(text);
        self.result = if name == "message" {
            write!(self.writer, "{sep}{value}")
        } else {
            write!(self.writer, "{sep}{name}={value}")
        };
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, value);
        } else {
            // Quoted, as tracing-subscriber writes a string field.
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

/// `text` with every control character written as an escape and cut at
/// [`MAX_VALUE_BYTES`].
pub fn escaped(text: &str) -> String {
    let mut cut = text.len().min(MAX_VALUE_BYTES);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut + 16);
    for c in text[..cut].chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    if cut < text.len() {
        let _ = write!(out, "…(+{} bytes)", text.len() - cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_values_cut() {
        assert_eq!(escaped("plain text"), "plain text");
        assert_eq!(
            escaped("a\nFAKE 2026 INFO forged\r\x1b[31m\u{85}"),
            "a\\nFAKE 2026 INFO forged\\r\\u{1b}[31m\\u{85}"
        );
        let long = "é".repeat(MAX_VALUE_BYTES);
        let out = escaped(&long);
        assert!(out.len() < MAX_VALUE_BYTES + 32, "{}", out.len());
        assert!(out.ends_with(&format!("…(+{} bytes)", long.len() - MAX_VALUE_BYTES)), "{out}");
    }

    #[test]
    fn a_log_line_stays_one_line() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(EscapedFields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let name = "m\n2026-01-01T00:00:00Z ERROR forged";
            tracing::info!(model = %name, path = "/v2/models/x\ny", worker_id = 3, "model\nloaded");
        });
        let text = String::from_utf8(buf.0.lock().unwrap_or_else(|p| p.into_inner()).clone()).unwrap_or_default();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("model\\nloaded model=m\\n2026"), "{text}");
        assert!(text.contains("path=\"/v2/models/x\\ny\" worker_id=3"), "{text}");
    }
}

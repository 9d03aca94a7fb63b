//! The agent's recent log lines, kept in memory for `logs.tail`, `logs.search` and
//! `diagnostics`: a ring bounded by line count and by bytes, fed by a `tracing` layer
//! ([`LogBuffer::layer`]).

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The default number of lines kept.
pub const DEFAULT_MAX_LINES: usize = 5000;
/// The default bound on the text kept (level, target and text of every line).
pub const DEFAULT_MAX_BYTES: usize = 4 * 1024 * 1024;
/// A single line's text is cut at this many bytes, so one huge event (a debug dump of a
/// message) cannot push every other line out of the ring.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// One log line.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// When (unix ms).
    pub time_ms: i64,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG`, `TRACE`.
    pub level: String,
    /// The module that logged it.
    pub target: String,
    /// The message and its fields, formatted.
    pub text: String,
}

impl LogLine {
    /// What the line costs against the byte bound.
    fn bytes(&self) -> usize {
        self.level.len() + self.target.len() + self.text.len()
    }

    /// Whether the line is at least as severe as `min_level` (`None` takes every line).
    /// A level this module does not know is kept, so nothing is hidden by a filter.
    fn is_at_least(&self, min_level: Option<Level>) -> bool {
        match (min_level, self.level.parse::<Level>()) {
            // tracing orders levels by verbosity: ERROR < WARN < … < TRACE.
            (Some(min), Ok(level)) => level <= min,
            _ => true,
        }
    }
}

/// The ring and the bytes its lines hold.
#[derive(Default)]
struct Ring {
    lines: VecDeque<LogLine>,
    bytes: usize,
}

/// The ring of recent lines; cheap to clone.
#[derive(Clone)]
pub struct LogBuffer {
    ring: Arc<Mutex<Ring>>,
    max_lines: usize,
    max_bytes: usize,
}

impl Default for LogBuffer {
    fn default() -> Self {
        LogBuffer::new(DEFAULT_MAX_LINES)
    }
}

impl LogBuffer {
    /// A ring keeping the newest `max_lines` lines, and at most [`DEFAULT_MAX_BYTES`].
    pub fn new(max_lines: usize) -> LogBuffer {
        LogBuffer::with_limits(max_lines, DEFAULT_MAX_BYTES)
    }

    /// A ring keeping the newest `max_lines` lines holding at most `max_bytes` of text
    /// (the newest line is always kept).
    pub fn with_limits(max_lines: usize, max_bytes: usize) -> LogBuffer {
        LogBuffer {
            ring: Arc::new(Mutex::new(Ring::default())),
            max_lines: max_lines.max(1),
            max_bytes,
        }
    }

    /// Adds a line (its text cut at [`MAX_LINE_BYTES`]), dropping the oldest past either
    /// limit.
    pub fn push(&self, mut line: LogLine) {
        if line.text.len() > MAX_LINE_BYTES {
            let cut = floor_char_boundary(&line.text, MAX_LINE_BYTES);
            line.text.truncate(cut);
            line.text.push_str(" …(cut)");
        }
        if let Ok(mut ring) = self.ring.lock() {
            ring.bytes += line.bytes();
            ring.lines.push_back(line);
            while ring.lines.len() > self.max_lines
                || (ring.bytes > self.max_bytes && ring.lines.len() > 1)
            {
                match ring.lines.pop_front() {
                    Some(old) => ring.bytes -= old.bytes(),
                    None => break,
                }
            }
        }
    }

    /// The newest `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<LogLine> {
        self.ring
            .lock()
            .map(|ring| {
                let lines = &ring.lines;
                lines
                    .iter()
                    .skip(lines.len().saturating_sub(n))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The newest `limit` lines whose text or target contains `text` (ASCII
    /// case-insensitive; empty matches every line) and whose level is at least as severe
    /// as `min_level`, oldest first.
    pub fn search(&self, text: &str, min_level: Option<Level>, limit: usize) -> Vec<LogLine> {
        let needle = text.to_ascii_lowercase();
        let Ok(ring) = self.ring.lock() else {
            return Vec::new();
        };
        let mut found: Vec<LogLine> = ring
            .lines
            .iter()
            .rev()
            .filter(|line| line.is_at_least(min_level))
            .filter(|line| {
                needle.is_empty()
                    || contains_ignore_ascii_case(&line.text, &needle)
                    || contains_ignore_ascii_case(&line.target, &needle)
            })
            .take(limit)
            .cloned()
            .collect();
        found.reverse();
        found
    }

    /// Lines held now.
    pub fn len(&self) -> usize {
        self.ring.lock().map(|ring| ring.lines.len()).unwrap_or(0)
    }

    /// Whether no line is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A `tracing` layer that copies every event it sees into this ring, formatted as
    /// `span{fields}:span{fields}: message key=value …`.
    pub fn layer(&self) -> LogLayer {
        LogLayer {
            buffer: self.clone(),
        }
    }
}

/// The `tracing` layer of a [`LogBuffer`]; see [`LogBuffer::layer`].
pub struct LogLayer {
    buffer: LogBuffer,
}

/// A span's fields, formatted once when it is created (and extended by `record`), kept in
/// the span's extensions so each event inside it only copies a string.
struct SpanFields(String);

impl<S> Layer<S> for LogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = FieldWriter::default();
        attrs.record(&mut fields);
        span.extensions_mut().insert(SpanFields(fields.finish()));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = FieldWriter::default();
        values.record(&mut fields);
        let added = fields.finish();
        if added.is_empty() {
            return;
        }
        let mut extensions = span.extensions_mut();
        match extensions.get_mut::<SpanFields>() {
            Some(SpanFields(existing)) if !existing.is_empty() => {
                existing.push(' ');
                existing.push_str(&added);
            }
            Some(SpanFields(existing)) => *existing = added,
            None => extensions.insert(SpanFields(added)),
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut text = String::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                text.push_str(span.name());
                if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                    if !fields.is_empty() {
                        let _ = write!(text, "{{{fields}}}");
                    }
                }
                text.push_str(": ");
            }
        }
        let mut fields = FieldWriter::default();
        event.record(&mut fields);
        text.push_str(&fields.finish());
        let metadata = event.metadata();
        self.buffer.push(LogLine {
            time_ms: now_ms(),
            level: metadata.level().to_string(),
            target: metadata.target().to_owned(),
            text,
        });
    }
}

/// Formats fields as `message key=value key=value`: the message first and bare, the
/// others as their `Debug` (strings quoted), like tracing-subscriber's default format.
#[derive(Default)]
struct FieldWriter {
    message: String,
    fields: String,
}

impl FieldWriter {
    fn finish(self) -> String {
        match (self.message.is_empty(), self.fields.is_empty()) {
            (_, true) => self.message,
            (true, false) => self.fields,
            (false, false) => format!("{} {}", self.message, self.fields),
        }
    }
}

impl Visit for FieldWriter {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
            return;
        }
        // `log` records bridged by tracing-log carry their origin as `log.*` fields;
        // they repeat the target and add nothing support needs.
        if field.name().starts_with("log.") {
            return;
        }
        if !self.fields.is_empty() {
            self.fields.push(' ');
        }
        let _ = write!(self.fields, "{}={value:?}", field.name());
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn floor_char_boundary(text: &str, index: usize) -> usize {
    let mut index = index.min(text.len());
    while index > 0 && !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

fn contains_ignore_ascii_case(haystack: &str, lowercase_needle: &str) -> bool {
    let needle = lowercase_needle.as_bytes();
    if needle.is_empty() {
        return true;
    }
    haystack.as_bytes().windows(needle.len()).any(|window| {
        window
            .iter()
            .zip(needle)
            .all(|(a, b)| a.to_ascii_lowercase() == *b)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn line(level: &str, text: &str) -> LogLine {
        LogLine {
            time_ms: 0,
            level: level.to_owned(),
            target: "outpost_agent::test".to_owned(),
            text: text.to_owned(),
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_lines_within_the_line_limit() {
        let buffer = LogBuffer::new(3);
        for i in 0..10 {
            buffer.push(line("INFO", &format!("line {i}")));
        }
        let texts: Vec<String> = buffer.tail(10).into_iter().map(|l| l.text).collect();
        assert_eq!(texts, ["line 7", "line 8", "line 9"]);
        let last: Vec<String> = buffer.tail(1).into_iter().map(|l| l.text).collect();
        assert_eq!(last, ["line 9"]);
    }

    #[test]
    fn the_ring_drops_the_oldest_lines_past_the_byte_limit() {
        let per_line = line("INFO", &"x".repeat(100)).bytes();
        let buffer = LogBuffer::with_limits(1000, per_line * 5 + 10);
        for _ in 0..20 {
            buffer.push(line("INFO", &"x".repeat(100)));
        }
        assert_eq!(buffer.len(), 5);
        // One line over the whole limit is still kept (cut to the per-line limit).
        buffer.push(line("INFO", &"y".repeat(MAX_LINE_BYTES * 2)));
        let kept = buffer.tail(10);
        assert_eq!(kept.len(), 1);
        assert!(kept[0].text.len() < MAX_LINE_BYTES + 20);
        assert!(kept[0].text.ends_with("(cut)"));
    }

    #[test]
    fn search_filters_by_text_and_level_newest_last() {
        let buffer = LogBuffer::new(100);
        buffer.push(line("INFO", "connector started"));
        buffer.push(line("WARN", "Connector lab-in backing off"));
        buffer.push(line("ERROR", "connector lab-in failed"));
        buffer.push(line("DEBUG", "connector lab-in idle"));
        buffer.push(line("WARN", "disk low"));

        let found = buffer.search("LAB-IN", None, 10);
        let texts: Vec<&str> = found.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "Connector lab-in backing off",
                "connector lab-in failed",
                "connector lab-in idle"
            ]
        );

        let warn: Vec<String> = buffer
            .search("", Some(Level::WARN), 10)
            .into_iter()
            .map(|l| l.text)
            .collect();
        assert_eq!(
            warn,
            [
                "Connector lab-in backing off",
                "connector lab-in failed",
                "disk low"
            ]
        );

        let newest: Vec<String> = buffer
            .search("connector", None, 2)
            .into_iter()
            .map(|l| l.text)
            .collect();
        assert_eq!(newest, ["connector lab-in failed", "connector lab-in idle"]);
        assert!(buffer.search("nothing like this", None, 10).is_empty());
    }

    #[test]
    fn the_layer_records_events_with_their_fields_and_spans() {
        let buffer = LogBuffer::new(100);
        let subscriber = tracing_subscriber::registry().with(buffer.layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("connector", name = "lab-in", kind = "mllp");
            let _entered = span.enter();
            tracing::warn!(attempts = 3, peer = "10.0.0.5:2575", "delivery failed");
            tracing::info!("no fields");
        });
        let lines = buffer.tail(10);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].level, "WARN");
        assert_eq!(
            lines[0].text,
            "connector{name=\"lab-in\" kind=\"mllp\"}: delivery failed attempts=3 peer=\"10.0.0.5:2575\""
        );
        assert!(lines[0].target.contains("logbuf"), "{}", lines[0].target);
        assert!(lines[0].time_ms > 0);
        assert_eq!(
            lines[1].text,
            "connector{name=\"lab-in\" kind=\"mllp\"}: no fields"
        );
    }

    #[test]
    fn the_layer_sees_fields_recorded_on_a_span_later() {
        let buffer = LogBuffer::new(100);
        let subscriber = tracing_subscriber::registry().with(buffer.layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("job", id = tracing::field::Empty);
            span.record("id", "j-1");
            span.in_scope(|| tracing::error!(code = 7, "boom"));
        });
        assert_eq!(buffer.tail(1)[0].text, "job{id=\"j-1\"}: boom code=7");
    }
}

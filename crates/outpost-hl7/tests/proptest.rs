//! Property tests: parsing never panics, escaping round-trips, and models survive encoding.

use outpost_hl7::{
    escape, normalize_segment_terminators, unescape, Ack, Delimiters, FieldModel, Message,
    MessageModel, SegmentModel,
};
use proptest::prelude::*;
use proptest::sample::{select, subsequence};

const PUNCTUATION: &[u8] = b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// Escape sequences as they appear in real feeds, including ones `unescape` keeps verbatim.
const SEQUENCES: &[&[u8]] = &[
    b"\\F\\",
    b"\\S\\",
    b"\\T\\",
    b"\\R\\",
    b"\\E\\",
    b"\\X41\\",
    b"\\X0D0A\\",
    b"\\.br\\",
    b"\\H\\",
    b"\\N\\",
    b"\\Zvendor\\",
];

fn delimiters() -> impl Strategy<Value = Delimiters> {
    let distinct = subsequence(PUNCTUATION.to_vec(), 6).prop_shuffle();
    (distinct, any::<bool>()).prop_map(|(d, has_truncation)| Delimiters {
        field: d[0],
        component: d[1],
        repetition: d[2],
        escape: Some(d[3]),
        subcomponent: Some(d[4]),
        truncation: has_truncation.then_some(d[5]),
    })
}

fn segment_name() -> impl Strategy<Value = String> {
    "[A-Z0-9]{3}".prop_filter("only the first segment is MSH", |n| n != "MSH")
}

fn field() -> impl Strategy<Value = FieldModel> {
    let value = prop::collection::vec(any::<u8>(), 0..6);
    let component = prop::collection::vec(value, 1..3);
    let repetition = prop::collection::vec(component, 1..4);
    prop::collection::vec(repetition, 1..3).prop_map(|repetitions| FieldModel { repetitions })
}

fn model() -> impl Strategy<Value = MessageModel> {
    let msh_fields = prop::collection::vec(field(), 0..12);
    let segment = (segment_name(), prop::collection::vec(field(), 0..6));
    let segments = prop::collection::vec(segment, 0..5);
    (delimiters(), msh_fields, segments).prop_map(|(delimiters, msh_fields, segments)| {
        let msh = SegmentModel {
            name: "MSH".into(),
            fields: msh_fields,
        };
        let rest = segments
            .into_iter()
            .map(|(name, fields)| SegmentModel { name, fields });
        MessageModel {
            delimiters,
            segments: std::iter::once(msh).chain(rest).collect(),
        }
    })
}

/// Bytes that often hit delimiters, terminators and segment names.
fn hl7ish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![any::<u8>(), select(b"|^~\\&#\r\nMSHPIDOBX0123".to_vec())];
    prop::collection::vec(byte, 0..512)
}

/// Valid ER7 with the default delimiters, built from text and escape sequences.
fn er7() -> impl Strategy<Value = Vec<u8>> {
    let text = prop::collection::vec(select(b"abcXYZ019 .-\xE9\xFC".to_vec()), 1..4);
    let token = prop_oneof![text, select(SEQUENCES).prop_map(<[u8]>::to_vec)];
    let sub = prop::collection::vec(token, 0..3).prop_map(|t| t.concat());
    let joined = |parts: Vec<Vec<u8>>, sep: &[u8]| parts.join(sep);
    let component = prop::collection::vec(sub, 1..3).prop_map(move |p| joined(p, b"&"));
    let repetition = prop::collection::vec(component, 1..3).prop_map(move |p| joined(p, b"^"));
    let field = prop::collection::vec(repetition, 1..3).prop_map(move |p| joined(p, b"~"));
    let fields = prop::collection::vec(field, 0..8);
    let segments = prop::collection::vec((segment_name(), fields.clone()), 0..4);
    (fields, segments).prop_map(|(msh_fields, segments)| {
        let mut out = b"MSH|^~\\&".to_vec();
        let mut write = |name: Option<&str>, fields: &[Vec<u8>]| {
            out.extend_from_slice(name.unwrap_or_default().as_bytes());
            for f in fields {
                out.push(b'|');
                out.extend_from_slice(f);
            }
            out.push(b'\r');
        };
        write(None, &msh_fields);
        for (name, fields) in &segments {
            write(Some(name), fields);
        }
        out
    })
}

/// Calls every reader on whatever parsed, to find panics.
fn exercise(raw: &[u8]) {
    let _ = Ack::parse(raw);
    let _ = unescape(raw, &Delimiters::DEFAULT);
    let normalized = normalize_segment_terminators(raw);
    if let Ok(m) = Message::parse(&normalized) {
        let _ = (m.message_type_full(), m.control_id(), m.version());
        for location in [
            "MSH-1",
            "MSH-2.2",
            "MSH-9.2",
            "PID-3(2).1",
            "OBX-5.1.2",
            "X-1.1",
        ] {
            let _ = m.get(location);
        }
        let _ = m.to_model().encode();
    }
}

/// Every location of the form f, f(r), f(r).c and f(r).c.s up to three at each level.
fn paths(fields: usize) -> Vec<String> {
    let mut out = Vec::new();
    for f in 1..=fields + 1 {
        out.push(f.to_string());
        for r in 1..=3 {
            out.push(format!("{f}({r})"));
            for c in 1..=3 {
                out.push(format!("{f}({r}).{c}"));
                out.extend((1..=3).map(|s| format!("{f}({r}).{c}.{s}")));
            }
        }
    }
    out
}

proptest! {
    #[test]
    fn parse_never_panics_on_arbitrary_bytes(raw in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise(&raw);
    }

    #[test]
    fn parse_never_panics_after_a_valid_header(tail in hl7ish_bytes()) {
        let mut raw = b"MSH|^~\\&|".to_vec();
        raw.extend_from_slice(&tail);
        exercise(&raw);
    }

    #[test]
    fn unescape_inverts_escape(d in delimiters(), value in prop::collection::vec(any::<u8>(), 0..64)) {
        prop_assert_eq!(unescape(&escape(&value, &d), &d), value);
    }

    #[test]
    fn escaped_values_hold_no_separators_or_line_breaks(
        d in delimiters(),
        value in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let separators = [d.field, d.component, d.repetition, d.subcomponent.unwrap_or(b'\r'), b'\r', b'\n'];
        prop_assert!(!escape(&value, &d).iter().any(|b| separators.contains(b)));
    }

    #[test]
    fn encode_then_parse_gives_back_the_model(model in model()) {
        let raw = model.encode();
        let parsed = Message::parse(&raw).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed.to_model().normalized(), model.normalized());
    }

    #[test]
    fn reencoding_parsed_er7_preserves_every_value(raw in er7()) {
        let first = Message::parse(&raw).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let again = first.to_model().encode();
        let second = Message::parse(&again).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(first.segments().len(), second.segments().len());
        prop_assert_eq!(first.message_type_full(), second.message_type_full());
        for (a, b) in first.segments().iter().zip(second.segments()) {
            for path in paths(a.fields().count()) {
                prop_assert_eq!(a.get(&path), b.get(&path), "{}-{}", a.name(), path);
            }
        }
    }
}

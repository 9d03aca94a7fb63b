//! Parsing raw ER7 bytes into a [`Message`] that borrows them, and reading values by location.

use std::borrow::Cow;

use crate::delimiters::{Delimiters, CR};
use crate::error::ParseError;
use crate::escape::unescape;
use crate::model::{FieldModel, MessageModel, SegmentModel};

/// A parsed message borrowing the original bytes. Segments are separated by CR (0x0D). A
/// trailing CR is allowed, and empty segments (CR CR) are skipped.
///
/// Parsing checks MSH-1, MSH-2 and the segment names in one linear pass. Fields are split only
/// when read, and every value handed out is a slice of [`Message::raw`], so the message can be
/// forwarded byte-identical whatever was read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    raw: &'a [u8],
    delimiters: Delimiters,
    segments: Vec<Segment<'a>>,
}

impl<'a> Message<'a> {
    /// Parses `raw`, which must start with `MSH` and end segments with CR; use
    /// [`normalize_segment_terminators`] first for input that may use LF or CRLF.
    pub fn parse(raw: &'a [u8]) -> Result<Self, ParseError> {
        if raw.is_empty() {
            return Err(ParseError::Empty);
        }
        if !raw.starts_with(b"MSH") {
            return Err(ParseError::MissingMsh);
        }
        let delimiters = Delimiters::from_msh(raw)?;
        let mut segments = Vec::new();
        let mut offset = 0;
        for line in raw.split(|&b| b == CR) {
            let start = offset;
            offset += line.len() + 1;
            if !line.is_empty() {
                segments.push(Segment::new(line, start, segments.len(), delimiters)?);
            }
        }
        Ok(Self {
            raw,
            delimiters,
            segments,
        })
    }

    /// The bytes this message was parsed from.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The delimiters declared in MSH-1 and MSH-2.
    pub fn delimiters(&self) -> &Delimiters {
        &self.delimiters
    }

    /// All segments in order, MSH first.
    pub fn segments(&self) -> &[Segment<'a>] {
        &self.segments
    }

    /// The first segment named `name`.
    pub fn segment(&self, name: &str) -> Option<Segment<'a>> {
        self.segments_named(name).next()
    }

    /// Every segment named `name`, in order (for example each OBX of a result).
    pub fn segments_named<'m>(&'m self, name: &'m str) -> impl Iterator<Item = Segment<'a>> + 'm {
        self.segments
            .iter()
            .copied()
            .filter(move |s| s.name == name)
    }

    /// Raw (still escaped) bytes at a location like `"PID-3"`, `"MSH-9.1"`, `"PID-3(2).1"` or
    /// `"OBX-5.1.2"`, in the first segment with that name. The repetition index is 1-based in
    /// parentheses (default 1); component and subcomponent are 1-based. `None` when the location
    /// is absent, empty or malformed. See [`Segment::get_raw`].
    pub fn get_raw(&self, location: &str) -> Option<&'a [u8]> {
        let (name, path) = location.split_once('-')?;
        self.segment(name)?.get_raw(path)
    }

    /// Same as [`Message::get_raw`], unescaped and lossily converted to a `String`.
    pub fn get(&self, location: &str) -> Option<String> {
        self.get_unescaped(location).map(lossy)
    }

    /// Same as [`Message::get_raw`], unescaped but kept as bytes (for Latin-1 and other
    /// non-UTF-8 feeds).
    pub fn get_unescaped(&self, location: &str) -> Option<Vec<u8>> {
        self.get_raw(location)
            .map(|value| unescape(value, &self.delimiters))
    }

    /// The byte offset of `part` in [`Message::raw`], when `part` is a slice of it (as every
    /// value returned by this message is).
    pub fn offset_of(&self, part: &[u8]) -> Option<usize> {
        let start = (part.as_ptr() as usize).checked_sub(self.raw.as_ptr() as usize)?;
        (start + part.len() <= self.raw.len()).then_some(start)
    }

    /// MSH-9 components 1 and 2 joined with `^` whatever the message's own component
    /// separator, e.g. `"ORU^R01"` (just `"ACK"` when there is one component). `None` if MSH-9
    /// is empty.
    pub fn message_type(&self) -> Option<String> {
        self.joined_msh_9(2)
    }

    /// All components of MSH-9 joined with `^`, e.g. `"ORU^R01^ORU_R01"`.
    pub fn message_type_full(&self) -> Option<String> {
        self.joined_msh_9(usize::MAX)
    }

    /// MSH-10, the message control id.
    pub fn control_id(&self) -> Option<String> {
        self.get("MSH-10")
    }

    /// MSH-11, the processing id (`P` production, `T` training, `D` debugging).
    pub fn processing_id(&self) -> Option<String> {
        self.get("MSH-11")
    }

    /// MSH-12, the HL7 version, e.g. `"2.5"`.
    pub fn version(&self) -> Option<String> {
        self.get("MSH-12")
    }

    /// Converts to the owned, unescaped model.
    pub fn to_model(&self) -> MessageModel {
        MessageModel {
            delimiters: self.delimiters,
            segments: self.segments.iter().map(Segment::to_model).collect(),
        }
    }

    fn joined_msh_9(&self, max_components: usize) -> Option<String> {
        let value = self.get_raw("MSH-9")?;
        let mut parts: Vec<String> = value
            .split(|&b| b == self.delimiters.component)
            .take(max_components)
            .map(|c| lossy(unescape(c, &self.delimiters)))
            .collect();
        while parts.last().is_some_and(String::is_empty) {
            parts.pop();
        }
        (!parts.is_empty()).then(|| parts.join("^"))
    }
}

/// One segment of a [`Message`], borrowing the message's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    name: &'a str,
    raw: &'a [u8],
    offset: usize,
    delimiters: Delimiters,
}

impl<'a> Segment<'a> {
    fn new(
        raw: &'a [u8],
        offset: usize,
        index: usize,
        delimiters: Delimiters,
    ) -> Result<Self, ParseError> {
        let is_name = |n: &[u8]| {
            n.iter()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        };
        let name = raw
            .get(..3)
            .filter(|n| is_name(n) && (raw.len() == 3 || raw[3] == delimiters.field))
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or(ParseError::BadSegmentName { index, offset })?;
        Ok(Self {
            name,
            raw,
            offset,
            delimiters,
        })
    }

    /// The three-character segment name, e.g. `"PID"`.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The segment's bytes, without its CR.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Byte offset of the segment in [`Message::raw`].
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Raw bytes of field `n` with all its repetitions, numbered as HL7 does: in MSH, field 1
    /// is the field separator and field 2 the encoding characters; elsewhere field 1 is the
    /// first field after the name. `Some(b"")` for a present but empty field.
    pub fn field(&self, n: usize) -> Option<&'a [u8]> {
        let separator = self.delimiters.field;
        let mut fields = self.raw.split(move |&b| b == separator);
        match (self.is_msh(), n) {
            (_, 0) => None,
            (true, 1) => self.raw.get(3..4),
            (true, n) => fields.nth(n - 1),
            (false, n) => fields.nth(n),
        }
    }

    /// Raw bytes of every data field in order: from SEG-1, or from MSH-3 in MSH.
    pub fn fields(&self) -> impl Iterator<Item = &'a [u8]> {
        let separator = self.delimiters.field;
        let skip = if self.is_msh() { 2 } else { 1 };
        self.raw.split(move |&b| b == separator).skip(skip)
    }

    /// Raw (still escaped) bytes at `path`, a location without its segment name: `"3"`,
    /// `"3(2)"`, `"3(2).1"`, `"5.1.2"`. Without parentheses the first repetition is meant, so
    /// `"3"` is repetition 1 with all its components. MSH-1 and MSH-2 are never split. `None`
    /// when the location is absent, empty or malformed.
    pub fn get_raw(&self, path: &str) -> Option<&'a [u8]> {
        let path = Path::parse(path)?;
        let field = self.field(path.field)?;
        let d = &self.delimiters;
        let value = if self.is_msh() && path.field <= 2 {
            let is_whole = path.repetition == 1
                && path.component.unwrap_or(1) == 1
                && path.subcomponent.unwrap_or(1) == 1;
            is_whole.then_some(field)?
        } else {
            let repetition = nth(field, d.repetition, path.repetition)?;
            match path.component {
                None => repetition,
                Some(c) => {
                    let component = nth(repetition, d.component, c)?;
                    match (path.subcomponent, d.subcomponent) {
                        (None, _) | (Some(1), None) => component,
                        (Some(s), Some(separator)) => nth(component, separator, s)?,
                        (Some(_), None) => return None,
                    }
                }
            }
        };
        (!value.is_empty()).then_some(value)
    }

    /// Same as [`Segment::get_raw`], unescaped and lossily converted to a `String`.
    pub fn get(&self, path: &str) -> Option<String> {
        self.get_unescaped(path).map(lossy)
    }

    /// Same as [`Segment::get_raw`], unescaped but kept as bytes.
    pub fn get_unescaped(&self, path: &str) -> Option<Vec<u8>> {
        self.get_raw(path)
            .map(|value| unescape(value, &self.delimiters))
    }

    /// Converts to the owned, unescaped model; for MSH, `fields[0]` is MSH-3.
    pub fn to_model(&self) -> SegmentModel {
        SegmentModel {
            name: self.name.to_owned(),
            fields: self
                .fields()
                .map(|f| FieldModel::decode(f, &self.delimiters))
                .collect(),
        }
    }

    fn is_msh(&self) -> bool {
        self.name == "MSH"
    }
}

/// Turns CRLF and lone LF into CR, borrowing when there is nothing to change. Some senders end
/// segments the way their platform ends lines; the gateway stores the normalised bytes.
pub fn normalize_segment_terminators(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.contains(&b'\n') {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    for (i, &b) in raw.iter().enumerate() {
        match b {
            b'\n' if i > 0 && raw[i - 1] == CR => {}
            b'\n' => out.push(CR),
            _ => out.push(b),
        }
    }
    Cow::Owned(out)
}

/// A parsed location inside one segment.
struct Path {
    field: usize,
    repetition: usize,
    component: Option<usize>,
    subcomponent: Option<usize>,
}

impl Path {
    fn parse(path: &str) -> Option<Self> {
        let index = |s: &str| s.parse::<usize>().ok().filter(|&n| n >= 1);
        let mut parts = path.split('.');
        let head = parts.next()?;
        let (field, repetition) = match head.split_once('(') {
            Some((f, r)) => (index(f)?, index(r.strip_suffix(')')?)?),
            None => (index(head)?, 1),
        };
        let mut next_index = || match parts.next() {
            Some(s) => index(s).map(Some),
            None => Some(None),
        };
        let component = next_index()?;
        let subcomponent = next_index()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            field,
            repetition,
            component,
            subcomponent,
        })
    }
}

fn nth(bytes: &[u8], separator: u8, index: usize) -> Option<&[u8]> {
    bytes.split(move |&b| b == separator).nth(index - 1)
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"MSH|^~\\&|LAB|HOSP|GW|HOSP|20240101120000||ORU^R01|MSG00001|P|2.5\rPID|1||PID0001^^^HOSP^MR||TEST^PATIENT||19700101|O\rOBR|1|ORD1|FIL1|88304^GLUCOSE^L|||20240101115000\rOBX|1|NM|2345-7^Glucose^LN||105|mg/dL|70-110|N|||F\r";

    const ORU: &[u8] =
        b"MSH|^~\\&|LAB|HOSP|GW|HOSP|20240101120000||ORU^R01^ORU_R01|MSG00002|P|2.5.1\r\
PID|1||123^^^HOSP^MR~456^^^STATE^SS||DOE^JANE\r\
OBX|1|ST|NA^Sodium||Na\\S\\K ratio\\.br\\see note|mmol/L\r\
OBX|2|CE|CODE||A&B^C~D\r\
OBX|3|TX|NOTE||line\\X0D0A\\two\\E\\\r";

    fn parse(raw: &[u8]) -> Message<'_> {
        Message::parse(raw).unwrap()
    }

    #[test]
    fn sample_splits_into_named_segments_at_their_offsets() {
        let m = parse(SAMPLE);
        let names: Vec<_> = m.segments().iter().map(Segment::name).collect();
        assert_eq!(names, ["MSH", "PID", "OBR", "OBX"]);
        let pid = m.segment("PID").unwrap();
        assert_eq!(&SAMPLE[pid.offset()..pid.offset() + 5], b"PID|1");
        assert_eq!(m.raw(), SAMPLE);
    }

    #[test]
    fn msh_fields_are_numbered_from_the_field_separator() {
        let m = parse(SAMPLE);
        assert_eq!(m.get_raw("MSH-1"), Some(&b"|"[..]));
        assert_eq!(m.get_raw("MSH-2"), Some(&b"^~\\&"[..]));
        assert_eq!(m.get("MSH-2.1").as_deref(), Some("^~\\&"));
        assert_eq!(m.get_raw("MSH-2.2"), None);
        assert_eq!(m.get("MSH-3").as_deref(), Some("LAB"));
        assert_eq!(m.get("MSH-9.2").as_deref(), Some("R01"));
        assert_eq!(m.get_raw("MSH-8"), None);
    }

    #[test]
    fn header_accessors_read_msh_9_to_12() {
        let m = parse(SAMPLE);
        assert_eq!(m.message_type().as_deref(), Some("ORU^R01"));
        assert_eq!(m.message_type_full().as_deref(), Some("ORU^R01"));
        assert_eq!(m.control_id().as_deref(), Some("MSG00001"));
        assert_eq!(m.processing_id().as_deref(), Some("P"));
        assert_eq!(m.version().as_deref(), Some("2.5"));
        assert_eq!(
            parse(ORU).message_type_full().as_deref(),
            Some("ORU^R01^ORU_R01")
        );
    }

    #[test]
    fn locations_reach_repetitions_components_and_subcomponents() {
        let m = parse(ORU);
        let get = |location| m.get(location);
        assert_eq!(get("PID-3").as_deref(), Some("123^^^HOSP^MR"));
        assert_eq!(get("PID-3(2).1").as_deref(), Some("456"));
        assert_eq!(get("PID-3(2).4").as_deref(), Some("STATE"));
        assert_eq!(get("PID-5.2").as_deref(), Some("JANE"));
        let obx2 = m.segments_named("OBX").nth(1).unwrap();
        assert_eq!(obx2.get("5.1.2").as_deref(), Some("B"));
        assert_eq!(obx2.get("5.2.1").as_deref(), Some("C"));
        assert_eq!(obx2.get("5(2)").as_deref(), Some("D"));
        for absent in ["PID-3(3)", "PID-3.2", "PID-99", "ZZZ-1", "OBX-5.1.2"] {
            assert_eq!(get(absent), None, "{absent}");
        }
    }

    #[test]
    fn malformed_locations_find_nothing() {
        let m = parse(ORU);
        for bad in [
            "PID",
            "PID-",
            "PID-x",
            "PID-0",
            "PID-3(0)",
            "PID-3(2",
            "PID-3.1.1.1",
            "PID-3.",
        ] {
            assert_eq!(m.get_raw(bad), None, "{bad}");
        }
    }

    #[test]
    fn get_unescapes_and_get_raw_does_not() {
        let m = parse(ORU);
        assert_eq!(
            m.get_raw("OBX-5"),
            Some(&b"Na\\S\\K ratio\\.br\\see note"[..])
        );
        assert_eq!(m.get("OBX-5").as_deref(), Some("Na^K ratio\\.br\\see note"));
        let obx3 = m.segments_named("OBX").nth(2).unwrap();
        assert_eq!(obx3.get("5").as_deref(), Some("line\r\ntwo\\"));
    }

    #[test]
    fn latin1_bytes_are_kept_raw_and_replaced_only_in_strings() {
        let raw = b"MSH|^~\\&|LAB\rPID|1||7||M\xE9NARD^REN\xC9\r";
        let m = parse(raw);
        let family = m.get_raw("PID-5.1").unwrap();
        assert_eq!(family, b"M\xE9NARD");
        assert_eq!(m.get_unescaped("PID-5.2").unwrap(), b"REN\xC9");
        assert_eq!(m.get("PID-5.1").as_deref(), Some("M\u{FFFD}NARD"));
        assert_eq!(m.offset_of(family), Some(23));
        assert_eq!(m.offset_of(b"elsewhere"), None);
    }

    #[test]
    fn adt_a01_reads_visit_and_patient_fields() {
        let raw = b"MSH|^~\\&|ADT|HOSP|GW|HOSP|20240101083000||ADT^A01^ADT_A01|A0001|P|2.5\r\
EVN|A01|20240101083000\r\
PID|1||900^^^HOSP^MR||SMITH^ANNA^M||19800101|F\r\
PV1|1|I|WARD1^101^A||||1234^DOC^DAVID\r";
        let m = parse(raw);
        assert_eq!(m.message_type().as_deref(), Some("ADT^A01"));
        assert_eq!(m.get("EVN-1").as_deref(), Some("A01"));
        assert_eq!(m.get("PV1-3.2").as_deref(), Some("101"));
        assert_eq!(m.get("PV1-7.3").as_deref(), Some("DAVID"));
    }

    #[test]
    fn non_default_delimiters_are_honoured() {
        let m = parse(
            b"MSH#*@!$#LAB#HOSP##H#20240101##ORU*R01*ORU_R01#C7#P#2.5\rOBX#1#ST#X##a!F!b$c*d@e\r",
        );
        assert_eq!(m.message_type().as_deref(), Some("ORU^R01"));
        assert_eq!(m.get("OBX-5.1.1").as_deref(), Some("a#b"));
        assert_eq!(m.get("OBX-5.1.2").as_deref(), Some("c"));
        assert_eq!(m.get("OBX-5(2)").as_deref(), Some("e"));
        let t = parse(b"MSH|^~\\&#|LAB|HOSP\rOBX|1|ST|X||cut\\P\\#\r");
        assert_eq!(t.delimiters().truncation, Some(b'#'));
        assert_eq!(t.get("MSH-2").as_deref(), Some("^~\\&#"));
        assert_eq!(t.get("OBX-5").as_deref(), Some("cut##"));
    }

    #[test]
    fn empty_segments_and_a_trailing_cr_are_skipped() {
        let m = parse(b"MSH|^~\\&|A\r\rPID|1\r\r");
        let names: Vec<_> = m
            .segments()
            .iter()
            .map(|s| (s.name(), s.offset()))
            .collect();
        assert_eq!(names, [("MSH", 0), ("PID", 12)]);
        assert_eq!(parse(b"MSH|^~\\&|A\rZ01").segments()[1].name(), "Z01");
    }

    #[test]
    fn broken_input_is_rejected_with_its_position() {
        let err = |raw: &[u8]| Message::parse(raw).unwrap_err();
        assert_eq!(err(b""), ParseError::Empty);
        assert_eq!(err(b"PID|1\rMSH|^~\\&"), ParseError::MissingMsh);
        assert_eq!(err(b"\rMSH|^~\\&"), ParseError::MissingMsh);
        assert_eq!(err(b"MSH|^"), ParseError::MshTooShort { len: 5 });
        assert!(matches!(
            err(b"MSH|^^\\&|A"),
            ParseError::BadDelimiters { .. }
        ));
        for (raw, index, offset) in [
            (&b"MSH|^~\\&|A\rpid|1"[..], 1, 11),
            (b"MSH|^~\\&|A\rPID|1\r\rPI|1", 2, 18),
            (b"MSH|^~\\&|A\rPIDX|1", 1, 11),
            (b"MSH|^~\\&|A\rP\xC9D|1", 1, 11),
        ] {
            assert_eq!(err(raw), ParseError::BadSegmentName { index, offset });
        }
    }

    #[test]
    fn errors_name_positions_not_content() {
        let e = Message::parse(b"MSH|^~\\&|A\rDOE^JANE").unwrap_err();
        assert_eq!(
            e.to_string(),
            "segment 1 at byte 11: name is not three uppercase letters or digits"
        );
    }

    #[test]
    fn normalizing_terminators_borrows_when_only_cr_is_used() {
        assert!(matches!(
            normalize_segment_terminators(SAMPLE),
            Cow::Borrowed(_)
        ));
        let fixed = normalize_segment_terminators(b"MSH|a\r\nPID|1\nOBX|1\r\n\r");
        assert_eq!(&*fixed, b"MSH|a\rPID|1\rOBX|1\r\r");
    }

    #[test]
    fn to_model_splits_and_unescapes_every_field() {
        let model = parse(ORU).to_model();
        assert_eq!(model.delimiters, Delimiters::DEFAULT);
        assert_eq!(model.segments[0].fields[0], FieldModel::simple("LAB"));
        let pid_3 = &model.segments[1].fields[2].repetitions;
        assert_eq!(pid_3.len(), 2);
        assert_eq!(pid_3[1][3], [b"STATE".to_vec()]);
        let obx_5 = &model.segments[2].fields[4];
        assert_eq!(obx_5, &FieldModel::simple("Na^K ratio\\.br\\see note"));
    }
}

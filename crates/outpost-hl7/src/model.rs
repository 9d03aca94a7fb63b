//! The owned, unescaped message model, its builder and its ER7 encoder.

use crate::delimiters::{Delimiters, CR};
use crate::escape::{escape, unescape};

/// An owned message with unescaped values, for building messages and comparing them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageModel {
    /// The delimiters used by [`MessageModel::encode`]; they are also MSH-1 and MSH-2.
    pub delimiters: Delimiters,
    /// Segments in order; MSH should come first.
    pub segments: Vec<SegmentModel>,
}

/// One segment of a [`MessageModel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentModel {
    /// Three uppercase letters or digits, e.g. `"PID"`.
    pub name: String,
    /// Data fields in order: `fields[0]` is SEG-1, except in MSH where it is MSH-3 (MSH-1 and
    /// MSH-2 come from [`MessageModel::delimiters`]).
    pub fields: Vec<FieldModel>,
}

/// One field: repetition, then component, then subcomponent, then unescaped bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldModel {
    /// `repetitions[r][c][s]` is subcomponent `s` of component `c` of repetition `r`, 0-based.
    pub repetitions: Vec<Vec<Vec<Vec<u8>>>>,
}

impl MessageModel {
    /// An empty message using `delimiters`.
    pub fn new(delimiters: Delimiters) -> Self {
        Self {
            delimiters,
            segments: Vec::new(),
        }
    }

    /// Appends a segment (builder style).
    pub fn segment(mut self, segment: SegmentModel) -> Self {
        self.segments.push(segment);
        self
    }

    /// Writes ER7: values escaped, each segment followed by CR, everything in the model written
    /// as-is (trailing empty pieces included). Without a subcomponent separator, subcomponents
    /// after the first of each component are dropped.
    pub fn encode(&self) -> Vec<u8> {
        let d = &self.delimiters;
        let mut out = Vec::new();
        for segment in &self.segments {
            out.extend_from_slice(segment.name.as_bytes());
            if segment.name == "MSH" {
                out.push(d.field);
                out.extend_from_slice(&d.encoding_characters());
            }
            for field in &segment.fields {
                out.push(d.field);
                field.encode_into(&mut out, d);
            }
            out.push(CR);
        }
        out
    }

    /// The normal form two models are compared in: trailing empty subcomponents, components,
    /// repetitions and fields removed, so an empty piece at any level is an empty `Vec`. ER7
    /// cannot tell `a^` from `a`, so `parse(encode(m)).to_model().normalized() == m.normalized()`.
    pub fn normalized(&self) -> Self {
        let segments = self.segments.iter().map(|s| SegmentModel {
            name: s.name.clone(),
            fields: trimmed(s.fields.iter().map(FieldModel::normalized)),
        });
        Self {
            delimiters: self.delimiters,
            segments: segments.collect(),
        }
    }
}

impl SegmentModel {
    /// A segment with no fields yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            fields: Vec::new(),
        }
    }

    /// Appends a field holding one simple value; nothing in it is split, delimiters in it are
    /// escaped on encoding.
    pub fn field(self, value: impl AsRef<[u8]>) -> Self {
        self.field_model(FieldModel::simple(value))
    }

    /// Appends one simple-value field per item, e.g. `.fields(["", "", "E"])`.
    pub fn fields<V: AsRef<[u8]>>(self, values: impl IntoIterator<Item = V>) -> Self {
        values.into_iter().fold(self, Self::field)
    }

    /// Appends a field with one repetition made of `components`, e.g. `["ACK", "R01", "ACK"]`.
    pub fn components<V: AsRef<[u8]>>(self, components: &[V]) -> Self {
        self.field_model(FieldModel::from_components(components))
    }

    /// Appends a field given as a model.
    pub fn field_model(mut self, field: FieldModel) -> Self {
        self.fields.push(field);
        self
    }
}

impl FieldModel {
    /// A field holding one simple value.
    pub fn simple(value: impl AsRef<[u8]>) -> Self {
        Self::from_components(&[value])
    }

    /// A field with one repetition made of `components`, each a single subcomponent.
    pub fn from_components<V: AsRef<[u8]>>(components: &[V]) -> Self {
        let repetition = components.iter().map(|c| vec![c.as_ref().to_vec()]);
        Self {
            repetitions: vec![repetition.collect()],
        }
    }

    /// Splits and unescapes a raw field.
    pub(crate) fn decode(raw: &[u8], d: &Delimiters) -> Self {
        let split = |bytes: &[u8], sep: Option<u8>| -> Vec<Vec<u8>> {
            match sep {
                Some(sep) => bytes.split(|&b| b == sep).map(|p| p.to_vec()).collect(),
                None => vec![bytes.to_vec()],
            }
        };
        let repetitions = raw.split(|&b| b == d.repetition).map(|repetition| {
            let components = repetition.split(|&b| b == d.component).map(|component| {
                let subs = split(component, d.subcomponent);
                subs.iter().map(|s| unescape(s, d)).collect()
            });
            components.collect()
        });
        Self {
            repetitions: repetitions.collect(),
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>, d: &Delimiters) {
        for (r, repetition) in self.repetitions.iter().enumerate() {
            if r > 0 {
                out.push(d.repetition);
            }
            for (c, component) in repetition.iter().enumerate() {
                if c > 0 {
                    out.push(d.component);
                }
                for (s, sub) in component.iter().enumerate() {
                    match (s, d.subcomponent) {
                        (0, _) => {}
                        (_, Some(sep)) => out.push(sep),
                        (_, None) => break,
                    }
                    out.extend_from_slice(&escape(sub, d));
                }
            }
        }
    }

    fn normalized(&self) -> Self {
        let repetitions = self.repetitions.iter().map(|repetition| {
            trimmed(
                repetition
                    .iter()
                    .map(|component| trimmed(component.iter().cloned())),
            )
        });
        Self {
            repetitions: trimmed(repetitions),
        }
    }
}

/// Collects `items`, dropping the empty ones at the end.
fn trimmed<T: IsEmpty>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut items: Vec<T> = items.collect();
    while items.last().is_some_and(IsEmpty::is_empty) {
        items.pop();
    }
    items
}

trait IsEmpty {
    fn is_empty(&self) -> bool;
}

impl<T> IsEmpty for Vec<T> {
    fn is_empty(&self) -> bool {
        Vec::is_empty(self)
    }
}

impl IsEmpty for FieldModel {
    fn is_empty(&self) -> bool {
        self.repetitions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    #[test]
    fn builder_encodes_escaped_values_and_msh_delimiters() {
        let model = MessageModel::new(Delimiters::DEFAULT)
            .segment(
                SegmentModel::new("MSH")
                    .field("GW")
                    .field("")
                    .components(&["ACK", "A01"]),
            )
            .segment(SegmentModel::new("NTE").field("1").field("a|b^c\r"))
            .segment(SegmentModel::new("ZZ1"));
        assert_eq!(
            model.encode(),
            b"MSH|^~\\&|GW||ACK^A01\rNTE|1|a\\F\\b\\S\\c\\X0D\\\rZZ1\r"
        );
    }

    #[test]
    fn subcomponents_and_repetitions_are_written_with_their_separators() {
        let field = FieldModel {
            repetitions: vec![
                vec![vec![b"a".to_vec(), b"b&".to_vec()], vec![b"c".to_vec()]],
                vec![vec![b"d".to_vec()]],
            ],
        };
        let model = MessageModel::new(Delimiters::DEFAULT)
            .segment(SegmentModel::new("MSH"))
            .segment(SegmentModel::new("OBX").field_model(field.clone()));
        assert_eq!(model.encode(), b"MSH|^~\\&\rOBX|a&b\\T\\^c~d\r");
        let parsed = Message::parse(&model.encode()).unwrap().to_model();
        assert_eq!(parsed.segments[1].fields[0], field);
    }

    #[test]
    fn normalized_drops_trailing_empty_pieces_at_every_level() {
        let padded = FieldModel {
            repetitions: vec![vec![vec![b"x".to_vec(), vec![]], vec![vec![]]], vec![]],
        };
        let model = MessageModel::new(Delimiters::DEFAULT).segment(
            SegmentModel::new("PID")
                .field_model(padded)
                .field("")
                .field_model(FieldModel::default()),
        );
        let expected = MessageModel::new(Delimiters::DEFAULT).segment(
            SegmentModel::new("PID").field_model(FieldModel {
                repetitions: vec![vec![vec![b"x".to_vec()]]],
            }),
        );
        assert_eq!(model.normalized(), expected);
    }
}

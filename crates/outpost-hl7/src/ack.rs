//! Building original-mode acknowledgments (HL7 v2 section 2.9.2) and reading the ones peers send.

use std::fmt;
use std::str::FromStr;

use crate::delimiters::Delimiters;
use crate::error::AckError;
use crate::message::{normalize_segment_terminators, Message};
use crate::model::{FieldModel, MessageModel, SegmentModel};

/// MSA-1, the acknowledgment code (HL7 table 0008).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// Original mode: application accept.
    AA,
    /// Original mode: application error; the sender may resend.
    AE,
    /// Original mode: application reject; resending will not help.
    AR,
    /// Enhanced mode: commit accept.
    CA,
    /// Enhanced mode: commit error.
    CE,
    /// Enhanced mode: commit reject.
    CR,
}

impl AckCode {
    /// The two-letter code as written in MSA-1.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::AA => "AA",
            Self::AE => "AE",
            Self::AR => "AR",
            Self::CA => "CA",
            Self::CE => "CE",
            Self::CR => "CR",
        }
    }

    /// True for AA and CA, the codes that mean the receiver took the message.
    pub fn is_accept(&self) -> bool {
        match self {
            Self::AA | Self::CA => true,
            Self::AE | Self::AR | Self::CE | Self::CR => false,
        }
    }
}

impl fmt::Display for AckCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AckCode {
    type Err = AckError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::AA, Self::AE, Self::AR, Self::CA, Self::CE, Self::CR]
            .into_iter()
            .find(|code| code.as_str() == s)
            .ok_or(AckError::UnknownCode { control_id: None })
    }
}

/// Builds an original-mode ACK for `original`, using its delimiters.
///
/// MSH swaps sending and receiving application and facility (MSH-3/4 with MSH-5/6), MSH-7 is
/// `timestamp` (`YYYYMMDDHHMMSS`), MSH-9 is `ACK^<trigger>^ACK` (just `ACK` when the original
/// has no trigger), MSH-10 is `ack_control_id`, and MSH-11 and MSH-12 are copied from the
/// original (defaults `P` and `2.5`). Then `MSA|code|<original MSH-10>|<text>`, and for a code
/// that is not an accept and a given text, an ERR segment carrying the text in ERR-8.
pub fn build_ack(
    original: &Message,
    code: AckCode,
    text: Option<&str>,
    timestamp: &str,
    ack_control_id: &str,
) -> Vec<u8> {
    let d = original.delimiters();
    let copy = |n: usize| {
        let raw = original.segment("MSH").and_then(|msh| msh.field(n));
        raw.map(|f| FieldModel::decode(f, d)).unwrap_or_default()
    };
    let copy_or = |n: usize, default: &str| match original.get_raw(&format!("MSH-{n}")) {
        Some(_) => copy(n),
        None => FieldModel::simple(default),
    };
    let message_type = match original.get_unescaped("MSH-9.2") {
        Some(trigger) => FieldModel::from_components(&[&b"ACK"[..], &trigger, b"ACK"]),
        None => FieldModel::simple("ACK"),
    };
    let header = SegmentModel::new("MSH")
        .field_model(copy(5))
        .field_model(copy(6))
        .field_model(copy(3))
        .field_model(copy(4))
        .fields([timestamp, ""])
        .field_model(message_type)
        .field(ack_control_id)
        .field_model(copy_or(11, "P"))
        .field_model(copy_or(12, "2.5"));
    encode_ack(*d, header, code, copy(10), text)
}

/// Builds an ACK for input that could not be parsed at all (no MSH, bad delimiters): default
/// delimiters, MSH-3 is `sending_app` (this gateway), MSA-2 is `control_id` if the caller could
/// recover one and empty otherwise.
pub fn build_ack_for_unparsed(
    code: AckCode,
    text: &str,
    sending_app: &str,
    timestamp: &str,
    ack_control_id: &str,
    control_id: Option<&str>,
) -> Vec<u8> {
    let header = SegmentModel::new("MSH").fields([
        sending_app,
        "",
        "",
        "",
        timestamp,
        "",
        "ACK",
        ack_control_id,
        "P",
        "2.5",
    ]);
    let control_id = FieldModel::simple(control_id.unwrap_or_default());
    let text = (!text.is_empty()).then_some(text);
    encode_ack(Delimiters::DEFAULT, header, code, control_id, text)
}

fn encode_ack(
    delimiters: Delimiters,
    header: SegmentModel,
    code: AckCode,
    control_id: FieldModel,
    text: Option<&str>,
) -> Vec<u8> {
    let mut msa = SegmentModel::new("MSA")
        .field(code.as_str())
        .field_model(control_id);
    if let Some(text) = text {
        msa = msa.field(text);
    }
    let mut model = MessageModel::new(delimiters).segment(header).segment(msa);
    if let (false, Some(text)) = (code.is_accept(), text) {
        // ERR-3 from HL7 table 0357; ERR-4 severity E; ERR-8 the user message (v2.5 layout).
        let err = SegmentModel::new("ERR")
            .fields(["", ""])
            .components(&["207", "Application internal error", "HL70357"])
            .fields(["E", "", "", "", text]);
        model = model.segment(err);
    }
    model.encode()
}

/// The parts of an acknowledgment a sender acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// MSA-1.
    pub code: AckCode,
    /// MSA-2, the control id of the acknowledged message (empty when absent).
    pub control_id: String,
    /// MSA-3, or ERR-8 when MSA-3 is empty.
    pub text: Option<String>,
}

impl Ack {
    /// Reads an ACK; segments may end with CR, LF or CRLF.
    pub fn parse(raw: &[u8]) -> Result<Ack, AckError> {
        let raw = normalize_segment_terminators(raw);
        let message = Message::parse(&raw)?;
        let msa = message.segment("MSA").ok_or(AckError::MissingMsa)?;
        let control_id = msa.get("2");
        let code = msa
            .get("1")
            .and_then(|code| code.trim().parse().ok())
            .ok_or_else(|| AckError::UnknownCode {
                control_id: control_id.clone(),
            })?;
        Ok(Ack {
            code,
            control_id: control_id.unwrap_or_default(),
            text: msa.get("3").or_else(|| message.get("ERR-8")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ParseError;

    const SAMPLE: &[u8] = b"MSH|^~\\&|LAB|HOSP|GW|HOSP|20240101120000||ORU^R01|MSG00001|P|2.5\rPID|1||PID0001^^^HOSP^MR||TEST^PATIENT||19700101|O\rOBR|1|ORD1|FIL1|88304^GLUCOSE^L|||20240101115000\rOBX|1|NM|2345-7^Glucose^LN||105|mg/dL|70-110|N|||F\r";

    fn ack_for(original: &[u8], code: AckCode, text: Option<&str>) -> String {
        let message = Message::parse(original).unwrap();
        let ack = build_ack(&message, code, text, "20240102030405", "ACK0001");
        String::from_utf8(ack).unwrap()
    }

    #[test]
    fn accept_ack_swaps_applications_and_echoes_control_id() {
        assert_eq!(
            ack_for(SAMPLE, AckCode::AA, None),
            "MSH|^~\\&|GW|HOSP|LAB|HOSP|20240102030405||ACK^R01^ACK|ACK0001|P|2.5\rMSA|AA|MSG00001\r"
        );
    }

    #[test]
    fn error_ack_carries_escaped_text_in_msa_and_err() {
        let ack = ack_for(SAMPLE, AckCode::AE, Some("bad OBX-5 | retry"));
        assert_eq!(
            ack.split('\r').skip(1).collect::<Vec<_>>(),
            [
                "MSA|AE|MSG00001|bad OBX-5 \\F\\ retry",
                "ERR|||207^Application internal error^HL70357|E||||bad OBX-5 \\F\\ retry",
                ""
            ]
        );
    }

    #[test]
    fn accept_ack_with_text_has_no_err_segment() {
        let ack = ack_for(SAMPLE, AckCode::AA, Some("ok"));
        assert!(ack.ends_with("MSA|AA|MSG00001|ok\r"), "{ack:?}");
    }

    #[test]
    fn ack_without_trigger_and_version_uses_defaults() {
        let ack = ack_for(b"MSH|^~\\&|A|B|C|D|20240101||ACK|X1\r", AckCode::AA, None);
        assert_eq!(
            ack,
            "MSH|^~\\&|C|D|A|B|20240102030405||ACK|ACK0001|P|2.5\rMSA|AA|X1\r"
        );
    }

    #[test]
    fn ack_uses_the_original_delimiters_and_keeps_components() {
        let original = b"MSH#*@!$#LAB*1.2*ISO#HOSP#GW#HOSP#20240101##ADT*A01#C1#T#2.3\rPID#1\r";
        assert_eq!(
            ack_for(original, AckCode::AA, None),
            "MSH#*@!$#GW#HOSP#LAB*1.2*ISO#HOSP#20240102030405##ACK*A01*ACK#ACK0001#T#2.3\rMSA#AA#C1\r"
        );
    }

    #[test]
    fn ack_for_unparsed_input_uses_default_delimiters() {
        let ack = build_ack_for_unparsed(AckCode::AR, "no MSH", "OUTPOST", "20240102", "N1", None);
        assert_eq!(
            String::from_utf8(ack).unwrap(),
            "MSH|^~\\&|OUTPOST||||20240102||ACK|N1|P|2.5\rMSA|AR||no MSH\r\
             ERR|||207^Application internal error^HL70357|E||||no MSH\r"
        );
    }

    #[test]
    fn built_acks_parse_back() {
        let raw = build_ack(
            &Message::parse(SAMPLE).unwrap(),
            AckCode::AE,
            Some("x^y"),
            "20240102030405",
            "A1",
        );
        let ack = Ack::parse(&raw).unwrap();
        assert_eq!(
            ack,
            Ack {
                code: AckCode::AE,
                control_id: "MSG00001".into(),
                text: Some("x^y".into())
            }
        );
    }

    #[test]
    fn ack_parse_accepts_lf_terminators_and_reads_err_8() {
        let raw = b"MSH|^~\\&|V|F|GW|H|20240101||ACK^R01^ACK|9|P|2.5\nMSA|CR|MSG7\r\nERR||||||||rejected\n";
        let ack = Ack::parse(raw).unwrap();
        assert_eq!(
            (ack.code, ack.control_id.as_str(), ack.text.as_deref()),
            (AckCode::CR, "MSG7", Some("rejected"))
        );
    }

    #[test]
    fn ack_parse_reports_what_is_wrong() {
        assert_eq!(
            Ack::parse(b"hello"),
            Err(AckError::NotHl7(ParseError::MissingMsh))
        );
        assert_eq!(
            Ack::parse(b"MSH|^~\\&|A\rPID|1\r"),
            Err(AckError::MissingMsa)
        );
        assert_eq!(
            Ack::parse(b"MSH|^~\\&|A\rMSA|OK|C9\r"),
            Err(AckError::UnknownCode {
                control_id: Some("C9".into())
            })
        );
    }

    #[test]
    fn ack_codes_round_trip_through_strings() {
        for code in [
            AckCode::AA,
            AckCode::AE,
            AckCode::AR,
            AckCode::CA,
            AckCode::CE,
            AckCode::CR,
        ] {
            assert_eq!(code.as_str().parse::<AckCode>().unwrap(), code);
            assert_eq!(code.is_accept(), matches!(code, AckCode::AA | AckCode::CA));
        }
        assert!("aa".parse::<AckCode>().is_err());
    }
}

//! DIMSE command sets (PS3.7 §9.3, §E): C-ECHO and C-STORE requests and responses, always
//! in Implicit VR Little Endian, and their decoding into a [`Command`].

use dicom_core::{dicom_value, DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

use crate::error::{chain, DicomError};

/// Command Field (0000,0100) values.
pub mod field {
    /// C-STORE-RQ.
    pub const C_STORE_RQ: u16 = 0x0001;
    /// C-STORE-RSP.
    pub const C_STORE_RSP: u16 = 0x8001;
    /// C-ECHO-RQ.
    pub const C_ECHO_RQ: u16 = 0x0030;
    /// C-ECHO-RSP.
    pub const C_ECHO_RSP: u16 = 0x8030;
    /// C-CANCEL-RQ, which has no response.
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
}

/// Command Data Set Type (0000,0800) meaning "no data set follows"; any other value means
/// one does.
pub const NO_DATA_SET: u16 = 0x0101;

/// The Verification SOP Class, the abstract syntax of C-ECHO.
pub const VERIFICATION_SOP_CLASS: &str = "1.2.840.10008.1.1";

/// A decoded command set: the fields the gateway acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// (0000,0100) Command Field.
    pub command_field: u16,
    /// (0000,0110) Message ID, present on requests.
    pub message_id: Option<u16>,
    /// (0000,0120) Message ID Being Responded To, present on responses.
    pub message_id_responded_to: Option<u16>,
    /// (0000,0002) Affected SOP Class UID, trimmed.
    pub affected_sop_class_uid: Option<String>,
    /// (0000,1000) Affected SOP Instance UID, trimmed.
    pub affected_sop_instance_uid: Option<String>,
    /// (0000,0900) Status, present on responses.
    pub status: Option<u16>,
    /// (0000,0800) Command Data Set Type; [`NO_DATA_SET`] when none follows.
    pub data_set_type: u16,
    /// (0000,0902) Error Comment, when the peer gave one.
    pub error_comment: Option<String>,
}

impl Command {
    /// Whether a data set follows this command.
    pub fn has_data_set(&self) -> bool {
        self.data_set_type != NO_DATA_SET
    }
}

/// Removes the trailing NUL or space padding UIDs and AE titles carry on the wire.
pub fn trim_uid(s: &str) -> &str {
    s.trim_end_matches(|c: char| c == '\0' || c.is_whitespace())
}

/// Encodes a C-ECHO-RQ.
pub fn echo_rq(message_id: u16) -> Result<Vec<u8>, DicomError> {
    encode(&InMemDicomObject::command_from_element_iter([
        ui(tags::AFFECTED_SOP_CLASS_UID, VERIFICATION_SOP_CLASS),
        us(tags::COMMAND_FIELD, field::C_ECHO_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
    ]))
}

/// Encodes a C-ECHO-RSP answering the request with `message_id`.
pub fn echo_rsp(message_id: u16, status: u16) -> Result<Vec<u8>, DicomError> {
    encode(&InMemDicomObject::command_from_element_iter([
        ui(tags::AFFECTED_SOP_CLASS_UID, VERIFICATION_SOP_CLASS),
        us(tags::COMMAND_FIELD, field::C_ECHO_RSP),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status),
    ]))
}

/// Encodes a C-STORE-RQ at medium priority; a data set follows it.
pub fn store_rq(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
) -> Result<Vec<u8>, DicomError> {
    encode(&InMemDicomObject::command_from_element_iter([
        ui(tags::AFFECTED_SOP_CLASS_UID, sop_class_uid),
        us(tags::COMMAND_FIELD, field::C_STORE_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::PRIORITY, 0),
        // Any value but 0x0101 says a data set follows; 0x0000 is what dcmtk and dicom-rs send.
        us(tags::COMMAND_DATA_SET_TYPE, 0x0000),
        ui(tags::AFFECTED_SOP_INSTANCE_UID, sop_instance_uid),
    ]))
}

/// Encodes the response to any request: `command_field` is the request's field (the
/// response bit 0x8000 is set here), with an Error Comment when one is given.
pub fn response(
    request_field: u16,
    message_id: u16,
    sop_class_uid: Option<&str>,
    sop_instance_uid: Option<&str>,
    status: u16,
    error_comment: Option<&str>,
) -> Result<Vec<u8>, DicomError> {
    let mut elements = Vec::with_capacity(7);
    if let Some(class) = sop_class_uid {
        elements.push(ui(tags::AFFECTED_SOP_CLASS_UID, class));
    }
    elements.push(us(tags::COMMAND_FIELD, request_field | 0x8000));
    elements.push(us(tags::MESSAGE_ID_BEING_RESPONDED_TO, message_id));
    elements.push(us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET));
    elements.push(us(tags::STATUS, status));
    if let Some(instance) = sop_instance_uid {
        elements.push(ui(tags::AFFECTED_SOP_INSTANCE_UID, instance));
    }
    if let Some(comment) = error_comment {
        // LO holds at most 64 characters; a longer comment would make strict peers fail
        // to parse the whole response.
        let comment: String = comment.chars().take(64).collect();
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            dicom_value!(Str, comment),
        ));
    }
    encode(&InMemDicomObject::command_from_element_iter(elements))
}

/// Encodes a C-STORE-RSP.
pub fn store_rsp(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    status: u16,
    error_comment: Option<&str>,
) -> Result<Vec<u8>, DicomError> {
    response(
        field::C_STORE_RQ,
        message_id,
        Some(sop_class_uid),
        Some(sop_instance_uid),
        status,
        error_comment,
    )
}

/// Decodes a whole command set (all command fragments joined).
pub fn decode(bytes: &[u8]) -> Result<Command, DicomError> {
    check_element_lengths(bytes)?;
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| DicomError::Command {
            reason: format!("cannot decode ({} bytes): {}", bytes.len(), chain(&e)),
        })?;
    let u16_of = |tag| -> Result<Option<u16>, DicomError> {
        match obj.get(tag) {
            None => Ok(None),
            Some(e) => e
                .to_int::<u16>()
                .map(Some)
                .map_err(|e| DicomError::Command {
                    reason: format!("element {tag} is not an unsigned short: {e}"),
                }),
        }
    };
    let str_of = |tag| {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| trim_uid(&s).to_string())
    };
    let command_field = u16_of(tags::COMMAND_FIELD)?.ok_or_else(|| DicomError::Command {
        reason: "no command field (0000,0100)".into(),
    })?;
    Ok(Command {
        command_field,
        message_id: u16_of(tags::MESSAGE_ID)?,
        message_id_responded_to: u16_of(tags::MESSAGE_ID_BEING_RESPONDED_TO)?,
        affected_sop_class_uid: str_of(tags::AFFECTED_SOP_CLASS_UID),
        affected_sop_instance_uid: str_of(tags::AFFECTED_SOP_INSTANCE_UID),
        status: u16_of(tags::STATUS)?,
        data_set_type: u16_of(tags::COMMAND_DATA_SET_TYPE)?.unwrap_or(NO_DATA_SET),
        error_comment: str_of(tags::ERROR_COMMENT),
    })
}

/// Command sets are flat implicit-VR elements. Checking every declared length against the
/// bytes present before decoding stops a hostile length from making the decoder allocate
/// gigabytes.
fn check_element_lengths(bytes: &[u8]) -> Result<(), DicomError> {
    let mut at = 0usize;
    while at < bytes.len() {
        let header = bytes.get(at..at + 8).ok_or_else(|| DicomError::Command {
            reason: format!("truncated element header at byte {at}"),
        })?;
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let end = (at + 8).checked_add(len).filter(|end| *end <= bytes.len());
        at = end.ok_or_else(|| DicomError::Command {
            reason: format!(
                "element at byte {at} declares {len} bytes, only {} remain",
                bytes.len() - at - 8
            ),
        })?;
    }
    Ok(())
}

fn encode(obj: &InMemDicomObject) -> Result<Vec<u8>, DicomError> {
    let mut out = Vec::with_capacity(256);
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| DicomError::Command {
            reason: format!("cannot encode: {}", chain(&e)),
        })?;
    Ok(out)
}

fn us(tag: dicom_core::Tag, value: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, dicom_value!(U16, [value]))
}

fn ui(tag: dicom_core::Tag, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::UI, dicom_value!(Str, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_request_round_trips() {
        let bytes = store_rq(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5").unwrap();
        let cmd = decode(&bytes).unwrap();
        assert_eq!(cmd.command_field, field::C_STORE_RQ);
        assert_eq!(cmd.message_id, Some(7));
        assert_eq!(
            cmd.affected_sop_class_uid.as_deref(),
            Some("1.2.840.10008.5.1.4.1.1.2")
        );
        // "1.2.3.4.5" has odd length, so it went out padded with a NUL and came back trimmed.
        assert_eq!(cmd.affected_sop_instance_uid.as_deref(), Some("1.2.3.4.5"));
        assert!(cmd.has_data_set());
        assert_eq!(cmd.status, None);
    }

    #[test]
    fn store_response_round_trips_with_comment() {
        let bytes = store_rsp(9, "1.2.3", "4.5.6", 0xA700, Some("disk full")).unwrap();
        let cmd = decode(&bytes).unwrap();
        assert_eq!(cmd.command_field, field::C_STORE_RSP);
        assert_eq!(cmd.message_id_responded_to, Some(9));
        assert_eq!(cmd.status, Some(0xA700));
        assert_eq!(cmd.error_comment.as_deref(), Some("disk full"));
        assert!(!cmd.has_data_set());
    }

    #[test]
    fn echo_round_trips() {
        let rq = decode(&echo_rq(3).unwrap()).unwrap();
        assert_eq!(
            (rq.command_field, rq.message_id),
            (field::C_ECHO_RQ, Some(3))
        );
        let rsp = decode(&echo_rsp(3, 0).unwrap()).unwrap();
        assert_eq!(rsp.command_field, field::C_ECHO_RSP);
        assert_eq!(rsp.message_id_responded_to, Some(3));
        assert_eq!(
            rsp.affected_sop_class_uid.as_deref(),
            Some(VERIFICATION_SOP_CLASS)
        );
        assert_eq!(rsp.status, Some(0));
    }

    #[test]
    fn trailing_padding_is_trimmed() {
        assert_eq!(trim_uid("1.2.3\0"), "1.2.3");
        assert_eq!(trim_uid("STORESCU  "), "STORESCU");
    }

    #[test]
    fn hostile_lengths_are_refused_without_allocating() {
        let mut bytes = store_rq(1, "1.2", "3.4").unwrap();
        // Declare 0xFFFF_FFF0 bytes for the last element's value.
        let n = bytes.len();
        bytes.truncate(n - 4);
        bytes[n - 8..n - 4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        let err = decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("declares"), "{err}");
        assert!(decode(&[1, 2, 3]).is_err());
        assert!(decode(&[]).is_err());
    }
}

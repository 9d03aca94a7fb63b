//! Part-10 file framing (PS3.10 §7): the preamble and file meta group written in front of
//! a received data set, reading them back, and the identifying attributes at the start of
//! a data set.

use std::io::Read;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{FileMetaTable, FileMetaTableBuilder};
use dicom_parser::dataset::{read::DataSetReader, DataToken};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::command::trim_uid;
use crate::error::{chain, DicomError};
use crate::InstanceAttributes;

/// Our Implementation Class UID (0002,0012): the 2.25 arc (PS3.5 §B.2) with a UUID made
/// once for Outpost, so files we write are traceable to us and not to dicom-rs.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.333335065317405892350092449469100950539";

/// Our Implementation Version Name (0002,0013), at most 16 characters.
pub const IMPLEMENTATION_VERSION_NAME: &str = "OUTPOST_0_1";

/// How much of a data set's start [`attributes_from_dataset_prefix`] needs: the attributes
/// up to (0020,000E) fit easily unless a large private element precedes them.
pub const ATTRIBUTE_PREFIX_BYTES: usize = 64 * 1024;

/// The file meta of a Part-10 file, as read by [`read_part10_meta`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part10Meta {
    /// (0002,0002) Media Storage SOP Class UID, trimmed.
    pub sop_class_uid: String,
    /// (0002,0003) Media Storage SOP Instance UID, trimmed.
    pub sop_instance_uid: String,
    /// (0002,0010) Transfer Syntax UID of the data set, trimmed.
    pub transfer_syntax: String,
    /// (0002,0016) Source Application Entity Title, when present.
    pub source_ae: Option<String>,
    /// Byte offset of the first data set byte from the start of the file.
    pub dataset_offset: u64,
}

/// The preamble, `DICM` and file meta group for an instance whose data set bytes, in
/// `transfer_syntax`, follow unchanged.
pub fn part10_header(
    sop_class: &str,
    sop_instance: &str,
    transfer_syntax: &str,
    source_ae: &str,
) -> Result<Vec<u8>, DicomError> {
    let mut builder = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .transfer_syntax(transfer_syntax)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
    if !source_ae.is_empty() {
        builder = builder.source_application_entity_title(source_ae);
    }
    let meta = builder.build().map_err(|e| DicomError::Part10 {
        reason: format!(
            "building meta for sop instance {sop_instance}: {}",
            chain(&e)
        ),
    })?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out).map_err(|e| DicomError::Part10 {
        reason: format!(
            "writing meta for sop instance {sop_instance}: {}",
            chain(&e)
        ),
    })?;
    Ok(out)
}

/// Reads the preamble (if any) and file meta group, leaving `reader` at the first data set
/// byte. Files without the 128-byte preamble (starting with `DICM`) are accepted too.
pub fn read_part10_meta<R: Read>(mut reader: R) -> Result<Part10Meta, DicomError> {
    let io = |e: std::io::Error| DicomError::Part10 {
        reason: format!("reading preamble: {e}"),
    };
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic).map_err(io)?;
    let mut consumed = 4u64;
    if &magic != b"DICM" {
        // A preamble: skip the remaining 124 bytes and expect DICM after it.
        let mut rest = [0u8; 124];
        reader.read_exact(&mut rest).map_err(io)?;
        reader.read_exact(&mut magic).map_err(io)?;
        consumed += 128;
        if &magic != b"DICM" {
            return Err(DicomError::Part10 {
                reason: "no DICM prefix at byte 0 or 128: not a part-10 file".into(),
            });
        }
    }
    // FileMetaTable::from_reader wants the magic again and then reads exactly the
    // meta group's bytes, so the reader ends at the data set.
    let meta = FileMetaTable::from_reader(std::io::Cursor::new(magic).chain(&mut reader)).map_err(
        |e| DicomError::Part10 {
            reason: format!("reading meta group: {}", chain(&e)),
        },
    )?;
    // The group length element itself is 12 bytes in explicit VR LE.
    let dataset_offset = consumed + 12 + u64::from(meta.information_group_length);
    Ok(Part10Meta {
        sop_class_uid: trim_uid(&meta.media_storage_sop_class_uid).to_string(),
        sop_instance_uid: trim_uid(&meta.media_storage_sop_instance_uid).to_string(),
        transfer_syntax: trim_uid(&meta.transfer_syntax).to_string(),
        source_ae: meta
            .source_application_entity_title
            .as_deref()
            .map(|s| trim_uid(s).to_string())
            .filter(|s| !s.is_empty()),
        dataset_offset,
    })
}

/// Reads the identifying attributes from the first bytes of a data set (no file meta) in
/// `transfer_syntax`. Stops at (0020,0010), at the end of `bytes` or at anything it cannot
/// parse; what it did not find is `None`. Never fails and never allocates more than the
/// prefix holds.
pub fn attributes_from_dataset_prefix(bytes: &[u8], transfer_syntax: &str) -> InstanceAttributes {
    let mut out = InstanceAttributes::default();
    let Some(ts) = TransferSyntaxRegistry.get(trim_uid(transfer_syntax)) else {
        return out;
    };
    let Ok(reader) = DataSetReader::new_with_ts(bytes, ts) else {
        return out;
    };
    // Sequence nesting depth: only root-level elements count, and only root-level tags
    // end the scan.
    let mut depth = 0usize;
    let mut pending: Option<Tag> = None;
    for token in reader {
        let Ok(token) = token else { break };
        match token {
            DataToken::ElementHeader(header) => {
                // The reader allocates the declared length before reading the value; a
                // length beyond the prefix can only fail, so stop before it is tried.
                if header
                    .len
                    .get()
                    .is_some_and(|len| len as usize > bytes.len())
                {
                    break;
                }
                if depth == 0 && header.tag >= tags::STUDY_ID {
                    break;
                }
                pending = (depth == 0).then_some(header.tag);
            }
            DataToken::PrimitiveValue(value) => {
                let Some(tag) = pending.take() else { continue };
                let text = value.to_str();
                let text = Some(trim_uid(text.trim_start()).to_string()).filter(|s| !s.is_empty());
                match tag {
                    tags::SOP_CLASS_UID => out.sop_class_uid = text,
                    tags::SOP_INSTANCE_UID => out.sop_instance_uid = text,
                    tags::MODALITY => out.modality = text,
                    tags::STUDY_INSTANCE_UID => out.study_instance_uid = text,
                    tags::SERIES_INSTANCE_UID => out.series_instance_uid = text,
                    _ => {}
                }
            }
            DataToken::SequenceStart { tag, .. } => {
                if depth == 0 && tag >= tags::STUDY_ID {
                    break;
                }
                depth += 1;
                pending = None;
            }
            DataToken::PixelSequenceStart => break,
            DataToken::SequenceEnd => depth = depth.saturating_sub(1),
            DataToken::ItemStart { .. }
            | DataToken::ItemEnd
            | DataToken::ItemValue(_)
            | DataToken::OffsetTable(_) => pending = None,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

    #[test]
    fn header_round_trips_through_read_part10_meta() {
        let mut file = part10_header(CT, "1.2.3.4.5", EXPLICIT_LE, "MODALITY1").unwrap();
        let header_len = file.len() as u64;
        file.extend_from_slice(b"DATASET");
        let mut reader = std::io::Cursor::new(&file);
        let meta = read_part10_meta(&mut reader).unwrap();
        assert_eq!(meta.sop_class_uid, CT);
        assert_eq!(meta.sop_instance_uid, "1.2.3.4.5");
        assert_eq!(meta.transfer_syntax, EXPLICIT_LE);
        assert_eq!(meta.source_ae.as_deref(), Some("MODALITY1"));
        assert_eq!(meta.dataset_offset, header_len);
        assert_eq!(reader.position(), header_len, "reader left at the data set");
    }

    #[test]
    fn header_carries_our_implementation_uid_and_name() {
        let file = part10_header(CT, "1.2.3", EXPLICIT_LE, "").unwrap();
        let meta = FileMetaTable::from_reader(&file[128..]).unwrap();
        assert_eq!(
            trim_uid(&meta.implementation_class_uid),
            IMPLEMENTATION_CLASS_UID
        );
        assert_eq!(
            meta.implementation_version_name.as_deref().map(trim_uid),
            Some(IMPLEMENTATION_VERSION_NAME)
        );
        assert_eq!(meta.source_application_entity_title, None);
    }

    #[test]
    fn meta_without_preamble_is_read() {
        let file = part10_header(CT, "1.2.3", EXPLICIT_LE, "A").unwrap();
        let mut reader = std::io::Cursor::new(&file[128..]);
        let meta = read_part10_meta(&mut reader).unwrap();
        assert_eq!(meta.dataset_offset, file.len() as u64 - 128);
        assert_eq!(reader.position(), meta.dataset_offset);
    }

    #[test]
    fn non_dicom_input_is_an_error() {
        let err = read_part10_meta(&[0u8; 300][..]).unwrap_err().to_string();
        assert!(err.contains("not a part-10 file"), "{err}");
        assert!(read_part10_meta(&b"DI"[..]).is_err());
    }

    #[test]
    fn garbage_and_truncated_prefixes_give_empty_attributes() {
        assert_eq!(
            attributes_from_dataset_prefix(&[0xFF; 100], EXPLICIT_LE),
            InstanceAttributes::default()
        );
        assert_eq!(
            attributes_from_dataset_prefix(b"", EXPLICIT_LE),
            InstanceAttributes::default()
        );
        assert_eq!(
            attributes_from_dataset_prefix(&[0; 10], "1.2.3.unknown"),
            InstanceAttributes::default()
        );
        // An element declaring 4 GB must not make the parser try to allocate it.
        let mut hostile = vec![0x08, 0x00, 0x18, 0x00];
        hostile.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        hostile.extend_from_slice(b"1.2.3");
        assert_eq!(
            attributes_from_dataset_prefix(&hostile, "1.2.840.10008.1.2"),
            InstanceAttributes::default()
        );
    }
}

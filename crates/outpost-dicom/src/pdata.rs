//! P-DATA-TF PDUs read straight from an association's read buffer.
//!
//! dicom-ul's `receive` copies each P-DATA-TF PDU twice (into a `Bytes`, then every
//! presentation data value into a `Vec` of its own); at intake rates those copies were an
//! eighth of the agent's CPU. Data sets are nearly all an SCP reads, so a P-DATA-TF PDU is
//! split off the read buffer without a copy and its items are handed on as slices. Every
//! other PDU (association control: rare and small) is still read and checked by dicom-ul,
//! from the same buffer.

use std::time::Duration;

use bytes::Bytes;
use dicom_ul::association::{AsyncAssociation, AsyncServerAssociation};
use dicom_ul::Pdu;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const P_DATA_TF: u8 = 0x04;
/// Type, reserved byte, length.
const PDU_HEADER: usize = 6;
/// Item length, presentation context, message control header.
const PDV_HEADER: usize = 6;
/// Buffer grown at most this much ahead of the bytes that arrive, so a PDU header that
/// announces a large length costs memory only as its bytes come.
const RESERVE_AHEAD: usize = 256 * 1024;

/// One presentation data value: a fragment of a command or of a data set.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Pdv<'a> {
    pub(crate) pc_id: u8,
    pub(crate) command: bool,
    pub(crate) last: bool,
    pub(crate) data: &'a [u8],
}

/// A PDU as read.
pub(crate) enum Incoming {
    /// The items of a P-DATA-TF PDU, as sent.
    PData(Bytes),
    /// Any other PDU, read by dicom-ul.
    Other(Pdu),
}

/// Why no PDU could be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Nothing arrived within the association's timeout.
    Timeout(Duration),
    /// The peer closed the connection.
    Closed,
    /// The bytes are not a PDU this association accepts.
    Malformed(String),
    /// The socket failed.
    Io(std::io::Error),
    /// dicom-ul could not read a PDU other than P-DATA-TF.
    Ul(dicom_ul::association::Error),
}

/// Reads the next PDU: P-DATA-TF here, any other through dicom-ul, within `timeout` for
/// the whole PDU (so a peer trickling bytes cannot hold the association). Cancel-safe:
/// bytes read stay in the association's buffer until a whole PDU is there.
pub(crate) async fn next_pdu(
    assoc: &mut AsyncServerAssociation<TcpStream>,
    max_pdu: u32,
    timeout: Duration,
) -> Result<Incoming, ReadError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (socket, buffer) = assoc.get_mut();
        if buffer.len() >= PDU_HEADER {
            if buffer[0] != P_DATA_TF {
                return assoc
                    .receive()
                    .await
                    .map(Incoming::Other)
                    .map_err(ReadError::Ul);
            }
            let length = u32::from_be_bytes([buffer[2], buffer[3], buffer[4], buffer[5]]);
            // As dicom-ul in strict mode: a PDU longer than announced is refused before
            // any of it is buffered, which bounds memory.
            if length > max_pdu {
                return Err(ReadError::Malformed(format!(
                    "P-DATA-TF PDU of {length} bytes, longer than the {max_pdu} this gateway accepts"
                )));
            }
            let whole = PDU_HEADER + length as usize;
            if buffer.len() >= whole {
                let mut pdu = buffer.split_to(whole);
                let items = pdu.split_off(PDU_HEADER);
                return Ok(Incoming::PData(items.freeze()));
            }
            buffer.reserve((whole - buffer.len()).min(RESERVE_AHEAD));
        }
        let read = tokio::time::timeout_at(deadline, socket.read_buf(buffer))
            .await
            .map_err(|_| ReadError::Timeout(timeout))?
            .map_err(ReadError::Io)?;
        if read == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// The presentation data values of a P-DATA-TF PDU's items, or what is wrong with them.
pub(crate) fn values(mut items: &[u8]) -> Result<Vec<Pdv<'_>>, String> {
    let mut values = Vec::with_capacity(1);
    if items.is_empty() {
        return Err("P-DATA-TF PDU without a presentation data value".into());
    }
    while !items.is_empty() {
        if items.len() < PDV_HEADER {
            return Err(format!(
                "P-DATA-TF item of {} bytes, shorter than its header",
                items.len()
            ));
        }
        let length = u32::from_be_bytes([items[0], items[1], items[2], items[3]]) as usize;
        if length < 2 || length > items.len() - 4 {
            return Err(format!(
                "P-DATA-TF item length {length} does not fit the {} bytes left in its PDU",
                items.len() - 4
            ));
        }
        let header = items[5];
        values.push(Pdv {
            pc_id: items[4],
            command: header & 0x01 != 0,
            last: header & 0x02 != 0,
            data: &items[PDV_HEADER..4 + length],
        });
        items = &items[4 + length..];
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn item(pc_id: u8, header: u8, data: &[u8]) -> Vec<u8> {
        let mut item = ((data.len() + 2) as u32).to_be_bytes().to_vec();
        item.extend_from_slice(&[pc_id, header]);
        item.extend_from_slice(data);
        item
    }

    #[test]
    fn items_split_into_their_values() {
        let mut items = item(1, 0x03, b"command");
        items.extend(item(3, 0x00, b"data"));
        items.extend(item(3, 0x02, b""));
        let values = values(&items).unwrap();
        assert_eq!(
            values,
            vec![
                Pdv {
                    pc_id: 1,
                    command: true,
                    last: true,
                    data: b"command"
                },
                Pdv {
                    pc_id: 3,
                    command: false,
                    last: false,
                    data: b"data"
                },
                Pdv {
                    pc_id: 3,
                    command: false,
                    last: true,
                    data: b""
                },
            ]
        );
    }

    #[test]
    fn inconsistent_items_are_refused_with_the_reason() {
        assert!(values(&[]).unwrap_err().contains("without"));
        assert!(values(&[0, 0, 0, 9, 1, 2])
            .unwrap_err()
            .contains("does not fit"));
        assert!(values(&[0, 0, 0, 1, 1, 2])
            .unwrap_err()
            .contains("does not fit"));
        let mut cut = item(1, 0, b"abc");
        cut.extend_from_slice(&[0, 0]);
        assert!(values(&cut)
            .unwrap_err()
            .contains("shorter than its header"));
    }
}

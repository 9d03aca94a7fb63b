//! The SCU: C-ECHO, and C-STORE of data sets in their own transfer syntax (never
//! transcoded), with the P-DATA framing done here on the raw stream.

use std::time::{Duration, Instant};

use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::association::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::prelude::*;
use dicom_ul::Pdu;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use crate::command::{self, Command, VERIFICATION_SOP_CLASS};
use crate::error::{chain, DicomError};

/// Implicit VR Little Endian, which every peer must accept for C-ECHO.
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR Little Endian.
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// Where and as whom to associate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScuConfig {
    /// The peer, `host:port`.
    pub address: String,
    /// The peer's AE title.
    pub called_ae: String,
    /// Our AE title.
    pub calling_ae: String,
    /// Largest PDU we accept from the peer, in bytes.
    pub max_pdu: u32,
    /// Timeout for connecting, and for each send and receive.
    pub timeout: Duration,
}

/// One instance to send: its identity and the length of its data set (the bytes after the
/// Part-10 file meta, in `transfer_syntax`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingInstance {
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// Transfer syntax of the data set bytes.
    pub transfer_syntax: String,
    /// Number of data set bytes the reader given to [`StoreAssociation::store`] yields.
    pub dataset_len: u64,
}

/// What a DIMSE status means for the sender (PS3.4 Annex B.2.3, PS3.7 Annex C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// Stored.
    Success,
    /// Stored, with a warning (coercion, elements discarded): treat as delivered.
    Warning,
    /// Refused for lack of resources (0xA7xx): try again later.
    RetryLater,
    /// Refused for good: retrying the same instance will fail again.
    Failed,
}

/// Classifies a C-STORE response status.
pub fn classify_status(status: u16) -> StatusClass {
    match status {
        0x0000 => StatusClass::Success,
        // 0x0001 and 0x0107/0x0116 are the general warning codes (PS3.7 C.4).
        0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF => StatusClass::Warning,
        0xA700..=0xA7FF => StatusClass::RetryLater,
        _ => StatusClass::Failed,
    }
}

/// Verifies the peer answers C-ECHO; returns the round trip including association setup.
pub async fn echo(config: &ScuConfig) -> Result<Duration, DicomError> {
    let started = Instant::now();
    let contexts = [(
        VERIFICATION_SOP_CLASS.to_string(),
        vec![IMPLICIT_VR_LE.to_string(), EXPLICIT_VR_LE.to_string()],
    )];
    let mut association = connect(config, &contexts).await?;
    let pc_id = association
        .accepted(VERIFICATION_SOP_CLASS, None)
        .ok_or_else(|| association.not_accepted(VERIFICATION_SOP_CLASS, IMPLICIT_VR_LE))?;
    let message_id = association.next_message_id();
    let request = command::echo_rq(message_id)?;
    association
        .send_command(pc_id, request, "C-ECHO-RQ")
        .await?;
    let response = association.read_response(message_id, "C-ECHO-RSP").await?;
    association.release().await?;
    match response.status {
        Some(0) => Ok(started.elapsed()),
        other => Err(DicomError::Association {
            address: config.address.clone(),
            called_ae: config.called_ae.clone(),
            reason: format!("C-ECHO answered with status {other:04x?}"),
        }),
    }
}

/// An open association for sending instances with C-STORE, one at a time.
pub struct StoreAssociation {
    inner: Connection,
}

impl StoreAssociation {
    /// Associates, proposing each distinct (SOP class, transfer syntax) pair as its own
    /// presentation context so the peer can accept or refuse each one.
    pub async fn open(
        config: &ScuConfig,
        contexts: &[(String, String)],
    ) -> Result<Self, DicomError> {
        let mut proposed: Vec<(String, Vec<String>)> = Vec::new();
        for (class, ts) in contexts {
            let pair = (class.clone(), vec![ts.clone()]);
            if !proposed.contains(&pair) {
                proposed.push(pair);
            }
        }
        if proposed.is_empty() || proposed.len() > 128 {
            return Err(DicomError::Config {
                reason: format!(
                    "{} presentation contexts proposed to {} at {}; 1 to 128 are possible",
                    proposed.len(),
                    config.called_ae,
                    config.address
                ),
            });
        }
        Ok(Self {
            inner: connect(config, &proposed).await?,
        })
    }

    /// The (SOP class, transfer syntax) pairs the peer accepted.
    pub fn accepted_contexts(&self) -> Vec<(String, String)> {
        self.inner
            .association
            .presentation_contexts()
            .iter()
            .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .map(|pc| (pc.abstract_syntax.clone(), pc.transfer_syntax.clone()))
            .collect()
    }

    /// Sends one instance: the C-STORE-RQ, then exactly `instance.dataset_len` bytes from
    /// `dataset`, then waits for the response and returns its status (see
    /// [`classify_status`]). Any error aborts the association; open a new one to go on.
    pub async fn store<R: AsyncRead + Unpin>(
        &mut self,
        instance: &OutgoingInstance,
        dataset: R,
    ) -> Result<u16, DicomError> {
        let result = self.inner.store(instance, dataset).await;
        if result.is_err() {
            self.inner.abort().await;
        }
        result
    }

    /// Releases the association (A-RELEASE).
    pub async fn release(self) -> Result<(), DicomError> {
        self.inner.release().await
    }
}

impl std::fmt::Debug for StoreAssociation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreAssociation")
            .field("address", &self.inner.address)
            .field("called_ae", &self.inner.called_ae)
            .finish_non_exhaustive()
    }
}

/// An established association and what error messages need to name it.
struct Connection {
    association: AsyncClientAssociation<TcpStream>,
    address: String,
    called_ae: String,
    timeout: Duration,
    message_id: u16,
    /// Set once an error left the association in an unknown state.
    is_broken: bool,
}

async fn connect(
    config: &ScuConfig,
    contexts: &[(String, Vec<String>)],
) -> Result<Connection, DicomError> {
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(config.calling_ae.as_str())
        .called_ae_title(config.called_ae.as_str())
        .max_pdu_length(config.max_pdu)
        .strict(true)
        .read_timeout(config.timeout)
        .write_timeout(config.timeout)
        .connection_timeout(config.timeout);
    for (class, syntaxes) in contexts {
        options = options.with_presentation_context(class.clone(), syntaxes.clone());
    }
    let established = options.establish_async(config.address.as_str()).await;
    let mut association = established.map_err(|e| {
        use dicom_ul::association::Error;
        match e {
            Error::Rejected { association_rj, .. } => DicomError::Rejected {
                address: config.address.clone(),
                called_ae: config.called_ae.clone(),
                calling_ae: config.calling_ae.clone(),
                reason: format!(
                    "{} ({})",
                    association_rj.source,
                    match association_rj.result {
                        dicom_ul::pdu::AssociationRJResult::Permanent => "permanent",
                        dicom_ul::pdu::AssociationRJResult::Transient => "transient",
                    }
                ),
            },
            Error::NoAcceptedPresentationContexts { .. } => DicomError::NotAccepted {
                address: config.address.clone(),
                called_ae: config.called_ae.clone(),
                sop_class_uid: join(contexts.iter().map(|(c, _)| c.as_str())),
                transfer_syntax: join(contexts.iter().flat_map(|(_, t)| t).map(String::as_str)),
            },
            other => DicomError::Connect {
                address: config.address.clone(),
                called_ae: config.called_ae.clone(),
                calling_ae: config.calling_ae.clone(),
                reason: chain(&other),
            },
        }
    })?;
    // Each C-STORE-RQ and its response are small writes; Nagle would hold them back.
    if let Err(e) = association.inner_stream().set_nodelay(true) {
        debug!(address = %config.address, "TCP_NODELAY: {e}");
    }
    Ok(Connection {
        association,
        address: config.address.clone(),
        called_ae: config.called_ae.clone(),
        timeout: config.timeout,
        message_id: 0,
        is_broken: false,
    })
}

fn join<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut unique: Vec<&str> = Vec::new();
    for item in items {
        if !unique.contains(&item) {
            unique.push(item);
        }
    }
    unique.join(", ")
}

/// Largest PDV payload we send, whatever the peer allows: bounds our buffer.
const MAX_PDV_DATA: usize = 1 << 20;

impl Connection {
    fn next_message_id(&mut self) -> u16 {
        self.message_id = self.message_id.wrapping_add(1).max(1);
        self.message_id
    }

    fn accepted(&self, sop_class: &str, transfer_syntax: Option<&str>) -> Option<u8> {
        self.association
            .presentation_contexts()
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && pc.abstract_syntax == sop_class
                    && transfer_syntax.is_none_or(|ts| pc.transfer_syntax == ts)
            })
            .map(|pc| pc.id)
    }

    fn not_accepted(&self, sop_class: &str, transfer_syntax: &str) -> DicomError {
        DicomError::NotAccepted {
            address: self.address.clone(),
            called_ae: self.called_ae.clone(),
            sop_class_uid: sop_class.to_string(),
            transfer_syntax: transfer_syntax.to_string(),
        }
    }

    fn failure(&mut self, reason: String) -> DicomError {
        self.is_broken = true;
        DicomError::Association {
            address: self.address.clone(),
            called_ae: self.called_ae.clone(),
            reason,
        }
    }

    async fn store<R: AsyncRead + Unpin>(
        &mut self,
        instance: &OutgoingInstance,
        mut dataset: R,
    ) -> Result<u16, DicomError> {
        if self.is_broken {
            return Err(self.failure(format!(
                "not sending sop instance {}: the association was aborted after an earlier error",
                instance.sop_instance_uid
            )));
        }
        let pc_id = self
            .accepted(&instance.sop_class_uid, Some(&instance.transfer_syntax))
            .ok_or_else(|| self.not_accepted(&instance.sop_class_uid, &instance.transfer_syntax))?;
        let message_id = self.next_message_id();
        let request = command::store_rq(
            message_id,
            &instance.sop_class_uid,
            &instance.sop_instance_uid,
        )?;
        self.send_command(pc_id, request, "C-STORE-RQ").await?;
        self.send_dataset(pc_id, instance, &mut dataset).await?;
        let response = self.read_response(message_id, "C-STORE-RSP").await?;
        response.status.ok_or_else(|| {
            self.failure(format!(
                "C-STORE-RSP for sop instance {} has no status",
                instance.sop_instance_uid
            ))
        })
    }

    /// Frames the data set as P-DATA-TF PDUs directly on the stream (PS3.8 §9.3.5), each
    /// with one PDV of at most the peer's max PDU. dicom-ul's own writer is avoided: in
    /// 0.10.1 it can report a zero-byte write when its buffer is exactly full, and its
    /// `Drop` needs a multi-threaded runtime.
    async fn send_dataset<R: AsyncRead + Unpin>(
        &mut self,
        pc_id: u8,
        instance: &OutgoingInstance,
        dataset: &mut R,
    ) -> Result<(), DicomError> {
        // PDV item length (4) + context id (1) + control header (1) = 6 bytes on top of the data.
        let max_data = (self.association.peer_max_pdu_length() as usize)
            .saturating_sub(6)
            .clamp(1024, MAX_PDV_DATA);
        let mut remaining = instance.dataset_len;
        let mut buf = vec![0u8; 12 + max_data.min(remaining as usize)];
        loop {
            let n = remaining.min(max_data as u64) as usize;
            if let Err(e) = dataset.read_exact(&mut buf[12..12 + n]).await {
                self.is_broken = true;
                return Err(DicomError::Dataset {
                    sop_instance_uid: instance.sop_instance_uid.clone(),
                    reason: format!(
                        "reading {n} bytes with {remaining} of {} left: {e}",
                        instance.dataset_len
                    ),
                });
            }
            remaining -= n as u64;
            let is_last = remaining == 0;
            buf[0] = 0x04; // P-DATA-TF
            buf[1] = 0;
            buf[2..6].copy_from_slice(&((n + 6) as u32).to_be_bytes());
            buf[6..10].copy_from_slice(&((n + 2) as u32).to_be_bytes());
            buf[10] = pc_id;
            // Message control header: bit 0 clear = data set, bit 1 set = last fragment.
            buf[11] = if is_last { 0x02 } else { 0x00 };
            let write = self.association.inner_stream().write_all(&buf[..12 + n]);
            match tokio::time::timeout(self.timeout, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(self.failure(format!(
                        "sending the data set of sop instance {} with {remaining} bytes left: {e}",
                        instance.sop_instance_uid
                    )))
                }
                Err(_) => {
                    return Err(self.failure(format!(
                        "sending the data set of sop instance {}: peer took no data for {:?}",
                        instance.sop_instance_uid, self.timeout
                    )))
                }
            }
            if is_last {
                return Ok(());
            }
        }
    }

    async fn send_command(
        &mut self,
        pc_id: u8,
        data: Vec<u8>,
        what: &str,
    ) -> Result<(), DicomError> {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data,
            }],
        };
        match self.association.send(&pdu).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failure(format!("sending {what}: {}", chain(&e)))),
        }
    }

    /// Reads PDUs until a complete command set answering `message_id` arrives.
    async fn read_response(&mut self, message_id: u16, what: &str) -> Result<Command, DicomError> {
        let mut buffer = Vec::new();
        loop {
            let pdu = match self.association.receive().await {
                Ok(pdu) => pdu,
                Err(dicom_ul::association::Error::Timeout { .. }) => {
                    self.is_broken = true;
                    return Err(DicomError::Timeout {
                        address: self.address.clone(),
                        called_ae: self.called_ae.clone(),
                        what: what.to_string(),
                        after: self.timeout,
                    });
                }
                Err(e) => return Err(self.failure(format!("waiting for {what}: {}", chain(&e)))),
            };
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        if pdv.value_type != PDataValueType::Command {
                            continue;
                        }
                        buffer.extend_from_slice(&pdv.data);
                        if !pdv.is_last {
                            continue;
                        }
                        let response = command::decode(&std::mem::take(&mut buffer))?;
                        if response.message_id_responded_to == Some(message_id)
                            && response.command_field & 0x8000 != 0
                        {
                            return Ok(response);
                        }
                        debug!(address = %self.address, "ignoring command {:#06x} while waiting for {what}", response.command_field);
                    }
                }
                Pdu::AbortRQ { source } => {
                    return Err(self.failure(format!(
                        "peer aborted ({source:?}) while we waited for {what}"
                    )))
                }
                other => {
                    return Err(self.failure(format!(
                        "unexpected {} while waiting for {what}",
                        other.short_description()
                    )))
                }
            }
        }
    }

    async fn release(self) -> Result<(), DicomError> {
        if self.is_broken {
            return Ok(());
        }
        let (address, called_ae) = (self.address.clone(), self.called_ae.clone());
        self.association
            .release()
            .await
            .map_err(|e| DicomError::Association {
                address,
                called_ae,
                reason: format!("releasing: {}", chain(&e)),
            })
    }

    /// Sends A-ABORT and closes; the association state is unknown after an error.
    async fn abort(&mut self) {
        self.is_broken = true;
        let pdu = Pdu::AbortRQ {
            source: dicom_ul::pdu::AbortRQSource::ServiceUser,
        };
        let _ = tokio::time::timeout(self.timeout, self.association.send(&pdu)).await;
        let _ = self.association.inner_stream().shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert_eq!(classify_status(0x0000), StatusClass::Success);
        assert_eq!(classify_status(0xB000), StatusClass::Warning);
        assert_eq!(classify_status(0xB007), StatusClass::Warning);
        assert_eq!(classify_status(0xA700), StatusClass::RetryLater);
        assert_eq!(classify_status(0xA7FF), StatusClass::RetryLater);
        assert_eq!(classify_status(0xA900), StatusClass::Failed);
        assert_eq!(classify_status(0xC000), StatusClass::Failed);
        assert_eq!(classify_status(0x0122), StatusClass::Failed);
    }
}

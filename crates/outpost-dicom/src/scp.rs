//! The storage SCP: accepts associations, answers C-ECHO, and streams each C-STORE data
//! set into an [`InstanceStore`] as it arrives, answering success only after the store's
//! commit. Memory per association is about one PDU plus a 64 KiB prefix copy.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::association::server::{AccessControl, ServerAssociationOptions};
use dicom_ul::association::AsyncServerAssociation;
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValue, PDataValueType,
    PresentationContextNegotiated, PresentationContextResultReason, UserIdentity,
};
use dicom_ul::prelude::*;
use dicom_ul::Pdu;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::command::{self, field, trim_uid, Command, VERIFICATION_SOP_CLASS};
use crate::error::{chain, DicomError};
use crate::part10::{attributes_from_dataset_prefix, part10_header, ATTRIBUTE_PREFIX_BYTES};
use crate::pdata::{self, next_pdu, Incoming, Pdv, ReadError};
use crate::{status, IncomingInstance, InstanceStore, InstanceWriter, StoreStatus};

/// The storage SCP's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Our AE title; associations calling another title are rejected.
    pub ae_title: String,
    /// Calling AE titles allowed to associate; `None` allows any.
    pub allowed_callers: Option<Vec<String>>,
    /// Largest PDU we accept, in bytes (1018 ..= 16 MiB). Larger PDUs abort the association.
    pub max_pdu: u32,
    /// Associations served at once; more are rejected as "local limit exceeded".
    pub max_associations: usize,
    /// Largest data set accepted per instance, in bytes; beyond it the association is aborted.
    pub max_instance_bytes: u64,
    /// How long to wait for each PDU, and how long shutdown waits for an instance to finish.
    pub timeout: Duration,
}

impl ScpConfig {
    /// A config with the defaults: any caller, 64 KiB PDUs, 16 associations, 4 GiB per
    /// instance, 60 s timeout.
    pub fn new(listen: SocketAddr, ae_title: impl Into<String>) -> Self {
        Self {
            listen,
            ae_title: ae_title.into(),
            allowed_callers: None,
            max_pdu: 65_536,
            max_associations: 16,
            max_instance_bytes: 4 << 30,
            timeout: Duration::from_secs(60),
        }
    }

    fn validate(&self) -> Result<(), DicomError> {
        let fail = |reason: String| Err(DicomError::Config { reason });
        check_ae_title("ae_title", &self.ae_title)?;
        for caller in self.allowed_callers.iter().flatten() {
            check_ae_title("allowed_callers", caller)?;
        }
        let pdu_range = dicom_ul::pdu::MINIMUM_PDU_SIZE..=dicom_ul::pdu::MAXIMUM_PDU_SIZE;
        if !pdu_range.contains(&self.max_pdu) {
            return fail(format!(
                "max_pdu {} is outside {pdu_range:?} bytes",
                self.max_pdu
            ));
        }
        if self.max_associations == 0 {
            return fail("max_associations must be at least 1".into());
        }
        if self.timeout.is_zero() {
            return fail("timeout must be more than zero".into());
        }
        Ok(())
    }
}

/// Checks the config and binds the listening socket, so a port conflict shows at startup.
pub async fn bind(config: &ScpConfig) -> Result<TcpListener, DicomError> {
    config.validate()?;
    TcpListener::bind(config.listen)
        .await
        .map_err(|source| DicomError::Bind {
            addr: config.listen,
            source,
        })
}

/// Serves associations on `listener` until `shutdown` is cancelled. Then it stops
/// accepting, lets each association finish the instance it is receiving (up to
/// `config.timeout`), aborts them and returns.
pub async fn serve<S: InstanceStore>(
    listener: TcpListener,
    config: ScpConfig,
    store: Arc<S>,
    shutdown: CancellationToken,
) -> Result<(), DicomError> {
    config.validate()?;
    let listening = listener.local_addr().unwrap_or(config.listen);
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_associations));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    error!("association task failed: {e}");
                }
            }
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Usually out of file descriptors: wait instead of spinning.
                        warn!(ae_title = %config.ae_title, "accept on {listening}: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // C-STORE is request/response; Nagle would delay each small response.
                if let Err(e) = socket.set_nodelay(true) {
                    debug!(%peer, "TCP_NODELAY: {e}");
                }
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let association = Association {
                            peer,
                            config: config.clone(),
                            store: store.clone(),
                            _permit: permit,
                        };
                        tasks.spawn(association.run(socket, shutdown.clone()));
                    }
                    Err(_) => {
                        tasks.spawn(reject_over_limit(socket, peer, config.max_associations));
                    }
                }
            }
        }
    }
    drop(listener);
    info!(
        ae_title = %config.ae_title,
        "stopped accepting on {listening}; waiting for {} association(s)",
        tasks.len()
    );
    // Each association ends itself within `timeout` of the cancel; the margin covers
    // sending the abort. This is only a backstop.
    let grace = config.timeout + Duration::from_secs(5);
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            "{} association(s) still running {grace:?} after shutdown: dropping them",
            tasks.len()
        );
        tasks.shutdown().await;
    }
    Ok(())
}

/// Whether a SOP class is a storage class we accept C-STORE for (PS3.4 Annex B: the
/// `1.2.840.10008.5.1.4.1.1.` arc).
pub fn is_storage_sop_class(uid: &str) -> bool {
    uid.starts_with("1.2.840.10008.5.1.4.1.1.")
}

fn check_ae_title(which: &str, ae: &str) -> Result<(), DicomError> {
    let trimmed = ae.trim();
    if trimmed.is_empty() || ae.len() > 16 || ae.contains('\\') || ae.chars().any(char::is_control)
    {
        return Err(DicomError::Config {
            reason: format!("{which}: {ae:?} is not an AE title (1 to 16 characters, no backslash or control characters)"),
        });
    }
    Ok(())
}

/// Rejects a connection beyond `max_associations` with A-ASSOCIATE-RJ "rejected-transient,
/// local limit exceeded" (PS3.8 §9.3.4), which tells the sender to retry later.
async fn reject_over_limit(mut socket: TcpStream, peer: SocketAddr, limit: usize) {
    let rejection = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let exchange = async {
        // Read the A-ASSOCIATE-RQ first: closing with unread data makes the kernel reset the
        // connection, and the peer might never see the rejection.
        let mut header = [0u8; 6];
        socket.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        let mut body = (&mut socket).take(u64::from(len).min(1 << 20));
        tokio::io::copy(&mut body, &mut tokio::io::sink()).await?;
        let mut out = Vec::with_capacity(10);
        dicom_ul::write_pdu(&mut out, &rejection)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        socket.write_all(&out).await?;
        socket.shutdown().await
    };
    let outcome = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(())) => "sent A-ASSOCIATE-RJ (transient, local limit exceeded)".to_string(),
        Ok(Err(e)) => format!("closed the connection ({e})"),
        Err(_) => "closed the connection (no A-ASSOCIATE-RQ within 10 s)".to_string(),
    };
    warn!(%peer, "association refused: {limit} association(s) already open (max_associations); {outcome}");
}

/// Rejects wrong called AE titles (reason 7) and calling AE titles not in
/// `allowed_callers` (reason 3), logging which and why.
struct Gate {
    peer: SocketAddr,
    allowed: Option<HashSet<String>>,
}

impl AccessControl for Gate {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let (calling, called) = (trim_uid(calling_ae_title), trim_uid(called_ae_title));
        if called != trim_uid(this_ae_title) {
            warn!(peer = %self.peer, calling_ae = calling, called_ae = called,
                "association refused: calling AE {calling:?} at {} called AE title {called:?}, which is not ours ({this_ae_title:?}); sent A-ASSOCIATE-RJ reason 7",
                self.peer);
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if let Some(allowed) = &self.allowed {
            if !allowed.contains(calling) {
                warn!(peer = %self.peer, calling_ae = calling, called_ae = called,
                    "association refused: calling AE title {calling:?} at {} is not in allowed_callers; sent A-ASSOCIATE-RJ reason 3",
                    self.peer);
                return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
            }
        }
        Ok(())
    }
}

/// One accepted connection, holding its association permit until it ends.
struct Association<S> {
    peer: SocketAddr,
    config: Arc<ScpConfig>,
    store: Arc<S>,
    _permit: OwnedSemaphorePermit,
}

impl<S: InstanceStore> Association<S> {
    async fn run(self, socket: TcpStream, shutdown: CancellationToken) {
        let config = &self.config;
        let options = ServerAssociationOptions::new()
            .ae_access_control(Gate {
                peer: self.peer,
                allowed: config
                    .allowed_callers
                    .as_ref()
                    .map(|list| list.iter().map(|a| a.trim().to_string()).collect()),
            })
            .ae_title(config.ae_title.trim().to_string())
            // Every storage class is accepted at negotiation and filtered per command
            // (0x0122), because dicom-ul has no per-abstract-syntax hook.
            .promiscuous(true)
            .with_abstract_syntax(VERIFICATION_SOP_CLASS)
            .max_pdu_length(config.max_pdu)
            // Strict: a PDU longer than max_pdu is an error, which bounds memory.
            .strict(true)
            .read_timeout(config.timeout)
            .write_timeout(config.timeout);
        let established = tokio::select! {
            _ = shutdown.cancelled() => return,
            established = options.establish_async(socket) => established,
        };
        let assoc = match established {
            Ok(assoc) => assoc,
            // The gate has logged why.
            Err(dicom_ul::association::Error::Rejected { .. }) => return,
            Err(e) => {
                // Often a port probe or a health check that connects and closes: worth a
                // line, not a warning.
                tracing::info!(peer = %self.peer, "association from {} not established: {}", self.peer, chain(&e));
                return;
            }
        };
        let mut session = Session {
            calling_ae: assoc.peer_ae_title().to_string(),
            called_ae: trim_uid(assoc.called_ae_title()).to_string(),
            assoc,
            peer: self.peer,
            config: self.config.clone(),
            store: self.store.clone(),
            command: Vec::new(),
            current: None,
        };
        debug!(peer = %self.peer, calling_ae = %session.calling_ae, "association established");
        let ending = session.receive(&shutdown).await;
        session.end(ending).await;
    }
}

/// Why an association ended.
enum Ending {
    Released,
    PeerAborted(String),
    Shutdown,
    Failed(String),
}

/// An instance whose data set is arriving.
struct InFlight<W> {
    pc_id: u8,
    request_field: u16,
    message_id: u16,
    sop_class_uid: String,
    sop_instance_uid: String,
    transfer_syntax: String,
    /// `None` once refused: the rest of the data set is read and dropped.
    writer: Option<W>,
    refusal: Option<StoreStatus>,
    bytes: u64,
    prefix: Vec<u8>,
}

struct Session<S: InstanceStore> {
    assoc: AsyncServerAssociation<TcpStream>,
    peer: SocketAddr,
    calling_ae: String,
    called_ae: String,
    config: Arc<ScpConfig>,
    store: Arc<S>,
    command: Vec<u8>,
    current: Option<InFlight<S::Writer>>,
}

/// Command sets are a few hundred bytes; anything near this is hostile.
const MAX_COMMAND_BYTES: usize = 64 * 1024;

impl<S: InstanceStore> Session<S> {
    async fn receive(&mut self, shutdown: &CancellationToken) -> Ending {
        let mut deadline: Option<Instant> = None;
        loop {
            if shutdown.is_cancelled() {
                if self.current.is_none() {
                    return Ending::Shutdown;
                }
                deadline.get_or_insert_with(|| Instant::now() + self.config.timeout);
            }
            let until_deadline = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // next_pdu is cancel-safe: partial PDUs stay in the association's read buffer.
            let received = tokio::select! {
                biased;
                _ = shutdown.cancelled(), if deadline.is_none() => continue,
                _ = until_deadline => {
                    return Ending::Failed(format!(
                        "shutting down and the instance did not finish within {:?}",
                        self.config.timeout
                    ));
                }
                received = next_pdu(&mut self.assoc, self.config.max_pdu, self.config.timeout) => received,
            };
            let pdu = match received {
                Ok(Incoming::PData(items)) => {
                    let values = match pdata::values(&items) {
                        Ok(values) => values,
                        Err(why) => return Ending::Failed(format!("malformed PDU: {why}")),
                    };
                    for pdv in values {
                        if let Err(why) = self.on_pdv(pdv).await {
                            return Ending::Failed(why);
                        }
                    }
                    continue;
                }
                Ok(Incoming::Other(pdu)) => pdu,
                Err(e) => return Ending::Failed(self.describe_read_error(e)),
            };
            match pdu {
                // Read here only if dicom-ul's own reader met one (it never should).
                Pdu::PData { data } => {
                    for value in &data {
                        let pdv = Pdv {
                            pc_id: value.presentation_context_id,
                            command: value.value_type == PDataValueType::Command,
                            last: value.is_last,
                            data: &value.data,
                        };
                        if let Err(why) = self.on_pdv(pdv).await {
                            return Ending::Failed(why);
                        }
                    }
                }
                Pdu::ReleaseRQ => {
                    if let Err(e) = self.assoc.send(&Pdu::ReleaseRP).await {
                        debug!(peer = %self.peer, "sending A-RELEASE-RP: {}", chain(&e));
                    }
                    return Ending::Released;
                }
                Pdu::AbortRQ { source } => return Ending::PeerAborted(format!("{source:?}")),
                other => {
                    return Ending::Failed(format!("unexpected PDU: {}", other.short_description()))
                }
            }
        }
    }

    fn describe_read_error(&self, e: ReadError) -> String {
        use dicom_ul::association::Error;
        match e {
            ReadError::Timeout(timeout) => {
                format!("nothing received within {timeout:?} (read timeout)")
            }
            ReadError::Closed => "connection closed by peer".into(),
            ReadError::Malformed(why) => format!("malformed PDU: {why}"),
            ReadError::Io(err) => format!("reading from the connection: {err}"),
            ReadError::Ul(Error::Timeout { .. }) => {
                format!("no PDU within {:?} (read timeout)", self.config.timeout)
            }
            ReadError::Ul(Error::ConnectionClosed { .. }) => "connection closed by peer".into(),
            ReadError::Ul(e @ Error::ReceivePdu { .. }) => format!("malformed PDU: {}", chain(&e)),
            ReadError::Ul(e) => chain(&e),
        }
    }

    async fn on_pdv(&mut self, pdv: Pdv<'_>) -> Result<(), String> {
        if !pdv.command {
            return self.on_data(pdv).await;
        }
        if let Some(flight) = &self.current {
            return Err(format!(
                "command fragment on presentation context {} while the data set of sop instance {} was still arriving",
                pdv.pc_id, flight.sop_instance_uid
            ));
        }
        self.command.extend_from_slice(pdv.data);
        if self.command.len() > MAX_COMMAND_BYTES {
            return Err(format!("command set longer than {MAX_COMMAND_BYTES} bytes"));
        }
        if !pdv.last {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.command);
        let command = command::decode(&bytes).map_err(|e| e.to_string())?;
        self.on_command(pdv.pc_id, command).await
    }

    async fn on_command(&mut self, pc_id: u8, command: Command) -> Result<(), String> {
        let context = self
            .assoc
            .presentation_contexts()
            .iter()
            .find(|pc| pc.id == pc_id && pc.reason == PresentationContextResultReason::Acceptance)
            .cloned()
            .ok_or_else(|| {
                format!("command on presentation context {pc_id}, which was not accepted")
            })?;
        let message_id = command.message_id.ok_or_else(|| {
            format!(
                "command {:#06x} without a message id (0000,0110)",
                command.command_field
            )
        })?;
        match command.command_field {
            field::C_ECHO_RQ => {
                self.send_command(pc_id, command::echo_rsp(message_id, status::SUCCESS))
                    .await
            }
            field::C_STORE_RQ => self.begin_store(context, command, message_id).await,
            // Nothing to cancel: a C-STORE is answered as soon as its data set has arrived.
            field::C_CANCEL_RQ => Ok(()),
            other => {
                info!(peer = %self.peer, calling_ae = %self.calling_ae,
                    "unrecognized command {other:#06x} from {} at {}: answering 0x0211", self.calling_ae, self.peer);
                let refusal = StoreStatus {
                    code: status::UNRECOGNIZED_OPERATION,
                    comment: format!("command {other:#06x} is not supported"),
                };
                self.refuse(pc_id, &context, command, message_id, refusal)
                    .await
            }
        }
    }

    async fn begin_store(
        &mut self,
        context: PresentationContextNegotiated,
        command: Command,
        message_id: u16,
    ) -> Result<(), String> {
        let sop_class_uid = command.affected_sop_class_uid.clone().unwrap_or_default();
        let sop_instance_uid = command
            .affected_sop_instance_uid
            .clone()
            .unwrap_or_default();
        let refusal = if sop_class_uid.is_empty() || sop_instance_uid.is_empty() {
            Some((
                status::CANNOT_UNDERSTAND,
                "C-STORE-RQ without affected sop class or instance uid".to_string(),
            ))
        } else if !is_storage_sop_class(&sop_class_uid) {
            Some((
                status::SOP_CLASS_NOT_SUPPORTED,
                format!("sop class {sop_class_uid} is not a storage class"),
            ))
        } else if sop_class_uid != trim_uid(&context.abstract_syntax) {
            Some((
                status::SOP_CLASS_NOT_SUPPORTED,
                format!(
                    "sop class {sop_class_uid} sent on the context for {}",
                    context.abstract_syntax
                ),
            ))
        } else {
            None
        };
        if let Some((code, comment)) = refusal {
            // finish() logs the refusal once the data set has been read.
            let refusal = StoreStatus { code, comment };
            return self
                .refuse(context.id, &context, command, message_id, refusal)
                .await;
        }
        let transfer_syntax = trim_uid(&context.transfer_syntax).to_string();
        let mut flight = InFlight {
            pc_id: context.id,
            request_field: field::C_STORE_RQ,
            message_id,
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax,
            writer: None,
            refusal: None,
            bytes: 0,
            prefix: Vec::new(),
        };
        let incoming = IncomingInstance {
            calling_ae: self.calling_ae.clone(),
            called_ae: self.called_ae.clone(),
            peer: self.peer,
            sop_class_uid: flight.sop_class_uid.clone(),
            sop_instance_uid: flight.sop_instance_uid.clone(),
            transfer_syntax: flight.transfer_syntax.clone(),
        };
        match self.store.begin(&incoming).await {
            Ok(mut writer) => {
                let header = part10_header(
                    &flight.sop_class_uid,
                    &flight.sop_instance_uid,
                    &flight.transfer_syntax,
                    &self.calling_ae,
                )
                .map_err(|e| StoreStatus {
                    code: status::CANNOT_UNDERSTAND,
                    comment: e.to_string(),
                });
                match header {
                    Ok(header) => match writer.write(&header).await {
                        Ok(()) => flight.writer = Some(writer),
                        Err(refusal) => {
                            writer.abort().await;
                            flight.refusal = Some(refusal);
                        }
                    },
                    Err(refusal) => {
                        writer.abort().await;
                        flight.refusal = Some(refusal);
                    }
                }
            }
            Err(refusal) => flight.refusal = Some(refusal),
        }
        if let Some(refusal) = &flight.refusal {
            debug!(peer = %self.peer, calling_ae = %self.calling_ae,
                "store refused sop instance {} from {} at {}: {:#06x} {}; reading and dropping its data set",
                flight.sop_instance_uid, self.calling_ae, self.peer, refusal.code, refusal.comment);
        }
        self.current = Some(flight);
        Ok(())
    }

    /// Answers `refusal` now if no data set follows, else once it has been read and dropped.
    async fn refuse(
        &mut self,
        pc_id: u8,
        context: &PresentationContextNegotiated,
        command: Command,
        message_id: u16,
        refusal: StoreStatus,
    ) -> Result<(), String> {
        let flight = InFlight {
            pc_id,
            request_field: command.command_field,
            message_id,
            sop_class_uid: command.affected_sop_class_uid.unwrap_or_default(),
            sop_instance_uid: command.affected_sop_instance_uid.unwrap_or_default(),
            transfer_syntax: context.transfer_syntax.clone(),
            writer: None,
            refusal: Some(refusal),
            bytes: 0,
            prefix: Vec::new(),
        };
        if command.data_set_type == command::NO_DATA_SET {
            self.finish(flight).await
        } else {
            self.current = Some(flight);
            Ok(())
        }
    }

    async fn on_data(&mut self, pdv: Pdv<'_>) -> Result<(), String> {
        let max_instance_bytes = self.config.max_instance_bytes;
        let Some(flight) = self.current.as_mut() else {
            return Err(format!(
                "data set fragment on presentation context {} without a C-STORE-RQ",
                pdv.pc_id
            ));
        };
        if pdv.pc_id != flight.pc_id {
            return Err(format!(
                "data set fragment for sop instance {} on presentation context {} instead of {}",
                flight.sop_instance_uid, pdv.pc_id, flight.pc_id
            ));
        }
        flight.bytes += pdv.data.len() as u64;
        if flight.bytes > max_instance_bytes {
            // Aborting rather than reading on and answering 0xA700: the remainder has no
            // upper bound, and the sender learns just as well from the abort.
            return Err(format!(
                "sop instance {} is larger than max_instance_bytes ({max_instance_bytes}); aborting the association",
                flight.sop_instance_uid
            ));
        }
        let room = ATTRIBUTE_PREFIX_BYTES.saturating_sub(flight.prefix.len());
        flight
            .prefix
            .extend_from_slice(&pdv.data[..room.min(pdv.data.len())]);
        if let Some(writer) = flight.writer.as_mut() {
            if let Err(refusal) = writer.write(pdv.data).await {
                debug!(peer = %self.peer, calling_ae = %self.calling_ae,
                    "writing sop instance {} failed after {} bytes: {:#06x} {}; reading and dropping the rest",
                    flight.sop_instance_uid, flight.bytes, refusal.code, refusal.comment);
                if let Some(writer) = flight.writer.take() {
                    writer.abort().await;
                }
                flight.refusal = Some(refusal);
            }
        }
        if !pdv.last {
            return Ok(());
        }
        match self.current.take() {
            Some(flight) => self.finish(flight).await,
            None => Ok(()),
        }
    }

    /// The whole data set has arrived: commit (or not) and answer.
    async fn finish(&mut self, flight: InFlight<S::Writer>) -> Result<(), String> {
        let outcome = match (flight.refusal, flight.writer) {
            (Some(refusal), writer) => {
                if let Some(writer) = writer {
                    writer.abort().await;
                }
                refusal
            }
            (None, Some(writer)) if flight.bytes % 2 == 1 => {
                // Every DICOM data set has an even length: an odd one was cut short
                // mid-value, and forwarding it would make the PACS abort.
                writer.abort().await;
                StoreStatus {
                    code: status::CANNOT_UNDERSTAND,
                    comment: "data set has an odd length (truncated)".into(),
                }
            }
            (None, Some(writer)) => {
                let attributes =
                    attributes_from_dataset_prefix(&flight.prefix, &flight.transfer_syntax);
                match attributes.sop_instance_uid.as_deref() {
                    Some(found) if found != flight.sop_instance_uid => {
                        writer.abort().await;
                        StoreStatus {
                            code: status::DATASET_MISMATCH,
                            comment: format!("data set has sop instance uid {found}"),
                        }
                    }
                    _ => match writer.commit(attributes).await {
                        Ok(()) => StoreStatus {
                            code: status::SUCCESS,
                            comment: String::new(),
                        },
                        Err(refusal) => refusal,
                    },
                }
            }
            (None, None) => StoreStatus {
                code: status::PROCESSING_FAILURE,
                comment: "no writer for the instance".into(),
            },
        };
        if outcome.code == status::SUCCESS {
            info!(peer = %self.peer, calling_ae = %self.calling_ae, bytes = flight.bytes,
                "stored sop instance {} from {} at {}", flight.sop_instance_uid, self.calling_ae, self.peer);
        } else {
            warn!(peer = %self.peer, calling_ae = %self.calling_ae, bytes = flight.bytes,
                "not stored: sop instance {} from {} at {}: answering {:#06x} ({})",
                flight.sop_instance_uid, self.calling_ae, self.peer, outcome.code, outcome.comment);
        }
        let non_empty = |s: String| Some(s).filter(|s| !s.is_empty());
        let comment = (outcome.code != status::SUCCESS).then_some(outcome.comment);
        let response = command::response(
            flight.request_field,
            flight.message_id,
            non_empty(flight.sop_class_uid).as_deref(),
            non_empty(flight.sop_instance_uid).as_deref(),
            outcome.code,
            comment.as_deref().filter(|c| !c.is_empty()),
        );
        self.send_command(flight.pc_id, response).await
    }

    async fn send_command(
        &mut self,
        pc_id: u8,
        encoded: Result<Vec<u8>, DicomError>,
    ) -> Result<(), String> {
        let data = encoded.map_err(|e| e.to_string())?;
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data,
            }],
        };
        self.assoc
            .send(&pdu)
            .await
            .map_err(|e| format!("sending response: {}", chain(&e)))
    }

    /// Discards any instance in flight, logs why the association ended, and aborts it
    /// unless it was released.
    async fn end(mut self, ending: Ending) {
        let lost = self.current.take().map(|flight| {
            let note = format!(
                "; {} data set bytes of sop instance {} had arrived, writer aborted",
                flight.bytes, flight.sop_instance_uid
            );
            (note, flight.writer)
        });
        let note = match lost {
            Some((note, writer)) => {
                if let Some(writer) = writer {
                    writer.abort().await;
                }
                note
            }
            None => String::new(),
        };
        let who = format!("association from {} at {}", self.calling_ae, self.peer);
        let (peer, calling_ae) = (self.peer, self.calling_ae.clone());
        match ending {
            Ending::Released if note.is_empty() => {
                debug!(%peer, %calling_ae, "{who} released");
            }
            Ending::Released => warn!(%peer, %calling_ae, "{who} released mid-instance{note}"),
            Ending::PeerAborted(source) => {
                let log = format!("{who} aborted by the peer (A-ABORT, source {source}){note}");
                if note.is_empty() {
                    info!(%peer, %calling_ae, "{log}");
                } else {
                    warn!(%peer, %calling_ae, "{log}");
                }
            }
            Ending::Shutdown => {
                info!(%peer, %calling_ae, "{who} aborted: shutting down{note}");
                let _ = self.assoc.abort().await;
            }
            Ending::Failed(why) => {
                warn!(%peer, %calling_ae, "{who} ended: {why}{note}");
                // Best effort: the connection may already be gone.
                let _ = self.assoc.abort().await;
            }
        }
    }
}

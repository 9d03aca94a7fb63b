//! The storage SCP: each instance streams into an encrypted blob; on its last fragment
//! the blob is synced and its record committed to the queue for every routed sink, and
//! only then does the SCP answer the modality with success.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outpost_core::{ConnectorName, ItemKind};
use outpost_dicom::{
    status, IncomingInstance, InstanceAttributes, InstanceStore, InstanceWriter, StoreStatus,
};
use outpost_queue::blob::{BlobStore, BlobWriter};
use outpost_queue::NewItem;
use tokio::net::TcpListener;

use super::{InstanceRecord, SourceConfig};
use crate::connectors::SourceContext;
use crate::health::ConnectorState;
use crate::ConnectorError;

fn scp_config(config: &SourceConfig) -> outpost_dicom::scp::ScpConfig {
    outpost_dicom::scp::ScpConfig {
        listen: config.listen.0,
        ae_title: config.ae_title.clone(),
        allowed_callers: config.allowed_callers.clone(),
        max_pdu: config.max_pdu,
        max_associations: config.max_associations,
        max_instance_bytes: config.max_instance_mb.saturating_mul(1024 * 1024),
        timeout: Duration::from_secs(config.timeout_secs),
    }
}

/// Binds the listen address (at start-up, so a port in use is a start-up error).
pub async fn bind_source(config: &SourceConfig) -> Result<TcpListener, ConnectorError> {
    outpost_dicom::scp::bind(&scp_config(config))
        .await
        .map_err(|err| ConnectorError::Unavailable(err.to_string()))
}

/// Serves associations until shutdown.
pub async fn run_source(
    config: SourceConfig,
    listener: TcpListener,
    cx: SourceContext,
) -> Result<(), ConnectorError> {
    let blobs = BlobStore::open(&cx.config.data_dir)
        .map_err(|err| ConnectorError::Unavailable(err.to_string()))?;
    cx.health.set_state(&cx.name, ConnectorState::Running);
    tracing::info!(listen = %config.listen.0, ae_title = %config.ae_title, "dicom source listening");
    let store = Arc::new(QueueStore {
        cx: cx.clone(),
        blobs,
    });
    let shutdown = cx.shutdown.clone();
    outpost_dicom::scp::serve(listener, scp_config(&config), store, shutdown)
        .await
        .map_err(|err| ConnectorError::Unavailable(err.to_string()))
}

/// Takes back a record committed for an instance whose blob then failed: each delivery
/// becomes a dead letter that says why, so no sink waits on a blob that is not there. The
/// sender was told the instance failed and will send it again.
async fn withdraw(cx: &SourceContext, id: outpost_core::ItemId, sinks: &[ConnectorName]) {
    let policy = outpost_queue::RetryPolicy {
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(1),
        max_attempts: Some(1),
    };
    let reason = "the instance's file could not be written to disk; the sender was told it failed";
    for sink in sinks {
        if let Err(err) = cx.queue.mark_failed(sink, id, reason, policy, true).await {
            tracing::error!(error = %err, item_id = %id, "cannot withdraw the record of a failed instance");
        }
    }
}

/// The queue as an SCP's instance store.
struct QueueStore {
    cx: SourceContext,
    blobs: BlobStore,
}

/// One instance on its way into the queue.
struct QueueWriter {
    cx: SourceContext,
    blobs: BlobStore,
    instance: IncomingInstance,
    blob: BlobWriter,
}

fn out_of_resources(what: &str) -> StoreStatus {
    StoreStatus {
        code: status::OUT_OF_RESOURCES,
        comment: what.to_owned(),
    }
}

#[async_trait]
impl InstanceStore for QueueStore {
    type Writer = QueueWriter;

    async fn begin(&self, instance: &IncomingInstance) -> Result<QueueWriter, StoreStatus> {
        let blob = self.blobs.create().await.map_err(|err| {
            tracing::error!(error = %err, "cannot start a blob for an incoming instance");
            out_of_resources("the gateway cannot store the instance (disk)")
        })?;
        Ok(QueueWriter {
            cx: self.cx.clone(),
            blobs: self.blobs.clone(),
            instance: instance.clone(),
            blob,
        })
    }
}

#[async_trait]
impl InstanceWriter for QueueWriter {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreStatus> {
        self.blob.write(bytes).await.map_err(|err| {
            tracing::error!(error = %err, sop_instance_uid = %self.instance.sop_instance_uid, "cannot write an incoming instance");
            out_of_resources("the gateway cannot store the instance (disk)")
        })
    }

    async fn commit(self, attributes: InstanceAttributes) -> Result<(), StoreStatus> {
        let QueueWriter {
            cx,
            blobs,
            instance,
            blob,
        } = self;
        let record_base = InstanceRecord {
            blob: String::new(),
            key: String::new(),
            len: 0,
            sop_class_uid: instance.sop_class_uid.clone(),
            sop_instance_uid: instance.sop_instance_uid.clone(),
            transfer_syntax: instance.transfer_syntax.clone(),
            calling_ae: instance.calling_ae.clone(),
            study_instance_uid: attributes.study_instance_uid.clone(),
            series_instance_uid: attributes.series_instance_uid.clone(),
            modality: attributes.modality.clone(),
        };
        let sinks = cx.config.sinks_for_instance(&cx.name, &record_base);
        if sinks.is_empty() {
            blob.abort().await;
            cx.health
                .record_failure(&cx.name, "an instance matched no route");
            tracing::warn!(sop_instance_uid = %instance.sop_instance_uid, calling_ae = %instance.calling_ae, modality = attributes.modality.as_deref().unwrap_or(""), "instance refused: no route takes it");
            return Err(StoreStatus {
                code: status::PROCESSING_FAILURE,
                comment: "no route of this gateway takes this instance".into(),
            });
        }
        let record = InstanceRecord {
            blob: blob.name().to_owned(),
            key: hex::encode(blob.key()),
            len: blob.len(),
            ..record_base
        };
        let payload = serde_json::to_vec(&record).unwrap_or_default();
        let item = NewItem {
            source: cx.name.clone(),
            kind: ItemKind::Dicom,
            msg_type: record.modality.clone(),
            control_id: Some(record.sop_instance_uid.clone()),
            subject: None,
            external_ref: Some(record.blob.clone()),
            payload,
            sinks: sinks.clone(),
        };
        // The record is committed while the blob is synced; the instance is acknowledged
        // only when both are on disk.
        let (stored, appended) = blob.finish_alongside(cx.queue.append(item)).await;
        match (stored, appended) {
            (Ok(_), Some(Ok(id))) => {
                cx.health.count_item(&cx.name);
                tracing::info!(item_id = %id, sop_instance_uid = %record.sop_instance_uid, calling_ae = %record.calling_ae, bytes = record.len, "instance stored");
                Ok(())
            }
            (Err(err), appended) => {
                tracing::error!(error = %err, sop_instance_uid = %instance.sop_instance_uid, "cannot finish an incoming instance");
                cx.health.record_failure(&cx.name, &err.to_string());
                if let Some(Ok(id)) = appended {
                    withdraw(&cx, id, &sinks).await;
                }
                let _ = blobs.remove(&record.blob).await;
                Err(out_of_resources(
                    "the gateway cannot store the instance (disk)",
                ))
            }
            (Ok(_), appended) => {
                let reason = match appended {
                    Some(Err(err)) => err.to_string(),
                    _ => "the queue did not answer".to_owned(),
                };
                let _ = blobs.remove(&record.blob).await;
                cx.health.record_failure(&cx.name, &reason);
                tracing::error!(error = %reason, sop_instance_uid = %record.sop_instance_uid, "instance refused: the queue did not take it");
                Err(out_of_resources("the gateway cannot queue the instance"))
            }
        }
    }

    async fn abort(self) {
        self.blob.abort().await;
    }
}

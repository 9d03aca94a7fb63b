//! Hands a sink's delivery outcome to the source connection that is waiting to acknowledge
//! its sender (`ack = "on_delivery"`).
//!
//! The source learns the item id only after the commit, and a fast sink could deliver the
//! item before the source starts waiting, so an outcome that arrives first is kept until
//! it is collected (or until it is old enough that nobody will).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_core::ItemId;
use tokio::sync::oneshot;

/// How a delivery ended.
#[derive(Debug, Clone)]
pub enum DeliveryOutcome {
    /// The peer accepted it; its acknowledgement bytes.
    Delivered(Bytes),
    /// The sink gave up (dead letter) with this error.
    DeadLettered(String),
}

/// Shared between sources and sinks; cheap to clone.
#[derive(Clone, Default)]
pub struct DeliveryWatch {
    slots: Arc<Mutex<HashMap<ItemId, Slot>>>,
}

enum Slot {
    Waiting(oneshot::Sender<DeliveryOutcome>),
    Done(DeliveryOutcome, Instant),
}

/// Outcomes nobody collects (the sender hung up) are dropped after this long.
const UNCLAIMED_TTL: Duration = Duration::from_secs(600);

impl DeliveryWatch {
    /// Waits for the outcome of item `id`.
    pub fn expect(&self, id: ItemId) -> oneshot::Receiver<DeliveryOutcome> {
        let (tx, rx) = oneshot::channel();
        let Ok(mut slots) = self.slots.lock() else {
            return rx;
        };
        match slots.remove(&id) {
            Some(Slot::Done(outcome, _)) => {
                let _ = tx.send(outcome);
            }
            Some(Slot::Waiting(_)) | None => {
                slots.insert(id, Slot::Waiting(tx));
            }
        }
        rx
    }

    /// Records the outcome of item `id` for a source that waits for it.
    pub fn complete(&self, id: ItemId, outcome: DeliveryOutcome) {
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        match slots.remove(&id) {
            Some(Slot::Waiting(tx)) => {
                let _ = tx.send(outcome);
            }
            Some(Slot::Done(..)) | None => {
                slots.retain(
                    |_, slot| !matches!(slot, Slot::Done(_, at) if at.elapsed() > UNCLAIMED_TTL),
                );
                slots.insert(id, Slot::Done(outcome, Instant::now()));
            }
        }
    }

    /// Forgets a wait that will not be collected (the sender's connection closed).
    pub fn abandon(&self, id: ItemId) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_outcome_reaches_a_waiter_that_came_first_or_second() {
        let watch = DeliveryWatch::default();
        let early = watch.expect(ItemId(1));
        watch.complete(
            ItemId(1),
            DeliveryOutcome::Delivered(Bytes::from_static(b"ack1")),
        );
        assert!(matches!(early.await.unwrap(), DeliveryOutcome::Delivered(b) if b == "ack1"));

        watch.complete(ItemId(2), DeliveryOutcome::DeadLettered("AR".into()));
        let late = watch.expect(ItemId(2));
        assert!(matches!(late.await.unwrap(), DeliveryOutcome::DeadLettered(e) if e == "AR"));
    }
}

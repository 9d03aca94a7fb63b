//! A small in-process MLLP server that acknowledges every message with `AA`: the demo's
//! "lab" and the benchmark's downstream. It counts what it received and can report each message's type and id.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use outpost_hl7::{build_ack, AckCode, Message};
use outpost_mllp::{Frame, MllpCodec};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

/// What the downstream saw of one message (never its body: that is patient data).
#[derive(Debug, Clone)]
pub struct Received {
    /// MSH-9.
    pub msg_type: String,
    /// MSH-10.
    pub control_id: String,
    /// Length in bytes.
    pub bytes: usize,
}

/// A running downstream.
pub struct Downstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Messages received so far.
    pub count: Arc<AtomicU64>,
}

impl Downstream {
    /// Starts on 127.0.0.1 with an OS-chosen port. If `events` is given, each message is
    /// also sent there (dropped if the receiver is slow).
    pub async fn start(events: Option<mpsc::Sender<Received>>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let count = Arc::new(AtomicU64::new(0));
        let task_count = count.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = outpost_mllp::configure_stream(&stream);
                let (count, events) = (task_count.clone(), events.clone());
                tokio::spawn(async move {
                    let mut framed = Framed::new(stream, MllpCodec::default());
                    while let Some(Ok(Frame::Message(body))) = framed.next().await {
                        let Ok(message) = Message::parse(&body) else {
                            break;
                        };
                        let received = Received {
                            msg_type: message.message_type_full().unwrap_or_default(),
                            control_id: message.control_id().unwrap_or_default(),
                            bytes: body.len(),
                        };
                        let ack = build_ack(&message, AckCode::AA, None, "20261123000000", "DS");
                        count.fetch_add(1, Ordering::Relaxed);
                        if let Some(events) = &events {
                            let _ = events.try_send(received);
                        }
                        if framed.send(&ack[..]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(Self { addr, count })
    }
}

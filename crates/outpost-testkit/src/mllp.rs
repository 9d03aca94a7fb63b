//! MLLP peers written in Rust: a scripted downstream, a steady background sender, and a
//! sender that reconnects and resends like a real interface engine.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outpost_hl7::{build_ack, Ack, AckCode, Message};
use outpost_mllp::MllpClient;

use crate::samples;

/// MLLP start block.
const SB: u8 = 0x0b;
/// MLLP end block (followed by CR).
const EB: u8 = 0x1c;
/// Frame limit for replies read by the senders here.
const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// Writes `payload` as one MLLP frame.
pub fn write_frame(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(payload.len() + 3);
    frame.push(SB);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(&[EB, b'\r']);
    stream.write_all(&frame)
}

/// Reads one MLLP frame's payload, keeping unread bytes in `buf` between calls. `Ok(None)`
/// when the peer closed the connection between frames; read timeouts are passed on as
/// errors (with `buf` intact, so the caller may call again).
pub fn read_frame(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(start) = buf.iter().position(|&b| b == SB) {
            if let Some(end) = buf[start..].windows(2).position(|w| w == [EB, b'\r']) {
                let payload = buf[start + 1..start + end].to_vec();
                buf.drain(..start + end + 2);
                return Ok(Some(payload));
            }
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk)? {
            0 if buf.iter().all(u8::is_ascii_whitespace) => return Ok(None),
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("connection closed mid-frame after {} bytes", buf.len()),
                ))
            }
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Parses an ACK, panicking with the reply's text if it is not one.
pub fn ack_of(reply: &[u8]) -> Ack {
    Ack::parse(reply).unwrap_or_else(|err| {
        panic!(
            "reply is not an ACK ({err}): {:?}",
            String::from_utf8_lossy(reply)
        )
    })
}

/// What a [`ScriptedDownstream`] answers to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownstreamReply {
    /// MSA-1.
    pub code: AckCode,
    /// MSA-3 (and ERR-8 for a negative code).
    pub text: Option<String>,
}

/// Messages a [`ScriptedDownstream`] received, each with the code it answered.
type Received = Arc<Mutex<Vec<(Vec<u8>, AckCode)>>>;

type Responder = dyn Fn(usize, &[u8]) -> DownstreamReply + Send + Sync;

/// A tiny MLLP server on 127.0.0.1 (an OS-chosen port) that answers the n-th message
/// (0-based, counted over all connections) with whatever `respond(n, payload)` says, using
/// [`outpost_hl7::build_ack`]. It records every message and the code it answered.
pub struct ScriptedDownstream {
    addr: SocketAddr,
    received: Received,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl ScriptedDownstream {
    /// Starts listening.
    pub fn start(
        respond: impl Fn(usize, &[u8]) -> DownstreamReply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|err| panic!("bind the scripted downstream on 127.0.0.1:0: {err}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("scripted downstream address: {err}"));
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let respond: Arc<Responder> = Arc::new(respond);
        let (task_received, task_stop) = (received.clone(), stop.clone());
        let acceptor = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if task_stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (received, stop, respond) =
                    (task_received.clone(), task_stop.clone(), respond.clone());
                std::thread::spawn(move || serve(stream, &received, &stop, &*respond));
            }
        });
        ScriptedDownstream {
            addr,
            received,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every message received so far with the code it was answered, in order.
    pub fn received(&self) -> Vec<(Vec<u8>, AckCode)> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// A one-line summary for failure messages: control id and answer of each message.
    pub fn summary(&self) -> String {
        self.received()
            .iter()
            .map(|(raw, code)| {
                let id = Message::parse(raw)
                    .ok()
                    .and_then(|m| m.control_id())
                    .unwrap_or_default();
                format!("{id}:{code}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Drop for ScriptedDownstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn serve(
    mut stream: TcpStream,
    received: &Mutex<Vec<(Vec<u8>, AckCode)>>,
    stop: &AtomicBool,
    respond: &Responder,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let payload = match read_frame(&mut stream, &mut buf) {
            Ok(Some(payload)) => payload,
            Ok(None) => return,
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        let Ok(mut received) = received.lock() else {
            return;
        };
        let reply = respond(received.len(), &payload);
        let Ok(message) = Message::parse(&payload) else {
            return;
        };
        let ack = build_ack(
            &message,
            reply.code,
            reply.text.as_deref(),
            "20261123000000",
            &format!("DS{}", received.len()),
        );
        received.push((payload.clone(), reply.code));
        drop(received);
        if write_frame(&mut stream, &ack).is_err() {
            return;
        }
    }
}

/// A background connection that keeps sending ADT^A08 messages (control ids `STEADY…`),
/// one at a time with a short pause, and checks that each gets an `AA` for its control id.
/// It stops at the first failure and reports it.
pub struct SteadySender {
    port: u16,
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl SteadySender {
    /// Connects to 127.0.0.1:`port` and starts sending.
    pub fn start(port: u16) -> SteadySender {
        let acked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let failure = Arc::new(Mutex::new(None));
        let (t_acked, t_stop, t_failure) = (acked.clone(), stop.clone(), failure.clone());
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    set_failure(&t_failure, format!("tokio runtime: {err}"));
                    return;
                }
            };
            if let Err(err) = runtime.block_on(steady_loop(port, &t_acked, &t_stop)) {
                set_failure(&t_failure, err);
            }
        });
        SteadySender {
            port,
            acked,
            stop,
            failure,
            thread: Some(thread),
        }
    }

    /// AAs received so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits until `more` further AAs have arrived; panics (with `context()`) if the
    /// connection failed or the deadline passed.
    pub fn wait_for_more_acks(&self, more: usize, context: impl Fn() -> String) {
        let target = self.acked() + more;
        crate::wait_until_explained(
            Duration::from_secs(30),
            &format!(
                "the steady sender on 127.0.0.1:{} has {target} AAs",
                self.port
            ),
            || {
                if let Some(failure) = self.failure() {
                    panic!(
                        "the steady connection to 127.0.0.1:{} failed after {} AAs: {failure}\n{}",
                        self.port,
                        self.acked(),
                        context()
                    );
                }
                let acked = self.acked();
                if acked >= target {
                    Ok(())
                } else {
                    Err(format!("{acked} AAs"))
                }
            },
            &context,
        );
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Stops sending; panics if the connection ever failed. Returns the AA count.
    pub fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(failure) = self.failure() {
            panic!(
                "the steady connection to 127.0.0.1:{} failed after {} AAs: {failure}",
                self.port,
                self.acked()
            );
        }
        self.acked()
    }
}

impl Drop for SteadySender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn set_failure(slot: &Mutex<Option<String>>, failure: String) {
    if let Ok(mut slot) = slot.lock() {
        slot.get_or_insert(failure);
    }
}

async fn steady_loop(port: u16, acked: &AtomicUsize, stop: &AtomicBool) -> Result<(), String> {
    let addr = format!("127.0.0.1:{port}");
    let mut client = MllpClient::connect(addr.as_str(), Duration::from_secs(5), MAX_REPLY_BYTES)
        .await
        .map_err(|err| format!("connect {addr}: {err}"))?;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let control_id = format!("STEADY{n:06}");
        let message = samples::adt(&control_id, "A08", &format!("S{n:05}"), "STEADY", "SAM");
        let reply = client
            .request(&message, Duration::from_secs(30))
            .await
            .map_err(|err| format!("message {control_id}: {err}"))?;
        let ack = Ack::parse(&reply).map_err(|err| {
            format!(
                "message {control_id}: reply is not an ACK ({err}): {:?}",
                String::from_utf8_lossy(&reply)
            )
        })?;
        if ack.code != AckCode::AA || ack.control_id != control_id {
            return Err(format!(
                "message {control_id}: expected AA for it, got {} for {:?} ({:?})",
                ack.code, ack.control_id, ack.text
            ));
        }
        acked.fetch_add(1, Ordering::SeqCst);
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// What [`send_with_retries`] did.
#[derive(Debug, Clone, Default)]
pub struct SendReport {
    /// Control ids that got an `AA`, in the order they got it.
    pub acked: Vec<String>,
    /// Control ids of sends whose outcome is unknown (the connection failed after the
    /// message may have been written); each was sent again, so the receiver may hold it twice.
    pub unknown_outcomes: Vec<String>,
    /// Connections opened.
    pub connections: usize,
}

/// Sends `messages` (control id, bytes) in order over one connection to 127.0.0.1:`port`,
/// each only after the previous one got its `AA`, like an interface engine: when the
/// connection fails it reconnects (retrying every 25 ms for up to `reconnect_deadline`)
/// and resends the message whose ACK it did not get. `acked_count` is bumped at each `AA`.
/// Any negative or mismatched ACK is an error.
pub async fn send_with_retries(
    port: u16,
    messages: Vec<(String, Vec<u8>)>,
    acked_count: Arc<AtomicUsize>,
    reconnect_deadline: Duration,
) -> Result<SendReport, String> {
    let addr = format!("127.0.0.1:{port}");
    let mut report = SendReport::default();
    let mut client: Option<MllpClient> = None;
    for (control_id, message) in messages {
        loop {
            let connection = match &mut client {
                Some(connection) => connection,
                None => {
                    let started = Instant::now();
                    let connection = loop {
                        match MllpClient::connect(addr.as_str(), Duration::from_secs(2), MAX_REPLY_BYTES).await {
                            Ok(connection) => break connection,
                            Err(err) if started.elapsed() > reconnect_deadline => {
                                return Err(format!(
                                    "could not reconnect to {addr} within {reconnect_deadline:?} (last error: {err}); \
                                     {} AAs so far, next message {control_id}",
                                    report.acked.len()
                                ))
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
                        }
                    };
                    report.connections += 1;
                    client.insert(connection)
                }
            };
            match connection.request(&message, Duration::from_secs(30)).await {
                Ok(reply) => {
                    let ack = Ack::parse(&reply).map_err(|err| {
                        format!(
                            "{control_id}: reply is not an ACK ({err}): {:?}",
                            String::from_utf8_lossy(&reply)
                        )
                    })?;
                    if ack.code != AckCode::AA || ack.control_id != control_id {
                        return Err(format!(
                            "{control_id}: expected AA for it, got {} for {:?} ({:?})",
                            ack.code, ack.control_id, ack.text
                        ));
                    }
                    report.acked.push(control_id);
                    acked_count.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                Err(_) => {
                    report.unknown_outcomes.push(control_id.clone());
                    client = None;
                }
            }
        }
    }
    Ok(report)
}

//! A persistent MLLP request/reply client over TCP.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_util::codec::{Decoder, Encoder};

use crate::{Frame, MllpCodec, MllpError};

/// Spare room kept in the read buffer before each read; a reply usually fits in one.
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// One persistent MLLP connection that sends a message and waits for the reply frame.
///
/// After any error the client is broken ([`MllpClient::is_broken`]) and every later
/// call returns [`MllpError::Broken`]: after a timeout in particular, a late reply
/// would otherwise be read as the answer to the next request. Reconnect instead.
#[derive(Debug)]
pub struct MllpClient {
    stream: TcpStream,
    codec: MllpCodec,
    read_buf: BytesMut,
    write_buf: BytesMut,
    peer: SocketAddr,
    is_broken: bool,
}

impl MllpClient {
    /// Connects with a timeout and sets TCP_NODELAY (request/response protocols
    /// stall on Nagle's algorithm otherwise). Reply frames longer than
    /// `max_frame_bytes` are refused with [`MllpError::ReplyTooLarge`].
    pub async fn connect<A>(
        addr: A,
        connect_timeout: Duration,
        max_frame_bytes: usize,
    ) -> Result<Self, MllpError>
    where
        A: ToSocketAddrs + fmt::Display,
    {
        let addr_text = addr.to_string();
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Err(_elapsed) => {
                return Err(MllpError::Timeout {
                    what: "connect",
                    after: connect_timeout,
                })
            }
            Ok(Err(source)) => {
                return Err(MllpError::Connect {
                    addr: addr_text,
                    source,
                })
            }
            Ok(Ok(stream)) => stream,
        };
        let connect_error = |source| MllpError::Connect {
            addr: addr_text.clone(),
            source,
        };
        configure_stream(&stream).map_err(connect_error)?;
        let peer = stream.peer_addr().map_err(connect_error)?;
        tracing::debug!(%peer, "mllp client connected");
        Ok(Self {
            stream,
            codec: MllpCodec::new(max_frame_bytes),
            read_buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            write_buf: BytesMut::new(),
            peer,
            is_broken: false,
        })
    }

    /// Sends one framed payload and waits up to `reply_timeout` for one reply frame.
    ///
    /// The timeout covers the whole exchange, writing included, so a peer that
    /// stops reading cannot stall the caller either.
    pub async fn request(
        &mut self,
        payload: &[u8],
        reply_timeout: Duration,
    ) -> Result<Bytes, MllpError> {
        self.check_usable()?;
        let exchange = async {
            self.write_frame(payload).await?;
            self.read_reply().await
        };
        let result = match tokio::time::timeout(reply_timeout, exchange).await {
            Ok(result) => result,
            Err(_elapsed) => Err(MllpError::Timeout {
                what: "reply",
                after: reply_timeout,
            }),
        };
        self.note(result)
    }

    /// Sends one framed payload without waiting for a reply.
    ///
    /// Has no timeout of its own: wrap it in `tokio::time::timeout` if the peer
    /// may stop reading (then drop the client if it fires).
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), MllpError> {
        self.check_usable()?;
        let result = self.write_frame(payload).await;
        self.note(result)
    }

    /// Waits up to `timeout` for the next frame from the peer and returns its payload.
    pub async fn receive(&mut self, timeout: Duration) -> Result<Bytes, MllpError> {
        self.check_usable()?;
        let result = match tokio::time::timeout(timeout, self.read_reply()).await {
            Ok(result) => result,
            Err(_elapsed) => Err(MllpError::Timeout {
                what: "reply",
                after: timeout,
            }),
        };
        self.note(result)
    }

    /// The address of the peer this client is connected to.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Whether an earlier error has made this connection unusable.
    pub fn is_broken(&self) -> bool {
        self.is_broken
    }

    fn check_usable(&self) -> Result<(), MllpError> {
        if self.is_broken {
            return Err(MllpError::Broken);
        }
        Ok(())
    }

    fn note<T>(&mut self, result: Result<T, MllpError>) -> Result<T, MllpError> {
        if result.is_err() {
            self.is_broken = true;
        }
        result
    }

    async fn write_frame(&mut self, payload: &[u8]) -> Result<(), MllpError> {
        self.write_buf.clear();
        self.codec.encode(payload, &mut self.write_buf)?;
        self.stream.write_all(&self.write_buf).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn read_reply(&mut self) -> Result<Bytes, MllpError> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.read_buf)? {
                return self.reply_payload(frame);
            }
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK_BYTES / 2 {
                self.read_buf.reserve(READ_CHUNK_BYTES);
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return match self.codec.decode_eof(&mut self.read_buf)? {
                    Some(frame) => self.reply_payload(frame),
                    None => Err(MllpError::ConnectionClosed),
                };
            }
        }
    }

    fn reply_payload(&self, frame: Frame) -> Result<Bytes, MllpError> {
        match frame {
            Frame::Message(payload) => Ok(payload),
            Frame::Oversized { total_bytes, .. } => Err(MllpError::ReplyTooLarge {
                total_bytes,
                max_frame_bytes: self.codec.max_frame_bytes(),
            }),
        }
    }
}

/// Sets TCP_NODELAY on an accepted or connected stream; logs nothing, returns the io error.
///
/// MLLP is request/response with small frames: with Nagle's algorithm on, a
/// trailer written separately can wait for the peer's delayed ACK.
pub fn configure_stream(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)
}

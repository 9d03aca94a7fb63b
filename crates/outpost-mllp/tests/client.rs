//! MllpClient against small tokio servers on 127.0.0.1:0.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use outpost_mllp::{
    configure_stream, Frame, MllpClient, MllpCodec, MllpError, DEFAULT_MAX_FRAME_BYTES,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

const GENEROUS: Duration = Duration::from_secs(10);

/// How the test server treats each connection.
#[derive(Clone, Copy)]
enum Peer {
    /// Answers every frame with `ACK:` + its payload.
    EchoAck,
    /// Reads frames and never answers.
    Silent,
    /// Reads one frame, then closes.
    CloseAfterRequest,
    /// Reads one frame, answers with half a frame, then closes.
    HalfReply,
    /// Reads one frame, answers with `n` bytes of payload.
    BigReply(usize),
}

async fn start(peer: Peer) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // A server-side failure shows up as the client's error in the test.
            tokio::spawn(serve(stream, peer));
        }
    });
    Ok(addr)
}

async fn serve(stream: TcpStream, peer: Peer) -> Result<(), MllpError> {
    configure_stream(&stream)?;
    let mut framed = Framed::new(stream, MllpCodec::default());
    while let Some(Frame::Message(payload)) = framed.next().await.transpose()? {
        match peer {
            Peer::EchoAck => {
                let reply = [&b"ACK:"[..], &payload].concat();
                framed.send(Bytes::from(reply)).await?;
            }
            Peer::Silent => {}
            Peer::CloseAfterRequest => break,
            Peer::HalfReply => {
                framed.get_mut().write_all(b"\x0bMSA|AA").await?;
                break;
            }
            Peer::BigReply(n) => framed.send(Bytes::from(vec![b'x'; n])).await?,
        }
    }
    Ok(())
}

#[tokio::test]
async fn request_returns_each_reply_on_one_persistent_connection() {
    let addr = start(Peer::EchoAck).await.unwrap();
    let mut client = MllpClient::connect(addr, GENEROUS, DEFAULT_MAX_FRAME_BYTES)
        .await
        .unwrap();
    assert_eq!(client.peer_addr(), addr);
    for i in 0..20 {
        let request = format!("MSH|{i}");
        let reply = client.request(request.as_bytes(), GENEROUS).await.unwrap();
        assert_eq!(
            &reply[..],
            format!("ACK:MSH|{i}").as_bytes(),
            "peer {addr}, request {i}"
        );
    }
    assert!(!client.is_broken());
}

#[tokio::test]
async fn connect_accepts_a_host_and_port_string() {
    let addr = start(Peer::EchoAck).await.unwrap();
    let mut client = MllpClient::connect(addr.to_string().as_str(), GENEROUS, 1024)
        .await
        .unwrap();
    assert_eq!(&client.request(b"x", GENEROUS).await.unwrap()[..], b"ACK:x");
}

#[tokio::test]
async fn send_and_receive_are_the_building_blocks_of_request() {
    let addr = start(Peer::EchoAck).await.unwrap();
    let mut client = MllpClient::connect(addr, GENEROUS, 1024).await.unwrap();
    client.send(b"one").await.unwrap();
    client.send(b"two").await.unwrap();
    assert_eq!(&client.receive(GENEROUS).await.unwrap()[..], b"ACK:one");
    assert_eq!(&client.receive(GENEROUS).await.unwrap()[..], b"ACK:two");
}

#[tokio::test]
async fn a_silent_peer_times_out_and_breaks_the_client() {
    let addr = start(Peer::Silent).await.unwrap();
    let mut client = MllpClient::connect(addr, GENEROUS, 1024).await.unwrap();
    let timeout = Duration::from_millis(100);
    let err = client.request(b"MSH|1", timeout).await.unwrap_err();
    assert!(
        matches!(err, MllpError::Timeout { what: "reply", after } if after == timeout),
        "got {err:?}"
    );
    assert!(client.is_broken());
    let err = client.request(b"MSH|2", GENEROUS).await.unwrap_err();
    assert!(
        matches!(err, MllpError::Broken),
        "a late reply must not answer the next request; got {err:?}"
    );
}

#[tokio::test]
async fn a_peer_closing_between_frames_is_connection_closed() {
    let addr = start(Peer::CloseAfterRequest).await.unwrap();
    let mut client = MllpClient::connect(addr, GENEROUS, 1024).await.unwrap();
    let err = client.request(b"MSH|1", GENEROUS).await.unwrap_err();
    assert!(matches!(err, MllpError::ConnectionClosed), "got {err:?}");
}

#[tokio::test]
async fn a_peer_closing_mid_reply_is_a_truncated_frame() {
    let addr = start(Peer::HalfReply).await.unwrap();
    let mut client = MllpClient::connect(addr, GENEROUS, 1024).await.unwrap();
    let err = client.request(b"MSH|1", GENEROUS).await.unwrap_err();
    assert!(
        matches!(err, MllpError::TruncatedFrame { buffered_bytes: 6 }),
        "got {err:?}"
    );
}

#[tokio::test]
async fn a_reply_over_the_limit_is_reply_too_large() {
    let addr = start(Peer::BigReply(100_000)).await.unwrap();
    let mut client = MllpClient::connect(addr, GENEROUS, 1000).await.unwrap();
    let err = client.request(b"MSH|1", GENEROUS).await.unwrap_err();
    assert!(
        matches!(
            err,
            MllpError::ReplyTooLarge {
                total_bytes: 100_000,
                max_frame_bytes: 1000
            }
        ),
        "got {err:?}"
    );
}

#[tokio::test]
async fn a_payload_holding_framing_bytes_is_refused_before_sending() {
    let addr = start(Peer::EchoAck).await.unwrap();
    let mut client = MllpClient::connect(addr, GENEROUS, 1024).await.unwrap();
    let err = client.request(b"a\x0bb", GENEROUS).await.unwrap_err();
    assert!(
        matches!(err, MllpError::FramingByteInPayload { offset: 1, .. }),
        "got {err:?}"
    );
}

#[tokio::test]
async fn connecting_to_a_closed_port_names_the_address() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = MllpClient::connect(addr, GENEROUS, 1024).await.unwrap_err();
    assert!(
        matches!(&err, MllpError::Connect { addr: a, .. } if *a == addr.to_string()),
        "got {err:?}"
    );
    assert!(
        err.to_string().starts_with(&format!("connect {addr}: ")),
        "message: {err}"
    );
}

#[tokio::test]
async fn configure_stream_turns_nagle_off() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    configure_stream(&stream).unwrap();
    configure_stream(&accepted).unwrap();
    assert!(stream.nodelay().unwrap() && accepted.nodelay().unwrap());
}

#[tokio::test]
async fn the_server_side_can_use_the_codec_with_framed() {
    // The gateway's listener side: Framed + MllpCodec, fed by a raw writer with a stray LF.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let writer = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"\x0bone\x1c\r\n\x0btwo\x1c\r\n")
            .await
            .unwrap();
    });
    let (stream, _) = listener.accept().await.unwrap();
    let mut framed = Framed::new(stream, MllpCodec::default());
    let mut seen = Vec::new();
    while let Some(frame) = framed.next().await {
        seen.push(frame.unwrap());
    }
    writer.await.unwrap();
    let expected = vec![
        Frame::Message(Bytes::from_static(b"one")),
        Frame::Message(Bytes::from_static(b"two")),
    ];
    assert_eq!(seen, expected);
}

//! STOW-RS client (PS3.18 §10.5): Part-10 files streamed as one
//! `multipart/related; type="application/dicom"` request with an explicit length, and the
//! DICOM JSON answer reduced to which instances were stored and which failed.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::io::ReaderStream;

use crate::error::{chain, DicomError};

/// How to authenticate to the DICOMweb server.
#[derive(Clone, PartialEq, Eq)]
pub enum StowAuth {
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// HTTP basic authentication.
    Basic {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
}

impl std::fmt::Debug for StowAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log through Debug.
        match self {
            Self::Bearer(_) => f.write_str("Bearer(***)"),
            Self::Basic { user, .. } => write!(f, "Basic {{ user: {user:?}, password: *** }}"),
        }
    }
}

/// One Part-10 file to send: its exact length and a reader over it.
pub struct StowPart {
    /// Number of bytes `reader` yields (preamble, meta and data set).
    pub len: u64,
    /// The file's bytes.
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
}

impl std::fmt::Debug for StowPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StowPart")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// An instance the server reported as not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StowFailure {
    /// (0008,1155) of the failed item, when given.
    pub sop_instance_uid: Option<String>,
    /// (0008,1197) Failure Reason, when given.
    pub reason: Option<u16>,
}

/// The server's answer to a STOW-RS request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StowOutcome {
    /// HTTP status code.
    pub http_status: u16,
    /// SOP Instance UIDs listed in (0008,1199) Referenced SOP Sequence.
    pub stored: Vec<String>,
    /// Items of (0008,1198) Failed SOP Sequence.
    pub failed: Vec<StowFailure>,
}

impl StowOutcome {
    /// Whether the instance was stored: a 2xx answer that lists it in (0008,1199).
    pub fn is_stored(&self, sop_instance_uid: &str) -> bool {
        (200..300).contains(&self.http_status) && self.stored.iter().any(|u| u == sop_instance_uid)
    }

    /// Whether sending again later may succeed: 5xx, 408 and 429. Other 4xx answers will
    /// repeat.
    pub fn retryable(&self) -> bool {
        self.http_status >= 500 || self.http_status == 408 || self.http_status == 429
    }
}

/// A STOW-RS endpoint, e.g. `http://pacs:8042/dicom-web/studies`.
#[derive(Debug, Clone)]
pub struct StowClient {
    client: reqwest::Client,
    url: String,
    auth: Option<StowAuth>,
}

impl StowClient {
    /// A client for `url` (the `/studies` resource). `timeout` bounds connecting and the
    /// whole request, so it must allow for the largest study sent at once.
    pub fn new(
        url: impl Into<String>,
        auth: Option<StowAuth>,
        timeout: Duration,
    ) -> Result<Self, DicomError> {
        let url = url.into();
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|e| DicomError::Config {
                reason: format!("stow-rs client for {url}: {}", chain(&e)),
            })?;
        Ok(Self { client, url, auth })
    }

    /// Sends the parts as one request and reads the answer. An `Err` means no answer arrived
    /// (see [`DicomError::retryable`]); any HTTP status is an `Ok` outcome.
    pub async fn store(&self, parts: Vec<StowPart>) -> Result<StowOutcome, DicomError> {
        let boundary = format!("outpost-{:032x}", rand::thread_rng().gen::<u128>());
        let (body, len) = multipart_body(&boundary, parts);
        let mut request = self
            .client
            .post(&self.url)
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
            )
            .header(reqwest::header::ACCEPT, "application/dicom+json")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(body));
        request = match &self.auth {
            Some(StowAuth::Bearer(token)) => request.bearer_auth(token),
            Some(StowAuth::Basic { user, password }) => request.basic_auth(user, Some(password)),
            None => request,
        };
        let response = request.send().await.map_err(|e| self.http_error(&e))?;
        let http_status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| self.http_error(&e))?;
        let (stored, failed) = parse_response(&body);
        Ok(StowOutcome {
            http_status,
            stored,
            failed,
        })
    }

    fn http_error(&self, e: &reqwest::Error) -> DicomError {
        // Anything that failed before or while the answer arrived (connect, timeout,
        // reset) may work later; a request we could not even build will not.
        let is_transient = !e.is_builder();
        DicomError::Http {
            url: self.url.clone(),
            reason: chain(e),
            is_transient,
        }
    }
}

/// The multipart body as a stream, and its exact length.
fn multipart_body(
    boundary: &str,
    parts: Vec<StowPart>,
) -> (BoxStream<'static, std::io::Result<Bytes>>, u64) {
    let count = parts.len();
    let mut len = 0u64;
    let mut pieces: Vec<BoxStream<'static, std::io::Result<Bytes>>> = Vec::new();
    let push_text = |text: String, len: &mut u64| {
        *len += text.len() as u64;
        stream::once(async move { Ok(Bytes::from(text)) }).boxed()
    };
    for (index, part) in parts.into_iter().enumerate() {
        let lead = if index == 0 { "" } else { "\r\n" };
        pieces.push(push_text(
            format!("{lead}--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"),
            &mut len,
        ));
        len += part.len;
        pieces.push(exact_stream(index, count, part));
    }
    pieces.push(push_text(format!("\r\n--{boundary}--\r\n"), &mut len));
    (stream::iter(pieces).flatten().boxed(), len)
}

/// The part's bytes, failing the request if the reader ends before `len`: a short body
/// under an explicit Content-Length would otherwise leave the server waiting.
fn exact_stream(
    index: usize,
    count: usize,
    part: StowPart,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    let expected = part.len;
    let reader = ReaderStream::with_capacity(part.reader.take(expected), 256 * 1024);
    stream::unfold(
        (reader, 0u64, false),
        move |(mut reader, sent, done)| async move {
            if done {
                return None;
            }
            match reader.next().await {
                Some(Ok(chunk)) => {
                    let sent = sent + chunk.len() as u64;
                    Some((Ok(chunk), (reader, sent, false)))
                }
                Some(Err(e)) => Some((Err(e), (reader, sent, true))),
                None if sent < expected => {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "stow part {} of {count} ended after {sent} of {expected} bytes",
                            index + 1
                        ),
                    );
                    Some((Err(e), (reader, sent, true)))
                }
                None => None,
            }
        },
    )
    .boxed()
}

/// Reads (0008,1199) and (0008,1198) from a DICOM JSON answer; anything else (empty,
/// XML, HTML error page) gives empty lists.
fn parse_response(body: &[u8]) -> (Vec<String>, Vec<StowFailure>) {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (Vec::new(), Vec::new());
    };
    // PS3.18 F.2: the answer is one data set, though some servers wrap it in an array.
    let dataset = match &json {
        serde_json::Value::Array(items) => items.first().unwrap_or(&serde_json::Value::Null),
        other => other,
    };
    let items = |tag: &str| -> Vec<serde_json::Value> {
        dataset
            .get(tag)
            .and_then(|e| e.get("Value"))
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default()
    };
    let first_string = |item: &serde_json::Value, tag: &str| {
        item.get(tag)?
            .get("Value")?
            .get(0)?
            .as_str()
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
    };
    let stored = items("00081199")
        .iter()
        .filter_map(|item| first_string(item, "00081155"))
        .collect();
    let failed = items("00081198")
        .iter()
        .map(|item| StowFailure {
            sop_instance_uid: first_string(item, "00081155"),
            reason: item
                .get("00081197")
                .and_then(|e| e.get("Value"))
                .and_then(|v| v.get(0))
                .and_then(|v| v.as_u64())
                .and_then(|v| u16::try_from(v).ok()),
        })
        .collect();
    (stored, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthanc_success_answer_is_parsed() {
        let body = br#"{"00080005":{"vr":"CS","Value":["ISO_IR 100"]},
            "00081190":{"vr":"UR","Value":["http://x/studies/1"]},
            "00081198":{"vr":"SQ","Value":[]},
            "00081199":{"vr":"SQ","Value":[{"00081150":{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.2"]},
              "00081155":{"vr":"UI","Value":["1.2.3.4"]}}]}}"#;
        let (stored, failed) = parse_response(body);
        assert_eq!(stored, vec!["1.2.3.4".to_string()]);
        assert!(failed.is_empty());
    }

    #[test]
    fn failed_items_and_reasons_are_parsed() {
        let body = br#"{"00081198":{"vr":"SQ","Value":[{"00081155":{"vr":"UI","Value":["9.8"]},
            "00081197":{"vr":"US","Value":[272]}}]}}"#;
        let (stored, failed) = parse_response(body);
        assert!(stored.is_empty());
        assert_eq!(
            failed,
            vec![StowFailure {
                sop_instance_uid: Some("9.8".into()),
                reason: Some(272)
            }]
        );
        assert_eq!(parse_response(b"<html>"), (Vec::new(), Vec::new()));
    }

    #[test]
    fn retryable_statuses() {
        let outcome = |http_status| StowOutcome {
            http_status,
            stored: vec!["1".into()],
            failed: Vec::new(),
        };
        assert!(outcome(503).retryable());
        assert!(outcome(429).retryable());
        assert!(outcome(408).retryable());
        assert!(!outcome(400).retryable());
        assert!(!outcome(409).retryable());
        assert!(outcome(200).is_stored("1"));
        assert!(!outcome(409).is_stored("1"));
    }

    #[tokio::test]
    async fn body_length_matches_what_is_streamed() {
        let parts = vec![
            StowPart {
                len: 5,
                reader: Box::new(&b"hello"[..]),
            },
            StowPart {
                len: 3,
                reader: Box::new(&b"abc"[..]),
            },
        ];
        let (body, len) = multipart_body("B", parts);
        let chunks: Vec<_> = body.collect().await;
        let bytes: Vec<u8> = chunks
            .into_iter()
            .flat_map(|c| c.unwrap().to_vec())
            .collect();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "--B\r\nContent-Type: application/dicom\r\n\r\nhello\r\n--B\r\nContent-Type: application/dicom\r\n\r\nabc\r\n--B--\r\n"
        );
    }

    #[tokio::test]
    async fn short_part_fails_the_stream() {
        let parts = vec![StowPart {
            len: 10,
            reader: Box::new(&b"abc"[..]),
        }];
        let (body, _) = multipart_body("B", parts);
        let chunks: Vec<_> = body.collect().await;
        let err = chunks.into_iter().find_map(Result::err).unwrap();
        assert!(
            err.to_string().contains("ended after 3 of 10 bytes"),
            "{err}"
        );
    }
}

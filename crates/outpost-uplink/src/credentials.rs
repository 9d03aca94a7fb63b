//! The agent's identity: an Ed25519 key made on the box (0600, never sent), the id the hub
//! assigned, and the hub's address and pinned CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::{SigningKey, VerifyingKey};
use outpost_proto::{EnrollRequest, EnrollResponse, ErrorBody};
use serde::{Deserialize, Serialize};

use crate::UplinkError;

/// The private key file in the data directory.
pub const KEY_FILE: &str = "agent.key";
/// The enrollment record in the data directory.
pub const CREDENTIALS_FILE: &str = "agent.json";
/// The pinned hub CA, copied into the data directory at enrollment.
pub const HUB_CA_FILE: &str = "hub-ca.pem";

/// Everything needed to open a session.
pub struct Credentials {
    /// The agent's id at the hub.
    pub agent_id: String,
    /// The site name.
    pub name: String,
    /// The hub's base URL (`https://host:port`).
    pub hub_url: String,
    /// The signing key.
    pub key: SigningKey,
    /// The hub's job key, pinned at enrollment; None for an agent enrolled with a hub
    /// that had none (it then refuses every job).
    pub job_key: Option<VerifyingKey>,
    /// TLS settings with the pinned CA (or the public roots).
    pub tls: Arc<rustls::ClientConfig>,
}

#[derive(Serialize, Deserialize)]
struct Record {
    agent_id: String,
    name: String,
    hub_url: String,
    /// Whether `hub-ca.pem` pins the hub's CA; otherwise the public roots are used.
    pinned_ca: bool,
    /// The hub's job key (hex), pinned at enrollment.
    #[serde(default)]
    job_key: Option<String>,
}

impl Credentials {
    /// Loads the credentials made by [`enroll`].
    pub fn load(data_dir: &Path) -> Result<Self, UplinkError> {
        let record_path = data_dir.join(CREDENTIALS_FILE);
        let text = match std::fs::read_to_string(&record_path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(UplinkError::NotEnrolled {
                    path: record_path.display().to_string(),
                })
            }
            Err(source) => return Err(io(&record_path, source)),
        };
        let record: Record =
            serde_json::from_str(&text).map_err(|err| UplinkError::BadCredentials {
                path: record_path.display().to_string(),
                problem: err.to_string(),
            })?;
        let key_path = data_dir.join(KEY_FILE);
        let seed = std::fs::read(&key_path).map_err(|source| io(&key_path, source))?;
        let seed: [u8; 32] =
            seed.try_into()
                .map_err(|bytes: Vec<u8>| UplinkError::BadCredentials {
                    path: key_path.display().to_string(),
                    problem: format!("expected a 32-byte key, found {} bytes", bytes.len()),
                })?;
        let ca = record.pinned_ca.then(|| data_dir.join(HUB_CA_FILE));
        let job_key = match record.job_key.as_deref() {
            None | Some("") => None,
            Some(hex_key) => {
                Some(
                    parse_job_key(hex_key).ok_or_else(|| UplinkError::BadCredentials {
                        path: record_path.display().to_string(),
                        problem: "job_key is not an Ed25519 public key in hex".into(),
                    })?,
                )
            }
        };
        Ok(Self {
            agent_id: record.agent_id,
            name: record.name,
            hub_url: record.hub_url,
            key: SigningKey::from_bytes(&seed),
            job_key,
            tls: client_tls(ca.as_deref())?,
        })
    }
}

/// Enrolls with the hub: makes the key pair, registers the public key with the one-time
/// token over TLS (pinned to `ca_file` when given), and stores the assigned id.
pub async fn enroll(
    data_dir: &Path,
    hub_url: &str,
    token: &str,
    ca_file: Option<&Path>,
) -> Result<EnrollResponse, UplinkError> {
    let record_path = data_dir.join(CREDENTIALS_FILE);
    if let Ok(existing) = Credentials::load(data_dir) {
        return Err(UplinkError::AlreadyEnrolled {
            agent_id: existing.agent_id,
            path: record_path.display().to_string(),
        });
    }
    std::fs::create_dir_all(data_dir).map_err(|source| io(data_dir, source))?;
    let hub_url = hub_url.trim_end_matches('/').to_owned();
    if !hub_url.starts_with("https://") {
        return Err(UplinkError::Hub {
            url: hub_url,
            problem: "the hub URL must start with https://".into(),
        });
    }
    let tls = client_tls(ca_file)?;
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let client = reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|err| UplinkError::Tls(err.to_string()))?;
    let request = EnrollRequest {
        token: token.trim().to_owned(),
        public_key: hex::encode(key.verifying_key().to_bytes()),
        hostname: hostname(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let url = format!("{hub_url}/api/v1/enroll");
    let hub_error = |problem: String| UplinkError::Hub {
        url: url.clone(),
        problem,
    };
    let response = client
        .post(&url)
        .json(&request)
        .send()
        .await
        .map_err(|err| hub_error(explain_tls(describe_reqwest(&err))))?;
    if !response.status().is_success() {
        let status = response.status();
        let body: Option<ErrorBody> = response.json().await.ok();
        return Err(match body {
            Some(body) => UplinkError::EnrollRefused {
                code: body.code,
                message: body.message,
            },
            None => hub_error(format!("answered {status}")),
        });
    }
    let enrolled: EnrollResponse = response
        .json()
        .await
        .map_err(|err| hub_error(format!("unreadable answer: {err}")))?;

    write_private(&data_dir.join(KEY_FILE), &key.to_bytes())?;
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|source| io(ca, source))?;
        std::fs::write(data_dir.join(HUB_CA_FILE), pem)
            .map_err(|source| io(&data_dir.join(HUB_CA_FILE), source))?;
    }
    let record = Record {
        agent_id: enrolled.agent_id.clone(),
        name: enrolled.name.clone(),
        hub_url,
        pinned_ca: ca_file.is_some(),
        job_key: Some(enrolled.job_key.clone()).filter(|key| parse_job_key(key).is_some()),
    };
    let text = serde_json::to_string_pretty(&record).unwrap_or_default();
    std::fs::write(&record_path, text).map_err(|source| io(&record_path, source))?;
    Ok(enrolled)
}

fn parse_job_key(hex_key: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex_key).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// TLS 1.3 client settings trusting only `ca_file` when given, else the public roots.
pub fn client_tls(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, UplinkError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| io(path, source))?;
            let certs = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| UplinkError::Tls(format!("{}: {err}", path.display())))?;
            if certs.is_empty() {
                return Err(UplinkError::Tls(format!(
                    "{}: no certificate in it",
                    path.display()
                )));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|err| UplinkError::Tls(format!("{}: {err}", path.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| UplinkError::Tls(err.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Adds what an operator should check to a certificate failure.
pub(crate) fn explain_tls(problem: String) -> String {
    if problem.contains("invalid peer certificate") {
        format!("{problem} (the hub's certificate is not issued by the CA this agent trusts: check the --ca / ca_file given at enrollment)")
    } else {
        problem
    }
}

fn describe_reqwest(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn io(path: &Path, source: std::io::Error) -> UplinkError {
    UplinkError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// This machine's name, for inventories and the fleet list.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(unix)]
fn write_private(path: &PathBuf, bytes: &[u8]) -> Result<(), UplinkError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| io(path, source))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| io(path, source))
}

// On Windows the file inherits the data directory's ACL (SYSTEM and Administrators).
#[cfg(not(unix))]
fn write_private(path: &PathBuf, bytes: &[u8]) -> Result<(), UplinkError> {
    std::fs::write(path, bytes).map_err(|source| io(path, source))
}

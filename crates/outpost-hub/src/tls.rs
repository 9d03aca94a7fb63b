//! TLS for the hub: on first start it makes its own CA and a server certificate signed by
//! it (agents pin the CA), unless the config names a certificate (e.g. a public one).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use sha2::{Digest, Sha256};

use crate::HubError;

/// The hub's CA certificate file inside `data_dir/tls`.
pub const CA_FILE: &str = "ca.pem";

/// TLS material ready to serve.
pub struct HubTls {
    /// The rustls server config (TLS 1.3 only).
    pub server_config: Arc<rustls::ServerConfig>,
    /// The CA agents should pin, when the hub made its own.
    pub ca_path: Option<PathBuf>,
    /// SHA-256 fingerprint of the CA (or of the leaf certificate when given one).
    pub fingerprint: String,
}

/// Loads the configured certificate or the hub's own, making the own one on first start.
pub fn load_or_create(
    data_dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
    listen_ip: IpAddr,
) -> Result<HubTls, HubError> {
    let (cert_path, key_path, ca_path) = match (cert, key) {
        (Some(cert), Some(key)) => (cert.to_owned(), key.to_owned(), None),
        _ => {
            let dir = data_dir.join("tls");
            if !dir.join("server.pem").exists() {
                create_own(&dir, listen_ip)?;
            }
            (
                dir.join("server.pem"),
                dir.join("server.key"),
                Some(dir.join(CA_FILE)),
            )
        }
    };
    let chain = read_certs(&cert_path)?;
    let key = read_key(&key_path)?;
    let fingerprint_source = match &ca_path {
        Some(ca) => read_certs(ca)?
            .into_iter()
            .next()
            .ok_or_else(|| HubError::Tls(format!("{}: no certificate", ca.display())))?,
        None => chain
            .first()
            .cloned()
            .ok_or_else(|| HubError::Tls(format!("{}: no certificate", cert_path.display())))?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| HubError::Tls(err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|err| HubError::Tls(format!("{}: {err}", cert_path.display())))?;
    Ok(HubTls {
        server_config: Arc::new(server_config),
        ca_path,
        fingerprint: fingerprint(&fingerprint_source),
    })
}

/// `AB:CD:…` SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn create_own(dir: &Path, listen_ip: IpAddr) -> Result<(), HubError> {
    let tls = |err: rcgen::Error| HubError::Tls(err.to_string());
    std::fs::create_dir_all(dir).map_err(|source| HubError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let ca_key = KeyPair::generate().map_err(tls)?;
    let mut ca_params = CertificateParams::new(Vec::new()).map_err(tls)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // A name of its own per hub, so an agent pinned to another hub's CA is told the issuer
    // is unknown rather than that a signature does not verify.
    let ca_name = format!("Outpost hub CA {}", crate::secrets::new_id(""));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(tls)?;

    let server_key = KeyPair::generate().map_err(tls)?;
    let mut names = vec!["localhost".to_owned()];
    if let Ok(host) = std::env::var("HOSTNAME") {
        names.push(host);
    }
    let mut server_params = CertificateParams::new(names).map_err(tls)?;
    server_params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
    server_params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::from([
            0u16, 0, 0, 0, 0, 0, 0, 1,
        ])));
    if !listen_ip.is_unspecified() && !listen_ip.is_loopback() {
        server_params
            .subject_alt_names
            .push(SanType::IpAddress(listen_ip));
    }
    server_params
        .distinguished_name
        .push(DnType::CommonName, "Outpost hub");
    server_params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let server_cert = server_params
        .signed_by(&server_key, &ca_cert, &ca_key)
        .map_err(tls)?;

    write_file(&dir.join(CA_FILE), ca_cert.pem().as_bytes(), false)?;
    write_file(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes(), true)?;
    write_file(&dir.join("server.pem"), server_cert.pem().as_bytes(), false)?;
    write_file(
        &dir.join("server.key"),
        server_key.serialize_pem().as_bytes(),
        true,
    )?;
    tracing::info!(dir = %dir.display(), "created the hub's own CA and server certificate");
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], is_secret: bool) -> Result<(), HubError> {
    let io = |source| HubError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    restrict(&mut options, is_secret);
    use std::io::Write;
    let mut file = options.open(path).map_err(io)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io)
}

#[cfg(unix)]
fn restrict(options: &mut std::fs::OpenOptions, is_secret: bool) {
    use std::os::unix::fs::OpenOptionsExt;
    options.mode(if is_secret { 0o600 } else { 0o644 });
}

#[cfg(not(unix))]
fn restrict(_options: &mut std::fs::OpenOptions, _is_secret: bool) {}

/// Reads every certificate in a PEM file.
pub fn read_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, HubError> {
    let text = std::fs::read(path).map_err(|source| HubError::Io {
        path: path.to_owned(),
        source,
    })?;
    rustls_pemfile::certs(&mut text.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| HubError::Tls(format!("{}: {err}", path.display())))
}

fn read_key(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, HubError> {
    let text = std::fs::read(path).map_err(|source| HubError::Io {
        path: path.to_owned(),
        source,
    })?;
    rustls_pemfile::private_key(&mut text.as_slice())
        .map_err(|err| HubError::Tls(format!("{}: {err}", path.display())))?
        .ok_or_else(|| HubError::Tls(format!("{}: no private key", path.display())))
}

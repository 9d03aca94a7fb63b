//! The hub's config: a TOML file or, with none, embedded defaults (loopback, SQLite and a
//! folder under `./outpost-hub`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::HubError;

/// A loaded hub config. `Debug` hides the database password.
#[derive(Clone)]
pub struct HubConfig {
    /// HTTPS listen address.
    pub listen: SocketAddr,
    /// Store, TLS material, and the folder for large payloads.
    pub data_dir: PathBuf,
    /// `sqlite` (the default, in data_dir) or a `postgres://` URL.
    pub database: String,
    /// How often agents send heartbeats; silent for 3 periods means offline.
    pub heartbeat: Duration,
    /// Called (POST, JSON) when an agent goes offline or comes back.
    pub webhook_url: Option<String>,
    /// Certificate chain and key to use instead of the hub's own CA (PEM files).
    pub tls_cert: Option<PathBuf>,
    /// Key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    #[serde(default = "default_database")]
    database: String,
    #[serde(default = "default_heartbeat_secs")]
    heartbeat_secs: u64,
    #[serde(default)]
    webhook_url: Option<String>,
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
}

fn default_listen() -> String {
    "127.0.0.1:8443".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./outpost-hub")
}
fn default_database() -> String {
    "sqlite".into()
}
fn default_heartbeat_secs() -> u64 {
    10
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            data_dir: default_data_dir(),
            database: default_database(),
            heartbeat: Duration::from_secs(default_heartbeat_secs()),
            webhook_url: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl HubConfig {
    /// Reads a config file; relative paths are taken from its folder.
    pub fn load(path: &Path) -> Result<Self, HubError> {
        let text = std::fs::read_to_string(path).map_err(|source| HubError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, HubError> {
        let file = path.display();
        let raw: RawConfig = toml::from_str(text)
            .map_err(|err| HubError::Config(format!("{file}: {}", err.to_string().trim_end())))?;
        let listen = raw.listen.parse().map_err(|_| {
            HubError::Config(format!("{file}: key `listen`: expected an IP address and port like \"127.0.0.1:8443\", found {:?}", raw.listen))
        })?;
        if raw.database != "sqlite"
            && !raw.database.starts_with("postgres://")
            && !raw.database.starts_with("postgresql://")
        {
            return Err(HubError::Config(format!(
                "{file}: key `database`: expected \"sqlite\" or a postgres:// URL"
            )));
        }
        if raw.heartbeat_secs == 0 {
            return Err(HubError::Config(format!(
                "{file}: key `heartbeat_secs`: expected a whole number of seconds above 0"
            )));
        }
        if raw.tls_cert.is_some() != raw.tls_key.is_some() {
            return Err(HubError::Config(format!(
                "{file}: keys `tls_cert` and `tls_key`: give both or neither"
            )));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let anchor = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(Self {
            listen,
            data_dir: anchor(raw.data_dir),
            database: raw.database,
            heartbeat: Duration::from_secs(raw.heartbeat_secs),
            webhook_url: raw.webhook_url,
            tls_cert: raw.tls_cert.map(anchor),
            tls_key: raw.tls_key.map(anchor),
        })
    }
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("database", &crate::secrets::redact_url(&self.database))
            .field("heartbeat", &self.heartbeat)
            .field("webhook_url", &self.webhook_url)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .finish()
    }
}

//! The agent's TOML config: loading, per-kind dispatch and cross-checks. Every error names
//! the file, the key and what was expected.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_core::ConnectorName;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::connectors::{dicom, hub, jsonl, mllp, sql, sqlsink, SinkKind, SourceKind};
use crate::ConfigError;

/// A loaded, checked agent config.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// Queue, key file and other state; relative paths are taken from the config file's
    /// folder, so a service started from another working directory finds the same data.
    pub data_dir: PathBuf,
    /// How long delivered and refused items stay searchable before purge.
    pub retention: Duration,
    /// Intake stops while less than this is free on the data directory's disk.
    pub min_free_disk_bytes: u64,
    /// How long connectors get to finish in-flight work on shutdown.
    pub shutdown_grace: Duration,
    /// `[[source]]` tables.
    pub sources: Vec<SourceConfig>,
    /// `[[sink]]` tables.
    pub sinks: Vec<SinkConfig>,
    /// `[[route]]` tables.
    pub routes: Vec<RouteConfig>,
    /// `[hub]`: connect to a hub (also implied by a `kind = "hub"` sink).
    pub hub: Option<HubConfig>,
    /// `policy`: the practice's support policy (see `security.md`). Without one every job
    /// from the hub is refused. Relative paths are taken from the config file's folder.
    pub policy: Option<PathBuf>,
}

/// `[hub]`: where the hub is and how to enroll on first start. After enrollment the
/// hub's address and pinned CA are kept in the data directory; these keys then only
/// matter for a first start.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// The hub's base URL, e.g. `https://hub.example.com:8443`.
    #[serde(default)]
    pub url: Option<String>,
    /// A one-time enrollment token; used once, on first start, if not enrolled yet.
    #[serde(default)]
    pub token: Option<String>,
    /// The hub's CA certificate (PEM) to pin; without it the public roots are trusted.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The source name items from the hub carry; no connector may use it.
pub const HUB_SOURCE: &str = "hub";

/// One `[[source]]`.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Unique among sources and sinks.
    pub name: ConnectorName,
    /// The kind-specific settings.
    pub kind: SourceKind,
}

/// One `[[sink]]`.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Unique among sources and sinks.
    pub name: ConnectorName,
    /// The kind-specific settings.
    pub kind: SinkKind,
}

/// One `[[route]]`: items from a source go to these sinks, optionally only some HL7 types.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A source name.
    pub from: ConnectorName,
    /// Sink names.
    pub to: Vec<ConnectorName>,
    /// Only HL7 messages whose MSH-9 starts with one of these, component by component:
    /// `"ORU^R01"` takes `ORU^R01^ORU_R01`, `"ADT"` takes every ADT. Empty takes all.
    #[serde(default)]
    pub msh9: Vec<String>,
    /// DICOM: only instances of these modalities (`"CT"`, `"MR"`…). Empty takes all.
    #[serde(default)]
    pub modality: Vec<String>,
    /// DICOM: only instances sent by these calling AE titles. Empty takes all.
    #[serde(default)]
    pub calling_ae: Vec<String>,
    /// DICOM: only instances of these SOP Class UIDs. Empty takes all.
    #[serde(default)]
    pub sop_class: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    #[serde(default = "default_retention_hours")]
    retention_hours: u64,
    #[serde(default = "default_min_free_disk_mb")]
    min_free_disk_mb: u64,
    #[serde(default = "default_shutdown_grace_secs")]
    shutdown_grace_secs: u64,
    #[serde(default)]
    source: Vec<toml::Table>,
    #[serde(default)]
    sink: Vec<toml::Table>,
    #[serde(default)]
    route: Vec<toml::Table>,
    #[serde(default)]
    hub: Option<toml::Table>,
    #[serde(default)]
    policy: Option<PathBuf>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./outpost-data")
}
fn default_retention_hours() -> u64 {
    24 * 7
}
fn default_min_free_disk_mb() -> u64 {
    64
}
fn default_shutdown_grace_secs() -> u64 {
    10
}

/// The source kinds this version knows, for error messages.
const SOURCE_KINDS: &str = "\"mllp\", \"dicom\", \"sql\"";
/// The sink kinds this version knows, for error messages.
const SINK_KINDS: &str = "\"mllp\", \"hub\", \"dicom\", \"stow\", \"jsonl\", \"sql\"";

impl AgentConfig {
    /// Reads and checks the config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let table: toml::Table = text
            .parse()
            .map_err(|err: toml::de::Error| invalid(err.to_string().trim_end().to_owned()))?;
        let raw: RawConfig = deserialize_at(toml::Value::Table(table), "").map_err(&invalid)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let anchored = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let mut sources = Vec::new();
        for (index, table) in raw.source.into_iter().enumerate() {
            let at = format!("source[{index}]");
            let (name, kind, rest) =
                split_name_and_kind(table, &at, SOURCE_KINDS).map_err(&invalid)?;
            let kind = match kind.as_str() {
                "mllp" => SourceKind::Mllp(
                    deserialize_at::<mllp::SourceConfig>(rest, &at).map_err(&invalid)?,
                ),
                "dicom" => SourceKind::Dicom(
                    deserialize_at::<dicom::SourceConfig>(rest, &at).map_err(&invalid)?,
                ),
                "sql" => {
                    let mut config =
                        deserialize_at::<sql::SourceConfig>(rest, &at).map_err(&invalid)?;
                    config.password_file = config.password_file.map(&anchored);
                    // The message names the key inside the table (`url`, `tables[1].key`…).
                    config.validate(base).map_err(|err| {
                        let text = err.to_string();
                        let (key, message) = text.split_once(": ").unwrap_or(("url", &text));
                        invalid(format!("key `{at}.{key}`: {message}"))
                    })?;
                    SourceKind::Sql(Box::new(config))
                }
                other => return Err(invalid(unknown_kind(&at, other, SOURCE_KINDS))),
            };
            sources.push(SourceConfig { name, kind });
        }
        let mut sinks = Vec::new();
        for (index, table) in raw.sink.into_iter().enumerate() {
            let at = format!("sink[{index}]");
            let (name, kind, rest) =
                split_name_and_kind(table, &at, SINK_KINDS).map_err(&invalid)?;
            let kind = match kind.as_str() {
                "mllp" => {
                    SinkKind::Mllp(deserialize_at::<mllp::SinkConfig>(rest, &at).map_err(&invalid)?)
                }
                "hub" => {
                    SinkKind::Hub(deserialize_at::<hub::SinkConfig>(rest, &at).map_err(&invalid)?)
                }
                "dicom" => SinkKind::Dicom(
                    deserialize_at::<dicom::SinkConfig>(rest, &at).map_err(&invalid)?,
                ),
                "stow" => SinkKind::Stow(
                    deserialize_at::<dicom::StowSinkConfig>(rest, &at).map_err(&invalid)?,
                ),
                "jsonl" => {
                    let mut config =
                        deserialize_at::<jsonl::SinkConfig>(rest, &at).map_err(&invalid)?;
                    config.path = anchored(config.path);
                    SinkKind::Jsonl(config)
                }
                "sql" => {
                    let mut config =
                        deserialize_at::<sqlsink::SinkConfig>(rest, &at).map_err(&invalid)?;
                    config.password_file = config.password_file.map(&anchored);
                    // The message names the key inside the table (`url`, `operations.x`…).
                    config.validate(base).map_err(|err| {
                        let text = err.to_string();
                        let (key, message) = text.split_once(": ").unwrap_or(("url", &text));
                        invalid(format!("key `{at}.{key}`: {message}"))
                    })?;
                    SinkKind::Sql(Box::new(config))
                }
                other => return Err(invalid(unknown_kind(&at, other, SINK_KINDS))),
            };
            sinks.push(SinkConfig { name, kind });
        }
        let mut routes = Vec::new();
        for (index, table) in raw.route.into_iter().enumerate() {
            routes.push(
                deserialize_at::<RouteConfig>(
                    toml::Value::Table(table),
                    &format!("route[{index}]"),
                )
                .map_err(&invalid)?,
            );
        }

        let hub = match raw.hub {
            Some(table) => Some(
                deserialize_at::<HubConfig>(toml::Value::Table(table), "hub").map_err(&invalid)?,
            ),
            None => None,
        };
        let hub = hub.map(|mut hub| {
            hub.ca_file = hub
                .ca_file
                .map(|ca| if ca.is_absolute() { ca } else { base.join(ca) });
            hub
        });
        let config = AgentConfig {
            path: path.to_owned(),
            data_dir: if raw.data_dir.is_absolute() {
                raw.data_dir
            } else {
                base.join(raw.data_dir)
            },
            retention: Duration::from_secs(raw.retention_hours.saturating_mul(3600)),
            min_free_disk_bytes: raw.min_free_disk_mb.saturating_mul(1024 * 1024),
            shutdown_grace: Duration::from_secs(raw.shutdown_grace_secs),
            sources,
            sinks,
            routes,
            hub,
            policy: raw.policy.map(|policy| {
                if policy.is_absolute() {
                    policy
                } else {
                    base.join(policy)
                }
            }),
        };
        config.check().map_err(invalid)?;
        Ok(config)
    }

    /// Cross-checks that no single table can see: unique names, routes that point at real
    /// connectors, one listener per address, and `ack = "on_delivery"` leading to exactly
    /// one sink that can return an acknowledgement.
    fn check(&self) -> Result<(), String> {
        let mut names = HashSet::new();
        for (role, index, name) in self
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| ("source", i, &s.name))
            .chain(
                self.sinks
                    .iter()
                    .enumerate()
                    .map(|(i, s)| ("sink", i, &s.name)),
            )
        {
            if name.as_str() == HUB_SOURCE {
                return Err(format!("key `{role}[{index}].name`: \"{HUB_SOURCE}\" is reserved for messages from the hub; choose another name"));
            }
        }
        if let Some(url) = self.hub.as_ref().and_then(|h| h.url.as_deref()) {
            if !url.starts_with("https://") {
                return Err(format!(
                    "key `hub.url`: expected an https:// URL, found {url:?}"
                ));
            }
        }
        for (index, name) in self.sources.iter().map(|s| &s.name).enumerate() {
            if !names.insert(name.clone()) {
                return Err(format!("key `source[{index}].name`: \"{name}\" is already used by another connector; names must be unique"));
            }
        }
        for (index, name) in self.sinks.iter().map(|s| &s.name).enumerate() {
            if !names.insert(name.clone()) {
                return Err(format!("key `sink[{index}].name`: \"{name}\" is already used by another connector; names must be unique"));
            }
        }
        let mut listeners: HashMap<std::net::SocketAddr, &ConnectorName> = HashMap::new();
        for (index, source) in self.sources.iter().enumerate() {
            if let Some(addr) = source.kind.listen_addr() {
                if let Some(other) = listeners.insert(addr, &source.name) {
                    return Err(format!("key `source[{index}].listen`: {addr} is already the listen address of source \"{other}\""));
                }
            }
        }
        for (index, route) in self.routes.iter().enumerate() {
            if !self.sources.iter().any(|s| s.name == route.from) {
                return Err(format!(
                    "key `route[{index}].from`: expected the name of a [[source]], found \"{}\"",
                    route.from
                ));
            }
            if route.to.is_empty() {
                return Err(format!(
                    "key `route[{index}].to`: expected at least one sink name"
                ));
            }
            let source_is_dicom = self
                .sources
                .iter()
                .any(|s| s.name == route.from && matches!(s.kind, SourceKind::Dicom(_)));
            let source_is_sql = self
                .sources
                .iter()
                .any(|s| s.name == route.from && matches!(s.kind, SourceKind::Sql(_)));
            for (to_index, to) in route.to.iter().enumerate() {
                let Some(sink) = self.sinks.iter().find(|s| &s.name == to) else {
                    return Err(format!("key `route[{index}].to[{to_index}]`: expected the name of a [[sink]], found \"{to}\""));
                };
                if matches!(sink.kind, SinkKind::Sql(_)) {
                    return Err(format!("key `route[{index}].to[{to_index}]`: sink \"{to}\" is of kind \"sql\", which runs operations called through the hub's API, not routed items; remove it from the route"));
                }
                let compatible = match sink.kind {
                    SinkKind::Hub(_) | SinkKind::Jsonl(_) => true,
                    SinkKind::Sql(_) => false,
                    SinkKind::Dicom(_) | SinkKind::Stow(_) => source_is_dicom,
                    SinkKind::Mllp(_) => !source_is_dicom && !source_is_sql,
                };
                if !compatible {
                    let (what, takes) = if source_is_sql {
                        ("change events", "a sink of kind \"jsonl\" or \"hub\"")
                    } else if source_is_dicom {
                        (
                            "DICOM instances",
                            "a sink of kind \"dicom\", \"stow\" or \"hub\"",
                        )
                    } else {
                        ("HL7 messages", "a sink of kind \"mllp\" or \"hub\"")
                    };
                    return Err(format!("key `route[{index}].to[{to_index}]`: source \"{}\" sends {what}, which need {takes}; sink \"{to}\" is of kind \"{}\"", route.from, sink.kind.kind_name()));
                }
            }
            let filters_dicom = !route.modality.is_empty()
                || !route.calling_ae.is_empty()
                || !route.sop_class.is_empty();
            if source_is_sql && !route.msh9.is_empty() {
                return Err(format!("key `route[{index}].msh9`: filters HL7 messages, but source \"{}\" is a SQL source", route.from));
            }
            if !source_is_dicom && filters_dicom {
                return Err(format!("key `route[{index}]`: `modality`, `calling_ae` and `sop_class` filter DICOM instances, but source \"{}\" is not a DICOM source", route.from));
            }
            if source_is_dicom && !route.msh9.is_empty() {
                return Err(format!("key `route[{index}].msh9`: filters HL7 messages, but source \"{}\" is a DICOM source (use modality, calling_ae or sop_class)", route.from));
            }
            for (filter_index, filter) in route.msh9.iter().enumerate() {
                if filter.is_empty() || filter.split('^').any(str::is_empty) {
                    return Err(format!(
                        "key `route[{index}].msh9[{filter_index}]`: expected a message type like \"ORU^R01\" or \"ADT\", found {filter:?}"
                    ));
                }
            }
        }
        for (index, source) in self.sources.iter().enumerate() {
            let targets: HashSet<&ConnectorName> = self
                .routes
                .iter()
                .filter(|r| r.from == source.name)
                .flat_map(|r| r.to.iter())
                .collect();
            if targets.is_empty() {
                return Err(format!(
                    "source[{index}] (\"{}\"): no [[route]] has from = \"{}\"; every message would be refused",
                    source.name, source.name
                ));
            }
            if source.kind.acks_on_delivery() {
                let returns_acks = targets.len() == 1
                    && targets.iter().all(|t| {
                        self.sinks
                            .iter()
                            .any(|s| &&s.name == t && s.kind.returns_acks())
                    });
                if !returns_acks {
                    return Err(format!(
                        "key `source[{index}].ack`: \"on_delivery\" needs the source's routes to lead to exactly one mllp sink (whose acknowledgement is passed back), found {}",
                        targets.len()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the agent connects to a hub (a hub sink, or a SQL sink, whose calls come
    /// from the hub, implies one).
    pub fn uses_hub(&self) -> bool {
        self.hub.is_some()
            || self
                .sinks
                .iter()
                .any(|s| matches!(s.kind, SinkKind::Hub(_) | SinkKind::Sql(_)))
    }

    /// The sinks an item from `source` of HL7 type `msh9` goes to, each once, in config order.
    pub fn sinks_for(&self, source: &ConnectorName, msh9: Option<&str>) -> Vec<ConnectorName> {
        let mut sinks: Vec<ConnectorName> = Vec::new();
        for route in self.routes.iter().filter(|r| &r.from == source) {
            let is_accepted = route.msh9.is_empty()
                || msh9.is_some_and(|t| route.msh9.iter().any(|f| msh9_matches(f, t)));
            if is_accepted {
                for sink in &route.to {
                    if !sinks.contains(sink) {
                        sinks.push(sink.clone());
                    }
                }
            }
        }
        sinks
    }
}

impl AgentConfig {
    /// The sinks a DICOM instance from `source` goes to, by its modality, calling AE and
    /// SOP class, each once, in config order.
    pub fn sinks_for_instance(
        &self,
        source: &ConnectorName,
        instance: &dicom::InstanceRecord,
    ) -> Vec<ConnectorName> {
        let accepts = |filter: &[String], value: Option<&str>| {
            filter.is_empty() || value.is_some_and(|v| filter.iter().any(|f| f == v))
        };
        let mut sinks: Vec<ConnectorName> = Vec::new();
        for route in self.routes.iter().filter(|r| &r.from == source) {
            let is_accepted = accepts(&route.modality, instance.modality.as_deref())
                && accepts(&route.calling_ae, Some(&instance.calling_ae))
                && accepts(&route.sop_class, Some(&instance.sop_class_uid));
            if is_accepted {
                for sink in &route.to {
                    if !sinks.contains(sink) {
                        sinks.push(sink.clone());
                    }
                }
            }
        }
        sinks
    }
}

/// `filter` matches `msh9` when each of its components equals the message's component at
/// the same place: `ORU^R01` matches `ORU^R01^ORU_R01`, but not `ORU^R011`.
pub fn msh9_matches(filter: &str, msh9: &str) -> bool {
    let mut actual = msh9.split('^');
    filter
        .split('^')
        .all(|wanted| actual.next() == Some(wanted))
}

fn split_name_and_kind(
    mut table: toml::Table,
    at: &str,
    kinds: &str,
) -> Result<(ConnectorName, String, toml::Value), String> {
    let name = match table.remove("name") {
        None => {
            return Err(format!(
                "key `{at}.name`: missing; expected a name like \"lab-in\""
            ))
        }
        Some(value) => deserialize_at::<ConnectorName>(value, &format!("{at}.name"))?,
    };
    let kind = match table.remove("kind") {
        None => {
            return Err(format!(
                "key `{at}.kind` (\"{name}\"): missing; expected one of {kinds}"
            ))
        }
        Some(toml::Value::String(kind)) => kind,
        Some(other) => {
            return Err(format!(
                "key `{at}.kind` (\"{name}\"): expected one of {kinds}, found {}",
                other.type_str()
            ))
        }
    };
    Ok((name, kind, toml::Value::Table(table)))
}

fn unknown_kind(at: &str, found: &str, kinds: &str) -> String {
    format!("key `{at}.kind`: expected one of {kinds}, found \"{found}\"")
}

/// Deserializes `value`, naming the exact key that failed (prefixed by `at`).
fn deserialize_at<T: DeserializeOwned>(value: toml::Value, at: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let mut inner = err.path().to_string();
        let message = err.inner().to_string();
        // serde reports a missing key at its table; name the key itself, like every other error.
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            inner = if inner == "." {
                missing.to_owned()
            } else {
                format!("{inner}.{missing}")
            };
        }
        let key = match (at.is_empty(), inner.as_str()) {
            (true, ".") => String::new(),
            (true, inner) => inner.to_owned(),
            (false, ".") => at.to_owned(),
            (false, inner) => format!("{at}.{inner}"),
        };
        if key.is_empty() {
            err.inner().to_string()
        } else {
            format!("key `{key}`: {}", err.inner())
        }
    })
}

#[cfg(test)]
mod tests;

//! `[[source]] kind = "sql"`: change events out of a practice database (`outpost-sql`),
//! one queue item per event.
//!
//! Order of durability: the batch's events are appended to the queue (each append returns
//! after the commit), then the batch's position is written to
//! `<data_dir>/sql/<source>/position` (temporary file, fsync, rename), and only then is
//! the database told (`committed`; PostgreSQL advances its slot). A crash before the
//! position is written makes the database hand the batch out again; stream events carry a
//! stable id (`external_ref = sql:<source>:<commit LSN>:<n>`), so the first batches after
//! a start skip events the queue already holds.

mod progress;
mod source;

pub use outpost_sql::SourceConfig;
pub use source::run_source;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::Path;

    use crate::config::AgentConfig;
    use crate::connectors::{SinkKind, SourceKind};

    const MINIMAL: &str = r#"data_dir = "./outpost-data"
[[source]]
name = "pms"
kind = "sql"
url = "postgres://outpost:secret@127.0.0.1:5433/pms"
mode = "cdc"
tables = [ { name = "patient", key = ["patnum"] },
           { name = "appointment", key = ["aptnum"] } ]
[[sink]]
name = "events"
kind = "jsonl"
path = "./events.jsonl"
[[route]]
from = "pms"
to = ["events"]
"#;

    #[test]
    fn the_issue_minimal_config_loads() {
        let config = AgentConfig::parse(MINIMAL, Path::new("/etc/outpost/outpost.toml")).unwrap();
        let SourceKind::Sql(source) = &config.sources[0].kind else {
            panic!("not a sql source")
        };
        assert_eq!(source.tables.len(), 2);
        let SinkKind::Jsonl(sink) = &config.sinks[0].kind else {
            panic!("not a jsonl sink")
        };
        assert_eq!(sink.path, Path::new("/etc/outpost/./events.jsonl"));
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn bad_sql_sources_name_the_key() {
        let bad = MINIMAL.replace(r#"key = ["aptnum"]"#, "key = []");
        let err = AgentConfig::parse(&bad, Path::new("outpost.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `source[0].tables[1].key`"), "{err}");
        let bad = MINIMAL.replace("postgres://outpost:secret@", "oracle://outpost:secret@");
        let err = AgentConfig::parse(&bad, Path::new("outpost.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `source[0].url`") && !err.contains("secret"),
            "{err}"
        );
        let bad = MINIMAL.replace(
            r#"kind = "jsonl"
path = "./events.jsonl""#,
            r#"kind = "mllp"
connect = "127.0.0.1:2575""#,
        );
        let err = AgentConfig::parse(&bad, Path::new("outpost.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("change events"), "{err}");
    }
}

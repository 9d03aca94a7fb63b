//! `logs.tail`: the agent's newest log lines, one JSON object a line, oldest first.
//!
//! Arguments: `lines` (1 to 5000, default 200) and `level` (`error`, `warn`, `info`,
//! `debug`, `trace`: that level and more severe ones only).

use async_trait::async_trait;
use outpost_policy::Capability;

use super::{cut_note, Args};
use crate::jobs::capability::{CapabilityError, CapabilityHandler, JobContext, JobInput, Output};

/// The most lines one job may ask for.
pub const MAX_LINES: u64 = 5000;
/// Lines returned when the job does not say.
pub const DEFAULT_LINES: u64 = 200;

/// The `logs.tail` capability.
pub struct LogsTail;

#[async_trait]
impl CapabilityHandler for LogsTail {
    fn capability(&self) -> Capability {
        Capability::LogsTail
    }

    async fn run(
        &self,
        cx: &JobContext,
        job: &JobInput<'_>,
        out: &mut Output,
    ) -> Result<String, CapabilityError> {
        let args = Args::new(job.args, &["lines", "level"])?;
        let count = args.u64_in("lines", 1..=MAX_LINES, DEFAULT_LINES)?;
        let level = args.level("level")?;
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        let lines = cx.logs.search("", level, count);
        let mut written = 0usize;
        for line in &lines {
            if out.write_json(line).await.is_err() {
                break;
            }
            written += 1;
        }
        Ok(format!(
            "{written} of {} log line{}{}",
            lines.len(),
            if lines.len() == 1 { "" } else { "s" },
            cut_note(out)
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::jobs::capabilities::testutil;
    use crate::logbuf::LogLine;
    use serde_json::json;

    fn push(cx: &JobContext, level: &str, text: &str) {
        cx.logs.push(LogLine {
            time_ms: 1,
            level: level.to_owned(),
            target: "outpost_agent".to_owned(),
            text: text.to_owned(),
        });
    }

    #[tokio::test]
    async fn tail_returns_the_newest_lines_filtered_by_level() {
        let dir = tempfile::tempdir().unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        for i in 0..10 {
            push(
                &cx,
                if i % 2 == 0 { "INFO" } else { "WARN" },
                &format!("line {i}"),
            );
        }
        let policy = testutil::policy("[allow]\n\"logs.tail\" = true\n");

        let (result, output) = testutil::run(&LogsTail, &cx, &policy, json!({"lines": 3})).await;
        assert_eq!(result.unwrap(), "3 of 3 log lines");
        let texts: Vec<String> = testutil::lines(&output)
            .iter()
            .map(|l| l["text"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(texts, ["line 7", "line 8", "line 9"]);

        let (result, output) = testutil::run(
            &LogsTail,
            &cx,
            &policy,
            json!({"lines": 2, "level": "warn"}),
        )
        .await;
        result.unwrap();
        let lines = testutil::lines(&output);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l["level"] == "WARN"));
        assert_eq!(lines[1]["text"], "line 9");
    }

    #[tokio::test]
    async fn tail_refuses_a_line_count_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        let policy = testutil::policy("[allow]\n\"logs.tail\" = true\n");
        for bad in [
            json!({"lines": 0}),
            json!({"lines": 5001}),
            json!({"lines": "x"}),
        ] {
            let (result, _) = testutil::run(&LogsTail, &cx, &policy, bad).await;
            let err = result.unwrap_err().to_string();
            assert!(
                err.contains("`lines`") && err.contains("1 to 5000"),
                "{err}"
            );
        }
    }
}

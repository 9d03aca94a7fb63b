//! The decision for one job: allowed, awaiting approval, or refused with the rule and why.

use jiff::Timestamp;
use serde_json::Value;

use crate::policy::{is_sql_identifier, Columns, SqlGrant};
use crate::{resolve_under_roots, Access, Capability, Grant, Policy};

/// What a job asks for, as the agent sees it after checking signature, expiry and replay.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The capability name as the job states it; unknown names are refused.
    pub capability: &'a str,
    /// The job's arguments: `path` for `files.*`; `table`, `columns` and `limit` for
    /// `sql.query`.
    pub args: &'a Value,
    /// The time to check the maintenance window against.
    pub now: Timestamp,
}

/// The policy's answer for a job. `rule` names the policy key (or built-in rule:
/// `default-deny`, `unknown-capability`, `access`, `maintenance_window`) that decided it,
/// for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The job may run now.
    Allowed {
        /// The grant that allowed it, e.g. `allow.health`.
        rule: String,
    },
    /// The job may run once someone approves it locally.
    AwaitingApproval {
        /// Why approval is needed: `access`, `allow.shell`, `allow."sql.query".approval`.
        rule: String,
    },
    /// The job must not run.
    Refused {
        /// The rule that refused it.
        rule: String,
        /// A short explanation, without file names or argument values that could be PHI.
        reason: String,
    },
}

impl Decision {
    /// The rule that produced this decision.
    pub fn rule(&self) -> &str {
        match self {
            Decision::Allowed { rule }
            | Decision::AwaitingApproval { rule }
            | Decision::Refused { rule, .. } => rule,
        }
    }
}

impl Policy {
    /// Decides whether `request` may run. No file IO happens here except resolving the
    /// requested path of a `files.*` job against its roots.
    ///
    /// Refusals come first (unknown capability, not allowed, arguments outside the grant,
    /// outside the maintenance window), so nobody is asked to approve a job that could not
    /// run anyway; then the grant's own approval, then `access = "approval"`.
    pub fn decide(&self, request: &Request<'_>) -> Decision {
        let Some(capability) = Capability::from_name(request.capability) else {
            return refused(
                "unknown-capability",
                format!("no capability is named {}", shorten(request.capability)),
            );
        };
        let Some(grant) = self.grant(capability) else {
            return refused(
                "default-deny",
                format!("the policy does not allow `{capability}`"),
            );
        };
        if let Err(refusal) = check_args(grant, request.args) {
            return refusal;
        }
        if grant.is_window_only() {
            if let Some(refusal) = self.check_window(request.now) {
                return refusal;
            }
        }
        if grant.is_approval_only() {
            Decision::AwaitingApproval {
                rule: grant.approval_rule().to_owned(),
            }
        } else {
            match self.access() {
                Access::Approval => Decision::AwaitingApproval {
                    rule: "access".to_owned(),
                },
                Access::Unattended => Decision::Allowed {
                    rule: grant.key().to_owned(),
                },
            }
        }
    }

    fn check_window(&self, now: Timestamp) -> Option<Decision> {
        // Parsing guarantees a window exists when a grant says "window"; refusing is the
        // safe answer if that ever stops being true.
        let Some(window) = self.maintenance_window() else {
            return Some(refused(
                "maintenance_window",
                "the policy names no maintenance window".to_owned(),
            ));
        };
        if window.contains(now) {
            return None;
        }
        let next = window
            .next_start(now)
            .map_or_else(|| "unknown".to_owned(), |start| start.to_string());
        Some(refused(
            "maintenance_window",
            format!("outside the maintenance window ({window}); it next opens at {next}"),
        ))
    }
}

fn check_args(grant: &Grant, args: &Value) -> Result<(), Decision> {
    let capability = grant.capability();
    if capability.is_files() {
        let rule = || format!("{}.roots", grant.key());
        let Some(path) = args.get("path").and_then(Value::as_str) else {
            return Err(refused(
                rule(),
                "argument `path` is missing or not a string".to_owned(),
            ));
        };
        resolve_under_roots(grant.roots(), path)
            .map_err(|refusal| refused(rule(), refusal.to_string()))?;
    }
    if let Some(sql) = grant.sql() {
        check_sql(grant.key(), sql, args)?;
    }
    Ok(())
}

fn check_sql(key: &str, sql: &SqlGrant, args: &Value) -> Result<(), Decision> {
    let tables_rule = || format!("{key}.tables");
    let Some(table) = args.get("table").and_then(Value::as_str) else {
        return Err(refused(
            tables_rule(),
            "argument `table` is missing or not a string".to_owned(),
        ));
    };
    let Some(allowed) = sql.columns(table) else {
        return Err(refused(
            tables_rule(),
            format!("table {} is not listed", shorten(table)),
        ));
    };
    match args.get("columns") {
        None | Some(Value::Null) => {
            if *allowed != Columns::All {
                return Err(refused(
                    tables_rule(),
                    "argument `columns` is missing; all columns only where the policy says \"*\""
                        .to_owned(),
                ));
            }
        }
        Some(Value::Array(columns)) if !columns.is_empty() => {
            for column in columns {
                let Some(column) = column.as_str() else {
                    return Err(refused(
                        tables_rule(),
                        "a column is not a string".to_owned(),
                    ));
                };
                let is_allowed = match allowed {
                    Columns::All => column == "*" || is_sql_identifier(column, false),
                    Columns::Listed(_) => sql.allows_column(table, column),
                };
                if !is_allowed {
                    return Err(refused(
                        tables_rule(),
                        format!(
                            "column {} of table {} is not listed",
                            shorten(column),
                            shorten(table)
                        ),
                    ));
                }
            }
        }
        Some(_) => {
            return Err(refused(
                tables_rule(),
                "argument `columns` is not a non-empty list of names".to_owned(),
            ))
        }
    }
    let limit = args.get("limit").and_then(Value::as_u64);
    match limit {
        Some(limit) if (1..=sql.max_rows()).contains(&limit) => Ok(()),
        _ => Err(refused(
            format!("{key}.max_rows"),
            format!(
                "argument `limit` must be a whole number from 1 to {}",
                sql.max_rows()
            ),
        )),
    }
}

fn refused(rule: impl Into<String>, reason: String) -> Decision {
    Decision::Refused {
        rule: rule.into(),
        reason,
    }
}

/// A name from a job, quoted with escapes and cut to a bounded length, so a hostile name can
/// neither break an audit line nor bloat it.
fn shorten(name: &str) -> String {
    const MAX_CHARS: usize = 64;
    if name.chars().count() <= MAX_CHARS {
        format!("{name:?}")
    } else {
        let head: String = name.chars().take(MAX_CHARS).collect();
        format!("{head:?}…")
    }
}

//! The practice-owned policy file and the decision it gives for a job.
//!
//! The agent loads the policy (`policy = "…/policy.toml"` in its config) with
//! [`Policy::load`], and after it has checked a job's signature, agent id, expiry and
//! replay it asks [`Policy::decide`] whether the job may run now, must wait for a local
//! approval, or is refused; every outcome carries the rule that produced it, for the audit
//! log. The format is the example in `security.md`:
//!
//! ```toml
//! access = "unattended"          # or "approval": every job waits for a local approval
//! maintenance_window = "Sun 01:00-04:00 America/New_York"
//!
//! [allow]
//! health = true
//! "update.apply" = "window"      # only inside the maintenance window
//! "files.read" = { roots = ["/var/lib/outpost/exports"] }
//! "sql.query" = { approval = true, tables = { appointment = "*" }, max_rows = 500 }
//! ```
//!
//! Invariant: the hub can neither read nor change the policy. [`Policy`] deliberately has
//! no `Serialize` and no way to be turned back into text or sent anywhere, and
//! [`Capability`] has no member that touches the policy: a job asking for `policy.write`
//! is refused as an unknown capability. Only [`Policy::digest`] leaves the agent, in the
//! audit log's `policy.changed` entries.
//!
//! Invariant: anything the policy does not name is refused (`default-deny`), and a policy
//! key this crate does not know is a load error, so a typo can neither allow nor deny.
//!
//! This crate depends on no other Outpost crate.

#![forbid(unsafe_code)]

mod capability;
mod decide;
mod error;
mod paths;
mod policy;
mod window;

pub use capability::Capability;
pub use decide::{Decision, Request};
pub use error::{PathRefusal, PolicyError};
pub use paths::resolve_under_roots;
pub use policy::{Access, Columns, Grant, Policy, SqlGrant, MAX_POLICY_BYTES};
pub use window::MaintenanceWindow;

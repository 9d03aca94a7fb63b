//! Remote support on the agent: signed jobs from the hub are checked (signature, agent id,
//! expiry, replay), decided by the practice's policy, recorded in the audit log before
//! they run, and run by one of the capability modules.

pub mod capabilities;
pub mod capability;

pub use capability::{
    CapabilityError, CapabilityHandler, JobContext, JobInput, Output, ReloadRequest,
};
pub use runner::{RunnerHandle, RunnerMessage, RunnerSettings};
pub mod approvals;
pub mod audit;
pub mod gate;
pub mod mirror;
pub mod runner;

/// Makes a file readable and writable by its owner only (the agent's service account):
/// the audit log and approvals name staff and job arguments.
#[cfg(unix)]
pub(crate) fn restrict_to_owner(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(err) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(path = %path.display(), error = %err, "cannot restrict file permissions");
    }
}

/// On Windows the data directory's ACL (set at install) protects the file.
#[cfg(not(unix))]
pub(crate) fn restrict_to_owner(_path: &std::path::Path) {}

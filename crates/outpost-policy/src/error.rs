//! Errors from loading a policy file and refusals from path resolution.

use std::path::PathBuf;

/// Why a policy file could not be loaded. Each message names the file and, where there is
/// one, the key and what was expected there; none quotes a requested path or argument.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The policy file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any sensible policy, so it is not read into memory.
    #[error("{}: file is {bytes} bytes, more than the {limit} a policy may have", path.display())]
    TooLarge {
        /// The policy file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The file is not UTF-8.
    #[error("{}: not valid UTF-8", path.display())]
    NotUtf8 {
        /// The policy file.
        path: PathBuf,
    },
    /// The file is not valid TOML.
    #[error("{}: line {line}, column {column}: {message}", path.display())]
    Syntax {
        /// The policy file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The TOML parser's message.
        message: String,
    },
    /// A key holds a value of the wrong shape.
    #[error("{}: key `{key}`: expected {expected}", path.display())]
    Invalid {
        /// The policy file.
        path: PathBuf,
        /// The full dotted key, quoted as TOML would, e.g. `allow."files.read".roots`.
        key: String,
        /// What the key must hold.
        expected: String,
    },
    /// A key that the policy format does not have; a typo must not silently change a decision.
    #[error("{}: key `{key}`: {what}", path.display())]
    UnknownKey {
        /// The policy file.
        path: PathBuf,
        /// The full dotted key.
        key: String,
        /// What is wrong with it and what would be valid.
        what: String,
    },
}

/// Why a requested path was refused by [`crate::resolve_under_roots`]. Messages never
/// contain the requested path itself: file names under a root may be PHI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    /// The policy entry names no roots.
    #[error("the policy names no roots")]
    NoRoots,
    /// The path contains a NUL byte, which no file name may hold.
    #[error("path contains a NUL byte")]
    Nul,
    /// The path contains `..`; refused even when it would stay inside a root.
    #[error("path contains a `..` component")]
    ParentComponent,
    /// A Windows drive-relative or other prefixed path that is not absolute.
    #[error("path has a drive or device prefix but is not absolute")]
    DriveRelative,
    /// An absolute path that is not under any root.
    #[error("absolute path is outside every root")]
    OutsideRoots,
    /// The path is under a root as written, but a symbolic link leads it outside.
    #[error("path leads outside every root through a symbolic link")]
    SymlinkEscape,
    /// The path ends in a symbolic link whose target does not exist; writing through it
    /// could create a file anywhere.
    #[error("path ends in a symbolic link to a missing target")]
    DanglingSymlink,
    /// No root in the policy exists on this machine.
    #[error("root {} cannot be resolved: {reason}", root.display())]
    RootUnavailable {
        /// The root as the policy names it.
        root: PathBuf,
        /// What the OS said.
        reason: String,
    },
    /// The path could not be resolved (permission denied, a symlink loop, a file used as
    /// a folder).
    #[error("path cannot be resolved: {reason}")]
    Unresolvable {
        /// What the OS said.
        reason: String,
    },
}

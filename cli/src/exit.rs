//! Exit codes of `dfget` (documented in the crate README), and [`Failure`], a message with
//! its exit code.
//!
//! The daemon answers a failed download with the gRPC code of its `DownloadError`
//! (`controlplane::error::DownloadError::grpc_code`); [`for_code`] is the one mapping from
//! that code to an exit code, so a script can tell "not found" from "try again later"
//! without reading the message.

use std::fmt;

/// The download (or every download, with `--recursive`) finished.
pub const OK: u8 = 0;
/// Any other failure: no daemon answering, a local file error, a config file error.
pub const FAILURE: u8 = 1;
/// Bad arguments (also what clap exits with), or a request the daemon refused as invalid
/// (a range outside the file, an invalid header).
pub const USAGE: u8 = 2;
/// The origin has no such file (HTTP 404 or 410, no such object), or a task without an
/// origin that no peer holds.
pub const NOT_FOUND: u8 = 3;
/// The origin refused access (HTTP 401, 403, 407; the object store's access denied).
pub const DENIED: u8 = 4;
/// The content does not match its digest (`--digest`, or the one a blob URL names).
pub const DIGEST_MISMATCH: u8 = 5;
/// The daemon's storage (or the output's file system) is full.
pub const NO_SPACE: u8 = 6;
/// `--timeout` passed, or the download stopped making progress.
pub const TIMEOUT: u8 = 7;
/// Worth trying again later: the origin failed (a 5xx after the retries, unreachable), no
/// scheduler answered, no peer could serve and back-to-source is disabled, or the daemon
/// was shutting down.
pub const UNAVAILABLE: u8 = 8;

/// The exit code for a download the daemon ended with gRPC code `code`.
pub fn for_code(code: tonic::Code) -> u8 {
    use tonic::Code;
    match code {
        Code::Ok => OK,
        Code::InvalidArgument | Code::OutOfRange => USAGE,
        Code::NotFound => NOT_FOUND,
        Code::PermissionDenied | Code::Unauthenticated => DENIED,
        Code::DataLoss => DIGEST_MISMATCH,
        Code::ResourceExhausted => NO_SPACE,
        Code::DeadlineExceeded => TIMEOUT,
        Code::Unavailable | Code::FailedPrecondition | Code::Cancelled | Code::Aborted => {
            UNAVAILABLE
        }
        _ => FAILURE,
    }
}

/// A failed command: the message printed after `dfget: ` and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What the user reads.
    pub message: String,
    /// The process's exit code (one of the constants of this module).
    pub exit: u8,
}

impl Failure {
    /// A failure with an explicit exit code.
    pub fn new(exit: u8, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            exit,
        }
    }

    /// The daemon's answer to a failed request: its message, and the exit code of its
    /// gRPC code.
    pub fn from_status(status: &tonic::Status) -> Self {
        Self::new(for_code(status.code()), status.message())
    }

    /// The same failure with `context` (which file, which URL) before its message.
    #[must_use]
    pub fn context(self, context: &str) -> Self {
        Self::new(self.exit, format!("{context}: {}", self.message))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A failure known only by its message: [`FAILURE`].
impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self::new(FAILURE, message)
    }
}

/// A failure known only by its message: [`FAILURE`].
impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Self::new(FAILURE, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn daemon_codes_map_to_distinct_exit_codes() {
        assert_eq!(for_code(Code::NotFound), NOT_FOUND);
        assert_eq!(for_code(Code::PermissionDenied), DENIED);
        assert_eq!(for_code(Code::DataLoss), DIGEST_MISMATCH);
        assert_eq!(for_code(Code::ResourceExhausted), NO_SPACE);
        assert_eq!(for_code(Code::DeadlineExceeded), TIMEOUT);
        assert_eq!(for_code(Code::Unavailable), UNAVAILABLE);
        assert_eq!(for_code(Code::Cancelled), UNAVAILABLE);
        assert_eq!(for_code(Code::InvalidArgument), USAGE);
        assert_eq!(for_code(Code::Internal), FAILURE);
        assert_eq!(for_code(Code::Unknown), FAILURE);
        let codes = [
            OK,
            FAILURE,
            USAGE,
            NOT_FOUND,
            DENIED,
            DIGEST_MISMATCH,
            NO_SPACE,
            TIMEOUT,
            UNAVAILABLE,
        ];
        let distinct: std::collections::HashSet<u8> = codes.iter().copied().collect();
        assert_eq!(distinct.len(), codes.len(), "exit codes must differ");
    }

    #[test]
    fn a_status_keeps_its_message_and_context_is_prefixed() {
        let f = Failure::from_status(&tonic::Status::not_found(
            "origin answered 404 Not Found for http://o/f",
        ));
        assert_eq!(f.exit, NOT_FOUND);
        let f = f.context("http://o/f");
        assert_eq!(f.exit, NOT_FOUND);
        assert_eq!(
            f.to_string(),
            "http://o/f: origin answered 404 Not Found for http://o/f"
        );
        assert_eq!(Failure::from("x".to_string()).exit, FAILURE);
    }

    /// The daemon's side of the contract: each kind of download failure reaches dfget as
    /// the exit code the README promises.
    #[test]
    fn download_errors_reach_the_documented_exit_codes() {
        use controlplane::error::DownloadError as E;
        let m = || "m".to_string();
        let exit = |e: E| for_code(e.grpc_code());
        assert_eq!(
            exit(E::OriginStatus {
                status: 404,
                message: m()
            }),
            NOT_FOUND
        );
        assert_eq!(
            exit(E::OriginStatus {
                status: 403,
                message: m()
            }),
            DENIED
        );
        assert_eq!(
            exit(E::OriginStatus {
                status: 502,
                message: m()
            }),
            UNAVAILABLE
        );
        assert_eq!(exit(E::NotFound(m())), NOT_FOUND);
        assert_eq!(exit(E::DigestMismatch(m())), DIGEST_MISMATCH);
        assert_eq!(exit(E::NoSpace(m())), NO_SPACE);
        assert_eq!(exit(E::Stalled(m())), TIMEOUT);
        assert_eq!(exit(E::NoSource(m())), UNAVAILABLE);
        assert_eq!(exit(E::SchedulerUnavailable(m())), UNAVAILABLE);
        assert_eq!(exit(E::Origin(m())), UNAVAILABLE);
        assert_eq!(exit(E::Cancelled(m())), UNAVAILABLE);
        assert_eq!(exit(E::BadRequest(m())), USAGE);
        assert_eq!(exit(E::Storage(m())), FAILURE);
        assert_eq!(exit(E::Internal(m())), FAILURE);
    }
}

//! Why a download failed, as one type from where the failure happens to where it is shown.
//!
//! A [`DownloadError`] is made where a download fails (the task run, the origin fetch, the
//! delivery to the client), carried in [`crate::task::TaskState::Failed`], and mapped once
//! each: to a gRPC code ([`DownloadError::grpc_code`], used by the local API, so `dfget`
//! picks its exit code from it) and to the `kind` label of
//! `damselfly_downloads_failed_total` ([`DownloadError::metric_kind`]). The message
//! ([`std::fmt::Display`]) is the full sentence the user reads; the variant says what kind
//! of failure it is, so nothing downstream classifies failures by their words.

use crate::origin::OriginError;
use crate::s3::S3Error;
use dataplane::StorageFailure;

/// Why a download failed. The text of each variant is the whole message shown to the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownloadError {
    /// The origin (HTTP server or object store) answered with an error status that retrying
    /// does not fix: `404 Not Found`, `403 Forbidden`, a `5xx` after the retries, ….
    #[error("{message}")]
    OriginStatus {
        /// The HTTP status (404 for an object store's "no such key").
        status: u16,
        /// What the user reads.
        message: String,
    },
    /// The origin failed otherwise: unreachable, refused TLS, a transfer that kept
    /// breaking, an answer that contradicts itself or has no length.
    #[error("{0}")]
    Origin(String),
    /// Nothing to fetch from: the task has no origin (a `dfcache` import) and no peer has it.
    #[error("{0}")]
    NotFound(String),
    /// The content does not match its digest.
    #[error("{0}")]
    DigestMismatch(String),
    /// The disk this daemon stores tasks on (or the output's) is full.
    #[error("{0}")]
    NoSpace(String),
    /// Reading or writing the task's file failed (other than a full disk).
    #[error("{0}")]
    Storage(String),
    /// The task was evicted or removed while it was being written (by the GC, a delete, a
    /// failed run). Answered and counted as a storage failure.
    #[error("{0}")]
    Evicted(String),
    /// No peer can serve the task and back-to-source is disabled.
    #[error("{0}")]
    NoSource(String),
    /// No scheduler answered (or the scheduler went away) and back-to-source is disabled.
    #[error("{0}")]
    SchedulerUnavailable(String),
    /// The download made no progress for too long.
    #[error("{0}")]
    Stalled(String),
    /// The download was stopped before it ended (the daemon is shutting down).
    #[error("{0}")]
    Cancelled(String),
    /// The request cannot be served as asked: a bad header, a range outside the content,
    /// a size the protocol cannot carry.
    #[error("{0}")]
    BadRequest(String),
    /// A failure of the daemon itself.
    #[error("{0}")]
    Internal(String),
}

impl DownloadError {
    /// A failed file operation: [`Self::NoSpace`] for a full disk (by its OS error, see
    /// [`StorageFailure::is_no_space`]), else [`Self::Storage`]; `what` says what was being
    /// done.
    pub fn io(what: &str, e: &std::io::Error) -> Self {
        Self::from(StorageFailure::from(e)).context(what)
    }

    /// The same failure, with `context` (what was being done) before its message.
    #[must_use]
    pub fn context(self, context: &str) -> Self {
        let wrap = |m: String| format!("{context}: {m}");
        match self {
            Self::OriginStatus { status, message } => Self::OriginStatus {
                status,
                message: wrap(message),
            },
            Self::Origin(m) => Self::Origin(wrap(m)),
            Self::NotFound(m) => Self::NotFound(wrap(m)),
            Self::DigestMismatch(m) => Self::DigestMismatch(wrap(m)),
            Self::NoSpace(m) => Self::NoSpace(wrap(m)),
            Self::Storage(m) => Self::Storage(wrap(m)),
            Self::Evicted(m) => Self::Evicted(wrap(m)),
            Self::NoSource(m) => Self::NoSource(wrap(m)),
            Self::SchedulerUnavailable(m) => Self::SchedulerUnavailable(wrap(m)),
            Self::Stalled(m) => Self::Stalled(wrap(m)),
            Self::Cancelled(m) => Self::Cancelled(wrap(m)),
            Self::BadRequest(m) => Self::BadRequest(wrap(m)),
            Self::Internal(m) => Self::Internal(wrap(m)),
        }
    }

    /// The gRPC code the local API answers this failure with (`dfget`'s exit code follows
    /// from it, see the cli README).
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::OriginStatus { status, .. } => match status {
                404 | 410 => Code::NotFound,
                401 | 403 | 407 => Code::PermissionDenied,
                400..=499 => Code::FailedPrecondition,
                _ => Code::Unavailable,
            },
            Self::NotFound(_) => Code::NotFound,
            Self::DigestMismatch(_) => Code::DataLoss,
            Self::NoSpace(_) => Code::ResourceExhausted,
            Self::Storage(_) | Self::Evicted(_) | Self::Internal(_) => Code::Internal,
            Self::Origin(_) | Self::NoSource(_) | Self::SchedulerUnavailable(_) => {
                Code::Unavailable
            }
            Self::Stalled(_) => Code::DeadlineExceeded,
            Self::Cancelled(_) => Code::Cancelled,
            Self::BadRequest(_) => Code::InvalidArgument,
        }
    }

    /// The `kind` label of `damselfly_downloads_failed_total` (one of
    /// [`crate::metrics::FAILURE_KINDS`]).
    pub fn metric_kind(&self) -> &'static str {
        match self {
            Self::OriginStatus { .. } | Self::Origin(_) => "origin",
            Self::NotFound(_) => "not_found",
            Self::DigestMismatch(_) => "digest",
            Self::NoSpace(_) => "no_space",
            Self::Storage(_) | Self::Evicted(_) => "storage",
            Self::NoSource(_) => "no_source",
            Self::SchedulerUnavailable(_) => "scheduler",
            Self::Stalled(_) => "stalled",
            Self::Cancelled(_) => "cancelled",
            Self::BadRequest(_) => "bad_request",
            Self::Internal(_) => "other",
        }
    }
}

impl From<OriginError> for DownloadError {
    fn from(e: OriginError) -> Self {
        let message = e.to_string();
        match e {
            OriginError::Status(status, _) => Self::OriginStatus {
                status: status.as_u16(),
                message,
            },
            OriginError::ObjectStore(S3Error::NotFound(_)) => Self::OriginStatus {
                status: 404,
                message,
            },
            OriginError::ObjectStore(S3Error::Denied { status, .. }) => Self::OriginStatus {
                status: status.as_u16(),
                message,
            },
            OriginError::BadHeader(_) | OriginError::Layout(_) => Self::BadRequest(message),
            OriginError::Storage(f) => Self::from(f).context("storing piece"),
            OriginError::UnknownLength
            | OriginError::Inconsistent(_)
            | OriginError::Exhausted { .. }
            | OriginError::Tls(_)
            | OriginError::ObjectStore(_) => Self::Origin(message),
        }
    }
}

impl From<StorageFailure> for DownloadError {
    /// By class: a full disk is [`Self::NoSpace`], an evicted task [`Self::Evicted`], the
    /// rest [`Self::Storage`]; the message is the failure's.
    fn from(f: StorageFailure) -> Self {
        let message = f.to_string();
        match f {
            StorageFailure::NoSpace { .. } => Self::NoSpace(message),
            StorageFailure::Retired { .. } => Self::Evicted(message),
            StorageFailure::Io { .. } | StorageFailure::Other(_) => Self::Storage(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn every_kind() -> Vec<DownloadError> {
        use DownloadError::*;
        let m = || "m".to_string();
        vec![
            OriginStatus {
                status: 404,
                message: m(),
            },
            Origin(m()),
            NotFound(m()),
            DigestMismatch(m()),
            NoSpace(m()),
            Storage(m()),
            Evicted(m()),
            NoSource(m()),
            SchedulerUnavailable(m()),
            Stalled(m()),
            Cancelled(m()),
            BadRequest(m()),
            Internal(m()),
        ]
    }

    #[test]
    fn origin_statuses_map_to_grpc_codes() {
        let code = |status| {
            DownloadError::OriginStatus {
                status,
                message: String::new(),
            }
            .grpc_code()
        };
        assert_eq!(code(404), Code::NotFound);
        assert_eq!(code(410), Code::NotFound);
        assert_eq!(code(401), Code::PermissionDenied);
        assert_eq!(code(403), Code::PermissionDenied);
        assert_eq!(code(416), Code::FailedPrecondition);
        assert_eq!(code(500), Code::Unavailable);
        assert_eq!(code(503), Code::Unavailable);
    }

    #[test]
    fn each_kind_has_its_own_grpc_code() {
        use DownloadError::*;
        let m = || "m".to_string();
        assert_eq!(DigestMismatch(m()).grpc_code(), Code::DataLoss);
        assert_eq!(NoSpace(m()).grpc_code(), Code::ResourceExhausted);
        assert_eq!(NotFound(m()).grpc_code(), Code::NotFound);
        assert_eq!(Stalled(m()).grpc_code(), Code::DeadlineExceeded);
        assert_eq!(Cancelled(m()).grpc_code(), Code::Cancelled);
        assert_eq!(BadRequest(m()).grpc_code(), Code::InvalidArgument);
        assert_eq!(NoSource(m()).grpc_code(), Code::Unavailable);
        assert_eq!(SchedulerUnavailable(m()).grpc_code(), Code::Unavailable);
        assert_eq!(Origin(m()).grpc_code(), Code::Unavailable);
        assert_eq!(Storage(m()).grpc_code(), Code::Internal);
        assert_eq!(Evicted(m()).grpc_code(), Code::Internal);
        assert_eq!(Internal(m()).grpc_code(), Code::Internal);
    }

    #[test]
    fn every_metric_kind_is_exported() {
        for e in every_kind() {
            assert!(
                crate::metrics::FAILURE_KINDS.contains(&e.metric_kind()),
                "{e:?}: kind {} is not in FAILURE_KINDS",
                e.metric_kind()
            );
        }
        assert_eq!(
            DownloadError::OriginStatus {
                status: 404,
                message: String::new()
            }
            .metric_kind(),
            "origin",
            "a 404 is an origin failure"
        );
    }

    #[test]
    fn context_keeps_the_kind_and_prefixes_the_message() {
        for e in every_kind() {
            let wrapped = e.clone().context("fetching pieces");
            assert_eq!(wrapped.grpc_code(), e.grpc_code());
            assert_eq!(wrapped.metric_kind(), e.metric_kind());
            assert_eq!(wrapped.to_string(), format!("fetching pieces: {e}"));
        }
    }

    #[test]
    fn a_full_disk_is_no_space() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = DownloadError::io("storing piece 3", &full);
        assert!(matches!(e, DownloadError::NoSpace(_)), "{e:?}");
        assert_eq!(e.to_string(), format!("storing piece 3: {full}"));
        let quota = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert!(matches!(
            DownloadError::io("x", &quota),
            DownloadError::NoSpace(_)
        ));
        let other = std::io::Error::from_raw_os_error(libc::EIO);
        assert!(matches!(
            DownloadError::io("x", &other),
            DownloadError::Storage(_)
        ));
        // An error that only has the words of a full disk is not one.
        let words = std::io::Error::other(full.to_string());
        assert!(matches!(
            DownloadError::io("x", &words),
            DownloadError::Storage(_)
        ));
    }

    /// The data plane's report of a full disk over the bridge: the answer `dfget` turns
    /// into its disk-full exit code, the metric label, and the message as before.
    #[test]
    fn the_data_planes_full_disk_is_no_space() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let failure = StorageFailure::from(dataplane::StoreError::Io(full));
        let e = DownloadError::from(failure).context("storage");
        assert!(matches!(e, DownloadError::NoSpace(_)), "{e:?}");
        assert_eq!(e.grpc_code(), Code::ResourceExhausted);
        assert_eq!(e.metric_kind(), "no_space");
        assert_eq!(
            e.to_string(),
            format!(
                "storage: task file I/O: {}",
                std::io::Error::from_raw_os_error(libc::ENOSPC)
            )
        );
        let eio = StorageFailure::from(std::io::Error::from_raw_os_error(libc::EIO));
        let e = DownloadError::from(eio);
        assert!(matches!(e, DownloadError::Storage(_)), "{e:?}");
        assert_eq!(e.grpc_code(), Code::Internal);
    }

    #[test]
    fn an_evicted_task_is_evicted() {
        let e = DownloadError::from(StorageFailure::from(dataplane::StoreError::Retired));
        assert!(matches!(e, DownloadError::Evicted(_)), "{e:?}");
        assert_eq!(e.to_string(), "the task was evicted");
        assert_eq!(e.grpc_code(), Code::Internal);
        assert_eq!(e.metric_kind(), "storage");
        let e = DownloadError::from(OriginError::Storage(StorageFailure::retired(
            "the task was evicted or removed during the fetch",
        )));
        assert!(matches!(e, DownloadError::Evicted(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "storing piece: the task was evicted or removed during the fetch"
        );
    }

    #[test]
    fn origin_errors_keep_their_message_and_status() {
        let e = DownloadError::from(OriginError::Status(
            reqwest::StatusCode::NOT_FOUND,
            "http://o/f".into(),
        ));
        assert_eq!(e.grpc_code(), Code::NotFound);
        assert_eq!(
            e.to_string(),
            "origin answered 404 Not Found for http://o/f"
        );
        let e = DownloadError::from(OriginError::Exhausted {
            retries: 3,
            last: "origin answered 500 Internal Server Error".into(),
        });
        assert!(matches!(e, DownloadError::Origin(_)));
        assert!(e.to_string().contains("after 3 retries"), "{e}");
        let e = DownloadError::from(OriginError::ObjectStore(S3Error::NotFound(
            "s3://b/k".into(),
        )));
        assert_eq!(e.grpc_code(), Code::NotFound);
        assert_eq!(e.metric_kind(), "origin");
        for (status, code) in [
            (reqwest::StatusCode::UNAUTHORIZED, 401),
            (reqwest::StatusCode::FORBIDDEN, 403),
        ] {
            let e = DownloadError::from(OriginError::ObjectStore(S3Error::Denied {
                url: "s3://b/k".into(),
                status,
                hint: "the credentials",
                detail: "SignatureDoesNotMatch".into(),
            }));
            assert!(
                matches!(e, DownloadError::OriginStatus { status, .. } if status == code),
                "{e:?}"
            );
            assert_eq!(e.grpc_code(), Code::PermissionDenied);
            assert!(e.to_string().contains(&status.to_string()), "{e}");
        }
        let e = DownloadError::from(OriginError::BadHeader("x y".into()));
        assert_eq!(e.grpc_code(), Code::InvalidArgument);
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = DownloadError::from(OriginError::Storage(full.into()));
        assert_eq!(e.grpc_code(), Code::ResourceExhausted);
        assert_eq!(e.metric_kind(), "no_space");
    }
}

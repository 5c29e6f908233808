//! What a Redis failure means to the service: [`classify`] sorts it into a [`StoreError`]
//! (and [`classify_in_cluster`] first picks out a Redis Cluster's own refusals), so the
//! decision layer and discovery act on kinds, never on Redis's error codes.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::store::{StoreError, Unavailable};

/// Whether a node answered that it does not have the script a command named by its hash.
pub(crate) fn is_noscript(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Sorts a Redis failure into what the service does about it.
pub fn classify(err: &RedisError, timeout: Duration) -> StoreError {
    let source = Some(err.clone());
    let unavailable = |cause| StoreError::Unavailable {
        cause,
        source: source.clone(),
    };
    match err.kind() {
        ErrorKind::Server(ServerErrorKind::ReadOnly) => {
            return StoreError::MasterChanged {
                source: err.clone(),
            };
        }
        ErrorKind::Server(ServerErrorKind::BusyLoading) => {
            return unavailable(Unavailable::Loading);
        }
        ErrorKind::Server(ServerErrorKind::NoScript) => {
            return StoreError::Other {
                source: err.clone(),
            };
        }
        _ => {}
    }
    match err.code() {
        Some("WRONGTYPE") => StoreError::ForeignValue {
            source: err.clone(),
        },
        // The script's own arithmetic on a field that holds no number.
        Some("ERR") if err.to_string().contains("attempt to perform arithmetic") => {
            StoreError::ForeignValue {
                source: err.clone(),
            }
        }
        Some("NOREPLICAS") => unavailable(Unavailable::NoReplicas),
        Some("READONLY") => StoreError::MasterChanged {
            source: err.clone(),
        },
        Some("LOADING") => unavailable(Unavailable::Loading),
        Some("MASTERDOWN") => unavailable(Unavailable::NoConnection(err.to_string())),
        _ if err.is_timeout() => StoreError::Timeout {
            after_ms: timeout.as_millis() as u64,
            source,
        },
        _ if err.is_io_error() || err.is_connection_refusal() || err.is_unrecoverable_error() => {
            unavailable(Unavailable::NoConnection(err.to_string()))
        }
        _ => StoreError::Other {
            source: err.clone(),
        },
    }
}

/// Sorts a Redis Cluster failure into what the service does about it: the cluster's own
/// refusals are [`Unavailable::ClusterDown`], the rest as in the other modes.
pub fn classify_in_cluster(err: &RedisError, timeout: Duration) -> StoreError {
    match err.kind() {
        ErrorKind::Server(
            ServerErrorKind::ClusterDown
            | ServerErrorKind::TryAgain
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        ) => StoreError::Unavailable {
            cause: Unavailable::ClusterDown(err.to_string()),
            source: Some(err.clone()),
        },
        ErrorKind::ClusterConnectionNotFound => StoreError::Unavailable {
            cause: Unavailable::NoConnection(err.to_string()),
            source: Some(err.clone()),
        },
        _ => classify(err, timeout),
    }
}

//! What a Redis failure means to the service: [`classify`] sorts it into a [`StoreError`]
//! (and [`classify_in_cluster`] first picks out a Redis Cluster's own refusals), so the
//! decision layer and discovery act on kinds, never on Redis's error codes.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::store::{Cause, StoreError, Unavailable};

/// Whether a node answered that it does not have the script a command named by its hash.
pub(crate) fn is_noscript(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Sorts a Redis failure into what the service does about it; `err` is kept as the
/// error's source.
pub fn classify(err: &RedisError, timeout: Duration) -> StoreError {
    let source = || -> Cause { Box::new(err.clone()) };
    let unavailable = |cause| StoreError::Unavailable {
        cause,
        source: Some(source()),
    };
    match err.kind() {
        ErrorKind::Server(ServerErrorKind::ReadOnly) => {
            return StoreError::MasterChanged { source: source() };
        }
        ErrorKind::Server(ServerErrorKind::BusyLoading) => {
            return unavailable(Unavailable::Loading);
        }
        ErrorKind::Server(ServerErrorKind::NoScript) => {
            return StoreError::ScriptMissing { source: source() };
        }
        _ => {}
    }
    match err.code() {
        Some("WRONGTYPE") => StoreError::ForeignValue { source: source() },
        // The script's own arithmetic on a field that holds no number.
        Some("ERR") if err.to_string().contains("attempt to perform arithmetic") => {
            StoreError::ForeignValue { source: source() }
        }
        Some("NOREPLICAS") => unavailable(Unavailable::NoReplicas),
        Some("READONLY") => StoreError::MasterChanged { source: source() },
        Some("LOADING") => unavailable(Unavailable::Loading),
        Some("MASTERDOWN") => unavailable(Unavailable::NoConnection(err.to_string())),
        _ if err.is_timeout() => StoreError::Timeout {
            after_ms: timeout.as_millis() as u64,
            source: Some(source()),
        },
        _ if err.is_io_error() || err.is_connection_refusal() || err.is_unrecoverable_error() => {
            unavailable(Unavailable::NoConnection(err.to_string()))
        }
        _ => StoreError::Other { source: source() },
    }
}

/// Sorts a Redis Cluster failure into what the service does about it: the cluster's own
/// refusals are [`Unavailable::ClusterDown`], the rest as in the other modes.
pub fn classify_in_cluster(err: &RedisError, timeout: Duration) -> StoreError {
    let unavailable = |cause| StoreError::Unavailable {
        cause,
        source: Some(Box::new(err.clone())),
    };
    match err.kind() {
        ErrorKind::Server(
            ServerErrorKind::ClusterDown
            | ServerErrorKind::TryAgain
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        ) => unavailable(Unavailable::ClusterDown(err.to_string())),
        ErrorKind::ClusterConnectionNotFound => {
            unavailable(Unavailable::NoConnection(err.to_string()))
        }
        _ => classify(err, timeout),
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(250);

    fn server(kind: ServerErrorKind, text: &'static str) -> RedisError {
        RedisError::from((ErrorKind::Server(kind), text))
    }

    /// The Redis error a [`StoreError`] was made from, read back through its source.
    fn redis_source(error: &StoreError) -> Option<&RedisError> {
        error.source()?.downcast_ref::<RedisError>()
    }

    #[test]
    fn a_missing_script_is_counted_apart_and_sends_nobody_looking_for_a_new_master() {
        let error = classify(&server(ServerErrorKind::NoScript, "NOSCRIPT"), TIMEOUT);
        assert_eq!(error.kind(), "noscript");
        assert!(!error.suggests_master_change());
        assert!(
            error.to_string().starts_with("unexpected answer: "),
            "{error}"
        );
    }

    #[test]
    fn a_replica_is_told_apart_and_keeps_the_redis_error_as_the_source() {
        let error = classify(&server(ServerErrorKind::ReadOnly, "READONLY"), TIMEOUT);
        assert_eq!(error.kind(), "readonly");
        assert_eq!(
            error.to_string(),
            "the node is a read-only replica (READONLY)"
        );
        let source = redis_source(&error).expect("the Redis error is the source");
        assert_eq!(source.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly));
    }

    #[test]
    fn arithmetic_on_a_field_that_holds_no_number_is_a_foreign_value() {
        let err = server(
            ServerErrorKind::ResponseError,
            "attempt to perform arithmetic on a string value",
        );
        let error = classify(&err, TIMEOUT);
        assert_eq!(error.kind(), "wrongtype");
        assert!(!error.suggests_master_change());
        assert!(
            error
                .to_string()
                .starts_with("a bucket key holds a value that is not a bucket"),
            "{error}"
        );
    }

    #[test]
    fn a_timeout_names_the_configured_bound() {
        let err = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let error = classify(&err, TIMEOUT);
        assert_eq!(error.kind(), "timeout");
        assert_eq!(error.to_string(), "timed out after 250 ms");
        assert!(redis_source(&error).is_some());
    }

    #[test]
    fn the_clusters_own_refusals_mean_the_cluster_cannot_serve_the_slot() {
        for kind in [ServerErrorKind::ClusterDown, ServerErrorKind::TryAgain] {
            let error = classify_in_cluster(&server(kind, "refused"), TIMEOUT);
            assert_eq!(error.kind(), "clusterdown");
            assert!(
                error
                    .to_string()
                    .starts_with("Redis Cluster cannot serve the slot: "),
                "{error}"
            );
        }
        let readonly = classify_in_cluster(&server(ServerErrorKind::ReadOnly, "r"), TIMEOUT);
        assert_eq!(
            readonly.kind(),
            "readonly",
            "the rest as in the other modes"
        );
    }
}

//! What the limiter says about one request: a [`Verdict`], and per limit that applied a
//! [`LimitVerdict`]. Every front renders these (HTTP statuses and headers, the decision
//! API's body); none of them decides anything itself.

use crate::bucket::{Level, Limit};

/// Which part of the system decided, as `X-RateLimit-Source` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The shared store.
    Redis,
    /// This process: the embedded store, or the fallback while Redis cannot decide.
    Local,
    /// Redis could not decide and `FAIL_MODE=open` admitted the request.
    Open,
    /// Redis could not decide and `FAIL_MODE=closed` refused the request.
    Closed,
}

impl Source {
    pub const ALL: [Source; 4] = [Source::Redis, Source::Local, Source::Open, Source::Closed];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Redis => "redis",
            Source::Local => "local",
            Source::Open => "open",
            Source::Closed => "closed",
        }
    }
}

/// Which bucket answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// The shared store (Redis), directly or through its cached denial.
    Shared,
    /// This process's memory: the embedded store, or the fallback's share.
    Local,
}

/// Which limit of which policy, as headers, bodies and metrics name it. The names are the
/// policy set's own, shared rather than copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitName<'a> {
    pub policy: &'a std::sync::Arc<str>,
    pub limit: &'a std::sync::Arc<str>,
}

/// One limit's part in a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitVerdict<'a> {
    pub name: LimitName<'a>,
    /// The limit it was decided under: the configured one, or its share in the fallback.
    pub limit: Limit,
    /// False for a shadow policy's limit: counted, never refusing, never in the headers.
    pub enforced: bool,
    /// The bucket after the request; `None` when no bucket could be asked
    /// ([`Verdict::Open`], [`Verdict::Closed`]).
    pub level: Option<Level>,
}

impl LimitVerdict<'_> {
    /// Whether this limit's bucket was asked and lacked the tokens.
    pub fn lacked(&self) -> bool {
        self.level.is_some_and(|level| !level.allowed)
    }
}

/// What happens to one request. Each variant carries exactly what its answer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// No policy applies: admitted, nothing counted.
    Unlimited,
    /// Buckets decided: admitted when every enforced limit had the tokens. Every limit
    /// has its level.
    Decided {
        bucket: Bucket,
        admitted: bool,
        limits: Vec<LimitVerdict<'a>>,
    },
    /// No store could decide and `FAIL_MODE=open` admitted the request.
    Open { limits: Vec<LimitVerdict<'a>> },
    /// No store could decide and `FAIL_MODE=closed` refused it.
    Closed { limits: Vec<LimitVerdict<'a>> },
}

impl<'a> Verdict<'a> {
    pub fn allowed(&self) -> bool {
        match self {
            Verdict::Unlimited | Verdict::Open { .. } => true,
            Verdict::Decided { admitted, .. } => *admitted,
            Verdict::Closed { .. } => false,
        }
    }

    /// What decided, for `X-RateLimit-Source`; `None` when nothing had to.
    pub fn source(&self) -> Option<Source> {
        match self {
            Verdict::Unlimited => None,
            Verdict::Decided {
                bucket: Bucket::Shared,
                ..
            } => Some(Source::Redis),
            Verdict::Decided {
                bucket: Bucket::Local,
                ..
            } => Some(Source::Local),
            Verdict::Open { .. } => Some(Source::Open),
            Verdict::Closed { .. } => Some(Source::Closed),
        }
    }

    /// Every limit that applied, in order.
    pub fn limits(&self) -> &[LimitVerdict<'a>] {
        match self {
            Verdict::Unlimited => &[],
            Verdict::Decided { limits, .. }
            | Verdict::Open { limits }
            | Verdict::Closed { limits } => limits,
        }
    }

    /// For a denial: when every enforced limit that lacked tokens has them again.
    pub fn retry_after_us(&self) -> u64 {
        match self {
            Verdict::Decided {
                admitted: false,
                limits,
                ..
            } => limits
                .iter()
                .filter(|limit| limit.enforced)
                .filter_map(|limit| limit.level)
                .map(|level| level.retry_after_us)
                .max()
                .unwrap_or(0),
            _ => 0,
        }
    }

    /// The enforced limits that lacked tokens, in order (the problem body's
    /// `violated-policies`).
    pub fn violated(&self) -> impl Iterator<Item = LimitName<'a>> + '_ {
        self.limits()
            .iter()
            .filter(|limit| limit.enforced && limit.lacked())
            .map(|limit| limit.name)
    }
}

//! Logging: env_logger with a timestamp, level, module and instance name on every line.
//! `RUST_LOG` works as usual; the default is `info`.
//!
//! No thread that serves requests writes to stderr: env_logger formats each line where it
//! is logged and hands it to a bounded queue (tracing-appender's non-blocking writer),
//! and one thread of its own, `log-writer`, writes the queue to stderr. When stderr is
//! slow or stuck (a pipe nobody drains, a stalled log collector), the queue fills up to
//! `LOG_QUEUE_LINES` and further lines are dropped and counted ([`dropped_lines`], the
//! metric `ratelimit_log_lines_dropped_total`) instead of stalling the worker that
//! logged them: an access log line per request must never cost the request.

use std::io::Write;
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// The drop count of the process's one logger. A static, unlike the metrics, because the
/// logger it belongs to is one per process too (`log` has a single global logger).
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The writer thread. Dropping it (at the end of `main`) writes what is still queued,
/// waiting about a second at most, so that an exit never hangs on a stuck stderr.
#[must_use = "dropping it stops the writer thread: keep it until the process ends"]
pub struct LogWriter {
    _guard: WorkerGuard,
}

/// Installs the logger; `queue_lines` is `LOG_QUEUE_LINES`. Only the first call in a
/// process installs anything.
pub fn init(instance: &str, queue_lines: usize) -> LogWriter {
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(queue_lines)
        .lossy(true)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let instance = instance.to_string();
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Pipe(Box::new(writer)))
        .format(move |buf, record| {
            writeln!(
                buf,
                "{} {:<5} {} [{}] {}",
                buf.timestamp_millis(),
                record.level(),
                record.module_path().unwrap_or("-"),
                instance,
                record.args()
            )
        })
        .try_init();
    LogWriter { _guard: guard }
}

/// Lines dropped since start because the queue was full; 0 before [`init`].
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

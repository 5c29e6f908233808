//! Logging: env_logger with a timestamp, level, module and instance name on every line.
//! `RUST_LOG` works as usual; the default is `info`.
//!
//! This module owns the process's one logging stack (`log` + env_logger) and the queue
//! between it and stderr. No thread that serves requests writes to stderr: env_logger
//! formats each line where it is logged and hands it to a bounded queue ([`QueueWriter`],
//! std's `sync_channel`), and one thread of its own, `log-writer`, writes the queue to
//! stderr. When stderr is slow or stuck (a pipe nobody drains, a stalled log collector),
//! the queue fills up to `LOG_QUEUE_LINES` and further lines are dropped and counted
//! ([`dropped_lines`], the metric `ratelimit_log_lines_dropped_total`) instead of stalling
//! the worker that logged them: an access log line per request must never cost the
//! request.
//!
//! The queue is ours rather than a crate's so that logging needs nothing past env_logger:
//! a second stack (tracing-appender, with tracing-subscriber behind it) only to move
//! bytes between two threads was more code to build and audit than this file.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The drop count of the process's one logger. A static, unlike the metrics, because the
/// logger it belongs to is one per process too (`log` has a single global logger).
static DROPPED: OnceLock<Arc<AtomicU64>> = OnceLock::new();

/// How long dropping [`LogWriter`] waits for the queue to reach stderr: long enough for
/// a healthy stderr to take thousands of lines, short enough that a stuck one cannot
/// hold up an exit.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// The writer thread. Dropping it (at the end of `main`) writes what is still queued,
/// waiting about a second at most, so that an exit never hangs on a stuck stderr.
#[must_use = "dropping it stops the writer thread: keep it until the process ends"]
pub struct LogWriter {
    // `None` when another call (or another logger) had already installed one: only the
    // first call in a process owns a writer thread.
    _writer: Option<Writer>,
}

/// Installs the logger; `queue_lines` is `LOG_QUEUE_LINES`. Only the first call in a
/// process installs anything.
pub fn init(instance: &str, queue_lines: usize) -> LogWriter {
    let (pipe, lines) = queue(queue_lines);
    let dropped = Arc::clone(&pipe.dropped);
    let instance = instance.to_string();
    let installed =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .target(env_logger::Target::Pipe(Box::new(pipe)))
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
            .try_init()
            .is_ok();
    if !installed {
        return LogWriter { _writer: None };
    }
    let _ = DROPPED.set(dropped);
    // Lines logged before the thread starts wait in the queue; nothing is lost meanwhile.
    let writer = lines
        .spawn(io::stderr(), FLUSH_WAIT)
        .expect("cannot start the log-writer thread");
    LogWriter {
        _writer: Some(writer),
    }
}

/// Lines dropped since start because the queue was full; 0 before [`init`].
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |dropped| dropped.load(Ordering::Relaxed))
}

enum Msg {
    Line(Vec<u8>),
    /// Sent when [`Writer`] is dropped: the writer thread stops once it has written every
    /// line queued before it. A message rather than a closed channel, because the global
    /// logger keeps its sender for the rest of the process.
    Shutdown,
}

/// A bounded queue: the logger's end is [`QueueWriter`], the thread's end [`Lines`].
fn queue(lines: usize) -> (QueueWriter, Lines) {
    // A queue of 0 would be a rendezvous channel, dropping every line the writer thread
    // is not already waiting for; settings forbid it, and this keeps it usable anyway.
    let (sender, receiver) = mpsc::sync_channel(lines.max(1));
    let pipe = QueueWriter {
        pending: Vec::new(),
        queue: sender.clone(),
        dropped: Arc::new(AtomicU64::new(0)),
    };
    (pipe, Lines { receiver, sender })
}

/// What env_logger writes to. Its `Pipe` target renders a record into a buffer of its
/// own, then calls `write_all` with the whole record and `flush` (under a mutex), so one
/// flush is one record: bytes collect until `flush`, which enqueues them as one line.
/// Enqueueing per `write` would rely on env_logger never splitting a record; enqueueing
/// on flush keeps a record whole and records from different threads apart either way.
struct QueueWriter {
    pending: Vec<u8>,
    queue: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let line = std::mem::take(&mut self.pending);
        // Never `send`: that would block the logging thread, which is the one thing this
        // queue exists to prevent. A full queue (stderr behind) and a closed one (writer
        // stopped) both lose the line, so both are counted.
        match self.queue.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        // An error here would make env_logger report it on stderr, from the logging
        // thread; a dropped line is counted instead.
        Ok(())
    }
}

impl Drop for QueueWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// The writer thread's end of the queue, before the thread starts.
struct Lines {
    receiver: Receiver<Msg>,
    /// For [`Msg::Shutdown`]; a clone of the logger's sender.
    sender: SyncSender<Msg>,
}

impl Lines {
    /// Starts `log-writer`, writing the queue to `sink`. Dropping the returned [`Writer`]
    /// waits up to `wait` for what is queued to be written.
    fn spawn<W: Write + Send + 'static>(self, sink: W, wait: Duration) -> io::Result<Writer> {
        let Lines { receiver, sender } = self;
        let (done_sender, done) = mpsc::channel();
        thread::Builder::new()
            .name("log-writer".to_string())
            .spawn(move || {
                write_lines(receiver, sink);
                let _ = done_sender.send(());
            })?;
        Ok(Writer {
            queue: sender,
            done,
            wait,
        })
    }
}

/// The writer thread's loop: blocks for a line, writes it and whatever else is already
/// queued, flushes once per batch, and stops at [`Msg::Shutdown`]. It takes the receiver
/// so that the queue is closed before the thread reports done: from then on a line
/// logged is counted as dropped instead of waiting in a queue nobody reads.
fn write_lines<W: Write>(receiver: Receiver<Msg>, mut sink: W) {
    // Write errors are ignored: stderr is where they would be reported, and a line
    // that cannot be written is no reason to stop writing the next.
    while let Ok(mut msg) = receiver.recv() {
        loop {
            match msg {
                Msg::Line(line) => {
                    let _ = sink.write_all(&line);
                }
                Msg::Shutdown => {
                    let _ = sink.flush();
                    return;
                }
            }
            msg = match receiver.try_recv() {
                Ok(next) => next,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            };
        }
        let _ = sink.flush();
    }
}

/// The running `log-writer` thread, as [`LogWriter`] holds it.
struct Writer {
    queue: SyncSender<Msg>,
    /// Closed or sent to when the thread has written everything up to the shutdown.
    done: Receiver<()>,
    wait: Duration,
}

impl Drop for Writer {
    fn drop(&mut self) {
        let deadline = Instant::now() + self.wait;
        // A blocking `send` could wait forever for room in a queue that a stuck sink never
        // drains, so the shutdown is offered until the deadline instead. This polls, but
        // only at exit and only while the queue is full.
        loop {
            match self.queue.try_send(Msg::Shutdown) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(_)) => {
                    if Instant::now() >= deadline {
                        return;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
        // A thread still stuck at the deadline is left behind; the process is ending.
        match self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(()) | Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<Vec<u8>>>);

    impl Recorded {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    impl Write for Recorded {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A sink that holds every write until the test lets it through, and says when the
    /// writer thread is inside one: a stderr nobody reads, made deterministic.
    struct Gated {
        entered: SyncSender<()>,
        gate: Receiver<()>,
        open: bool,
        out: Recorded,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if !self.open {
                let _ = self.entered.try_send(());
                // Released by a message or by the test dropping its sender.
                if self.gate.recv().is_err() {
                    self.open = true;
                }
            }
            self.out.write(buf)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A gated sink and the test's handles: `entered` fires on the first held write,
    /// dropping `release` opens the gate for good.
    fn gated() -> (Gated, Receiver<()>, SyncSender<()>, Recorded) {
        let (entered_sender, entered) = mpsc::sync_channel(1);
        let (release, gate) = mpsc::sync_channel(0);
        let out = Recorded::default();
        let sink = Gated {
            entered: entered_sender,
            gate,
            open: false,
            out: out.clone(),
        };
        (sink, entered, release, out)
    }

    /// One record as env_logger writes it: the whole record at once, then a flush.
    /// A queue of two lines, and a writer held inside its write of `first` until `release`
    /// is dropped; dropped, the writer waits `wait` for its sink.
    fn held_in_a_write(
        first: &str,
        wait: Duration,
    ) -> (QueueWriter, Writer, SyncSender<()>, Recorded) {
        let (mut pipe, lines) = queue(2);
        let (sink, entered, release, out) = gated();
        let writer = lines.spawn(sink, wait).unwrap();
        log(&mut pipe, first);
        entered.recv_timeout(Duration::from_secs(5)).unwrap();
        (pipe, writer, release, out)
    }

    fn log(pipe: &mut QueueWriter, line: &str) {
        pipe.write_all(format!("{line}\n").as_bytes()).unwrap();
        pipe.flush().unwrap();
    }

    #[test]
    fn records_arrive_whole_and_in_order_from_many_threads() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 200;
        let (pipe, lines) = queue(THREADS * PER_THREAD);
        let out = Recorded::default();
        let writer = lines.spawn(out.clone(), Duration::from_secs(5)).unwrap();
        // env_logger holds its pipe behind a mutex; a record written in pieces must still
        // come out as one line.
        let pipe = Arc::new(Mutex::new(pipe));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let pipe = Arc::clone(&pipe);
                thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let mut pipe = pipe.lock().unwrap();
                        pipe.write_all(format!("thread {t} ").as_bytes()).unwrap();
                        pipe.write_all(format!("line {i}").as_bytes()).unwrap();
                        pipe.write_all(b" end\n").unwrap();
                        pipe.flush().unwrap();
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        let dropped = Arc::clone(&pipe.lock().unwrap().dropped);
        drop(writer);

        let lines = out.lines();
        assert_eq!(lines.len(), THREADS * PER_THREAD, "{lines:?}");
        let mut next = [0usize; THREADS];
        for line in &lines {
            let words: Vec<&str> = line.split(' ').collect();
            assert!(
                matches!(words[..], ["thread", _, "line", _, "end"]),
                "torn line: {line:?}"
            );
            let t: usize = words[1].parse().unwrap();
            let i: usize = words[3].parse().unwrap();
            assert_eq!(i, next[t], "thread {t} out of order at {line:?}");
            next[t] += 1;
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn bytes_without_a_flush_are_not_a_line_yet() {
        let (mut pipe, lines) = queue(4);
        pipe.write_all(b"half of a rec").unwrap();
        assert!(matches!(
            lines.receiver.try_recv(),
            Err(TryRecvError::Empty)
        ));
        pipe.write_all(b"ord\n").unwrap();
        pipe.flush().unwrap();
        match lines.receiver.try_recv() {
            Ok(Msg::Line(line)) => assert_eq!(line, b"half of a record\n"),
            _ => panic!("expected one whole line"),
        }
        // A flush with nothing written enqueues nothing.
        pipe.flush().unwrap();
        assert!(matches!(
            lines.receiver.try_recv(),
            Err(TryRecvError::Empty)
        ));
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_the_rest_is_written_at_drop() {
        // The writer takes line 0 and is held inside its write: the queue is empty again.
        let (mut pipe, writer, release, out) = held_in_a_write("line 0", Duration::from_secs(5));
        // Two fit, three do not.
        for i in 1..=5 {
            log(&mut pipe, &format!("line {i}"));
        }
        assert_eq!(pipe.dropped.load(Ordering::Relaxed), 3);

        drop(release);
        drop(writer);
        assert_eq!(out.lines(), ["line 0", "line 1", "line 2"]);

        // After the writer has stopped, a line has nowhere to go and is counted too.
        log(&mut pipe, "late");
        assert_eq!(pipe.dropped.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn dropping_the_writer_gives_up_on_a_stuck_sink() {
        let (mut pipe, writer, release, _out) =
            held_in_a_write("stuck", Duration::from_millis(300));
        // A full queue: not even the shutdown message fits.
        log(&mut pipe, "queued 1");
        log(&mut pipe, "queued 2");

        // Dropped on a thread of its own, so that a drop that hangs fails the test
        // instead of hanging it.
        let (dropped, returned) = mpsc::channel();
        let started = Instant::now();
        thread::spawn(move || {
            drop(writer);
            let _ = dropped.send(started.elapsed());
        });
        let took = returned.recv_timeout(Duration::from_secs(5));
        // The sink stays stuck until here.
        drop(release);
        let took = took.expect("dropping the writer hung on a stuck sink");
        assert!(took >= Duration::from_millis(300), "drop took {took:?}");
    }

    #[test]
    fn dropping_the_writer_returns_at_once_when_the_queue_is_written() {
        let (mut pipe, lines) = queue(8);
        let out = Recorded::default();
        let writer = lines.spawn(out.clone(), Duration::from_secs(5)).unwrap();
        log(&mut pipe, "only");
        let started = Instant::now();
        drop(writer);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(out.lines(), ["only"]);
    }
}

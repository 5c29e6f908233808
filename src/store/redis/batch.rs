//! Coalescing decisions on one connection: while a call is in flight, the decisions that
//! arrive wait in a queue, and when it completes everything queued (up to a cap) goes as
//! one call. A decision that finds nothing in flight goes at once, alone: a batch never
//! waits for company, so at low load nothing changes, and under load the node reads,
//! dispatches and runs one call where it ran one per decision.
//!
//! [`Batcher`] knows nothing of Redis: a [`Sender`] sends one batch and answers each of its
//! requests, and the batcher only sees that every caller gets the answer to its own
//! request, or [`Unanswered`] if the call that carried it ended without one (a sender that
//! panicked, a runtime shutting down); never nothing. A lone request is sent by its own
//! caller, as it would be without a queue; the calls of queued requests are sent by a task
//! of their own, so that no caller's lifetime decides whether they complete, and bounded
//! in time, since no caller's deadline drops them.

use std::collections::VecDeque;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::oneshot;

/// Sends a batch as one call.
pub trait Sender: Send + Sync + 'static {
    type Request: Send + 'static;
    type Answer: Send + 'static;

    /// Sends `batch` (never empty, in the order the requests came) as one call, and
    /// answers one per request, in the same order. A failure of the whole call is each
    /// request's answer.
    fn send(&self, batch: Vec<Self::Request>) -> impl Future<Output = Vec<Self::Answer>> + Send;
}

/// The call that carried a request ended without answering it.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the call that carried this decision ended without answering it")]
pub struct Unanswered;

/// A queue of requests in front of a [`Sender`], at most one call in flight.
pub struct Batcher<S: Sender> {
    sender: S,
    /// Most requests in one call.
    max: NonZeroUsize,
    /// How long a call of queued requests may take: every request in it was queued before
    /// it went, so by then none of their callers is still waiting (their deadlines are no
    /// longer than this), and a call that hangs would keep the queue behind it waiting.
    queued_call_limit: Duration,
    /// A `std::sync::Mutex`, not an async one: it is held only to push or drain, never
    /// across an await, and the task that sends may run on another thread than the
    /// callers (on a work-stealing runtime).
    queue: Mutex<Queue<S>>,
}

struct Queue<S: Sender> {
    /// Whether a task is sending: it goes on until the queue is empty, so a request queued
    /// while this holds is always sent by it.
    sending: bool,
    waiting: VecDeque<(S::Request, oneshot::Sender<S::Answer>)>,
}

impl<S: Sender> Batcher<S> {
    pub fn new(sender: S, max: NonZeroUsize, queued_call_limit: Duration) -> Arc<Self> {
        Arc::new(Self {
            sender,
            max,
            queued_call_limit,
            queue: Mutex::new(Queue {
                sending: false,
                waiting: VecDeque::new(),
            }),
        })
    }

    pub fn sender(&self) -> &S {
        &self.sender
    }

    /// Answers `request`: at once, in a call of its own sent by this caller, when no call
    /// is in flight (so that at low load nothing is added to a decision's way: no task,
    /// no channel); else in the next call, with the requests that queued behind the call
    /// in flight. Must run within a tokio runtime, on which later calls are sent. A caller
    /// that stops waiting (a timeout) before its request was sent takes it out of the
    /// queue: it is never decided behind its back.
    pub async fn submit(self: &Arc<Self>, request: S::Request) -> Result<S::Answer, Unanswered> {
        let queued = {
            let mut queue = self.lock();
            if queue.sending {
                let (reply, answer) = oneshot::channel();
                queue.waiting.push_back((request, reply));
                Err(answer)
            } else {
                queue.sending = true;
                Ok(request)
            }
        };
        match queued {
            Ok(request) => {
                let _hand_off = HandOff(Arc::clone(self));
                let mut answers = self.sender.send(vec![request]).await;
                answers.pop().ok_or(Unanswered)
            }
            Err(answer) => answer.await.map_err(|_| Unanswered),
        }
    }

    /// Sends what waits, up to the cap at a time, until nothing does.
    async fn send_until_empty(self: Arc<Self>) {
        let mut sending = Sending {
            batcher: &self,
            done: false,
        };
        loop {
            let (requests, replies): (Vec<_>, Vec<_>) = {
                let mut queue = self.lock();
                queue.waiting.retain(|(_, reply)| !reply.is_closed());
                if queue.waiting.is_empty() {
                    queue.sending = false;
                    sending.done = true;
                    return;
                }
                let taken = queue.waiting.len().min(self.max.get());
                queue.waiting.drain(..taken).unzip()
            };
            let call = self.sender.send(requests);
            // A call past its limit answers nothing, and a sender that answers too few
            // leaves the rest of `replies` to be dropped: those callers are told
            // `Unanswered`.
            let answers = tokio::time::timeout(self.queued_call_limit, call).await;
            let answers = answers.unwrap_or_default();
            for (reply, answer) in replies.into_iter().zip(answers) {
                // Its caller may have stopped waiting meanwhile.
                let _ = reply.send(answer);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue<S>> {
        // A panic while holding the lock leaves the queue consistent: every change to it
        // is one call on the VecDeque.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Held by a caller sending its own call: when the call completes, or the caller is
/// dropped at an await, or its sender panicked, whatever queued meanwhile is handed to a
/// task of its own, so that no caller's lifetime decides whether the others are sent.
struct HandOff<S: Sender>(Arc<Batcher<S>>);

impl<S: Sender> Drop for HandOff<S> {
    fn drop(&mut self) {
        let batcher = &self.0;
        let mut queue = batcher.lock();
        if queue.waiting.is_empty() {
            queue.sending = false;
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                drop(queue);
                runtime.spawn(Arc::clone(batcher).send_until_empty());
            }
            // No runtime left to send on (it is shutting down): they are told now.
            Err(_) => {
                queue.sending = false;
                queue.waiting.clear();
            }
        }
    }
}

/// The sending task's mark: if it ends other than by finding the queue empty (its sender
/// panicked, or the runtime dropped it), everyone waiting is told `Unanswered` now rather
/// than never, and the next request is sent as if nothing were in flight.
struct Sending<'a, S: Sender> {
    batcher: &'a Batcher<S>,
    done: bool,
}

impl<S: Sender> Drop for Sending<'_, S> {
    fn drop(&mut self) {
        if !self.done {
            let mut queue = self.batcher.lock();
            queue.sending = false;
            queue.waiting.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    /// A sender that records each batch, answers each request with its number times ten
    /// (or each with the same error), and sends only when the test lets it.
    #[derive(Clone, Default)]
    struct Scripted {
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        /// One permit per call the test lets complete; `None` lets every call complete.
        gate: Option<Arc<Semaphore>>,
        failing: Arc<AtomicBool>,
        /// Answers one fewer than asked.
        short: bool,
        panics: Arc<AtomicBool>,
    }

    impl Scripted {
        fn gated() -> (Self, Arc<Semaphore>) {
            let gate = Arc::new(Semaphore::new(0));
            let sender = Self {
                gate: Some(gate.clone()),
                ..Self::default()
            };
            (sender, gate)
        }

        fn batches(&self) -> Vec<Vec<u32>> {
            self.batches.lock().unwrap().clone()
        }
    }

    impl Sender for Scripted {
        type Request = u32;
        type Answer = Result<u32, String>;

        async fn send(&self, batch: Vec<u32>) -> Vec<Result<u32, String>> {
            self.batches.lock().unwrap().push(batch.clone());
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            assert!(!self.panics.load(Ordering::SeqCst), "the sender panics");
            let mut answers: Vec<_> = if self.failing.load(Ordering::SeqCst) {
                batch.iter().map(|_| Err("node down".to_string())).collect()
            } else {
                batch.iter().map(|n| Ok(n * 10)).collect()
            };
            if self.short {
                answers.pop();
            }
            answers
        }
    }

    /// Longer than any test waits.
    const NO_LIMIT: Duration = Duration::from_secs(60);

    fn cap(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    /// Lets spawned tasks run until `done` holds (bounded: a second).
    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..1_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn a_request_that_finds_nothing_in_flight_is_sent_at_once_and_alone() {
        let (sender, gate) = Scripted::gated();
        let batcher = Batcher::new(sender.clone(), cap(8), NO_LIMIT);

        let waiting = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(1).await }
        });

        until("the call to go out", || sender.batches().len() == 1).await;
        assert_eq!(sender.batches(), [[1]], "sent without waiting for company");
        gate.add_permits(1);
        assert_eq!(waiting.await.unwrap(), Ok(Ok(10)));
    }

    #[tokio::test]
    async fn requests_that_queue_behind_a_call_go_together_in_calls_of_at_most_the_cap() {
        let (sender, gate) = Scripted::gated();
        let batcher = Batcher::new(sender.clone(), cap(3), NO_LIMIT);
        let submit = |n: u32| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.submit(n).await })
        };
        let first = submit(1);
        until("the first call", || sender.batches().len() == 1).await;

        let queued: Vec<_> = (2..=8).map(submit).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(sender.batches().len(), 1, "one call in flight at a time");
        gate.add_permits(100);

        assert_eq!(first.await.unwrap(), Ok(Ok(10)));
        for (n, waiting) in (2..=8).zip(queued) {
            assert_eq!(waiting.await.unwrap(), Ok(Ok(n * 10)), "request {n}");
        }
        assert_eq!(
            sender.batches(),
            vec![vec![1], vec![2, 3, 4], vec![5, 6, 7], vec![8]]
        );
    }

    #[tokio::test]
    async fn every_caller_gets_the_answer_to_its_own_request() {
        let batcher = Batcher::new(Scripted::default(), cap(4), NO_LIMIT);
        let callers: Vec<_> = (0..50)
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move { (n, batcher.submit(n).await) })
            })
            .collect();
        for caller in callers {
            let (n, answer) = caller.await.unwrap();
            assert_eq!(answer, Ok(Ok(n * 10)));
        }
        let sent: usize = batcher.sender().batches().iter().map(Vec::len).sum();
        assert_eq!(sent, 50, "each request sent once");
    }

    #[tokio::test]
    async fn a_failed_call_is_every_one_of_its_requests_answer() {
        let (sender, gate) = Scripted::gated();
        sender.failing.store(true, Ordering::SeqCst);
        let batcher = Batcher::new(sender.clone(), cap(8), NO_LIMIT);
        let callers: Vec<_> = (1..=5)
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.submit(n).await })
            })
            .collect();
        gate.add_permits(100);
        for caller in callers {
            assert_eq!(caller.await.unwrap(), Ok(Err("node down".to_string())));
        }
    }

    #[tokio::test]
    async fn a_request_the_sender_does_not_answer_is_told_so_instead_of_waiting_forever() {
        let sender = Scripted {
            short: true,
            ..Scripted::default()
        };
        let batcher = Batcher::new(sender, cap(8), NO_LIMIT);
        assert_eq!(batcher.submit(1).await, Err(Unanswered));
    }

    #[tokio::test]
    async fn a_sender_that_panics_answers_the_queued_callers_and_the_next_request_is_sent() {
        let (sender, gate) = Scripted::gated();
        let batcher = Batcher::new(sender.clone(), cap(8), NO_LIMIT);
        sender.panics.store(true, Ordering::SeqCst);
        let submit = |n: u32| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.submit(n).await })
        };
        let in_flight = submit(1);
        until("the first call", || sender.batches().len() == 1).await;
        let queued = submit(2);
        tokio::time::sleep(Duration::from_millis(10)).await;
        gate.add_permits(2);
        // A call sent by its own caller panics in that caller, as an unbatched call would.
        assert!(in_flight.await.is_err());
        assert_eq!(queued.await.unwrap(), Err(Unanswered));

        sender.panics.store(false, Ordering::SeqCst);
        gate.add_permits(1);
        assert_eq!(batcher.submit(3).await, Ok(Ok(30)));
    }

    #[tokio::test]
    async fn a_caller_dropped_during_its_own_call_leaves_the_queued_ones_to_be_sent() {
        let (sender, gate) = Scripted::gated();
        let batcher = Batcher::new(sender.clone(), cap(8), NO_LIMIT);
        let submit = |n: u32| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.submit(n).await })
        };
        let dropped = submit(1);
        until("the first call", || sender.batches().len() == 1).await;
        let queued = submit(2);
        tokio::time::sleep(Duration::from_millis(10)).await;

        dropped.abort();
        gate.add_permits(1);

        assert_eq!(queued.await.unwrap(), Ok(Ok(20)));
        assert_eq!(sender.batches(), vec![vec![1], vec![2]]);
        gate.add_permits(1);
        assert_eq!(
            batcher.submit(3).await,
            Ok(Ok(30)),
            "nothing left in flight"
        );
    }

    #[tokio::test]
    async fn a_call_of_queued_requests_that_hangs_is_given_up_after_its_limit() {
        let (sender, gate) = Scripted::gated();
        let batcher = Batcher::new(sender.clone(), cap(8), Duration::from_millis(50));
        let in_flight = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(1).await }
        });
        until("the first call", || sender.batches().len() == 1).await;
        let queued = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(2).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The first call completes; the queued one is sent and never answered.
        gate.add_permits(1);
        assert_eq!(in_flight.await.unwrap(), Ok(Ok(10)));
        let told = tokio::time::timeout(Duration::from_secs(1), queued).await;
        let told = told.expect("told within a second, not left waiting");
        assert_eq!(told.unwrap(), Err(Unanswered));

        gate.add_permits(1);
        assert_eq!(batcher.submit(3).await, Ok(Ok(30)), "the queue goes on");
        assert_eq!(sender.batches(), vec![vec![1], vec![2], vec![3]]);
    }

    #[tokio::test]
    async fn a_caller_that_gave_up_while_queued_is_never_sent() {
        let (sender, gate) = Scripted::gated();
        let batcher = Batcher::new(sender.clone(), cap(8), NO_LIMIT);
        let in_flight = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(1).await }
        });
        until("the first call", || sender.batches().len() == 1).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(10), batcher.submit(2)).await;
        assert!(gave_up.is_err());
        let kept = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(3).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        gate.add_permits(2);

        assert_eq!(in_flight.await.unwrap(), Ok(Ok(10)));
        assert_eq!(kept.await.unwrap(), Ok(Ok(30)));
        assert_eq!(sender.batches(), vec![vec![1], vec![3]]);
    }
}

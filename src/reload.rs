//! Keeps a configuration file's parsed value current while the service runs: on `SIGHUP`,
//! and when the file's content changes (checked every poll; a change is applied once the
//! content has held still for one more check, so a file caught mid-write is not read, and
//! an editor's rename-and-replace is seen like any other change).
//!
//! A valid file replaces the active value atomically between requests; an invalid one
//! keeps the last good value and logs each problem. What "valid" means is the parser's
//! business: this module only watches, parses and swaps.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;

/// How a reload ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// A new value is active.
    Applied,
    /// The file did not parse; the last good value stays.
    Rejected,
    /// The file could not be read; the last good value stays.
    Unreadable,
}

impl Reloaded {
    pub fn as_str(self) -> &'static str {
        match self {
            Reloaded::Applied => "applied",
            Reloaded::Rejected => "rejected",
            Reloaded::Unreadable => "unreadable",
        }
    }
}

/// What the watcher calls: parse the text, or list its problems.
pub type Parse<T> = Box<dyn Fn(&str) -> Result<T, Vec<String>> + Send>;

/// Called after every reload attempt with its result and, when applied, the new value.
pub type Observe<T> = Box<dyn Fn(Reloaded, Option<&T>) + Send>;

pub struct WatchSettings<T> {
    pub path: PathBuf,
    /// How often the file is checked for a change.
    pub poll: Duration,
    pub parse: Parse<T>,
    pub observe: Observe<T>,
}

/// The running watcher; dropping it stops its thread.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    wake: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Watches `settings.path`, swapping each valid new value into `active`, whose current
    /// value came from `loaded_text`. `SIGHUP` makes it reload at once.
    pub fn start<T: Send + Sync + 'static>(
        settings: WatchSettings<T>,
        active: Arc<ArcSwap<T>>,
        loaded_text: String,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, woken) = mpsc::channel();
        let hangups = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
        let handle = hangups.handle();
        let hup_wake = wake.clone();
        std::thread::Builder::new()
            .name("sighup".into())
            .spawn(move || {
                let mut hangups = hangups;
                for _ in hangups.forever() {
                    if hup_wake.send(()).is_err() {
                        break;
                    }
                }
            })?;
        let thread_stop = stop.clone();
        let state = Mutex::new(Watching {
            settings,
            active,
            applied_text: loaded_text,
            pending_text: None,
        });
        let thread = std::thread::Builder::new()
            .name("policy-reload".into())
            .spawn(move || {
                let poll = state.lock().map(|s| s.settings.poll).unwrap_or_default();
                while !thread_stop.load(Ordering::Acquire) {
                    let forced = match woken.recv_timeout(poll) {
                        Ok(()) => true,
                        Err(RecvTimeoutError::Timeout) => false,
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    if thread_stop.load(Ordering::Acquire) {
                        break;
                    }
                    if let Ok(mut watching) = state.lock() {
                        watching.check(forced);
                    }
                }
                handle.close();
            })?;
        Ok(Self {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Asks for a reload now, as `SIGHUP` does.
    pub fn reload_now(&self) {
        let _ = self.wake.send(());
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Watching<T> {
    settings: WatchSettings<T>,
    active: Arc<ArcSwap<T>>,
    /// The text of the active value.
    applied_text: String,
    /// A changed text seen at the last check, applied once it reads the same again.
    pending_text: Option<String>,
}

impl<T> Watching<T> {
    /// One check: a forced one (SIGHUP) applies whatever the file says now; a poll applies
    /// a change once it has held still for one more poll.
    fn check(&mut self, forced: bool) {
        let path = &self.settings.path;
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) => {
                if forced || self.pending_text.is_none() {
                    log::warn!(
                        "cannot read {}: {err}; keeping the active policies",
                        path.display()
                    );
                    (self.settings.observe)(Reloaded::Unreadable, None);
                }
                // Remember the failure so a missing file is reported once, not every poll.
                self.pending_text = Some(String::new());
                return;
            }
        };
        let settled = forced || self.pending_text.as_deref() == Some(text.as_str());
        if text == self.applied_text && !forced {
            self.pending_text = None;
            return;
        }
        if !settled {
            self.pending_text = Some(text);
            return;
        }
        self.pending_text = None;
        match (self.settings.parse)(&text) {
            Ok(value) => {
                let value = Arc::new(value);
                self.active.store(value.clone());
                self.applied_text = text;
                log::info!("reloaded {}", path.display());
                (self.settings.observe)(Reloaded::Applied, Some(&value));
            }
            Err(problems) => {
                for problem in &problems {
                    log::error!("{problem}");
                }
                log::warn!(
                    "{} is invalid ({} problems); keeping the active policies",
                    path.display(),
                    problems.len()
                );
                // A rejected text is not tried again until it changes or SIGHUP asks.
                self.applied_text = text;
                (self.settings.observe)(Reloaded::Rejected, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A watcher on a file holding a number; "bad" text does not parse.
    struct Watched {
        path: PathBuf,
        active: Arc<ArcSwap<u64>>,
        seen: Arc<Mutex<Vec<Reloaded>>>,
        _watcher: Watcher,
    }

    fn watch(dir: &tempfile::TempDir) -> Watched {
        let path = dir.path().join("value");
        std::fs::write(&path, "1").unwrap();
        let active = Arc::new(ArcSwap::from_pointee(1u64));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let observed = seen.clone();
        let watcher = Watcher::start(
            WatchSettings {
                path: path.clone(),
                poll: Duration::from_millis(20),
                parse: Box::new(|text| text.trim().parse::<u64>().map_err(|e| vec![e.to_string()])),
                observe: Box::new(move |result, _| observed.lock().unwrap().push(result)),
            },
            active.clone(),
            "1".into(),
        )
        .unwrap();
        Watched {
            path,
            active,
            seen,
            _watcher: watcher,
        }
    }

    #[test]
    fn a_changed_file_replaces_the_value_and_an_invalid_one_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let watched = watch(&dir);
        let (path, active, seen) = (&watched.path, &watched.active, &watched.seen);
        std::fs::write(path, "2").unwrap();
        wait_for("the new value", || **active.load() == 2);
        std::fs::write(path, "bad").unwrap();
        wait_for("the rejection", || {
            seen.lock().unwrap().contains(&Reloaded::Rejected)
        });
        assert_eq!(**active.load(), 2);
    }

    #[test]
    fn a_file_replaced_by_rename_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let watched = watch(&dir);
        let (path, active) = (&watched.path, &watched.active);
        let staged = dir.path().join("value.new");
        std::fs::write(&staged, "3").unwrap();
        std::fs::rename(&staged, path).unwrap();
        wait_for("the renamed-in value", || **active.load() == 3);
    }

    #[test]
    fn a_reload_on_request_applies_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("value");
        std::fs::write(&path, "1").unwrap();
        let active = Arc::new(ArcSwap::from_pointee(1u64));
        let watcher = Watcher::start(
            WatchSettings {
                path: path.clone(),
                // Far longer than the test: only the explicit reload can apply the change.
                poll: Duration::from_secs(3600),
                parse: Box::new(|text| text.trim().parse::<u64>().map_err(|e| vec![e.to_string()])),
                observe: Box::new(|_, _| {}),
            },
            active.clone(),
            "1".into(),
        )
        .unwrap();
        std::fs::write(&path, "4").unwrap();
        watcher.reload_now();
        wait_for("the forced reload", || **active.load() == 4);
    }
}

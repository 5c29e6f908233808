//! Keeps a configuration's parsed value current while the service runs: on `SIGHUP`, and
//! when what it reads changes (checked every poll; a change is applied once it has held
//! still for one more check, so a file caught mid-write is not read, and an editor's
//! rename-and-replace is seen like any other change).
//!
//! What is read is the caller's: one file's text (`POLICY_FILE`), or the names and texts of
//! a folder's files (`RLS_CONFIG`). A valid read replaces the active value atomically
//! between requests; an invalid one keeps the last good value and logs each problem. What
//! "valid" means is the parser's business: this module only watches, parses and swaps.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;

/// Runs `on_signal` on a thread named `thread` at each of `signals` that arrives, until
/// it answers `false` or the handle returned is closed.
pub(crate) fn on_signals(
    signals: &[std::ffi::c_int],
    thread: &str,
    mut on_signal: impl FnMut() -> bool + Send + 'static,
) -> std::io::Result<signal_hook::iterator::Handle> {
    let mut arrivals = signal_hook::iterator::Signals::new(signals)?;
    let handle = arrivals.handle();
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            for _ in arrivals.forever() {
                if !on_signal() {
                    break;
                }
            }
        })?;
    Ok(handle)
}

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
    pub const ALL: [Reloaded; 3] = [Reloaded::Applied, Reloaded::Rejected, Reloaded::Unreadable];

    pub fn as_str(self) -> &'static str {
        match self {
            Reloaded::Applied => "applied",
            Reloaded::Rejected => "rejected",
            Reloaded::Unreadable => "unreadable",
        }
    }
}

/// What the watcher reads at each check: a snapshot compared with the last one, or why it
/// could not be read.
pub type Read<S> = Box<dyn Fn() -> Result<S, String> + Send>;

/// What the watcher calls on a changed snapshot: parse it, or list its problems.
pub type Parse<T, S> = Box<dyn Fn(&S) -> Result<T, Vec<String>> + Send>;

/// Called after every reload attempt with its result and, when applied, the new value.
pub type Observe<T> = Box<dyn Fn(Reloaded, Option<&T>) + Send>;

/// What to watch and how; `S` is the snapshot read at each check.
pub struct WatchSettings<T, S = String> {
    /// What the value is, as the logs say it ("policies").
    pub name: &'static str,
    /// The watching thread's name.
    pub thread: &'static str,
    /// The file or folder read, as the logs name it.
    pub path: PathBuf,
    /// How often the file is checked for a change.
    pub poll: Duration,
    pub read: Read<S>,
    pub parse: Parse<T, S>,
    pub observe: Observe<T>,
}

/// [`WatchSettings::read`] for one file: its text.
pub fn read_text(path: PathBuf) -> Read<String> {
    Box::new(move || std::fs::read_to_string(&path).map_err(|err| err.to_string()))
}

/// The running watcher; dropping it stops its thread.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    wake: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Watches what `settings.read` reads, swapping each valid new value into `active`,
    /// whose current value was parsed from `loaded`. `SIGHUP` makes it reload at once.
    pub fn start<T, S>(
        settings: WatchSettings<T, S>,
        active: Arc<ArcSwap<T>>,
        loaded: S,
    ) -> std::io::Result<Self>
    where
        T: Send + Sync + 'static,
        S: PartialEq + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, woken) = mpsc::channel();
        let hup_wake = wake.clone();
        let handle = on_signals(&[signal_hook::consts::SIGHUP], "sighup", move || {
            hup_wake.send(()).is_ok()
        })?;
        let thread_stop = stop.clone();
        let poll = settings.poll;
        let thread_name = settings.thread;
        let mut watching = Watching {
            settings,
            active,
            applied: loaded,
            pending: None,
        };
        let thread = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Acquire) {
                    let forced = match woken.recv_timeout(poll) {
                        Ok(()) => true,
                        Err(RecvTimeoutError::Timeout) => false,
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    if thread_stop.load(Ordering::Acquire) {
                        break;
                    }
                    watching.check(forced);
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

/// What the last check saw that is not applied yet.
enum Pending<S> {
    /// The read failed (reported once, not at every poll).
    Unreadable,
    /// A snapshot other than the applied one, applied once it reads the same again.
    Changed(S),
}

struct Watching<T, S> {
    settings: WatchSettings<T, S>,
    active: Arc<ArcSwap<T>>,
    /// The snapshot of the active value (or of the last rejected one: it is not tried
    /// again until it changes or `SIGHUP` asks).
    applied: S,
    pending: Option<Pending<S>>,
}

impl<T, S: PartialEq> Watching<T, S> {
    /// One check: a forced one (SIGHUP) applies whatever is read now; a poll applies a
    /// change once it has held still for one more poll.
    fn check(&mut self, forced: bool) {
        let (name, path) = (self.settings.name, &self.settings.path);
        let snapshot = match (self.settings.read)() {
            Ok(snapshot) => snapshot,
            Err(err) => {
                if forced || self.pending.is_none() {
                    log::warn!(
                        "cannot read {}: {err}; keeping the active {name}",
                        path.display()
                    );
                    (self.settings.observe)(Reloaded::Unreadable, None);
                }
                self.pending = Some(Pending::Unreadable);
                return;
            }
        };
        let settled =
            forced || matches!(&self.pending, Some(Pending::Changed(seen)) if *seen == snapshot);
        if snapshot == self.applied && !forced {
            self.pending = None;
            return;
        }
        if !settled {
            self.pending = Some(Pending::Changed(snapshot));
            return;
        }
        self.pending = None;
        match (self.settings.parse)(&snapshot) {
            Ok(value) => {
                let value = Arc::new(value);
                self.active.store(value.clone());
                self.applied = snapshot;
                log::info!("reloaded {}", path.display());
                (self.settings.observe)(Reloaded::Applied, Some(&value));
            }
            Err(problems) => {
                for problem in &problems {
                    log::error!("{problem}");
                }
                log::warn!(
                    "{} is invalid ({} problems); keeping the active {name}",
                    path.display(),
                    problems.len()
                );
                self.applied = snapshot;
                (self.settings.observe)(Reloaded::Rejected, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
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
                name: "value",
                thread: "value-reload",
                path: path.clone(),
                poll: Duration::from_millis(20),
                read: read_text(path.clone()),
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
                name: "value",
                thread: "value-reload",
                path: path.clone(),
                read: read_text(path.clone()),
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

    #[test]
    fn a_folder_read_as_its_files_is_watched_like_one_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "1").unwrap();
        let folder = dir.path().to_path_buf();
        let read_folder = move || -> Result<Vec<(String, String)>, String> {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(&folder).map_err(|e| e.to_string())? {
                let path = entry.map_err(|e| e.to_string())?.path();
                let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
                files.push((path.display().to_string(), text));
            }
            files.sort();
            Ok(files)
        };
        let loaded = read_folder().unwrap();
        let active = Arc::new(ArcSwap::from_pointee(1u64));
        let _watcher = Watcher::start(
            WatchSettings {
                name: "sum",
                thread: "sum-reload",
                path: dir.path().to_path_buf(),
                poll: Duration::from_millis(20),
                read: Box::new(read_folder),
                parse: Box::new(|files: &Vec<(String, String)>| {
                    files
                        .iter()
                        .map(|(_, text)| text.trim().parse::<u64>())
                        .sum::<Result<u64, _>>()
                        .map_err(|e| vec![e.to_string()])
                }),
                observe: Box::new(|_, _| {}),
            },
            active.clone(),
            loaded,
        )
        .unwrap();
        std::fs::write(dir.path().join("b"), "5").unwrap();
        wait_for("the second file to count", || **active.load() == 6);
    }
}

//! The Unix domain socket the HTTP server listens on (`UNIX_SOCKET`), for an Nginx on the
//! same host: binding it without taking a running instance's, its permissions
//! (`UNIX_SOCKET_MODE`), removing it at stop, and which requests came through it.
//!
//! A file at the path is looked at before binding: a socket nothing listens on is what a
//! stopped or killed instance leaves, and is replaced; a socket something answers on
//! belongs to a running process and stops the start; anything that is not a socket is
//! never removed. (actix's own `bind_uds` removes whatever is at the path.)

use std::any::Any;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use actix_web::HttpRequest;
use actix_web::dev::Extensions;
use thiserror::Error;

use crate::identity::Peer;

/// Where and how to listen: `UNIX_SOCKET` and `UNIX_SOCKET_MODE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    pub path: PathBuf,
    /// Permission bits of the socket file. Connecting needs write permission, so these say
    /// who on the host may be the peer the instance trusts as its proxy.
    pub mode: u32,
}

#[derive(Debug, Error)]
pub enum SocketError {
    #[error(
        "UNIX_SOCKET: a process is listening on {path:?} (another instance?); stop it or choose another path"
    )]
    InUse { path: PathBuf },
    #[error(
        "UNIX_SOCKET: {path:?} exists and is not a socket; it is left as it is: remove it or choose another path"
    )]
    NotASocket { path: PathBuf },
    #[error("UNIX_SOCKET: cannot listen on {path:?}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("UNIX_SOCKET_MODE: cannot give {path:?} the mode {mode:o}: {source}")]
    Mode {
        path: PathBuf,
        mode: u32,
        source: std::io::Error,
    },
}

/// The socket file this instance created; dropped, it removes the file, unless another
/// process has replaced it since.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// What tells the file from a newer one at the path: a new file may get the inode of
    /// one just removed, not its change time too.
    identity: FileIdentity,
}

/// Device, inode and change time (seconds, nanoseconds) of a file.
type FileIdentity = (u64, u64, i64, i64);

fn identity_of(meta: &std::fs::Metadata) -> FileIdentity {
    (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let still_ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| identity_of(&meta) == self.identity);
        if still_ours && let Err(err) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove the socket {:?}: {err}", self.path);
        }
    }
}

/// Binds `socket`, replacing a stale socket file, and gives it its mode.
pub fn bind(socket: &UnixSocket) -> Result<(UnixListener, SocketFile), SocketError> {
    let path = &socket.path;
    clear_stale(path)?;
    let bind_error = |source| SocketError::Bind {
        path: path.clone(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    let identity = |path: &Path| std::fs::symlink_metadata(path).map(|meta| identity_of(&meta));
    // From here on, a failure drops `file`, which removes the socket.
    let mut file = SocketFile {
        path: path.clone(),
        identity: identity(path).map_err(bind_error)?,
    };
    let mode_error = |source| SocketError::Mode {
        path: path.clone(),
        mode: socket.mode,
        source,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket.mode))
        .map_err(mode_error)?;
    // Setting the mode changed the change time.
    file.identity = identity(path).map_err(mode_error)?;
    Ok((listener, file))
}

/// Removes a socket at `path` that nothing listens on; refuses one that something does,
/// and anything that is not a socket.
fn clear_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Bind {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_path_buf(),
        }),
        Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
            log::info!("removing the socket {path:?}, which nothing listens on any more");
            std::fs::remove_file(path).map_err(|source| SocketError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(SocketError::Bind {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Marks a connection that came through the socket: actix gives a Unix connection no
/// peer address, and a request must not be taken for one whose address is unknown.
#[derive(Debug, Clone, Copy)]
struct ThroughSocket;

/// actix's `on_connect` hook: runs once per connection, before its first request.
pub fn mark_connection(connection: &dyn Any, data: &mut Extensions) {
    if connection.is::<actix_web::rt::net::UnixStream>() {
        data.insert(ThroughSocket);
    }
}

/// Who is at the other end of `req`'s connection; `None` for a TCP connection whose
/// address the system could not tell.
pub fn peer(req: &HttpRequest) -> Option<Peer> {
    if req.conn_data::<ThroughSocket>().is_some() {
        return Some(Peer::LocalSocket);
    }
    req.peer_addr().map(|addr| Peer::Tcp(addr.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket_in(dir: &tempfile::TempDir) -> UnixSocket {
        UnixSocket {
            path: dir.path().join("http.sock"),
            mode: 0o660,
        }
    }

    #[test]
    fn a_socket_is_bound_with_its_mode_and_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_in(&dir);

        let (listener, file) = bind(&socket).expect("binds");

        let meta = std::fs::symlink_metadata(&socket.path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        drop(listener);
        drop(file);
        assert!(!socket.path.exists());
    }

    #[test]
    fn a_socket_nothing_listens_on_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_in(&dir);
        drop(UnixListener::bind(&socket.path).unwrap());
        assert!(socket.path.exists(), "a closed listener leaves its file");

        let bound = bind(&socket);

        assert!(bound.is_ok(), "{bound:?}");
    }

    #[test]
    fn a_socket_a_process_listens_on_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_in(&dir);
        let _running = UnixListener::bind(&socket.path).unwrap();

        let refused = bind(&socket).unwrap_err();

        assert!(matches!(refused, SocketError::InUse { .. }), "{refused}");
        assert!(
            refused.to_string().starts_with("UNIX_SOCKET: "),
            "{refused}"
        );
        assert!(UnixStream::connect(&socket.path).is_ok(), "still listening");
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_in(&dir);
        std::fs::write(&socket.path, "data").unwrap();

        let refused = bind(&socket).unwrap_err();

        assert!(
            matches!(refused, SocketError::NotASocket { .. }),
            "{refused}"
        );
        assert_eq!(std::fs::read_to_string(&socket.path).unwrap(), "data");
    }

    #[test]
    fn a_socket_replaced_by_another_process_is_left_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_in(&dir);
        let (listener, file) = bind(&socket).unwrap();
        drop(listener);
        std::fs::remove_file(&socket.path).unwrap();
        let _newer = UnixListener::bind(&socket.path).unwrap();

        drop(file);

        assert!(socket.path.exists(), "the newer socket stays");
    }
}

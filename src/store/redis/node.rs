//! Connections to one node: its address and login, and connections whose every step has
//! a timeout, alone or from an r2d2 pool.

use std::time::Duration;

use redis::io::tcp::TcpSettings;
use redis::{ConnectionInfo, ConnectionLike, IntoConnectionInfo, RedisConnectionInfo};

/// How to log in to a node or a sentinel: an ACL user (`None`: the default user) and its
/// password.
#[derive(Clone, Default)]
pub struct Login {
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Where a data node is and how to log in to it.
pub fn node_info(host: &str, port: u16, login: &Login) -> ConnectionInfo {
    let info = redis::ConnectionAddr::Tcp(host.into(), port).into_connection_info();
    // A TCP address always converts; the error arm exists only for the trait's signature.
    let info = info.unwrap_or_else(|_| unreachable!("a TCP address is a connection info"));
    with_login(info, login)
}

/// `info` logging in with `login`'s user and password, each unless `info` already names
/// its own (a `REDIS_URL` with credentials keeps them).
pub fn with_login(info: ConnectionInfo, login: &Login) -> ConnectionInfo {
    let mut settings: RedisConnectionInfo = info.redis_settings().clone();
    if let (None, Some(username)) = (settings.username(), &login.username) {
        settings = settings.set_username(username);
    }
    if let (None, Some(password)) = (settings.password(), &login.password) {
        settings = settings.set_password(password);
    }
    info.set_redis_settings(settings.set_skip_set_lib_name())
        .set_tcp_settings(TcpSettings::default().set_nodelay(true))
}

/// A connection whose every step is bounded: connect, AUTH, read and write.
pub fn connect(info: &ConnectionInfo, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(info.clone())?;
    let connection = client.get_connection_with_timeout(timeout)?;
    connection.set_read_timeout(Some(timeout))?;
    connection.set_write_timeout(Some(timeout))?;
    Ok(connection)
}

/// Makes pooled connections. The `redis` crate's own r2d2 manager connects without a
/// timeout and checks connections with a PING that a demoted master still answers, so
/// this one bounds every step and lets a decision retire a connection it distrusts.
pub struct NodeManager {
    pub(super) info: ConnectionInfo,
    pub(super) timeout: Duration,
}

pub struct NodeConnection {
    pub(super) connection: redis::Connection,
    /// Set when an answer suggests the node is no longer a usable master.
    pub(super) retired: bool,
}

impl r2d2::ManageConnection for NodeManager {
    type Connection = NodeConnection;
    type Error = redis::RedisError;

    fn connect(&self) -> Result<NodeConnection, redis::RedisError> {
        Ok(NodeConnection {
            connection: connect(&self.info, self.timeout)?,
            retired: false,
        })
    }

    fn is_valid(&self, conn: &mut NodeConnection) -> Result<(), redis::RedisError> {
        redis::cmd("PING").query::<()>(&mut conn.connection)
    }

    fn has_broken(&self, conn: &mut NodeConnection) -> bool {
        conn.retired || !conn.connection.is_open()
    }
}

/// Async connection settings with the same bounds as [`connect`].
pub fn async_config(timeout: Duration) -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(username: Option<&str>, password: Option<&str>) -> Login {
        Login {
            username: username.map(str::to_string),
            password: password.map(str::to_string),
        }
    }

    #[test]
    fn a_node_is_logged_in_to_as_its_url_says_or_else_as_configured() {
        let configured = login(Some("ratelimiter"), Some("pw"));
        let url = |text: &str| text.into_connection_info().unwrap();
        let cases = [
            (
                "a node given by host and port",
                node_info("127.0.0.1", 6379, &configured),
                ("ratelimiter", "pw"),
            ),
            (
                "a URL that names its own user and password keeps them",
                with_login(url("redis://operator:own@127.0.0.1:6379"), &configured),
                ("operator", "own"),
            ),
            (
                "a URL without credentials takes the configured ones",
                with_login(url("redis://127.0.0.1:6379"), &configured),
                ("ratelimiter", "pw"),
            ),
        ];
        for (case, info, (user, password)) in cases {
            let settings = info.redis_settings();
            assert_eq!(settings.username(), Some(user), "{case}");
            assert_eq!(settings.password(), Some(password), "{case}");
        }
    }
}

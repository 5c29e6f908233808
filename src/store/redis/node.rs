//! Connections to one node: its address and password, and connections whose every step
//! has a timeout, alone or from an r2d2 pool.

use std::time::Duration;

use redis::io::tcp::TcpSettings;
use redis::{ConnectionInfo, ConnectionLike, IntoConnectionInfo, RedisConnectionInfo};

/// Where a data node is and how to log in to it.
pub fn node_info(host: &str, port: u16, password: Option<&str>) -> ConnectionInfo {
    let info = redis::ConnectionAddr::Tcp(host.into(), port).into_connection_info();
    // A TCP address always converts; the error arm exists only for the trait's signature.
    let info = info.unwrap_or_else(|_| unreachable!("a TCP address is a connection info"));
    with_password(info, password)
}

/// `info` with `password` for AUTH, unless `info` already carries one.
pub fn with_password(info: ConnectionInfo, password: Option<&str>) -> ConnectionInfo {
    let mut settings: RedisConnectionInfo = info.redis_settings().clone();
    if let (None, Some(password)) = (settings.password(), password) {
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

//! The demo upstream (the `demo-upstream` crate) on its own thread and actix system, on
//! free ports, stopped on `Drop`.

use std::net::TcpListener;
use std::thread::JoinHandle;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use demo_upstream::{Counts, DemoUpstream};

use crate::app::stop_servers_from_drop;
use crate::client;

pub struct TestUpstream {
    /// Where the gateway sends what it admits.
    pub port: u16,
    /// Where its counts are read.
    pub count_port: u16,
    handles: [ServerHandle; 2],
    thread: Option<JoinHandle<()>>,
}

impl TestUpstream {
    pub fn spawn() -> Self {
        let bind = || TcpListener::bind("127.0.0.1:0").expect("a free port");
        let (app, counts) = (bind(), bind());
        let port = app.local_addr().unwrap().port();
        let count_port = counts.local_addr().unwrap().port();
        let (sender, receiver) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let upstream = DemoUpstream::listen(app, counts, 1).expect("the upstream starts");
                sender.send(upstream.handles()).expect("report the handles");
                upstream.run().await.expect("the upstream runs");
            });
        });
        let handles = receiver
            .recv_timeout(Duration::from_secs(30))
            .expect("the upstream started");
        Self {
            port,
            count_port,
            handles,
            thread: Some(thread),
        }
    }

    /// `host:port` of what it answers.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What has reached it so far.
    pub async fn counts(&self) -> Counts {
        let url = format!("http://127.0.0.1:{}/__upstream/count", self.count_port);
        let response = client().get(&url).send().await.expect("the counts answer");
        assert_eq!(response.status(), 200, "GET {url}");
        response.json().await.expect("the counts are JSON")
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        let handles = self.handles.clone();
        stop_servers_from_drop(self.thread.take(), move || async move {
            for handle in handles {
                handle.stop(false).await;
            }
        });
    }
}

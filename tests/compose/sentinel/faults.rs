//! The master killed, then cut off its network, under a steady stream of requests: no
//! 5xx, a replica promoted, exact limits again, and the old master back as a replica.

use std::time::Duration;

use super::{INSTANCES, Topology};
use crate::clients::{Stream, assert_exact_once_redis_decides};
use crate::process::docker_ok;
use crate::{RATE_LIMIT, wait_until};

impl Topology {
    /// After a failover: both instances decide with Redis again, the stream saw no 5xx,
    /// and a new client gets exactly its limit (the instances share Redis again).
    async fn served_through_the_failover(&self, stream: Stream) {
        wait_until(
            "both instances ready again, on the new master",
            Duration::from_secs(30),
            || self.instances_ready(),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stream.assert_served();
        self.a_new_client_gets_exactly_its_limit("after the failover")
            .await;
    }

    /// The instances share Redis again: a new client gets exactly its limit.
    async fn a_new_client_gets_exactly_its_limit(&self, when: &str) {
        assert_exact_once_redis_decides(when, RATE_LIMIT, &INSTANCES, || {
            self.new_client_through_nginx()
        })
        .await;
    }

    fn start_stream(&self) -> Stream {
        let address = self.new_client();
        Stream::start(
            &self.stack,
            &self.front,
            &address,
            "http://nginx:8000/limited_endpoint",
        )
    }

    pub async fn killing_the_master_under_traffic_fails_over(&self) {
        let killed = self.current_master();
        let stream = self.start_stream();
        tokio::time::sleep(Duration::from_secs(2)).await;

        self.stack.kill(&killed);

        eprintln!("   killed {killed}");
        let what = format!("sentinels promote a replica after {killed} was killed");
        wait_until(&what, Duration::from_secs(30), || async {
            self.sentinels_moved_from(&killed)
        })
        .await;
        let promoted = self.current_master();
        eprintln!("   sentinels promoted {promoted}");
        self.served_through_the_failover(stream).await;
        self.stack.start(&killed);
        let what = format!("{killed}, started again, rejoins as a replica of {promoted}");
        wait_until(&what, Duration::from_secs(60), || async {
            self.is_replica_of(&killed, &promoted)
        })
        .await;
        eprintln!("  ok: {killed}, started again, is a replica of {promoted}");
    }

    pub async fn cutting_the_master_off_fails_over_and_heals(&self) {
        let isolated = self.current_master();
        let id = self.stack.id(&isolated);
        let stream = self.start_stream();
        tokio::time::sleep(Duration::from_secs(2)).await;

        docker_ok(&["network", "disconnect", &self.back, &id]);

        eprintln!("   disconnected {isolated} from {}", self.back);
        let what = format!("the isolated master {isolated} refuses writes (NOREPLICAS)");
        wait_until(&what, Duration::from_secs(15), || async {
            self.cli(&isolated, &["set", "e2e:partition-probe", "1"])
                .contains("NOREPLICAS")
        })
        .await;
        eprintln!("  ok: the isolated master {isolated} refuses writes: NOREPLICAS");
        let what = format!("sentinels promote a replica while {isolated} is cut off");
        wait_until(&what, Duration::from_secs(30), || async {
            self.sentinels_moved_from(&isolated)
        })
        .await;
        let promoted = self.current_master();
        eprintln!("   sentinels promoted {promoted}");
        self.served_through_the_failover(stream).await;
        docker_ok(&["network", "connect", "--alias", &isolated, &self.back, &id]);
        let what = format!("{isolated}, reconnected, rejoins as a replica of {promoted}");
        wait_until(&what, Duration::from_secs(60), || async {
            self.is_replica_of(&isolated, &promoted)
        })
        .await;
        eprintln!("  ok: {isolated}, reconnected, is a replica of {promoted}");
        self.a_new_client_gets_exactly_its_limit("after the partition healed")
            .await;
    }
}

//! Long-lived connections end to end on one L2 segment (`dsr`): 5,000
//! WebSocket connections through the balancer survive a backend being
//! added, a weight change and a drain; when a backend fails, only its
//! connections break and they reconnect elsewhere (tests/src/long_lived.rs;
//! tests/tests/routed.rs runs the same through tunnels).

use tests::harness::Daemon;
use tests::long_lived::{Scenario, survive_changes};
use tests::netns::{self, Testbed};

fn five_thousand_websockets_survive_add_weight_and_drain_and_only_a_failed_backends_break() {
    let testbed = Testbed::up("lbe-ws-", 4).expect("testbed");
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    survive_changes(&Scenario {
        testbed: &testbed,
        daemon: &daemon,
        vip: "198.18.0.10:8080",
        vip_args: &[],
        backend: netns::backend4,
        connections: 5_000,
    });
}

tests::root_tests!(
    five_thousand_websockets_survive_add_weight_and_drain_and_only_a_failed_backends_break,
);

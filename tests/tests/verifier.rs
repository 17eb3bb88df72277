//! The XDP program loads in every configuration `lb run` can give it, with
//! room to grow: the kernel's verifier walks every path once per distinct
//! state, and the load-time settings (flow sync, tunnel sources, the MTU)
//! decide which paths are live, so a program that loads with the defaults
//! can still be refused by a daemon that syncs flows and has tunnel
//! sources. The count the kernel reports for each configuration is
//! checked against a quarter of its one-million-instruction limit.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_userspace::datapath::Datapath;
use lb_userspace::model::{DatapathConfig, TunnelConfig};
use tests::packets::BALANCER_MAC;

/// A quarter of the kernel's limit (BPF_COMPLEXITY_LIMIT_INSNS).
const HEADROOM_LIMIT: u32 = 250_000;

fn tunnel() -> TunnelConfig {
    TunnelConfig {
        source_v4: Some(Ipv4Addr::new(198, 18, 0, 2)),
        source_v6: Some(Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 2)),
        mtu: 1500,
        ..TunnelConfig::NONE
    }
}

/// Instructions the verifier processed, per program of the object.
fn verified_instructions(config: DatapathConfig) -> Vec<(String, u32)> {
    let datapath = Datapath::load(config).expect("the programs load");
    datapath
        .programs()
        .map(|(name, program)| {
            let info = program.info().expect("program info");
            let count = info.verified_instruction_count().expect("a kernel that reports them");
            (name.to_owned(), count)
        })
        .collect()
}

fn every_configuration_verifies_with_headroom() {
    let configurations = [
        ("defaults", DatapathConfig::default()),
        ("own MAC", DatapathConfig { own_mac: BALANCER_MAC, ..DatapathConfig::default() }),
        ("flow sync", DatapathConfig { sync_flows: true, ..DatapathConfig::default() }),
        ("tunnel sources", DatapathConfig { tunnel: tunnel(), ..DatapathConfig::default() }),
        (
            "everything",
            DatapathConfig {
                sync_flows: true,
                own_mac: BALANCER_MAC,
                tunnel: tunnel(),
                ..DatapathConfig::default()
            },
        ),
    ];
    let mut failures = Vec::new();
    for (name, config) in configurations {
        let counts = verified_instructions(config);
        assert_eq!(counts.len(), 2, "{name}: the balancer's program and lb_encap: {counts:?}");
        for (program, count) in counts {
            eprintln!("{name}: {program}: {count} instructions verified");
            if count > HEADROOM_LIMIT {
                failures.push(format!("{name}: {program}: {count}"));
            }
        }
    }
    assert!(failures.is_empty(), "over {HEADROOM_LIMIT} verified instructions: {failures:?}");
}

tests::root_tests!(every_configuration_verifies_with_headroom,);

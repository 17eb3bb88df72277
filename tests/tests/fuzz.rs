//! The hostile-input fuzz test: a million generated packets through the real
//! object (LB_FUZZ_PACKETS and LB_FUZZ_SEED change the run; `cargo xtask
//! fuzz` runs a longer one).

fn a_million_hostile_packets_never_reach_a_backend_unless_well_formed_for_a_vip() {
    let packets =
        std::env::var("LB_FUZZ_PACKETS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000u64);
    let seed =
        std::env::var("LB_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_f022);
    let target = tests::fuzz::Target::new().expect("load the datapath");
    let started = std::time::Instant::now();
    let report = tests::fuzz::run(&target, seed, packets).expect("fuzz run");
    println!(
        "FIGURE fuzz: {} packets (seed {seed}) in {:.1} s: {} forwarded ({} ICMP errors), {} passed, {} dropped; {} failures",
        report.packets,
        started.elapsed().as_secs_f64(),
        report.forwarded,
        report.icmp_forwarded,
        report.passed,
        report.dropped,
        report.failures.len()
    );
    assert!(report.failures.is_empty(), "{}", report.failures.join("\n"));
    // The generator must reach every outcome, or the test proves little.
    assert!(
        report.forwarded > packets / 20
            && report.passed > packets / 20
            && report.dropped > packets / 100
            && report.icmp_forwarded > packets / 200,
        "{report:?}"
    );
}

tests::root_tests!(a_million_hostile_packets_never_reach_a_backend_unless_well_formed_for_a_vip,);

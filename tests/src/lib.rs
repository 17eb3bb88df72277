//! Shared helpers of the datapath and end-to-end tests: privilege checks,
//! packet builders, and network-namespace topologies that clean up after
//! themselves.

pub mod fixture;
pub mod fuzz;
pub mod generator;
pub mod harness;
pub mod netns;
pub mod packets;
pub mod websocket;

/// Whether this process may load BPF programs and create namespaces. When it
/// may not, the test prints why it is skipped; under `cargo xtask test`
/// (which sets `LB_TESTS_REQUIRE_ROOT=1`) a skip is a failure instead, so CI
/// can never pass by skipping.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("LB_TESTS_REQUIRE_ROOT").is_some_and(|value| value == "1") {
        panic!("{test} needs root (BPF and network namespaces) and LB_TESTS_REQUIRE_ROOT=1");
    }
    eprintln!("SKIPPED {test}: needs root (BPF and network namespaces)");
    false
}

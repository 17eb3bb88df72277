//! Shared helpers of the datapath and end-to-end tests and the bench: the
//! root-test harness, packet builders, the balancer fixture, and
//! network-namespace topologies that clean up after themselves.

use std::process::ExitCode;

pub mod bpf;
pub mod capture;
pub mod datapath_fixture;
pub mod demo;
pub mod download;
pub mod echo;
pub mod etcd;
pub mod fixture;
pub mod fleet;
pub mod forge;
pub mod fuzz;
pub mod generator;
pub mod harness;
pub mod long_lived;
pub mod netns;
pub mod packets;
pub mod prometheus;
pub mod routed;
pub mod tunnel_frames;
pub mod tunnels;
pub mod websocket;

/// XDP verdicts (the kernel's `enum xdp_action`), as `test_run` returns them.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Whether this process may load BPF programs and create namespaces.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs the tests of one integration-test file, which all need root (BPF,
/// network namespaces). Without root each is reported as ignored, with the
/// reason, so the summary line counts it as skipped and `cargo xtask test`
/// (which fails on any skip) cannot pass by skipping.
pub fn run_root_tests(tests: Vec<(&'static str, fn())>) -> ExitCode {
    let arguments = libtest_mimic::Arguments::from_args();
    let root = is_root();
    if !root {
        eprintln!("not root: these tests need BPF and network namespaces, so they are ignored");
    }
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            libtest_mimic::Trial::test(name, move || {
                test();
                Ok(())
            })
            .with_ignored_flag(!root)
        })
        .collect();
    libtest_mimic::run(&arguments, trials).exit_code()
}

/// The `main` of an integration-test file whose tests need root: lists them
/// for [`run_root_tests`] (the file sets `harness = false` in Cargo.toml).
#[macro_export]
macro_rules! root_tests {
    ($($test:ident),+ $(,)?) => {
        fn main() -> std::process::ExitCode {
            $crate::run_root_tests(vec![$((stringify!($test), $test as fn())),+])
        }
    };
}

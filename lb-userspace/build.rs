//! Builds the XDP object (lb-ebpf) with nightly and bpf-linker, so a plain
//! `cargo build` produces a complete `lb` binary.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("lb-userspace has no parent directory")?;
    // The XDP program compiles lb-common in too; aya-build only watches lb-ebpf.
    println!("cargo:rerun-if-changed={}", workspace.join("lb-common").display());
    let root = workspace.join("lb-ebpf");
    let root = root.to_str().context("workspace path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the XDP program failed: run scripts/setup.sh to install nightly, rust-src and bpf-linker")
}

#!/usr/bin/env bash
# Installs everything the balancer needs to build, run and test on a Debian host.
# Idempotent: when every prerequisite is present it only checks versions and exits.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (installs Debian packages and loads XDP programs)"
command -v rustup >/dev/null || die "rustup not found: install Rust with rustup first"
command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian; install iproute2, nftables and LLVM dev files by hand"

# The eBPF crate needs nightly with rust-src (it builds core for bpfel-unknown-none).
if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal --component rust-src
elif ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    log "adding rust-src to nightly"
    rustup component add rust-src --toolchain nightly
fi

# bpf-linker must be built against the same LLVM major version as nightly's rustc.
llvm_major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$llvm_major" ] || die "could not read nightly's LLVM version from 'rustc +nightly -vV'"

# prometheus (and promtool) scrape our /metrics and check our alert rules in
# the tests; systemd-analyze verifies the unit; tmux runs `lb top`; bird2
# announces VIPs over BGP in the multi-balancer testbed; etcd (server and
# etcdctl) is the fleet store the tests run in namespaces; protoc builds the
# etcd client's gRPC code (libprotobuf-dev has the well-known .proto files);
# scapy (Debian's, for /usr/bin/python3) dissects the tunnel frames the
# datapath builds, as a second opinion on every header and checksum.
packages=(iproute2 nftables ethtool haproxy util-linux prometheus bird2 systemd man-db tmux curl etcd-server etcd-client protobuf-compiler libprotobuf-dev python3-scapy "llvm-${llvm_major}-dev" libpolly-"${llvm_major}"-dev libzstd-dev zlib1g-dev)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian's etcd-server enables a host-wide etcd on 127.0.0.1:2379; the
    # tests start their own clusters in namespaces, so one installed here
    # for them must not run on the host.
    if [[ " ${missing[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null; then
        systemctl disable --now etcd.service >/dev/null 2>&1 || true
    fi
fi

# A stamp beside the binary records which LLVM it was built with, so a nightly
# upgrade that moves LLVM triggers a rebuild instead of a confusing link error.
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
stamp="$cargo_bin/.bpf-linker-llvm"
if ! command -v bpf-linker >/dev/null || [ "$(cat "$stamp" 2>/dev/null)" != "$llvm_major" ]; then
    log "building bpf-linker against LLVM ${llvm_major} (about a minute)"
    LLVM_PREFIX="/usr/lib/llvm-${llvm_major}" cargo install bpf-linker --locked --force --quiet
    echo "$llvm_major" >"$stamp"
fi

# bpffs is where the balancer pins its maps; most distributions mount it already.
if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf || log "warning: could not mount bpffs on /sys/fs/bpf"
fi
log "ready (nightly LLVM ${llvm_major}, $(bpf-linker --version 2>/dev/null || echo bpf-linker))"

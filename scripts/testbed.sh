#!/usr/bin/env bash
# The netns testbed: a client, the balancer and N backends on one L2 segment
# (198.18.0.0/24, fd00:198:18::/64). See tests/src/netns.rs for the layout.
#   scripts/testbed.sh up [PREFIX] [BACKENDS]   (default lbt- and 3)
#   scripts/testbed.sh up [PREFIX] [BACKENDS] --balancers N
#        a fleet instead (tests/src/fleet.rs): a router running BIRD with ECMP,
#        N balancers each running lb run and BIRD; files in /run/lb-testbed/PREFIX
#   scripts/testbed.sh down [PREFIX]            removes everything, even after a crash
#   scripts/testbed.sh status [PREFIX]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "testbed.sh: run as root (network namespaces)" >&2; exit 1; }
case "${1:-}" in up|down|status) ;; *) sed -n '2,10p' "$0" >&2; exit 2;; esac
bash scripts/setup.sh
cargo build --quiet --release -p tests -p lb-userspace --bin lb-testbed --bin lb
exec target/release/lb-testbed "$@"

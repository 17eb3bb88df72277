#!/usr/bin/env bash
# Drives UDP packets with many flows (varied client ports and addresses) from
# the testbed's client through the balancer to a VIP, then reports what
# arrived at each backend (their link counters).
#
# It uses the kernel's pktgen where /proc/net/pktgen exists, and otherwise
# the project's own generator (BPF_PROG_TEST_RUN with XDP live frames).
#
# Prerequisites: scripts/testbed.sh up, lb run in the balancer namespace,
# and the VIP with its backends, e.g.:
#   scripts/testbed.sh up
#   ip netns exec lbt-lb target/release/lb run --iface eth0 &
#   target/release/lb vip add 198.18.0.10:53 --proto udp
#   for b in 101 102 103; do target/release/lb backend add 198.18.0.10:53 198.18.0.$b --proto udp; done
#
# usage: scripts/pktgen.sh [--prefix lbt-] [--vip 198.18.0.10:53] [--flows 1000]
#                          [--addresses 16] [--count 1000000] [--seconds 10]
#                          [--rate PPS (0: flat out)] [--size 64] [--generator auto|kernel|xdp]
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=lbt- vip=198.18.0.10:53 flows=1000 addresses=16 count=1000000 seconds=10 rate=0 size=64 generator=auto
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2 ;;
        --vip) vip=$2 ;;
        --flows) flows=$2 ;;
        --addresses) addresses=$2 ;;
        --count) count=$2 ;;
        --seconds) seconds=$2 ;;
        --rate) rate=$2 ;;
        --size) size=$2 ;;
        --generator) generator=$2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "pktgen.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift 2
done
for number in flows addresses count seconds rate size; do
    [[ "${!number}" =~ ^[0-9]+$ ]] || { echo "pktgen.sh: --$number must be a whole number, not '${!number}'" >&2; exit 2; }
done
[ "$flows" -ge 1 ] && [ "$flows" -le 64000 ] || { echo "pktgen.sh: --flows must be 1 to 64000" >&2; exit 2; }
[ "$addresses" -ge 1 ] && [ "$addresses" -le 200 ] || { echo "pktgen.sh: --addresses must be 1 to 200" >&2; exit 2; }
[ "$count" -ge 1 ] && [ "$seconds" -ge 1 ] || { echo "pktgen.sh: --count and --seconds bound the run: both at least 1" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "pktgen.sh: run as root (network namespaces)" >&2; exit 1; }
client="${prefix}client" balancer="${prefix}lb"
ip netns list | grep -q "^$client" || { echo "pktgen.sh: no testbed '$prefix' (scripts/testbed.sh up)" >&2; exit 1; }
vip_address=${vip%:*} vip_port=${vip##*:}

backends=$(ip netns list | awk '{print $1}' | grep "^${prefix}b[0-9]" | sort)
rx_packets() { ip netns exec "$1" cat /sys/class/net/eth0/statistics/rx_packets; }
declare -A before
for backend in $backends; do before[$backend]=$(rx_packets "$backend"); done

if [ "$generator" = auto ]; then
    if ip netns exec "$client" test -d /proc/net/pktgen; then generator=kernel; else generator=xdp; fi
fi
echo "pktgen.sh: $count packets at most, ${seconds}s at most, rate ${rate:-0} pps (0: flat out), $flows flows x $addresses addresses -> $vip via $balancer, generator: $generator"
case "$generator" in
    kernel)
        balancer_mac=$(ip -n "$balancer" link show eth0 | awk '/link\/ether/ {print $2}')
        last=$((20 + addresses - 1))
        ip netns exec "$client" timeout "$((seconds + 5))" bash -euc '
            pg() { echo "$2" > "/proc/net/pktgen/$1"; }
            pg kpktgend_0 "rem_device_all"
            pg kpktgend_0 "add_device eth0"
            for setting in "count '"$count"'" "pkt_size '"$size"'" "delay 0" "dst_mac '"$balancer_mac"'" \
                "dst '"$vip_address"'" "udp_dst_min '"$vip_port"'" "udp_dst_max '"$vip_port"'" \
                "udp_src_min 1024" "udp_src_max $((1024 + '"$flows"' - 1))" "flag UDPSRC_RND" \
                "src_min 198.18.0.20" "src_max 198.18.0.'"$last"'" "flag IPSRC_RND"; do
                pg eth0 "$setting"
            done
            if [ '"$rate"' -gt 0 ]; then pg eth0 "ratep '"$rate"'"; fi
            timeout '"$seconds"' sh -c "echo start > /proc/net/pktgen/pgctrl" || true
            echo stop > /proc/net/pktgen/pgctrl
            grep -E "pps|Result" /proc/net/pktgen/eth0 || true'
        ;;
    xdp)
        bash scripts/setup.sh
        cargo build --quiet --release -p tests --bin lb-testbed
        target/release/lb-testbed generate "$prefix" "$vip" "$flows" "$addresses" "$count" "$seconds" "$rate" "$size"
        ;;
    *) echo "pktgen.sh: --generator must be auto, kernel or xdp" >&2; exit 2 ;;
esac

sleep 0.2
total=0
for backend in $backends; do
    arrived=$(( $(rx_packets "$backend") - ${before[$backend]} ))
    total=$((total + arrived))
    echo "pktgen.sh: $backend received $arrived packets"
done
echo "pktgen.sh: the backends received $total packets in all"

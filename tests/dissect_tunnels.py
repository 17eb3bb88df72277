"""Dissects tunnel frames with scapy, independently of the Rust tests.

Reads a pcap of Ethernet frames (IPIP, IP6IP6, or IP/UDP carrying an IP
packet right after the UDP header: GUE variant 1) and prints one JSON line
per frame: the outer and inner headers as scapy reads them, and whether
every checksum is the one scapy itself computes for those bytes (a zero
UDP checksum over IPv4 means none and is kept). Used by tests/tests/tunnel.rs.
"""

import json
import sys

from scapy.all import IP, UDP, Ether, IPv6, rdpcap, raw


def checksums_hold(packet):
    """Whether the packet's bytes stay the same with every checksum field
    scapy knows deleted (so scapy computes each one again)."""
    copy = packet.__class__(raw(packet))
    layer = copy
    while layer:
        for field in ("chksum", "cksum"):
            if field not in layer.fields:
                continue
            no_checksum = isinstance(layer, UDP) and layer.chksum == 0 and \
                isinstance(layer.underlayer, IP)
            if not no_checksum:
                delattr(layer, field)
        layer = layer.payload
    return raw(copy) == raw(packet)


def inner_of(outer):
    """The tunnelled IP packet: after the outer IP header, or after UDP."""
    payload = raw(outer[UDP].payload) if outer.haslayer(UDP) and outer_proto(outer) == 17 \
        else raw(outer.payload)
    if not payload:
        return None
    version = payload[0] >> 4
    return IP(payload) if version == 4 else IPv6(payload) if version == 6 else None


def outer_proto(outer):
    return outer.proto if isinstance(outer, IP) else outer.nh


def describe(frame):
    ether = Ether(frame)
    outer = ether.payload
    out = {"ethertype": ether.type, "outer": outer.__class__.__name__}
    if isinstance(outer, IP):
        out.update(src=outer.src, dst=outer.dst, proto=outer.proto, ttl=outer.ttl,
                   tos=outer.tos, df=bool(outer.flags.DF), length=outer.len, ihl=outer.ihl)
    elif isinstance(outer, IPv6):
        out.update(src=outer.src, dst=outer.dst, proto=outer.nh, ttl=outer.hlim,
                   tos=outer.tc, flow_label=outer.fl, length=outer.plen)
    else:
        return out
    out["checksums_ok"] = checksums_hold(ether)
    if outer_proto(outer) == 17:
        udp = outer[UDP]
        out.update(sport=udp.sport, dport=udp.dport, udp_length=udp.len,
                   udp_checksum=udp.chksum)
    inner = inner_of(outer)
    if inner is not None:
        out["inner"] = {
            "family": inner.__class__.__name__,
            "src": inner.src,
            "dst": inner.dst,
            "bytes": len(raw(inner)),
            "checksums_ok": checksums_hold(inner),
        }
    return out


def main():
    for packet in rdpcap(sys.argv[1]):
        print(json.dumps(describe(raw(packet))))


if __name__ == "__main__":
    main()

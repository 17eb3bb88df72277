//! Hostile-input fuzzing of the real XDP object through BPF_PROG_TEST_RUN.
//!
//! A seeded generator builds frames (well-formed templates, then one of many
//! mutations), an independent oracle says what the documented policy makes
//! of each, and [`run`] checks that the datapath did exactly that:
//! - forwarded (XDP_TX) only a well-formed packet for a VIP, to a backend of
//!   that VIP, with nothing but the MAC addresses changed;
//! - passed (XDP_PASS) anything not addressed to us, byte for byte;
//! - dropped (XDP_DROP) only what is addressed to a VIP address but cannot
//!   be hashed, byte for byte;
//! - counted every packet under exactly one reason of the matching kind.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use lb_common::Reason;
use lb_userspace::datapath::Datapath;
use lb_userspace::model::{DatapathConfig, Protocol, Vip};
use lb_userspace::reconcile::Reconciler;

use crate::fixture::{VipDecl, addresses, backend_mac, balancer};
use rand::rngs::SmallRng;
use rand::{RngExt as _, SeedableRng as _};

use crate::packets::{
    Flow, Icmp, L4, Segment, Shape, frame, icmp_frame, insert_ipv6_extensions, reply_packet,
};

use crate::{XDP_DROP, XDP_PASS, XDP_TX};
/// Offsets the datapath reads up to (parse::MAX_HEADER_OFFSET).
const MAX_HEADER_OFFSET: usize = 512;
const MAX_IPV6_EXTENSION_HEADERS: usize = 4;

/// The VIPs of the fuzzed balancer and their backends' MACs.
pub struct Target {
    pub reconciler: Reconciler,
    /// (address, port, protocol number) -> MACs of that VIP's backends.
    vips: BTreeMap<(IpAddr, u16, u8), BTreeSet<[u8; 6]>>,
    vip_addresses: BTreeSet<IpAddr>,
}

impl Target {
    pub fn new() -> anyhow::Result<Self> {
        let config = DatapathConfig {
            table_size: 251,
            max_vips: 8,
            max_backends: 32,
            flow_table_size: 65_536,
            ..DatapathConfig::default()
        };
        let declared = [
            ("198.18.0.10:80", Protocol::Tcp, addresses(&["198.18.1.1", "198.18.1.2"])),
            ("198.18.0.10:53", Protocol::Udp, addresses(&["198.18.1.3", "198.18.1.4"])),
            (
                "[fd00:198:18::10]:80",
                Protocol::Tcp,
                addresses(&["fd00:198:18:1::1", "fd00:198:18:1::2"]),
            ),
            (
                "[fd00:198:18::10]:53",
                Protocol::Udp,
                addresses(&["fd00:198:18:1::3", "fd00:198:18:1::4"]),
            ),
        ];
        let decls: Vec<VipDecl> = declared.iter().map(|(e, p, b)| (*e, *p, b.as_slice())).collect();
        let (reconciler, _) = balancer(config, &decls, backend_mac)?;
        let mut vips = BTreeMap::new();
        for (endpoint, protocol, backends) in &declared {
            let vip = Vip::new(endpoint.parse::<SocketAddr>()?, *protocol);
            let macs: BTreeSet<[u8; 6]> =
                backends.iter().map(|address| backend_mac(*address)).collect();
            vips.insert((vip.address, vip.port, protocol.number()), macs);
        }
        let vip_addresses = vips.keys().map(|(address, _, _)| *address).collect();
        Ok(Self { reconciler, vips, vip_addresses })
    }
}

/// What the documented policy makes of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Well-formed for this VIP: forwarded to one of its backends.
    Forward((IpAddr, u16, u8)),
    /// Not ours (or not parseable far enough to tell): passed untouched.
    Pass,
    /// Addressed to a VIP address but unhashable: dropped untouched.
    Drop,
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    (at <= MAX_HEADER_OFFSET).then_some(())?;
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

/// The oracle: the datapath's policy, written independently of it.
pub fn expected(frame: &[u8], target: &Target) -> Expected {
    let mut ether_type = be16(frame, 12).unwrap_or(0);
    let mut offset = 14;
    for _ in 0..2 {
        if ether_type != 0x8100 && ether_type != 0x88a8 {
            break;
        }
        let Some(next) = be16(frame, offset + 2) else { return Expected::Pass };
        ether_type = next;
        offset += 4;
    }
    let (destination, mut protocol, mut l4, l3_end, mut unhashable) = match ether_type {
        0x0800 => {
            if offset + 20 > frame.len() || offset > MAX_HEADER_OFFSET {
                return Expected::Pass;
            }
            let ip = &frame[offset..];
            let header_len = usize::from(ip[0] & 0x0f) * 4;
            let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if ip[0] >> 4 != 4
                || header_len < 20
                || total_len < header_len
                || offset + total_len > frame.len()
            {
                return Expected::Pass;
            }
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            let destination = IpAddr::from([ip[16], ip[17], ip[18], ip[19]]);
            (destination, ip[9], offset + header_len, offset + total_len, fragment)
        }
        0x86dd => {
            if offset + 40 > frame.len() || offset > MAX_HEADER_OFFSET {
                return Expected::Pass;
            }
            let ip = &frame[offset..];
            let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if ip[0] >> 4 != 6 || offset + 40 + payload_len > frame.len() {
                return Expected::Pass;
            }
            let destination = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).expect("16 bytes"));
            (destination, ip[6], offset + 40, offset + 40 + payload_len, false)
        }
        _ => return Expected::Pass,
    };
    if ether_type == 0x86dd {
        let mut walked = 0;
        loop {
            match protocol {
                0 | 43 | 60 | 51 if walked < MAX_IPV6_EXTENSION_HEADERS => {
                    if l4 + 2 > l3_end || l4 > MAX_HEADER_OFFSET {
                        unhashable = true;
                        break;
                    }
                    let length = usize::from(frame[l4 + 1]);
                    let header_len =
                        if protocol == 51 { (length + 2) * 4 } else { (length + 1) * 8 };
                    protocol = frame[l4];
                    l4 += header_len;
                    walked += 1;
                }
                0 | 43 | 60 | 51 | 44 | 50 => {
                    unhashable = true;
                    break;
                }
                _ => break,
            }
        }
    }
    let ours = target.vip_addresses.contains(&destination);
    let refused = if ours { Expected::Drop } else { Expected::Pass };
    if unhashable {
        return refused;
    }
    let icmp = if ether_type == 0x86dd { 58 } else { 1 };
    if protocol == icmp {
        return if ours {
            expected_icmp(frame, target, destination, l4, l3_end, ether_type == 0x86dd)
        } else {
            Expected::Pass
        };
    }
    let header_len = match protocol {
        6 => 20,
        17 => 8,
        _ => return Expected::Pass,
    };
    if l4 + header_len > l3_end || l4 > MAX_HEADER_OFFSET {
        return refused;
    }
    let port = u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]);
    let key = (destination, port, protocol);
    if target.vips.contains_key(&key) { Expected::Forward(key) } else { Expected::Pass }
}

/// The oracle for ICMP to a VIP address at `l4`: errors (IPv4 types 3 and
/// 11, ICMPv6 1 to 3) go to a backend of the VIP whose reply they quote,
/// other ICMP to the kernel; a truncated, non-TCP/UDP or foreign quote is dropped.
fn expected_icmp(
    frame: &[u8],
    target: &Target,
    destination: IpAddr,
    l4: usize,
    l3_end: usize,
    ipv6: bool,
) -> Expected {
    if l4 + 8 > l3_end || l4 > MAX_HEADER_OFFSET {
        return Expected::Drop;
    }
    let is_error = if ipv6 { (1..=3).contains(&frame[l4]) } else { matches!(frame[l4], 3 | 11) };
    if !is_error {
        return Expected::Pass;
    }
    let quoted = l4 + 8;
    let (source, protocol, ports) = if ipv6 {
        if quoted + 40 > l3_end || quoted > MAX_HEADER_OFFSET || frame[quoted] >> 4 != 6 {
            return Expected::Drop;
        }
        let source = IpAddr::from(<[u8; 16]>::try_from(&frame[quoted + 8..quoted + 24]).unwrap());
        (source, frame[quoted + 6], quoted + 40)
    } else {
        if quoted + 20 > l3_end || quoted > MAX_HEADER_OFFSET {
            return Expected::Drop;
        }
        let header_len = usize::from(frame[quoted] & 0x0f) * 4;
        let later_fragment = u16::from_be_bytes([frame[quoted + 6], frame[quoted + 7]]) & 0x1fff;
        if frame[quoted] >> 4 != 4 || header_len < 20 || later_fragment != 0 {
            return Expected::Drop;
        }
        let source = IpAddr::from(<[u8; 4]>::try_from(&frame[quoted + 12..quoted + 16]).unwrap());
        (source, frame[quoted + 9], quoted + header_len)
    };
    if ports + 4 > l3_end || ports > MAX_HEADER_OFFSET || (protocol != 6 && protocol != 17) {
        return Expected::Drop;
    }
    let key = (source, u16::from_be_bytes([frame[ports], frame[ports + 1]]), protocol);
    if source == destination && target.vips.contains_key(&key) {
        Expected::Forward(key)
    } else {
        Expected::Drop
    }
}

/// Builds one frame: a template, then (usually) one mutation.
pub fn generate(rng: &mut SmallRng) -> Vec<u8> {
    if rng.random_bool(0.03) {
        let mut noise = vec![0u8; rng.random_range(14..200)];
        rng.fill(&mut noise[..]);
        return noise;
    }
    let ipv6 = rng.random_bool(0.5);
    let l4 = if rng.random_bool(0.5) { L4::Tcp } else { L4::Udp };
    let vip = if ipv6 { "fd00:198:18::10" } else { "198.18.0.10" };
    let vip: IpAddr = if rng.random_bool(0.75) {
        vip.parse().unwrap()
    } else if ipv6 {
        IpAddr::from([0xfd00, 0x198, 0x18, 0, 0, 0, 0, rng.random_range(1..0x200)])
    } else {
        IpAddr::from([198, 18, 0, rng.random()])
    };
    let vip_port = match rng.random_range(0..10) {
        0..=3 => 80,
        4..=7 => 53,
        _ => rng.random(),
    };
    let client: IpAddr =
        if ipv6 { "fd00:198:18::1".parse().unwrap() } else { "198.18.0.1".parse().unwrap() };
    let flow = Flow { client, client_port: rng.random(), vip, vip_port, l4 };
    let segment = [Segment::Syn, Segment::Ack, Segment::Fin, Segment::Rst][rng.random_range(0..4)];
    let options: &'static [u8] = match rng.random_range(0..8) {
        0 => &[1, 1, 1, 0],
        1 => &[1, 1, 1, 1, 1, 1, 1, 1, 7, 3, 4, 0],
        _ => &[],
    };
    let mut payload = vec![0u8; rng.random_range(0..64)];
    rng.fill(&mut payload[..]);
    let mut out = if rng.random_bool(0.15) {
        // An ICMP error (or echo) from a router about the flow's reply.
        let kinds: &[u8] = if ipv6 { &[1, 2, 3, 128, 135] } else { &[3, 11, 8, 0, 5] };
        let icmp =
            Icmp { kind: kinds[rng.random_range(0..kinds.len())], code: rng.random_range(0..5) };
        let router: IpAddr =
            if ipv6 { "fd00:198:18::fe".parse().unwrap() } else { "198.18.0.254".parse().unwrap() };
        let quote = reply_packet(flow, &payload);
        let quoted = rng.random_range(quote.len().min(20)..=quote.len());
        icmp_frame(router, vip, icmp, &quote[..quoted])
    } else {
        frame(flow, Shape { segment, ipv4_options: options, ..Shape::default() }, &payload)
    };
    if ipv6 && rng.random_bool(0.4) {
        let kinds = [0u8, 43, 60, 51, 44, 50, 60, 0];
        let extensions: Vec<(u8, usize)> = (0..rng.random_range(1..7))
            .map(|_| (kinds[rng.random_range(0..kinds.len())], 8 * rng.random_range(1..5)))
            .collect();
        out = insert_ipv6_extensions(&out, &extensions);
    }
    if rng.random_bool(0.15) {
        // A random protocol byte (ICMP, SCTP, garbage) in place of TCP/UDP.
        let at = if ipv6 { 14 + 6 } else { 14 + 9 };
        out[at] = rng.random();
    }
    // VLAN tags: spliced in front of the EtherType, up to one more than handled.
    let tags = match rng.random_range(0..20) {
        0..=11 => 0,
        12..=15 => 1,
        16..=18 => 2,
        _ => 3,
    };
    for _ in 0..tags {
        let tpid: u16 = if rng.random_bool(0.5) { 0x8100 } else { 0x88a8 };
        let mut tag = tpid.to_be_bytes().to_vec();
        tag.extend_from_slice(&rng.random_range(1u16..4095).to_be_bytes());
        out.splice(12..12, tag);
    }
    mutate(rng, &mut out);
    out
}

/// One hostile change, or none.
fn mutate(rng: &mut SmallRng, frame: &mut Vec<u8>) {
    let len = frame.len();
    let l3 = 14; // for untagged frames; on tagged ones this hits the tags instead
    match rng.random_range(0..12) {
        0 => frame.truncate(rng.random_range(14..=len)),
        1 => {
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..len);
                frame[at] = rng.random();
            }
        }
        2 => frame[l3] = (frame[l3] & 0xf0) | rng.random_range(0..16), // IHL / traffic class
        3 => frame[l3] = (rng.random_range(0..16) << 4) | (frame[l3] & 0x0f), // version
        4 if len > l3 + 6 => {
            // IPv4 total length or IPv6 payload length.
            let at = if frame[l3] >> 4 == 6 { l3 + 4 } else { l3 + 2 };
            let value: u16 = rng.random_range(0..(len as u16 + 40));
            frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
        }
        5 if len > l3 + 8 => {
            // IPv4 fragment flags and offset.
            let value: u16 =
                if rng.random_bool(0.5) { 0x2000 } else { rng.random_range(1..0x2000) };
            frame[l3 + 6..l3 + 8].copy_from_slice(&value.to_be_bytes());
        }
        6 => frame[12..14].copy_from_slice(&rng.random::<u16>().to_be_bytes()),
        7 => frame.truncate(rng.random_range(14..len.clamp(15, 60))),
        _ => {}
    }
}

/// What a fuzz run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub packets: u64,
    pub forwarded: u64,
    /// Of `forwarded`, ICMP errors sent to the backend of the flow they quote.
    pub icmp_forwarded: u64,
    pub passed: u64,
    pub dropped: u64,
    pub failures: Vec<String>,
}

/// Runs `count` generated frames from `seed` through the datapath, checking
/// each against the oracle and every batch against the reason counters.
pub fn run(target: &Target, seed: u64, count: u64) -> anyhow::Result<Report> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let datapath = target.reconciler.datapath();
    let mut report = Report::default();
    const BATCH: u64 = 10_000;
    let totals = |datapath: &Datapath| -> anyhow::Result<(u64, u64, u64)> {
        let (mut forwarded, mut passed, mut dropped) = (0, 0, 0);
        for (reason, count) in datapath.reason_counters()? {
            match reason {
                Reason::Forwarded | Reason::ForwardedIcmp => forwarded += count,
                reason if reason.is_drop() => dropped += count,
                _ => passed += count,
            }
        }
        Ok((forwarded, passed, dropped))
    };
    let icmp_forwarded = |datapath: &Datapath| -> anyhow::Result<u64> {
        Ok(lb_userspace::datapath::total_of(&datapath.reason_counters()?, Reason::ForwardedIcmp))
    };
    let icmp_before = icmp_forwarded(datapath)?;
    let mut before = totals(datapath)?;
    let mut batch_actions = (0u64, 0u64, 0u64);
    for index in 0..count {
        let input = generate(&mut rng);
        let expected = expected(&input, target);
        let (action, output) = datapath.test_run(&input)?;
        report.packets += 1;
        let problem = match (&expected, action) {
            (Expected::Forward(key), XDP_TX) => {
                let mac: [u8; 6] = output[0..6].try_into().expect("six bytes");
                let rest_same = output.len() == input.len()
                    && output[12..] == input[12..]
                    && output[6..12] == input[0..6];
                (!(target.vips[key].contains(&mac) && rest_same))
                    .then(|| format!("forwarded to {mac:02x?}, rewritten wrongly"))
            }
            (Expected::Pass, XDP_PASS) | (Expected::Drop, XDP_DROP) => {
                (output != input).then(|| "changed a packet it did not forward".to_owned())
            }
            (expected, action) => Some(format!("expected {expected:?}, got action {action}")),
        };
        if let Some(problem) = problem
            && report.failures.len() < 20
        {
            report
                .failures
                .push(format!("packet {index} (seed {seed}): {problem}: {:02x?}", input));
        }
        match action {
            XDP_TX => {
                report.forwarded += 1;
                batch_actions.0 += 1;
            }
            XDP_PASS => {
                report.passed += 1;
                batch_actions.1 += 1;
            }
            _ => {
                report.dropped += 1;
                batch_actions.2 += 1;
            }
        }
        if (index + 1) % BATCH == 0 || index + 1 == count {
            let after = totals(datapath)?;
            let counted = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
            if counted != batch_actions && report.failures.len() < 20 {
                report.failures.push(format!(
                    "batch ending at packet {index}: actions (tx, pass, drop) {batch_actions:?} but reasons counted {counted:?}"
                ));
            }
            before = after;
            batch_actions = (0, 0, 0);
        }
    }
    report.icmp_forwarded = icmp_forwarded(datapath)? - icmp_before;
    Ok(report)
}

//! Loading the XDP program and creating its maps, and running it once on a
//! packet (for tests). Pinning and attaching live in `pins`, the typed map
//! readers and writers in `maps`. Only the daemon's reconcile step (and
//! tests standing in for it) write the maps.

use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, ProgramArray, RingBuf};
use aya::programs::links::PinnedLink;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, Xdp};
use aya::{Ebpf, EbpfLoader};
use lb_common::{
    Backend, FlowEntry, FlowKey, GLOBAL_HASH_SEED, GLOBAL_SYNC_FLOWS, GLOBAL_TABLE_SIZE,
    GLOBAL_UDP_IDLE_NS, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_FLOW_EVENTS, MAP_FLOW_SYNC, MAP_FLOWS,
    MAP_MAGLEV, MAP_REASONS, MAP_VIP_ADDRESSES, MAP_VIP_STATS, MAP_VIPS, PROGRAM_NAME,
    TrafficCounters, VipAddressKey, VipInfo, VipKey,
};
use memmap2::{MmapMut, MmapOptions};

use crate::model::DatapathConfig;

mod egress;
mod maps;
mod marks;
mod memory;
mod pins;

pub use maps::{FlowCounter, FlowState, Maps, monotonic_ns, total_of};
pub use marks::{FlowMarker, SlotCensus};
pub use memory::held_map_memory;
pub use pins::{
    Attached, InterfaceLock, attach_xdp, egress_link_pin, ensure_bpffs, has_pinned_link, has_pins,
    is_bpffs, lock_interface, pin_dir_for, remove_named_pins, remove_pins,
};

/// The compiled XDP object, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// An XDP program that passes every frame. On veth links (containers,
/// testbeds) the far end must run an XDP program for XDP_TX frames to be
/// delivered; this is the one to attach there. It has no maps, so iproute2
/// can load it (`ip link set dev PEER xdp obj FILE sec xdp`).
pub static PEER_PASS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-pass"));

/// Programs for `cargo xtask bench` (floors, a new-flow wrapper, a traffic
/// generator and a sink); see lb-ebpf/src/bin/bench-programs.rs. Never
/// attached by `lb run`.
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-programs"));

/// What flow sync (the `sync` task) is given of the datapath: handles it reopens on each
/// start, so a task started again resumes reading the ring where the last
/// one stopped (the read position lives in the ring's shared memory).
pub struct SyncDatapath {
    /// The flow-change ring buffer.
    pub ring: OwnedFd,
    /// The flow table, reopened for each writer and dump.
    pub flow_table: OwnedFd,
}

impl SyncDatapath {
    /// A reader of the flow-change ring, from where the last reader stopped.
    pub fn open_ring(&self) -> std::io::Result<RingBuf<MapData>> {
        let map = MapData::from_fd(self.ring.try_clone()?).map_err(std::io::Error::other)?;
        RingBuf::try_from(aya::maps::Map::RingBuf(map)).map_err(std::io::Error::other)
    }
}

/// How to attach: `Auto` tries native (driver) mode and falls back to generic
/// (skb) mode with a warning.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Auto,
    Native,
    Skb,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "max_vips {max_vips} x 2 x table_size {table_size} Maglev entries do not fit a BPF array"
    )]
    TableTooLarge { max_vips: u32, table_size: u32 },
    #[error("loading the XDP object failed (are you root, with BPF and BTF available?)")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no {kind} named {name}: the object and lb-common disagree")]
    Missing { kind: &'static str, name: &'static str },
    #[error("map {name}: {error}")]
    Map { name: &'static str, error: aya::maps::MapError },
    #[error("the XDP program was rejected by the kernel")]
    Program(#[source] ProgramError),
    #[error("attaching to interface {iface} in {mode} mode failed")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        error: ProgramError,
    },
    #[error("mapping the Maglev table into memory failed")]
    Mmap(#[source] std::io::Error),
    #[error("test run failed")]
    TestRun(#[source] ProgramError),
    #[error("pin directory {dir}: {error}")]
    PinDir { dir: PathBuf, error: std::io::Error },
    #[error(
        "{dir} is not on a bpf filesystem, so nothing can be pinned there: mount one (mount -t bpf bpf {dir}) or choose another --pin-dir"
    )]
    NotBpffs { dir: PathBuf },
    #[error("the datapath pinned in {} does not fit this configuration ({differences}). Keep the old settings, or replace it: `lb unload --iface IFACE` removes it (traffic to the VIPs stops until the next lb run loads a new one)", dir.display())]
    IncompatiblePins { dir: PathBuf, differences: String },
    #[error("pinned link {}: {error}", path.display())]
    PinnedLink { path: PathBuf, error: String },
    #[error("at most {max} --egress interfaces")]
    TooManyEgress { max: u32 },
    #[error("egress interface {ifindex}: {error}")]
    Egress { ifindex: u32, error: String },
    #[error("another lb run serves this interface (it holds the lock on {}): one daemon per interface; stop it first (with --detach-on-exit to detach at once)", dir.display())]
    Locked { dir: PathBuf },
}

fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |error| DatapathError::Map { name, error }
}

/// The loaded program and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    config: DatapathConfig,
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_addresses: HashMap<MapData, VipAddressKey, u32>,
    vip_ports: Array<MapData, u64>,
    backends: Array<MapData, Backend>,
    vip_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    reasons: PerCpuArray<MapData, u64>,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    flow_events: PerCpuArray<MapData, u64>,
    /// The flow-change ring buffer, until the sync task takes it.
    flow_sync: Option<RingBuf<MapData>>,
    /// The Maglev array, written through memory: installing a table is one
    /// copy instead of one syscall per entry.
    maglev: MmapMut,
    _maglev_map: MapData,
    attached: Option<(String, &'static str)>,
    /// Where the link and maps are pinned, when they are.
    pin_dir: Option<PathBuf>,
    /// Maps found pinned (a restart) rather than created.
    adopted: bool,
    /// The link [`Self::attach`] made without a pin directory, which
    /// [`Self::detach`] drops.
    link: Option<XdpLinkId>,
    /// The link kept attached across restarts, when pinned by us.
    pinned_link: Option<PinnedLink>,
    /// The tail-call table, held so that the kernel keeps its entries even
    /// when it is not pinned (test runs).
    _programs: ProgramArray<MapData>,
    /// LB_EGRESS and LB_EGRESS_INFO ([`Self::set_egress`]).
    egress: egress::EgressMaps,
}

/// Loads the programs the balancer's program tail-calls (`lb_encap`) and
/// puts them in its table; a pinned table from before a restart gets this
/// daemon's programs, so the old program and the new agree from here on.
fn load_tail_calls(ebpf: &mut Ebpf) -> Result<ProgramArray<MapData>, DatapathError> {
    let name = lb_common::MAP_PROGRAMS;
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing { kind: "map", name })?;
    let mut programs = ProgramArray::try_from(map).map_err(map_error(name))?;
    let encap: &mut Xdp = ebpf
        .program_mut(lb_common::ENCAP_PROGRAM_NAME)
        .ok_or(DatapathError::Missing { kind: "program", name: lb_common::ENCAP_PROGRAM_NAME })?
        .try_into()
        .map_err(DatapathError::Program)?;
    encap.load().map_err(DatapathError::Program)?;
    let fd = encap.fd().map_err(DatapathError::Program)?;
    programs.set(lb_common::TAIL_CALL_ENCAP, fd, 0).map_err(map_error(name))?;
    Ok(programs)
}

impl Datapath {
    /// Loads the XDP program and creates its maps with the configured sizes,
    /// unpinned (they live as long as this object). Nothing is attached yet.
    pub fn load(config: DatapathConfig) -> Result<Self, DatapathError> {
        Self::open(config, None)
    }

    fn open(config: DatapathConfig, pin_dir: Option<&Path>) -> Result<Self, DatapathError> {
        let too_large = || DatapathError::TableTooLarge {
            max_vips: config.max_vips,
            table_size: config.table_size,
        };
        let maglev_entries = config.maglev_entries().ok_or_else(too_large)?;
        if maglev_entries.checked_mul(4).is_none() {
            return Err(too_large());
        }
        let maglev_elements = lb_common::maglev_elements(maglev_entries);
        let udp_idle_ns = config.udp_idle_timeout_ms.saturating_mul(1_000_000);
        let tcp_idle_ns = config.tcp_idle_timeout_ms.saturating_mul(1_000_000);
        let sync_flows = u32::from(config.sync_flows);
        let own_mac = lb_common::mac_word(config.own_mac);
        let new_flow_slots = lb_common::new_flow_table_size(config.flow_table_size);
        let (tunnel_v4, tunnel_v6) = source_words(&config.tunnel);
        let spread_v4 = lb_common::spread_mask(config.tunnel.spread_v4);
        let spread_v6 = lb_common::spread_mask(config.tunnel.spread_v6);
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            for name in lb_common::ALL_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .override_global(GLOBAL_HASH_SEED, &config.hash_seed, true)
            .override_global(GLOBAL_UDP_IDLE_NS, &udp_idle_ns, true)
            .override_global(lb_common::GLOBAL_TCP_IDLE_NS, &tcp_idle_ns, true)
            .override_global(GLOBAL_SYNC_FLOWS, &sync_flows, true)
            .override_global(lb_common::GLOBAL_OWN_MAC, &own_mac, true)
            .override_global(lb_common::GLOBAL_TUNNEL_SOURCE_V4, &tunnel_v4, true)
            .override_global(lb_common::GLOBAL_TUNNEL_SOURCE_V6, &tunnel_v6, true)
            .override_global(lb_common::GLOBAL_TUNNEL_SPREAD_V4, &spread_v4, true)
            .override_global(lb_common::GLOBAL_TUNNEL_SPREAD_V6, &spread_v6, true)
            .override_global(lb_common::GLOBAL_TUNNEL_MTU, &config.tunnel.mtu, true)
            .map_max_entries(MAP_FLOWS, config.flow_table_size)
            .map_max_entries(lb_common::MAP_NEW_FLOWS, new_flow_slots)
            .override_global(lb_common::GLOBAL_NEW_FLOW_SLOTS, &new_flow_slots, true)
            .override_global(GLOBAL_TABLE_SIZE, &config.table_size, true)
            .map_max_entries(MAP_VIPS, config.max_vips)
            .map_max_entries(MAP_VIP_ADDRESSES, config.max_vips)
            .map_max_entries(MAP_VIP_STATS, config.max_vips)
            .map_max_entries(MAP_MAGLEV, maglev_elements)
            .map_max_entries(MAP_BACKENDS, config.max_backends)
            .map_max_entries(MAP_BACKEND_STATS, config.max_backends)
            .load(OBJECT)?;
        // Before anything reads or writes them: do pinned maps fit this configuration?
        let adopted = pins::check_layout(&mut ebpf, &config, pin_dir)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DatapathError::Missing { kind: "program", name: PROGRAM_NAME })?
            .try_into()
            .map_err(DatapathError::Program)?;
        program.load().map_err(DatapathError::Program)?;
        let programs = load_tail_calls(&mut ebpf)?;
        let egress = egress::EgressMaps::take(&mut ebpf)?;

        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(DatapathError::Missing { kind: "map", name })
        };
        let vips = HashMap::try_from(take(MAP_VIPS)?).map_err(map_error(MAP_VIPS))?;
        let vip_addresses =
            HashMap::try_from(take(MAP_VIP_ADDRESSES)?).map_err(map_error(MAP_VIP_ADDRESSES))?;
        let vip_ports = Array::try_from(take(lb_common::MAP_VIP_PORTS)?)
            .map_err(map_error(lb_common::MAP_VIP_PORTS))?;
        let backends = Array::try_from(take(MAP_BACKENDS)?).map_err(map_error(MAP_BACKENDS))?;
        let vip_stats =
            PerCpuArray::try_from(take(MAP_VIP_STATS)?).map_err(map_error(MAP_VIP_STATS))?;
        let backend_stats = PerCpuArray::try_from(take(MAP_BACKEND_STATS)?)
            .map_err(map_error(MAP_BACKEND_STATS))?;
        let reasons = PerCpuArray::try_from(take(MAP_REASONS)?).map_err(map_error(MAP_REASONS))?;
        let flows = HashMap::try_from(take(MAP_FLOWS)?).map_err(map_error(MAP_FLOWS))?;
        let flow_events =
            PerCpuArray::try_from(take(MAP_FLOW_EVENTS)?).map_err(map_error(MAP_FLOW_EVENTS))?;
        let flow_sync =
            RingBuf::try_from(take(MAP_FLOW_SYNC)?).map_err(map_error(MAP_FLOW_SYNC))?;
        let Map::Array(maglev_map) = take(MAP_MAGLEV)? else {
            return Err(DatapathError::Missing { kind: "array map", name: MAP_MAGLEV });
        };
        let length = maglev_elements as usize * size_of::<lb_common::MaglevChunk>();
        // SAFETY: the fd is a BPF array created with BPF_F_MMAPABLE holding
        // `length` bytes of values (64-byte elements, so no padding between
        // them); the kernel keeps the memory alive while it is mapped, and
        // nothing else in this process maps it.
        let maglev = unsafe { MmapOptions::new().len(length).map_mut(&maglev_map.fd().as_fd()) }
            .map_err(DatapathError::Mmap)?;
        Ok(Self {
            ebpf,
            config,
            vips,
            vip_addresses,
            vip_ports,
            backends,
            vip_stats,
            backend_stats,
            reasons,
            flows,
            flow_events,
            flow_sync: Some(flow_sync),
            _programs: programs,
            egress,
            maglev,
            _maglev_map: maglev_map,
            attached: None,
            pin_dir: pin_dir.map(Path::to_owned),
            adopted,
            link: None,
            pinned_link: None,
        })
    }

    /// What flow sync needs: the flow-change ring buffer (once; None after)
    /// and its own handle on the flow table.
    pub fn take_sync(&mut self) -> Result<Option<SyncDatapath>, DatapathError> {
        let Some(ring) = self.flow_sync.take() else { return Ok(None) };
        let ring = maps::owned_fd(ring.as_fd(), MAP_FLOW_SYNC)?;
        let flow_table = maps::owned_fd(self.flows_fd(), MAP_FLOWS)?;
        Ok(Some(SyncDatapath { ring, flow_table }))
    }

    /// The loaded XDP program (for test runs and for tail calls into it).
    pub fn program(&self) -> &Xdp {
        // Checked in load(): the program exists and is XDP.
        let program = self.ebpf.program(PROGRAM_NAME).expect("program checked at load");
        program.try_into().expect("program type checked at load")
    }

    /// Every program of the object by name: the balancer's and the ones it
    /// tail-calls (for checks of what the verifier made of them).
    pub fn programs(&self) -> impl Iterator<Item = (&str, &aya::programs::Program)> {
        self.ebpf.programs()
    }

    fn program_mut(&mut self) -> &mut Xdp {
        // Checked in load(): the program exists and is XDP.
        let program = self.ebpf.program_mut(PROGRAM_NAME).expect("program checked at load");
        program.try_into().expect("program type checked at load")
    }

    /// Runs the program once on `packet` through BPF_PROG_TEST_RUN. Returns the
    /// XDP action and the packet as the program left it.
    pub fn test_run(&self, packet: &[u8]) -> Result<(u32, Vec<u8>), DatapathError> {
        test_run_xdp(self.program(), packet)
    }
}

/// A tunnel's sources as the datapath holds them (lb_common::
/// GLOBAL_TUNNEL_SOURCE_V4 and _V6, lb_common::Egress): network-order
/// bytes read as native words, zero for none.
pub fn source_words(tunnel: &crate::model::TunnelConfig) -> (u32, [u32; 4]) {
    let v4 = tunnel.source_v4.map_or(0, |a| u32::from_ne_bytes(a.octets()));
    let v6 = tunnel.source_v6.map_or([0; 4], |address| {
        let bytes = address.octets();
        std::array::from_fn(|i| u32::from_ne_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap()))
    });
    (v4, v6)
}

/// Runs an XDP program once on `packet` through BPF_PROG_TEST_RUN: the XDP
/// action and the packet as the program left it.
pub fn test_run_xdp(program: &Xdp, packet: &[u8]) -> Result<(u32, Vec<u8>), DatapathError> {
    // Room for programs that grow the packet (encapsulation).
    let mut output = vec![0u8; packet.len() + 256];
    let result = aya::programs::TestRun::test_run(
        program,
        aya::programs::TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut output),
            ..Default::default()
        },
    )
    .map_err(DatapathError::TestRun)?;
    output.truncate(result.data_size_out as usize);
    Ok((result.return_value, output))
}

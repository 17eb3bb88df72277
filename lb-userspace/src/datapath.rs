//! Loading and attaching the XDP program, and the typed writers of its maps.
//! Only the daemon's reconcile step (and tests standing in for it) call the
//! writers here.

use std::os::fd::AsFd as _;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use lb_common::{
    Backend, FLOW_FLAG_CLOSING, FlowEntry, FlowEvent, FlowKey, GLOBAL_HASH_SEED, GLOBAL_TABLE_SIZE,
    GLOBAL_UDP_IDLE_NS, LAYOUT_VERSION, Layout, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_FLOW_EVENTS,
    MAP_FLOWS, MAP_LAYOUT, MAP_MAGLEV, MAP_REASONS, MAP_VIP_ADDRESSES, MAP_VIP_STATS, MAP_VIPS,
    PROGRAM_NAME, PROTO_TCP, Reason, SLOTS_PER_VIP, TrafficCounters, VipAddressKey, VipInfo,
    VipKey,
};
use memmap2::{MmapMut, MmapOptions};
use std::path::{Path, PathBuf};

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

/// Sizes and seeds fixed when the program is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    pub hash_seed: u32,
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    /// Flows the flow table holds (least recently used evicted beyond).
    pub flow_table_size: u32,
    /// A UDP flow idle this long is forgotten (its next packet is a new flow).
    pub udp_idle_timeout_ms: u64,
    /// A TCP flow idle this long no longer counts as active (it stays in the
    /// table, and keeps its backend, until evicted).
    pub tcp_idle_timeout_ms: u64,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            hash_seed: 0,
            table_size: lb_common::DEFAULT_TABLE_SIZE,
            max_vips: lb_common::DEFAULT_MAX_VIPS,
            max_backends: lb_common::DEFAULT_MAX_BACKENDS,
            flow_table_size: lb_common::DEFAULT_FLOW_TABLE_SIZE,
            udp_idle_timeout_ms: lb_common::DEFAULT_UDP_IDLE_NS / 1_000_000,
            tcp_idle_timeout_ms: 3_600_000,
        }
    }
}

impl DatapathConfig {
    /// What the map sizes allow the desired state to hold.
    pub const fn limits(&self) -> crate::model::Limits {
        crate::model::Limits { max_vips: self.max_vips, max_backends: self.max_backends }
    }

    /// Entries of the Maglev map: two slots per VIP.
    pub fn maglev_entries(&self) -> Option<u32> {
        self.max_vips.checked_mul(SLOTS_PER_VIP)?.checked_mul(self.table_size)
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
    #[error("attaching to interface {iface} in {mode} mode failed: {error}")]
    Attach { iface: String, mode: &'static str, error: ProgramError },
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
    backends: Array<MapData, Backend>,
    vip_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    reasons: PerCpuArray<MapData, u64>,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    flow_events: PerCpuArray<MapData, u64>,
    /// The Maglev array, written through memory: installing a table is one
    /// copy instead of one syscall per entry.
    maglev: MmapMut,
    _maglev_map: MapData,
    attached: Option<(String, &'static str)>,
    /// Where the link and maps are pinned, when they are.
    pin_dir: Option<PathBuf>,
    /// Maps found pinned (a restart) rather than created.
    adopted: bool,
    /// The link kept attached across restarts, when pinned by us.
    pinned_link: Option<PinnedLink>,
}

/// The link's pin, beside the maps' pins in the pin directory.
const LINK_PIN: &str = "link";
/// statfs magic of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` lies on a bpf filesystem (where pins can live).
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is a valid C string.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    }
}

impl Datapath {
    /// Loads the XDP program and creates its maps with the configured sizes,
    /// unpinned (they live as long as this object). Nothing is attached yet.
    pub fn load(config: DatapathConfig) -> Result<Self, DatapathError> {
        Self::open(config, None)
    }

    /// Like [`Self::load`], with every map pinned in `dir` (a directory on a
    /// bpf filesystem). Maps already pinned there, by an earlier `lb run`,
    /// are adopted with their contents, after checking they were made with
    /// this configuration's sizes and seed.
    pub fn load_pinned(config: DatapathConfig, dir: &Path) -> Result<Self, DatapathError> {
        let parent = dir.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent)
            .map_err(|error| DatapathError::PinDir { dir: dir.to_owned(), error })?;
        if !is_bpffs(parent) {
            return Err(DatapathError::NotBpffs { dir: parent.to_owned() });
        }
        std::fs::create_dir_all(dir)
            .map_err(|error| DatapathError::PinDir { dir: dir.to_owned(), error })?;
        Self::open(config, Some(dir))
    }

    /// Whether the maps were adopted from an earlier `lb run`.
    pub fn adopted(&self) -> bool {
        self.adopted
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
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            for name in lb_common::ALL_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .override_global(GLOBAL_HASH_SEED, &config.hash_seed, true)
            .override_global(GLOBAL_UDP_IDLE_NS, &udp_idle_ns, true)
            .map_max_entries(MAP_FLOWS, config.flow_table_size)
            .override_global(GLOBAL_TABLE_SIZE, &config.table_size, true)
            .map_max_entries(MAP_VIPS, config.max_vips)
            .map_max_entries(MAP_VIP_ADDRESSES, config.max_vips)
            .map_max_entries(MAP_VIP_STATS, config.max_vips)
            .map_max_entries(MAP_MAGLEV, maglev_elements)
            .map_max_entries(MAP_BACKENDS, config.max_backends)
            .map_max_entries(MAP_BACKEND_STATS, config.max_backends)
            .load(OBJECT)?;
        // Before anything reads or writes them: do pinned maps fit this configuration?
        let adopted = check_layout(&mut ebpf, &config, pin_dir)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DatapathError::Missing { kind: "program", name: PROGRAM_NAME })?
            .try_into()
            .map_err(DatapathError::Program)?;
        program.load().map_err(DatapathError::Program)?;

        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(DatapathError::Missing { kind: "map", name })
        };
        let vips = HashMap::try_from(take(MAP_VIPS)?).map_err(map_error(MAP_VIPS))?;
        let vip_addresses =
            HashMap::try_from(take(MAP_VIP_ADDRESSES)?).map_err(map_error(MAP_VIP_ADDRESSES))?;
        let backends = Array::try_from(take(MAP_BACKENDS)?).map_err(map_error(MAP_BACKENDS))?;
        let vip_stats =
            PerCpuArray::try_from(take(MAP_VIP_STATS)?).map_err(map_error(MAP_VIP_STATS))?;
        let backend_stats = PerCpuArray::try_from(take(MAP_BACKEND_STATS)?)
            .map_err(map_error(MAP_BACKEND_STATS))?;
        let reasons = PerCpuArray::try_from(take(MAP_REASONS)?).map_err(map_error(MAP_REASONS))?;
        let flows = HashMap::try_from(take(MAP_FLOWS)?).map_err(map_error(MAP_FLOWS))?;
        let flow_events =
            PerCpuArray::try_from(take(MAP_FLOW_EVENTS)?).map_err(map_error(MAP_FLOW_EVENTS))?;
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
            backends,
            vip_stats,
            backend_stats,
            reasons,
            flows,
            flow_events,
            maglev,
            _maglev_map: maglev_map,
            attached: None,
            pin_dir: pin_dir.map(Path::to_owned),
            adopted,
            pinned_link: None,
        })
    }

    pub fn config(&self) -> DatapathConfig {
        self.config
    }

    /// The loaded XDP program (for test runs and for tail calls into it).
    pub fn program(&self) -> &Xdp {
        // Checked in load(): the program exists and is XDP.
        let program = self.ebpf.program(PROGRAM_NAME).expect("program checked at load");
        program.try_into().expect("program type checked at load")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        // Checked in load(): the program exists and is XDP.
        let program = self.ebpf.program_mut(PROGRAM_NAME).expect("program checked at load");
        program.try_into().expect("program type checked at load")
    }

    /// Attaches to `iface`. Returns the mode actually used ("native" or "skb").
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<&'static str, DatapathError> {
        let pinned_link =
            self.pin_dir.as_ref().map(|dir| dir.join(LINK_PIN)).filter(|path| path.exists());
        let program = self.program_mut();
        let attempt = |program: &mut Xdp, mode: XdpMode, name: &'static str| {
            program.attach(iface, mode).map(|link| (link, name)).map_err(|error| {
                DatapathError::Attach { iface: iface.to_owned(), mode: name, error }
            })
        };
        // A link pinned by an earlier `lb run` keeps the old program attached:
        // swap this one in atomically, so no packet goes unhandled.
        if let Some(link_pin) = pinned_link {
            let pinned = PinnedLink::from_pin(&link_pin).map_err(|error| {
                DatapathError::PinnedLink { path: link_pin.clone(), error: error.to_string() }
            })?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|error| {
                DatapathError::PinnedLink { path: link_pin.clone(), error: error.to_string() }
            })?;
            program.attach_to_link(link).map_err(|error| DatapathError::Attach {
                iface: iface.to_owned(),
                mode: "pinned link",
                error,
            })?;
            self.attached = Some((iface.to_owned(), "pinned link (replaced atomically)"));
            return Ok("pinned link (replaced atomically)");
        }
        let (link_id, used) = match mode {
            AttachMode::Native => attempt(program, XdpMode::Driver, "native")?,
            AttachMode::Skb => attempt(program, XdpMode::Skb, "skb")?,
            AttachMode::Auto => match attempt(program, XdpMode::Driver, "native") {
                Ok(used) => used,
                Err(native_error) => {
                    tracing::warn!(
                        %iface, error = %native_error,
                        "native XDP unavailable; falling back to skb (generic) mode, which is much slower"
                    );
                    attempt(program, XdpMode::Skb, "skb")?
                }
            },
        };
        self.attached = Some((iface.to_owned(), used));
        if let Some(dir) = &self.pin_dir {
            // Pin the link so the program stays attached when lb run stops.
            let dir = dir.clone();
            let link = self.program_mut().take_link(link_id).map_err(DatapathError::Program)?;
            let path = dir.join(LINK_PIN);
            let pinned = FdLink::try_from(link)
                .map_err(|error| DatapathError::PinnedLink {
                    path: path.clone(),
                    error: error.to_string(),
                })?
                .pin(&path)
                .map_err(|error| DatapathError::PinnedLink {
                    path: path.clone(),
                    error: error.to_string(),
                })?;
            self.pinned_link = Some(pinned);
        }
        Ok(used)
    }

    /// Removes every pin, so the program detaches and the maps go once this
    /// object is dropped: `lb run --detach-on-exit`.
    pub fn unpin(&mut self) -> Result<(), DatapathError> {
        if let Some(dir) = self.pin_dir.take() {
            remove_pins(&dir)?;
        }
        self.pinned_link = None;
        Ok(())
    }

    /// Runs the program once on `packet` through BPF_PROG_TEST_RUN. Returns the
    /// XDP action and the packet as the program left it.
    pub fn test_run(&self, packet: &[u8]) -> Result<(u32, Vec<u8>), DatapathError> {
        // Room for programs that grow the packet (encapsulation).
        let mut output = vec![0u8; packet.len() + 256];
        let result = aya::programs::TestRun::test_run(
            self.program(),
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

    // --- writers -------------------------------------------------------------

    fn table_range(&self, vip_index: u32, slot: u32) -> std::ops::Range<usize> {
        let entries = self.config.table_size as usize;
        let start = (vip_index * SLOTS_PER_VIP + slot) as usize * entries * size_of::<u32>();
        start..start + entries * size_of::<u32>()
    }

    /// Fills one table slot. The caller installs it with [`Self::set_vip`]
    /// only after this returns, and never writes the slot the datapath reads.
    pub fn write_table(&mut self, vip_index: u32, slot: u32, table: &[u32]) {
        assert_eq!(table.len(), self.config.table_size as usize, "table of the wrong size");
        let range = self.table_range(vip_index, slot);
        self.maglev[range].copy_from_slice(bytemuck::cast_slice(table));
    }

    /// The backend slot at `index` of LB_MAGLEV (see `lb_common::table_index`).
    pub fn maglev_entry(&self, index: u32) -> u32 {
        let start = index as usize * size_of::<u32>();
        let bytes: [u8; 4] = self.maglev[start..start + 4].try_into().expect("four bytes");
        u32::from_ne_bytes(bytes)
    }

    /// A whole installed table, as the datapath reads it.
    pub fn table(&self, vip_index: u32, slot: u32) -> &[u32] {
        bytemuck::cast_slice(&self.maglev[self.table_range(vip_index, slot)])
    }

    /// Publishes a VIP (or moves it to another table slot) in one map update.
    pub fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DatapathError> {
        self.vips.insert(key, info, 0).map_err(map_error(MAP_VIPS))
    }

    pub fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        self.vips.get(key, 0).ok()
    }

    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), DatapathError> {
        self.vips.remove(key).map_err(map_error(MAP_VIPS))
    }

    /// Records how many VIPs use `address` (0 removes it).
    pub fn set_vip_address(&mut self, key: VipAddressKey, count: u32) -> Result<(), DatapathError> {
        if count == 0 {
            self.vip_addresses.remove(&key).map_err(map_error(MAP_VIP_ADDRESSES))
        } else {
            self.vip_addresses.insert(key, count, 0).map_err(map_error(MAP_VIP_ADDRESSES))
        }
    }

    pub fn set_backend(&mut self, slot: u32, backend: Backend) -> Result<(), DatapathError> {
        self.backends.set(slot, backend, 0).map_err(map_error(MAP_BACKENDS))
    }

    /// Zeroes the counters of a VIP index or backend slot that is being reused.
    pub fn reset_vip_stats(&mut self, vip_index: u32) -> Result<(), DatapathError> {
        reset(&mut self.vip_stats, vip_index).map_err(map_error(MAP_VIP_STATS))
    }

    pub fn reset_backend_stats(&mut self, slot: u32) -> Result<(), DatapathError> {
        reset(&mut self.backend_stats, slot).map_err(map_error(MAP_BACKEND_STATS))
    }

    // --- counters ------------------------------------------------------------

    pub fn vip_counters(&self, vip_index: u32) -> Result<TrafficCounters, DatapathError> {
        sum_traffic(&self.vip_stats, vip_index).map_err(map_error(MAP_VIP_STATS))
    }

    pub fn backend_counters(&self, slot: u32) -> Result<TrafficCounters, DatapathError> {
        sum_traffic(&self.backend_stats, slot).map_err(map_error(MAP_BACKEND_STATS))
    }

    /// Packets per [`Reason`], summed over CPUs, in `Reason::ALL` order.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>, DatapathError> {
        per_cpu_totals(
            &self.reasons,
            MAP_REASONS,
            Reason::ALL.map(|reason| (reason, reason as u32)),
        )
    }
}

impl Datapath {
    /// Every VIP entry in the map (for adopting pinned maps).
    pub fn vip_entries(&self) -> Vec<(VipKey, VipInfo)> {
        self.vips.iter().filter_map(Result::ok).collect()
    }

    /// Every backend slot in use (family set), with its entry.
    pub fn backend_entries(&self) -> Vec<(u32, Backend)> {
        (0..self.config.max_backends)
            .filter_map(|slot| self.backends.get(&slot, 0).ok().map(|backend| (slot, backend)))
            .filter(|(_, backend)| backend.family != 0)
            .collect()
    }

    /// Packets per [`FlowEvent`], summed over CPUs, in `FlowEvent::ALL` order.
    pub fn flow_event_counters(&self) -> Result<Vec<(FlowEvent, u64)>, DatapathError> {
        per_cpu_totals(
            &self.flow_events,
            MAP_FLOW_EVENTS,
            FlowEvent::ALL.map(|event| (event, event as u32)),
        )
    }

    /// Active flows per backend slot: entries neither closing nor idle past
    /// their protocol's timeout. Walks the whole flow table (about a second
    /// per million flows), so callers should not do it per packet or often.
    pub fn active_flows(&self) -> std::collections::HashMap<u32, u64> {
        let now = monotonic_ns();
        let tcp_idle = self.config.tcp_idle_timeout_ms.saturating_mul(1_000_000);
        let udp_idle = self.config.udp_idle_timeout_ms.saturating_mul(1_000_000);
        let mut counts = std::collections::HashMap::new();
        for (key, entry) in self.flows.iter().filter_map(Result::ok) {
            let idle = if key.protocol == u32::from(PROTO_TCP) { tcp_idle } else { udp_idle };
            if entry.flags & FLOW_FLAG_CLOSING == 0
                && now.saturating_sub(entry.last_seen_ns) <= idle
            {
                *counts.entry(entry.backend_slot).or_default() += 1;
            }
        }
        counts
    }

    /// The flow-table entry of one flow, as the datapath recorded it.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.flows.get(key, 0).ok()
    }

    /// Memory the kernel charges for the flow table (its `memlock`), if known.
    pub fn flow_table_memory(&self) -> Option<u64> {
        use std::os::fd::AsRawFd as _;
        let fd = self.flows_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines().find_map(|line| line.strip_prefix("memlock:")?.trim().parse().ok())
    }

    fn flows_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use aya::maps::IterableMap as _;
        self.flows.map().fd().as_fd()
    }
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; the clock is
    // always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Removes a pin directory's link and map pins (`lb unload`). Objects still
/// open elsewhere live on until closed; once nothing holds the link, the
/// program detaches.
pub fn remove_pins(dir: &Path) -> Result<(), DatapathError> {
    let pin_error = |error| DatapathError::PinDir { dir: dir.to_owned(), error };
    for name in std::iter::once(LINK_PIN).chain(lb_common::ALL_MAPS) {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(pin_error(error)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(pin_error(error)),
    }
}

/// Writes the layout into fresh maps, or checks the layout of adopted ones.
/// Returns whether the maps were adopted.
fn check_layout(
    ebpf: &mut Ebpf,
    config: &DatapathConfig,
    pin_dir: Option<&Path>,
) -> Result<bool, DatapathError> {
    let map =
        ebpf.map_mut(MAP_LAYOUT).ok_or(DatapathError::Missing { kind: "map", name: MAP_LAYOUT })?;
    let mut layout_map: Array<&mut MapData, Layout> =
        Array::try_from(map).map_err(map_error(MAP_LAYOUT))?;
    let wanted = Layout {
        version: LAYOUT_VERSION,
        hash_seed: config.hash_seed,
        table_size: config.table_size,
        max_vips: config.max_vips,
        max_backends: config.max_backends,
        flow_table_size: config.flow_table_size,
        udp_idle_timeout_ms: config.udp_idle_timeout_ms,
    };
    let found = layout_map.get(&0, 0).map_err(map_error(MAP_LAYOUT))?;
    if found == Layout::default() {
        layout_map.set(0, wanted, 0).map_err(map_error(MAP_LAYOUT))?;
        return Ok(false);
    }
    if found == wanted {
        return Ok(true);
    }
    let dir = pin_dir.map_or_else(PathBuf::new, Path::to_owned);
    let differences: Vec<String> = [
        ("layout version", u64::from(found.version), u64::from(wanted.version)),
        ("hash_seed", found.hash_seed.into(), wanted.hash_seed.into()),
        ("table_size", found.table_size.into(), wanted.table_size.into()),
        ("max_vips", found.max_vips.into(), wanted.max_vips.into()),
        ("max_backends", found.max_backends.into(), wanted.max_backends.into()),
        ("flow_table_size", found.flow_table_size.into(), wanted.flow_table_size.into()),
        ("udp_idle_timeout_ms", found.udp_idle_timeout_ms, wanted.udp_idle_timeout_ms),
    ]
    .into_iter()
    .filter(|(_, pinned, configured)| pinned != configured)
    .map(|(field, pinned, configured)| format!("{field} is {pinned} there but {configured} here"))
    .collect();
    Err(DatapathError::IncompatiblePins { dir, differences: differences.join(", ") })
}

/// Each labelled index of a per-CPU counter array, summed over CPUs.
fn per_cpu_totals<L, const N: usize>(
    map: &PerCpuArray<MapData, u64>,
    name: &'static str,
    indexes: [(L, u32); N],
) -> Result<Vec<(L, u64)>, DatapathError> {
    indexes
        .into_iter()
        .map(|(label, index)| {
            let values = map.get(&index, 0).map_err(map_error(name))?;
            Ok((label, values.iter().sum()))
        })
        .collect()
}

fn sum_traffic(
    map: &PerCpuArray<MapData, TrafficCounters>,
    index: u32,
) -> Result<TrafficCounters, aya::maps::MapError> {
    let values = map.get(&index, 0)?;
    Ok(values.iter().fold(TrafficCounters::default(), |total, cpu| TrafficCounters {
        packets: total.packets + cpu.packets,
        bytes: total.bytes + cpu.bytes,
    }))
}

fn reset(
    map: &mut PerCpuArray<MapData, TrafficCounters>,
    index: u32,
) -> Result<(), aya::maps::MapError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, error)| {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error: error,
        })
    })?;
    let zeroes = aya::maps::PerCpuValues::try_from(vec![TrafficCounters::default(); cpus])?;
    map.set(index, zeroes, 0)
}

//! `lb decap`, for backends of tunnelled VIPs: the `lb_decap` XDP program
//! (lb-ebpf/src/bin/decap.rs), which takes IPIP, IP6IP6 and GUE packets for
//! this host off their outer headers, loaded with the host's addresses,
//! attached to an interface and pinned so it outlives the command. Running
//! it again refreshes the addresses (and the GUE port) in place.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::Xdp;
use aya::{Ebpf, EbpfLoader};
use lb_common::{
    DECAP_PROGRAM_NAME, DecapReason, GLOBAL_DECAP_GUE_PORT, MAP_DECAP_LOCAL, MAP_DECAP_STATS,
    VipAddressKey,
};

use crate::datapath::{
    AttachMode, DatapathError, attach_xdp, is_bpffs, remove_named_pins, test_run_xdp,
};

/// The compiled decapsulating object, built by build.rs.
static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// The link's pin, beside the maps' in the decapsulator's pin directory.
const LINK_PIN: &str = "link";
/// Every pin of the decapsulator, link first.
const PINS: [&str; 3] = [LINK_PIN, MAP_DECAP_LOCAL, MAP_DECAP_STATS];

/// Where the decapsulator of `iface` is pinned, below `lb run`'s pin root.
pub fn pin_dir_for(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join("decap").join(iface)
}

/// The loaded decapsulator and its maps.
pub struct Decapsulator {
    ebpf: Ebpf,
    local: HashMap<MapData, VipAddressKey, u32>,
    stats: PerCpuArray<MapData, u64>,
    pin_dir: Option<PathBuf>,
}

impl Decapsulator {
    /// Loads the program to take GUE on `gue_port`, with its maps pinned in
    /// `pin_dir` (adopted, counters and all, when an earlier run pinned them
    /// there), or unpinned (test runs).
    pub fn load(gue_port: u16, pin_dir: Option<&Path>) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            let parent = dir.parent().unwrap_or(dir);
            std::fs::create_dir_all(dir)
                .map_err(|error| DatapathError::PinDir { dir: dir.to_owned(), error })?;
            if !is_bpffs(parent) {
                return Err(DatapathError::NotBpffs { dir: parent.to_owned() });
            }
            for name in [MAP_DECAP_LOCAL, MAP_DECAP_STATS] {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf =
            loader.override_global(GLOBAL_DECAP_GUE_PORT, &gue_port, true).load(DECAP_OBJECT)?;
        program_of(&mut ebpf)?.load().map_err(DatapathError::Program)?;
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(DatapathError::Missing { kind: "map", name })
        };
        let map_error = |name| move |error| DatapathError::Map { name, error };
        let local =
            HashMap::try_from(take(MAP_DECAP_LOCAL)?).map_err(map_error(MAP_DECAP_LOCAL))?;
        let stats =
            PerCpuArray::try_from(take(MAP_DECAP_STATS)?).map_err(map_error(MAP_DECAP_STATS))?;
        Ok(Self { ebpf, local, stats, pin_dir: pin_dir.map(Path::to_owned) })
    }

    /// Makes `addresses` the host's local addresses: added ones taken, ones
    /// no longer there removed. Returns how many there are.
    pub fn set_local(&mut self, addresses: &[IpAddr]) -> Result<usize, DatapathError> {
        let map_error = |error| DatapathError::Map { name: MAP_DECAP_LOCAL, error };
        let wanted: HashSet<VipAddressKey> =
            addresses.iter().map(|address| VipAddressKey::new(*address)).collect();
        let present: Vec<VipAddressKey> =
            self.local.keys().collect::<Result<_, _>>().map_err(map_error)?;
        for key in present.iter().filter(|key| !wanted.contains(key)) {
            self.local.remove(key).map_err(map_error)?;
        }
        for key in &wanted {
            self.local.insert(key, 1, 0).map_err(map_error)?;
        }
        Ok(wanted.len())
    }

    /// Attaches to `iface`, through the pinned link when pinned (an earlier
    /// run's program is swapped out atomically). Returns the mode used.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<&'static str, DatapathError> {
        let link_pin = self.pin_dir.as_ref().map(|dir| dir.join(LINK_PIN));
        // Pinned, the link lives on its pin; unpinned, the program keeps it
        // and it detaches when this object drops.
        let attached = attach_xdp(program_of(&mut self.ebpf)?, iface, mode, link_pin.as_deref())?;
        Ok(attached.used)
    }

    /// Frames counted per reason, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(DecapReason, u64)>, DatapathError> {
        counters_of(&self.stats)
    }

    /// Runs the program once on `frame` (BPF_PROG_TEST_RUN): the XDP action
    /// and the frame as the program left it.
    pub fn test_run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>), DatapathError> {
        let program = self
            .ebpf
            .program(DECAP_PROGRAM_NAME)
            .ok_or(DatapathError::Missing { kind: "program", name: DECAP_PROGRAM_NAME })?;
        test_run_xdp(program.try_into().map_err(DatapathError::Program)?, frame)
    }
}

fn program_of(ebpf: &mut Ebpf) -> Result<&mut Xdp, DatapathError> {
    ebpf.program_mut(DECAP_PROGRAM_NAME)
        .ok_or(DatapathError::Missing { kind: "program", name: DECAP_PROGRAM_NAME })?
        .try_into()
        .map_err(DatapathError::Program)
}

fn counters_of(
    stats: &PerCpuArray<MapData, u64>,
) -> Result<Vec<(DecapReason, u64)>, DatapathError> {
    DecapReason::ALL
        .iter()
        .map(|reason| {
            let values = stats
                .get(&(*reason as u32), 0)
                .map_err(|error| DatapathError::Map { name: MAP_DECAP_STATS, error })?;
            Ok((*reason, values.iter().sum()))
        })
        .collect()
}

/// The counters of the decapsulator pinned in `dir`, or None when nothing
/// is pinned there.
pub fn pinned_counters(dir: &Path) -> Result<Option<Vec<(DecapReason, u64)>>, DatapathError> {
    let path = dir.join(MAP_DECAP_STATS);
    if !path.exists() {
        return Ok(None);
    }
    let map_error = |error| DatapathError::Map { name: MAP_DECAP_STATS, error };
    let data = MapData::from_pin(&path).map_err(map_error)?;
    let stats = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(map_error)?;
    counters_of(&stats).map(Some)
}

/// Removes the decapsulator's pins in `dir`: the program detaches once
/// nothing holds its link. Returns whether anything was pinned.
pub fn remove_pins(dir: &Path) -> Result<bool, DatapathError> {
    remove_named_pins(dir, PINS)
}

/// Every address on this host's interfaces (in this network namespace),
/// loopback's among them: where a VIP of a tunnelled backend lives.
pub fn host_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let mut addresses = Vec::new();
    for interface in nix::ifaddrs::getifaddrs()? {
        let Some(address) = interface.address else { continue };
        if let Some(v4) = address.as_sockaddr_in() {
            addresses.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = address.as_sockaddr_in6() {
            addresses.push(IpAddr::V6(v6.ip()));
        }
    }
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

//! The interfaces besides its own that the datapath sends out of (`lb run
//! --egress`): their entries in LB_EGRESS (the devmap `bpf_redirect_map`
//! reads) and LB_EGRESS_INFO (their MACs, MTUs and tunnel sources), and the
//! pass program their far ends or drivers may need to take redirected frames.

use aya::maps::{Array, DevMap, MapData};
use lb_common::{Egress, MAP_EGRESS, MAP_EGRESS_INFO, MAX_EGRESS};

use super::{Datapath, DatapathError, map_error};

/// The two egress maps, taken from the object at load.
pub(super) struct EgressMaps {
    devices: DevMap<MapData>,
    info: Array<MapData, Egress>,
}

impl EgressMaps {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, DatapathError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(DatapathError::Missing { kind: "map", name })
        };
        let devices = DevMap::try_from(take(MAP_EGRESS)?).map_err(map_error(MAP_EGRESS))?;
        let info = Array::try_from(take(MAP_EGRESS_INFO)?).map_err(map_error(MAP_EGRESS_INFO))?;
        Ok(Self { devices, info })
    }
}

impl Datapath {
    /// Makes egress `index` (1 to MAX_EGRESS - 1) the interface `ifindex`,
    /// whose frames carry `egress`. Backends naming the index are sent
    /// there from then on; write it before any does.
    pub fn set_egress(
        &mut self,
        index: u32,
        ifindex: u32,
        egress: Egress,
    ) -> Result<(), DatapathError> {
        if index == 0 || index >= MAX_EGRESS {
            return Err(DatapathError::TooManyEgress { max: MAX_EGRESS - 1 });
        }
        let maps = &mut self.egress;
        maps.info.set(index, egress, 0).map_err(map_error(MAP_EGRESS_INFO))?;
        maps.devices
            .set(index, ifindex, None, 0)
            .map_err(|error| DatapathError::Egress { ifindex, error: error.to_string() })
    }
}

//! The reconcile step against an in-memory fake of the maps: slot reuse,
//! rollback after a failed change, fail-open, and the order of writes that
//! keeps every packet on a consistent table.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use lb_common::{
    BACKEND_FLAG_DOWN, Backend, FlowEntry, FlowKey, NO_BACKEND, SLOTS_PER_VIP, VipAddressKey,
    VipInfo, VipKey,
};

use super::{FlowCounts, ReconcileError, Reconciler};
use crate::datapath::{DatapathError, Maps};
use crate::model::{
    Affinity, BackendHealth, BackendSpec, CheckSpec, DatapathConfig, DesiredState, HealthMap,
    Limits, Protocol, Scheduler, TunnelConfig, Vip,
};

/// One write to the fake maps, in the order the reconcile step made it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Write {
    SetVip(VipKey, VipInfo),
    RemoveVip(VipKey),
    SetBackend(u32, Backend),
    Table { vip_index: u32, slot: u32 },
    ResetBackendStats(u32),
    PortWord(u32, u64),
}

/// The maps in memory. `fail_set_vip` makes every VIP update fail, as a
/// full or broken map would.
struct FakeMaps {
    config: DatapathConfig,
    vips: HashMap<VipKey, VipInfo>,
    backends: Vec<Backend>,
    maglev: Vec<u32>,
    writes: Vec<Write>,
    fail_set_vip: bool,
}

const CONFIG: DatapathConfig = DatapathConfig {
    hash_seed: 1,
    table_size: 13,
    max_vips: 2,
    max_backends: 4,
    flow_table_size: 16,
    udp_idle_timeout_ms: 1000,
    tcp_idle_timeout_ms: 1000,
    sync_flows: false,
    own_mac: [0; 6],
    tunnel: TunnelConfig::NONE,
};
const LIMITS: Limits = Limits { max_vips: 8, max_backends: 8 };

impl FakeMaps {
    fn new() -> Self {
        let entries = (CONFIG.max_vips * SLOTS_PER_VIP * CONFIG.table_size) as usize;
        Self {
            config: CONFIG,
            vips: HashMap::new(),
            backends: vec![Backend::default(); CONFIG.max_backends as usize],
            maglev: vec![NO_BACKEND; entries],
            writes: Vec::new(),
            fail_set_vip: false,
        }
    }

    fn range(&self, vip_index: u32, slot: u32) -> std::ops::Range<usize> {
        let start = ((vip_index * SLOTS_PER_VIP + slot) * self.config.table_size) as usize;
        start..start + self.config.table_size as usize
    }

    /// The backend slots the VIP's published table points at, sorted and deduplicated.
    fn table_slots(&self, vip: &Vip) -> Vec<u32> {
        let Some(info) = self.vips.get(&vip.key()) else { return Vec::new() };
        let mut slots: Vec<u32> = self.table(info.vip_index, info.active_slot).to_vec();
        slots.sort_unstable();
        slots.dedup();
        slots
    }

    fn position(&self, wanted: &Write) -> usize {
        self.writes
            .iter()
            .position(|write| write == wanted)
            .unwrap_or_else(|| panic!("{wanted:?} was never written: {:?}", self.writes))
    }
}

impl Maps for FakeMaps {
    fn config(&self) -> DatapathConfig {
        self.config
    }
    fn adopted(&self) -> bool {
        false
    }
    fn vip_entries(&self) -> Vec<(VipKey, VipInfo)> {
        self.vips.iter().map(|(key, info)| (*key, *info)).collect()
    }
    fn backend_entries(&self) -> Vec<(u32, Backend)> {
        (0..).zip(self.backends.iter().copied()).filter(|(_, b)| b.family != 0).collect()
    }
    fn write_table(&mut self, vip_index: u32, slot: u32, table: &[u32]) {
        let range = self.range(vip_index, slot);
        self.maglev[range].copy_from_slice(table);
        self.writes.push(Write::Table { vip_index, slot });
    }
    fn maglev_entry(&self, index: u32) -> u32 {
        self.maglev[index as usize]
    }
    fn table(&self, vip_index: u32, slot: u32) -> &[u32] {
        &self.maglev[self.range(vip_index, slot)]
    }
    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DatapathError> {
        if self.fail_set_vip {
            return Err(DatapathError::Mmap(std::io::Error::other("injected map failure")));
        }
        self.vips.insert(key, info);
        self.writes.push(Write::SetVip(key, info));
        Ok(())
    }
    fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        self.vips.get(key).copied()
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), DatapathError> {
        self.vips.remove(key);
        self.writes.push(Write::RemoveVip(*key));
        Ok(())
    }
    fn set_vip_address(&mut self, _: VipAddressKey, _: u32) -> Result<(), DatapathError> {
        Ok(())
    }
    fn set_vip_port_word(&mut self, word: u32, bits: u64) -> Result<(), DatapathError> {
        self.writes.push(Write::PortWord(word, bits));
        Ok(())
    }
    fn backend(&self, slot: u32) -> Option<Backend> {
        self.backends.get(slot as usize).copied()
    }

    fn set_backend(&mut self, slot: u32, backend: Backend) -> Result<(), DatapathError> {
        self.backends[slot as usize] = backend;
        self.writes.push(Write::SetBackend(slot, backend));
        Ok(())
    }
    fn reset_vip_stats(&mut self, _: u32) -> Result<(), DatapathError> {
        Ok(())
    }
    fn reset_backend_stats(&mut self, slot: u32) -> Result<(), DatapathError> {
        self.writes.push(Write::ResetBackendStats(slot));
        Ok(())
    }
    fn flow(&self, _: &FlowKey) -> Option<FlowEntry> {
        None
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([198, 18, 1, last])
}

fn web() -> Vip {
    Vip::new("198.18.0.10:80".parse().expect("endpoint"), Protocol::Tcp)
}

/// A desired state of one VIP with `backends` (weight 1), and a reconciler
/// that knows every backend's MAC.
fn setup(backends: &[u8]) -> (Reconciler<FakeMaps>, DesiredState) {
    let mut reconciler = Reconciler::new(FakeMaps::new());
    for last in 1..=9 {
        reconciler.set_mac(ip(last), [2, 0, 0, 0, 1, last]);
    }
    let mut desired = DesiredState::default();
    desired.add_vip(web(), CheckSpec::default(), Affinity::Flow, LIMITS).expect("vip");
    for last in backends {
        desired.add_backend(&web(), BackendSpec::new(ip(*last), 1), LIMITS).expect("backend");
    }
    (reconciler, desired)
}

fn slot_of(reconciler: &Reconciler<FakeMaps>, last: u8) -> u32 {
    reconciler
        .backends(&web())
        .iter()
        .find(|backend| backend.address == ip(last))
        .map(|backend| backend.slot)
        .expect("backend installed")
}

fn health(entries: &[(u8, bool, bool)]) -> HealthMap {
    entries
        .iter()
        .map(|(last, up, ever_up)| {
            ((web(), ip(*last)), BackendHealth { up: *up, ever_up: *ever_up })
        })
        .collect()
}

#[test]
fn a_freed_backend_slot_is_reused_last_and_starts_with_clean_counters() {
    let (mut reconciler, mut desired) = setup(&[1, 2]);
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    assert_eq!((slot_of(&reconciler, 1), slot_of(&reconciler, 2)), (0, 1));

    desired.remove_backend(&web(), ip(1)).unwrap();
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    let freed = Backend { generation: 1, ..Backend::default() };
    assert_eq!(reconciler.datapath().backends[0], freed, "slot 0 cleared, its generation kept");

    // Slots 2 and 3 were never used: they go first, so slot 0 waits longest.
    for last in [3, 4, 5] {
        desired.add_backend(&web(), BackendSpec::new(ip(last), 1), LIMITS).unwrap();
    }
    reconciler.datapath_mut().writes.clear();
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    assert_eq!([3, 4, 5].map(|last| slot_of(&reconciler, last)), [2, 3, 0]);
    let maps = reconciler.datapath();
    assert!(maps.writes.contains(&Write::ResetBackendStats(0)), "a reused slot's counters restart");
    assert_eq!(maps.backends[0].mac, [2, 0, 0, 0, 1, 5], "slot 0 now names backend 5");
    assert_eq!(maps.backends[0].generation, 2, "a new occupant, a new generation");
    assert_eq!(maps.table_slots(&web()), vec![0, 1, 2, 3]);

    // A fifth backend finds no slot: refused by name.
    desired.add_backend(&web(), BackendSpec::new(ip(6), 1), LIMITS).unwrap();
    let error = reconciler.apply(&desired, &HealthMap::new()).unwrap_err();
    assert!(matches!(error, ReconcileError::Exhausted("backend slot")), "{error}");
}

#[test]
fn after_a_failed_change_applying_the_previous_state_restores_the_maps() {
    let (mut reconciler, before) = setup(&[1, 2]);
    reconciler.apply(&before, &HealthMap::new()).unwrap();
    let published = reconciler.datapath().vips[&web().key()];
    let table = reconciler.datapath().table_slots(&web());

    // The daemon's change: validated, then installed; the install fails.
    let mut after = before.clone();
    after.add_backend(&web(), BackendSpec::new(ip(3), 1), LIMITS).unwrap();
    reconciler.datapath_mut().fail_set_vip = true;
    assert!(reconciler.apply(&after, &HealthMap::new()).is_err());
    // The failed flip left the published table as it was: packets never saw a half change.
    assert_eq!(reconciler.datapath().vips[&web().key()], published);

    // The daemon's rollback: apply what ran before, once the maps work again.
    reconciler.datapath_mut().fail_set_vip = false;
    reconciler.apply(&before, &HealthMap::new()).unwrap();
    let maps = reconciler.datapath();
    assert_eq!(maps.table_slots(&web()), table, "the same backends serve");
    assert_eq!(maps.vips[&web().key()].backend_count, 2);
    assert_eq!(reconciler.backends(&web()).len(), 2, "the added backend's slot was given back");
    assert_eq!(maps.backends.iter().filter(|b| b.family != 0).count(), 2);
}

#[test]
fn with_every_backend_down_the_ones_that_were_up_keep_serving() {
    let (mut reconciler, desired) = setup(&[1, 2, 3]);
    reconciler
        .apply(&desired, &health(&[(1, true, true), (2, true, true), (3, false, false)]))
        .unwrap();
    let status = reconciler.vip_status(&web()).unwrap();
    assert_eq!((status.serving, status.fail_open), (2, false));
    assert_eq!(reconciler.datapath().backends[2].flags, BACKEND_FLAG_DOWN);

    // All down: 1 and 2 had been up, so they serve (fail-open); 3 never was.
    reconciler
        .apply(&desired, &health(&[(1, false, true), (2, false, true), (3, false, false)]))
        .unwrap();
    let status = reconciler.vip_status(&web()).unwrap();
    assert_eq!((status.serving, status.fail_open), (2, true));
    let maps = reconciler.datapath();
    assert_eq!(maps.table_slots(&web()), vec![0, 1], "the table holds the earlier-up backends");
    assert_eq!(maps.vips[&web().key()].backend_count, 2);
    assert_eq!([0, 1, 2].map(|slot| maps.backends[slot].flags), [0, 0, BACKEND_FLAG_DOWN]);

    // One comes back: fail-open ends, only it serves.
    reconciler
        .apply(&desired, &health(&[(1, false, true), (2, false, true), (3, true, true)]))
        .unwrap();
    let status = reconciler.vip_status(&web()).unwrap();
    assert_eq!((status.serving, status.fail_open), (1, false));
    assert_eq!(reconciler.datapath().table_slots(&web()), vec![2]);
}

#[test]
fn a_backend_is_released_only_after_the_table_without_it_is_published() {
    let (mut reconciler, mut desired) = setup(&[1, 2]);
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    reconciler.datapath_mut().writes.clear();

    desired.remove_backend(&web(), ip(1)).unwrap();
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    let maps = reconciler.datapath();
    let flip = maps
        .writes
        .iter()
        .position(|write| matches!(write, Write::SetVip(_, info) if info.backend_count == 1))
        .expect("the table without backend 1 was published");
    let release =
        maps.position(&Write::SetBackend(0, Backend { generation: 1, ..Backend::default() }));
    assert!(
        flip < release,
        "slot 0 was cleared before the table stopped naming it: {:?}",
        maps.writes
    );
    assert!(!maps.table_slots(&web()).contains(&0));

    // A removed VIP is unpublished before its backends' slots are cleared.
    reconciler.datapath_mut().writes.clear();
    desired.remove_vip(&web()).unwrap();
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    let maps = reconciler.datapath();
    let unpublish = maps.position(&Write::RemoveVip(web().key()));
    let release =
        maps.position(&Write::SetBackend(1, Backend { generation: 1, ..Backend::default() }));
    assert!(unpublish < release, "{:?}", maps.writes);
}

#[test]
fn the_port_prefilter_covers_every_published_vip_and_nothing_else() {
    let (mut reconciler, mut desired) = setup(&[1]);
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    let (word, bit) = lb_common::vip_port_bit(lb_common::PROTO_TCP, 80).expect("TCP");
    let port_writes = |maps: &FakeMaps| -> Vec<(u32, u64)> {
        let words = maps.writes.iter().filter_map(|write| match write {
            Write::PortWord(word, bits) => Some((*word, *bits)),
            _ => None,
        });
        words.collect()
    };
    // The first apply writes every word (adopted maps may hold stale
    // ones), with port 80's bit set before the VIP is published.
    let maps = reconciler.datapath();
    let written = port_writes(maps);
    assert_eq!(written.len(), lb_common::VIP_PORT_WORDS as usize);
    assert_eq!(written.iter().filter(|(_, bits)| *bits != 0).collect::<Vec<_>>(), [&(word, bit)]);
    let published = maps.writes.iter().position(|write| matches!(write, Write::SetVip(..)));
    assert!(maps.position(&Write::PortWord(word, bit)) < published.expect("published"));

    // Unchanged VIPs write nothing; a removed VIP's bit is cleared after it
    // is unpublished.
    reconciler.datapath_mut().writes.clear();
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    assert_eq!(port_writes(reconciler.datapath()), []);
    desired.remove_vip(&web()).unwrap();
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    let maps = reconciler.datapath();
    assert_eq!(port_writes(maps), [(word, 0)]);
    assert!(
        maps.position(&Write::RemoveVip(web().key())) < maps.position(&Write::PortWord(word, 0))
    );
}

/// Entries of the published table per backend, in address order.
fn entries(reconciler: &Reconciler<FakeMaps>) -> Vec<u32> {
    reconciler.backends(&web()).iter().map(|backend| backend.table_entries).collect()
}

fn tables_written(reconciler: &Reconciler<FakeMaps>) -> usize {
    reconciler.datapath().writes.iter().filter(|write| matches!(write, Write::Table { .. })).count()
}

/// Active flows of backends 1, 2 and 3, as the counting thread reports them.
fn counted(reconciler: &Reconciler<FakeMaps>, active: [u64; 3]) -> FlowCounts {
    let slots = (1..=3).map(|last| slot_of(reconciler, last));
    FlowCounts {
        active: Arc::new(slots.zip(active).collect()),
        recently_confirmed: 0,
        closing: Default::default(),
    }
}

#[test]
fn least_connections_sends_new_flows_to_the_emptied_backend_and_follows_each_count() {
    let (mut reconciler, mut desired) = setup(&[1, 2, 3]);
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    let by_weight = entries(&reconciler);
    assert!(by_weight.iter().all(|&e| (4..=5).contains(&e)), "{by_weight:?}");

    // Under maglev a count changes nothing: no table is built.
    let built = tables_written(&reconciler);
    reconciler.set_flow_counts(counted(&reconciler, [0, 1_500, 1_500]));
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    assert_eq!((tables_written(&reconciler), entries(&reconciler)), (built, by_weight.clone()));

    // Under least-connections the emptied backend gets nearly all new flows.
    desired.set_scheduling(&web(), None, Some(Scheduler::LeastConnections)).unwrap();
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    let emptied = entries(&reconciler);
    assert!(emptied[0] >= 11, "backend 1 holds no flows but gets {emptied:?} of 13 entries");

    // Once it caught up, shares are even again; the same count builds nothing.
    reconciler.set_flow_counts(counted(&reconciler, [1_500, 1_500, 1_500]));
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    assert_eq!(entries(&reconciler), by_weight);
    let built = tables_written(&reconciler);
    reconciler.set_flow_counts(counted(&reconciler, [1_500, 1_500, 1_500]));
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    assert_eq!(tables_written(&reconciler), built);

    // A draining backend's flows are leaving: they neither hold back nor
    // attract new flows, which the other two share by their counts.
    desired.set_draining(&web(), ip(3), true).unwrap();
    reconciler.set_flow_counts(counted(&reconciler, [0, 1_500, 9_000]));
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    let draining = entries(&reconciler);
    assert!(draining[0] >= 11 && draining[2] == 0, "{draining:?}");

    // Back to maglev: the weights' table again.
    desired.set_draining(&web(), ip(3), false).unwrap();
    desired.set_scheduling(&web(), None, Some(Scheduler::Maglev)).unwrap();
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    assert_eq!(entries(&reconciler), by_weight);
}

/// Backend 1 fails with 975 flows while backend 2 is a little below
/// backend 3: its clients' reconnects, all at once, are shared about evenly
/// rather than mostly thrown at backend 2 (8 and 5 of 13 entries; 10 and 3
/// when the failed backend's flows were not planned for).
#[test]
fn a_failed_backends_reconnecting_clients_are_planned_for() {
    let (mut reconciler, mut desired) = setup(&[1, 2, 3]);
    desired.set_scheduling(&web(), None, Some(Scheduler::LeastConnections)).unwrap();
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    reconciler.set_flow_counts(counted(&reconciler, [975, 963, 1_047]));
    reconciler.apply(&desired, &health(&[(1, false, true)])).unwrap();
    let shares = entries(&reconciler);
    assert_eq!(shares[0], 0, "{shares:?}");
    assert!(
        shares[1].abs_diff(shares[2]) <= 3,
        "the reconnects would pile on backend 2: {shares:?}"
    );
}

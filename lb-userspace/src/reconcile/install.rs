//! Writing what `apply` decided: a VIP's Maglev table into its inactive
//! slot and the flip to it, backend slots given back, and the VIP address
//! and port prefilter maps brought in line with the desired state.

use std::collections::BTreeMap;
use std::time::Instant;

use lb_common::{Backend, NO_BACKEND, VipAddressKey, VipInfo};

use super::{Member, ReconcileError, Reconciler, SLOT_QUIET_TIME};
use crate::datapath::Maps;
use crate::maglev::{Candidate, build_failover_table};
use crate::model::{DesiredState, Vip};

impl<M: Maps> Reconciler<M> {
    /// Builds the table for `members`, writes it to the inactive slot, then
    /// flips the VIP to it with a single map update.
    pub(super) fn install_table(
        &mut self,
        vip: &Vip,
        members: Vec<Member>,
        fail_open: bool,
        flags: u32,
    ) -> Result<(), ReconcileError> {
        let started = Instant::now();
        let table_size = self.datapath.config().table_size;
        let installed = self.installed.get_mut(vip).expect("installed before its table");
        let candidates: Vec<Candidate> = members
            .iter()
            .map(|member| Candidate { address: member.address, weight: member.weight })
            .collect();
        let serving: Vec<bool> = members.iter().map(|member| member.serving).collect();
        let positions = build_failover_table(&candidates, &serving, table_size);
        let serving_count = serving.iter().filter(|&&s| s).count() as u32;
        let slots: Vec<u32> =
            members.iter().map(|member| installed.slots[&member.address]).collect();
        let table: Vec<u32> = positions
            .iter()
            .map(
                |&position| {
                    if position == NO_BACKEND { NO_BACKEND } else { slots[position as usize] }
                },
            )
            .collect();

        let building = started.elapsed();
        let quiet_for = installed.flipped_at.elapsed();
        if quiet_for < SLOT_QUIET_TIME {
            std::thread::sleep(SLOT_QUIET_TIME - quiet_for);
        }
        let installing = Instant::now();
        let next_slot = 1 - installed.active_slot;
        self.datapath.write_table(installed.vip_index, next_slot, &table);
        self.datapath.set_vip(
            vip.key(),
            VipInfo {
                vip_index: installed.vip_index,
                active_slot: next_slot,
                backend_count: serving_count,
                flags,
            },
        )?;
        installed.active_slot = next_slot;
        installed.flipped_at = Instant::now();
        installed.members = members;
        installed.fail_open = fail_open;
        installed.flags = flags;
        self.tables_built += 1;
        self.table_rebuild_time += building + installing.elapsed();
        Ok(())
    }

    /// The generation of the backend in `slot` (0 for a slot not in use).
    pub(super) fn generation(&self, slot: u32) -> u32 {
        self.generations.get(&slot).copied().unwrap_or_default()
    }

    pub(super) fn release_backend(&mut self, slot: u32) -> Result<(), ReconcileError> {
        // The freed slot keeps its generation, so that the next occupant's
        // is new even across a restart.
        let generation = self.generations.remove(&slot).unwrap_or_default();
        self.datapath.set_backend(slot, Backend { generation, ..Backend::default() })?;
        self.backend_slots.give_back(slot);
        Ok(())
    }

    pub(super) fn sync_vip_addresses(
        &mut self,
        desired: &DesiredState,
    ) -> Result<(), ReconcileError> {
        let mut counts: BTreeMap<VipAddressKey, u32> = BTreeMap::new();
        for vip in desired.vips.keys() {
            *counts.entry(VipAddressKey::new(vip.address)).or_default() += 1;
        }
        for key in self.vip_addresses.keys() {
            if !counts.contains_key(key) {
                self.datapath.set_vip_address(*key, 0)?;
            }
        }
        for (key, count) in &counts {
            if self.vip_addresses.get(key) != Some(count) {
                self.datapath.set_vip_address(*key, *count)?;
            }
        }
        self.vip_addresses = counts;
        Ok(())
    }

    /// Writes the words of the port prefilter that changed. `apply` calls it
    /// after unpublishing removed VIPs and before publishing added ones, so
    /// no published VIP's packets are ever filtered out.
    pub(super) fn sync_vip_ports(&mut self, desired: &DesiredState) -> Result<(), ReconcileError> {
        let mut words = vec![0u64; lb_common::VIP_PORT_WORDS as usize];
        for vip in desired.vips.keys() {
            if let Some((word, bit)) = lb_common::vip_port_bit(vip.protocol.number(), vip.port) {
                words[word as usize] |= bit;
            }
        }
        for (word, bits) in (0..).zip(&words) {
            let written = self.vip_port_words.as_ref().map(|old| old[word as usize]);
            if written != Some(*bits) {
                self.datapath.set_vip_port_word(word, *bits)?;
            }
        }
        self.vip_port_words = Some(words);
        Ok(())
    }
}

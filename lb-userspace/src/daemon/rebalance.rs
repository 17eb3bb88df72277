//! The rebalancer, once a second for each VIP that rebalances: pauses while
//! a backend is down, resolving or draining and for the quiet time after
//! the backends changed (or the daemon started); otherwise, while the VIP
//! is out of its band ([`Balancing`]), a round off the loop counts the
//! VIP's flows, marks the chosen ones to close ([`crate::datapath::FlowMarker`]) within the
//! rate, and reports back what it marked and which earlier marks closed.
//!
//! Which flows: of the crowded backend's flows without a mark, those that
//! sent a packet in the last [`rebalance::RECENT`], most recently seen
//! first. A client that sent nothing lately is never chosen (its close
//! would wait for its next packet, long after the imbalance was measured),
//! and a flow only this balancer's peers forward looks silent here, so in
//! a fleet each balancer closes only flows it forwards. Each balancer also
//! closes only its part of the excess (the part of the VIP's flows it sees
//! traffic of), so a fleet together closes about what one balancer would;
//! a balancer alone closes the whole excess (its silent flows are its own,
//! and closing less would leave the backend that gained below the band).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Daemon;
use crate::datapath::{FlowMarker, monotonic_ns};
use crate::health::Health;
use crate::model::{Rebalance, RebalanceMode, Vip};
use crate::rebalance::{self, Balancing, Budget, Member};

/// One VIP's round, as the loop asks for it.
struct Job {
    vip: Vip,
    vip_index: u32,
    /// Serving backends: address, slot, generation, weight.
    backends: Vec<(IpAddr, u32, u32, u32)>,
    settings: Rebalance,
    budget: u64,
    /// Flow sync is on: peers forward part of the VIP's flows.
    fleet: bool,
}

/// What a round found and did for one backend.
struct Closing {
    address: IpAddr,
    share: f64,
    active: u64,
    /// Closes it called for (this balancer's part), before the budget.
    wanted: u64,
    /// Flows marked to close now (none in dry-run).
    marked: u64,
}

/// What a round did for one VIP.
pub(super) struct Done {
    vip: Vip,
    backends: Vec<Closing>,
    skew: f64,
    dry_run: bool,
}

/// What a round did, and which earlier marks closed their flow.
pub(super) struct Round {
    done: Vec<Done>,
    closed: Vec<(u32, u32)>,
}

/// One VIP's rebalancing, as the loop keeps it.
#[derive(Default)]
pub(super) struct VipState {
    budget: Option<Budget>,
    balancing: Balancing,
    /// Slots of the backends this VIP's rounds close on (above their
    /// share), which least-connections then gives only their floor.
    closing: HashSet<u32>,
    /// The serving set last seen, to notice a change.
    fingerprint: Vec<(IpAddr, u32, &'static str)>,
    quiet_until: Option<Instant>,
    /// What `lb vip list` shows: balanced, closing, paused: why.
    pub status: String,
    pub skew: f64,
    /// Per backend: its share of the VIP's open connections.
    pub shares: HashMap<IpAddr, f64>,
    /// Per backend: connections closed since the daemon started.
    pub closed: HashMap<IpAddr, u64>,
    /// Per backend, in dry-run: what the last round would have closed.
    pub would_close: HashMap<IpAddr, u64>,
}

/// The rebalancer's part of the daemon.
pub(super) struct Rebalancer {
    marker: Arc<Mutex<FlowMarker>>,
    started: Instant,
    busy: bool,
    done: mpsc::UnboundedSender<Round>,
    pub vips: HashMap<Vip, VipState>,
}

impl Rebalancer {
    pub fn new(marker: FlowMarker) -> (Self, mpsc::UnboundedReceiver<Round>) {
        let (done, rounds) = mpsc::unbounded_channel();
        let rebalancer = Self {
            marker: Arc::new(Mutex::new(marker)),
            started: Instant::now(),
            busy: false,
            done,
            vips: HashMap::new(),
        };
        (rebalancer, rounds)
    }

    /// Slots of every backend a rebalanced VIP is closing connections on.
    pub fn closing(&self) -> HashSet<u32> {
        self.vips.values().flat_map(|state| state.closing.iter().copied()).collect()
    }
}

impl Daemon {
    /// Once a second: starts a round for the VIPs that need one.
    pub(super) fn rebalance_tick(&mut self) {
        let now = Instant::now();
        let configured: Vec<(Vip, Rebalance)> = self
            .config
            .desired
            .vips
            .iter()
            .filter(|(_, spec)| spec.rebalance.is_on())
            .map(|(vip, spec)| (*vip, spec.rebalance))
            .collect();
        self.rebalancer.vips.retain(|vip, _| configured.iter().any(|(on, _)| on == vip));
        let mut jobs = Vec::new();
        for (vip, settings) in configured {
            if let Some(job) = self.rebalance_job(vip, settings, now) {
                jobs.push(job);
            }
        }
        // A round holds the marker while it walks: never wait for it here.
        if self.rebalancer.busy {
            return;
        }
        let outstanding = self.rebalancer.marker.lock().is_ok_and(|m| m.outstanding() > 0);
        if jobs.is_empty() && !outstanding {
            return;
        }
        self.rebalancer.busy = true;
        let marker = Arc::clone(&self.rebalancer.marker);
        let done = self.rebalancer.done.clone();
        tokio::task::spawn_blocking(move || {
            let mut marker = marker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let round = run_round(&mut marker, jobs);
            let _ = done.send(round);
        });
    }

    /// The round for `vip`, or None (paused, or nothing to close), with its
    /// status recorded.
    fn rebalance_job(&mut self, vip: Vip, settings: Rebalance, now: Instant) -> Option<Job> {
        let spec = self.config.desired.vips.get(&vip)?;
        let vip_index = self.reconciler.vip_index(&vip)?;
        let active = self.active_flows.borrow().clone();
        let owners = self.reconciler.flow_owners(&vip)?;
        let slots: HashMap<IpAddr, (u32, u32)> =
            owners.backends.iter().map(|(slot, address)| (*address, *slot)).collect();
        let mut fingerprint = Vec::new();
        let mut backends = Vec::new();
        let mut paused = None;
        for installed in self.reconciler.backends(&vip) {
            let backend = spec.backends.get(&installed.address)?;
            let down =
                self.checks.state(&vip, installed.address).map(|h| h.health) == Some(Health::Down);
            let state = match () {
                () if installed.mac.is_none() => "resolving",
                () if down => "down",
                () if backend.draining => "draining",
                () => "up",
            };
            fingerprint.push((installed.address, backend.weight, state));
            if state != "up" && paused.is_none() {
                paused = Some(format!("paused: backend {} is {state}", installed.address));
            }
            let (slot, generation) = *slots.get(&installed.address)?;
            backends.push((installed.address, slot, generation, backend.weight));
        }
        let started = self.rebalancer.started;
        let quiet = Duration::from_secs(u64::from(settings.quiet_s));
        let state = self.rebalancer.vips.entry(vip).or_default();
        if state.fingerprint != fingerprint {
            state.fingerprint = fingerprint;
            state.quiet_until = Some(now.max(started) + quiet);
        }
        let budget = state.budget.get_or_insert_with(|| Budget::new(now));
        let quiet_left = state.quiet_until.map_or(Duration::ZERO, |until| until - now.min(until));
        let pause = paused.or_else(|| {
            (!quiet_left.is_zero())
                .then(|| format!("paused: quiet for {:.0} s more", quiet_left.as_secs_f64().ceil()))
        });
        if let Some(why) = pause {
            budget.empty(now);
            state.status = why;
            state.closing.clear();
            return None;
        }
        let members: Vec<Member> = backends
            .iter()
            .map(|(_, slot, _, weight)| Member {
                weight: *weight,
                active: active.get(slot).copied().unwrap_or(0),
                pending: 0,
            })
            .collect();
        let available = budget.available(settings.rate, now);
        if !state.balancing.update(&members, settings.band_percent) {
            state.status = "balanced".to_owned();
            state.skew = rebalance::skew(&members);
            state.would_close.clear();
            state.closing.clear();
            return None;
        }
        let above = rebalance::closes(&members);
        state.closing = if settings.mode == RebalanceMode::DryRun {
            HashSet::new()
        } else {
            let slots = backends.iter().zip(above).filter(|(_, wanted)| *wanted > 0);
            slots.map(|((_, slot, _, _), _)| *slot).collect()
        };
        Some(Job { vip, vip_index, backends, settings, budget: available, fleet: self.sync_on })
    }

    /// A round came back: its marks are spent from the budgets, closes
    /// counted, and what it did logged.
    pub(super) fn rebalanced(&mut self, round: Round) {
        self.rebalancer.busy = false;
        for (vip_index, slot) in round.closed {
            let Some((vip, address)) = self.backend_of(vip_index, slot) else { continue };
            let state = self.rebalancer.vips.entry(vip).or_default();
            *state.closed.entry(address).or_default() += 1;
        }
        for done in round.done {
            let state = self.rebalancer.vips.entry(done.vip).or_default();
            let marked: u64 = done.backends.iter().map(|b| b.marked).sum();
            if let Some(budget) = state.budget.as_mut() {
                budget.spend(marked);
            }
            state.skew = done.skew;
            state.shares = done.backends.iter().map(|b| (b.address, b.share)).collect();
            if done.dry_run {
                let would: HashMap<IpAddr, u64> =
                    done.backends.iter().map(|b| (b.address, b.wanted)).collect();
                let total: u64 = would.values().sum();
                if would != state.would_close {
                    tracing::info!(vip = %done.vip, would_close = total, "rebalance dry-run: closing nothing; this is what would be closed");
                }
                state.would_close = would;
                state.status = format!("dry-run: would close {total}");
                continue;
            }
            state.status = "closing".to_owned();
            for backend in done.backends.iter().filter(|b| b.marked > 0) {
                tracing::info!(vip = %done.vip, backend = %backend.address, active = backend.active, share = backend.share.round(), closing = backend.marked, "rebalancing: closing connections above the share");
            }
        }
    }

    /// The rebalancer's status for `lb vip list`.
    pub(super) fn rebalancing(&self, vip: &Vip, settings: Rebalance) -> String {
        if !settings.is_on() {
            return "off".to_owned();
        }
        match self.rebalancer.vips.get(vip) {
            Some(state) if !state.status.is_empty() => state.status.clone(),
            _ => "starting".to_owned(),
        }
    }

    fn backend_of(&self, vip_index: u32, slot: u32) -> Option<(Vip, IpAddr)> {
        self.config.desired.vips.keys().find_map(|vip| {
            if self.reconciler.vip_index(vip) != Some(vip_index) {
                return None;
            }
            let backends = self.reconciler.backends(vip);
            backends.iter().find(|b| b.slot == slot).map(|b| (*vip, b.address))
        })
    }
}

/// Off the loop: for each job, a census, the closes it calls for within its
/// budget and this balancer's part, and the marks; then which marks closed.
fn run_round(marker: &mut FlowMarker, jobs: Vec<Job>) -> Round {
    let mut done = Vec::new();
    let recent = rebalance::RECENT.as_nanos() as u64;
    for job in jobs {
        let now = monotonic_ns();
        let slots: Vec<(u32, u32)> = job.backends.iter().map(|b| (b.1, b.2)).collect();
        let mut census = marker.census(job.vip_index, &slots, now, recent);
        let members: Vec<Member> = job
            .backends
            .iter()
            .map(|(_, slot, _, weight)| {
                let counted = census.get(slot).cloned().unwrap_or_default();
                Member { weight: *weight, active: counted.active, pending: counted.pending }
            })
            .collect();
        let active: u64 = members.iter().map(|m| m.active).sum();
        let seen: u64 = census.values().map(|c| c.candidates.len() as u64 + c.pending).sum();
        // Alone, every flow is ours (a silent one too); in a fleet, those
        // that sent us nothing lately are mostly our peers'.
        let part = match (job.fleet, active) {
            (false, _) => 1.0,
            (true, 0) => 0.0,
            (true, _) => (seen as f64 / active as f64).min(1.0),
        };
        let wanted: Vec<u64> = rebalance::closes(&members)
            .iter()
            .map(|&want| (want as f64 * part).round() as u64)
            .collect();
        let given = rebalance::within_budget(&wanted, job.budget);
        let shares = rebalance::shares(&members);
        let dry_run = job.settings.mode == RebalanceMode::DryRun;
        let mut backends = Vec::new();
        for (index, (address, slot, _, _)) in job.backends.iter().enumerate() {
            let candidates = census.remove(slot).map(|c| c.candidates).unwrap_or_default();
            let marked = if dry_run {
                0
            } else {
                let chosen = candidates.iter().take(given[index] as usize);
                chosen.filter(|(key, entry)| marker.mark(key, entry, now)).count() as u64
            };
            backends.push(Closing {
                address: *address,
                share: shares[index],
                active: members[index].active,
                wanted: wanted[index],
                marked,
            });
        }
        done.push(Done { vip: job.vip, backends, skew: rebalance::skew(&members), dry_run });
    }
    Round { done, closed: marker.settle(monotonic_ns()) }
}

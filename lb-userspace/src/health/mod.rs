//! Health checks: one probe task per backend of each VIP, supervised here.
//! [`Checks`] starts, restarts and stops the tasks as the configuration
//! changes, and turns their reports into up/down transitions with each
//! backend's [`HealthState`]. Nothing here touches BPF maps: the daemon
//! hands [`Checks::health_map`] to the reconcile step.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::SystemTime;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::model::{BackendHealth, CheckKind, CheckSpec, DesiredState, HealthMap, Vip};

mod probe;
mod state;

pub use probe::check_once;
pub use state::{Health, HealthState, Transition};

/// One probe outcome, sent by a check task to the daemon.
#[derive(Debug)]
pub struct HealthReport {
    pub vip: Vip,
    pub backend: IpAddr,
    /// The task's generation: reports of a task replaced since are ignored.
    pub generation: u64,
    pub outcome: Result<(), String>,
    /// How long the probe took.
    pub duration: std::time::Duration,
}

/// When check tasks are created, which decides a new backend's first health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// `lb run` with a fresh datapath: the first check decides.
    Fresh,
    /// `lb run` adopting a pinned datapath that is forwarding: up until the
    /// first check says otherwise.
    Adopted,
    /// A change while running: down until `rise` checks pass.
    Running,
}

/// A backend's probe task and what its reports have established.
struct Checker {
    spec: CheckSpec,
    /// Reports from an older task (before a spec change) carry another
    /// generation and are ignored.
    generation: u64,
    /// None for check kind `none`: nothing to probe.
    task: Option<JoinHandle<()>>,
    state: HealthState,
    /// How long the last probe took.
    last_check: Option<std::time::Duration>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Spawns the probe loop of one (VIP, backend); its reports carry `generation`.
fn start_check(
    key: (Vip, IpAddr),
    spec: &CheckSpec,
    generation: u64,
    reports: &mpsc::Sender<HealthReport>,
) -> JoinHandle<()> {
    tokio::spawn(probe::check_loop(key.0, key.1, spec.clone(), generation, reports.clone()))
}

/// The check tasks of every (VIP, backend), and their health.
pub struct Checks {
    checkers: HashMap<(Vip, IpAddr), Checker>,
    reports: mpsc::Sender<HealthReport>,
    next_generation: u64,
}

impl Checks {
    /// Tasks report on `reports`; feed what arrives to [`Self::observe`].
    pub fn new(reports: mpsc::Sender<HealthReport>) -> Self {
        Self { checkers: HashMap::new(), reports, next_generation: 0 }
    }

    /// Starts, restarts and stops check tasks to match `desired`. A changed
    /// spec keeps the backend's health and restarts its counts.
    pub fn sync(&mut self, desired: &DesiredState, start: Start) {
        let now = SystemTime::now();
        let mut wanted: HashMap<(Vip, IpAddr), CheckSpec> = HashMap::new();
        for (vip, spec) in &desired.vips {
            for address in spec.backends.keys() {
                wanted.insert((*vip, *address), spec.check.clone());
            }
        }
        self.checkers.retain(|key, _| wanted.contains_key(key));
        for (key, spec) in wanted {
            if self.checkers.get(&key).is_some_and(|checker| checker.spec == spec) {
                continue;
            }
            let state = match self.checkers.remove(&key) {
                _ if spec.kind == CheckKind::None => HealthState::new_unchecked(now),
                Some(old) => HealthState { successes: 0, failures: 0, ..old.state.clone() },
                None => match start {
                    Start::Adopted => HealthState::new_adopted(now),
                    Start::Fresh => HealthState::new_at_start(now),
                    Start::Running => HealthState::new_added(now),
                },
            };
            self.next_generation += 1;
            let generation = self.next_generation;
            let task = (spec.kind != CheckKind::None)
                .then(|| start_check(key, &spec, generation, &self.reports));
            self.checkers.insert(key, Checker { spec, generation, task, state, last_check: None });
        }
    }

    /// Starts again every check task that ended (a probe loop only ends by
    /// a bug or a panic), keeping the backend's health.
    pub fn restart_dead(&mut self) {
        for (key, checker) in &mut self.checkers {
            if !checker.task.as_ref().is_some_and(JoinHandle::is_finished) {
                continue;
            }
            tracing::error!(vip = %key.0, backend = %key.1, "a health check task died: restarting it");
            self.next_generation += 1;
            checker.generation = self.next_generation;
            checker.task =
                Some(start_check(*key, &checker.spec, checker.generation, &self.reports));
        }
    }

    /// Records one report; returns the transition it caused, if any.
    /// Reports of removed backends or replaced tasks are ignored.
    pub fn observe(&mut self, report: HealthReport) -> Option<Transition> {
        let checker = self.checkers.get_mut(&(report.vip, report.backend))?;
        if checker.generation != report.generation {
            return None;
        }
        let (rise, fall) = (checker.spec.rise, checker.spec.fall);
        checker.last_check = Some(report.duration);
        checker.state.observe(report.outcome, rise, fall, SystemTime::now())
    }

    /// What the reconcile step needs to know of every checked backend.
    pub fn health_map(&self) -> HealthMap {
        self.checkers
            .iter()
            .map(|(key, checker)| {
                let up = checker.state.health == Health::Up;
                (*key, BackendHealth { up, ever_up: checker.state.ever_up })
            })
            .collect()
    }

    /// How long the backend's last probe took, if one ran.
    pub fn last_check(&self, vip: &Vip, backend: IpAddr) -> Option<std::time::Duration> {
        self.checkers.get(&(*vip, backend)).and_then(|checker| checker.last_check)
    }

    pub fn state(&self, vip: &Vip, backend: IpAddr) -> Option<&HealthState> {
        self.checkers.get(&(*vip, backend)).map(|checker| &checker.state)
    }
}

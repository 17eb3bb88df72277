//! What differs between two desired states, VIP by VIP and backend by
//! backend: what `lb config diff` prints and `lb config apply` and SIGHUP
//! log. Pure: applying a new state is the reconcile step's job.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{BackendSpec, DesiredState, VipSpec};

/// One difference, from the running state to the new one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    VipAdded {
        vip: String,
        backends: usize,
    },
    VipRemoved {
        vip: String,
        backends: usize,
        /// Established flows its removal breaks, as the balancer counted
        /// them (0 where nothing counts them).
        #[serde(default)]
        active_flows: u64,
    },
    /// Settings of a VIP present in both: `what` says which, from and to.
    VipChanged {
        vip: String,
        what: Vec<String>,
    },
    BackendAdded {
        vip: String,
        backend: IpAddr,
        weight: u32,
    },
    BackendRemoved {
        vip: String,
        backend: IpAddr,
        /// Established flows its removal breaks, as for `VipRemoved`.
        #[serde(default)]
        active_flows: u64,
    },
    BackendChanged {
        vip: String,
        backend: IpAddr,
        what: Vec<String>,
    },
}

impl std::fmt::Display for Change {
    /// One line: `+` added, `-` removed, `~` changed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::VipAdded { vip, backends } => write!(f, "+ vip {vip} ({backends} backends)"),
            Change::VipRemoved { vip, backends, active_flows } => {
                write!(f, "- vip {vip} (and its {backends} backends){}", breaks(*active_flows))
            }
            Change::VipChanged { vip, what } => write!(f, "~ vip {vip}: {}", what.join(", ")),
            Change::BackendAdded { vip, backend, weight } => {
                write!(f, "+ backend {backend} of {vip} (weight {weight})")
            }
            Change::BackendRemoved { vip, backend, active_flows } => {
                write!(f, "- backend {backend} of {vip}{}", breaks(*active_flows))
            }
            Change::BackendChanged { vip, backend, what } => {
                write!(f, "~ backend {backend} of {vip}: {}", what.join(", "))
            }
        }
    }
}

fn breaks(count: u64) -> String {
    if count == 0 { String::new() } else { format!(": breaks its {}", active_flows(count)) }
}

/// "1 active flow", "N active flows": how a count of flows reads.
pub fn active_flows(count: u64) -> String {
    match count {
        1 => "1 active flow".to_owned(),
        count => format!("{count} active flows"),
    }
}

impl Change {
    /// A removal's VIP, backend (None for a whole VIP) and the count of the
    /// established flows it breaks, to fill in.
    pub fn removal(&mut self) -> Option<(&str, Option<IpAddr>, &mut u64)> {
        match self {
            Change::VipRemoved { vip, active_flows, .. } => Some((vip, None, active_flows)),
            Change::BackendRemoved { vip, backend, active_flows } => {
                Some((vip, Some(*backend), active_flows))
            }
            _ => None,
        }
    }

    /// The established flows a removal breaks (0 for any other change).
    pub fn broken_flows(&self) -> u64 {
        match self {
            Change::VipRemoved { active_flows, .. }
            | Change::BackendRemoved { active_flows, .. } => *active_flows,
            _ => 0,
        }
    }
}

/// Every difference from `running` to `next`, in VIP order; a VIP's own
/// change comes before its backends'.
pub fn diff(running: &DesiredState, next: &DesiredState) -> Vec<Change> {
    let mut changes = Vec::new();
    for (vip, spec) in &running.vips {
        if !next.vips.contains_key(vip) {
            changes.push(Change::VipRemoved {
                vip: vip.to_string(),
                backends: spec.backends.len(),
                active_flows: 0,
            });
        }
    }
    for (vip, spec) in &next.vips {
        let name = vip.to_string();
        let Some(old) = running.vips.get(vip) else {
            changes.push(Change::VipAdded { vip: name.clone(), backends: spec.backends.len() });
            for backend in spec.backends.values() {
                changes.push(added(&name, backend));
            }
            continue;
        };
        let what = vip_settings(old, spec);
        if !what.is_empty() {
            changes.push(Change::VipChanged { vip: name.clone(), what });
        }
        for address in old.backends.keys().filter(|address| !spec.backends.contains_key(address)) {
            changes.push(Change::BackendRemoved {
                vip: name.clone(),
                backend: *address,
                active_flows: 0,
            });
        }
        for (address, backend) in &spec.backends {
            match old.backends.get(address) {
                None => changes.push(added(&name, backend)),
                Some(before) => {
                    let what = backend_settings(before, backend);
                    if !what.is_empty() {
                        changes.push(Change::BackendChanged {
                            vip: name.clone(),
                            backend: *address,
                            what,
                        });
                    }
                }
            }
        }
    }
    changes
}

fn added(vip: &str, backend: &BackendSpec) -> Change {
    Change::BackendAdded { vip: vip.to_owned(), backend: backend.address, weight: backend.weight }
}

fn from_to(name: &str, from: impl std::fmt::Display, to: impl std::fmt::Display) -> String {
    format!("{name} {from} -> {to}")
}

fn vip_settings(old: &VipSpec, new: &VipSpec) -> Vec<String> {
    let mut what = Vec::new();
    if old.scheduler != new.scheduler {
        what.push(from_to("scheduler", old.scheduler, new.scheduler));
    }
    if old.affinity != new.affinity {
        what.push(from_to("affinity", old.affinity, new.affinity));
    }
    if old.rebalance != new.rebalance {
        what.push(from_to("rebalance", old.rebalance, new.rebalance));
    }
    if old.forwarding != new.forwarding {
        what.push(from_to("forwarding", old.forwarding, new.forwarding));
    }
    if old.check != new.check {
        let json = |check| serde_json::to_string(check).unwrap_or_default();
        what.push(from_to("check", json(&old.check), json(&new.check)));
    }
    what
}

fn backend_settings(old: &BackendSpec, new: &BackendSpec) -> Vec<String> {
    let mut what = Vec::new();
    if old.weight != new.weight {
        what.push(from_to("weight", old.weight, new.weight));
    }
    if old.draining != new.draining {
        what.push(from_to("draining", old.draining, new.draining));
    }
    what
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CheckSpec, Limits, Protocol, Scheduler, Vip};

    fn vip(port: u16) -> Vip {
        Vip::new(std::net::SocketAddr::new([198, 18, 0, 10].into(), port), Protocol::Tcp)
    }

    fn state(vips: &[(u16, &[(u8, u32)])]) -> DesiredState {
        let mut state = DesiredState::default();
        for (port, backends) in vips {
            let limits = Limits { max_vips: 64, max_backends: 64 };
            state.add_vip(vip(*port), CheckSpec::default(), Default::default(), limits).unwrap();
            for (last, weight) in *backends {
                let backend = BackendSpec::new(IpAddr::from([198, 18, 1, *last]), *weight);
                state.add_backend(&vip(*port), backend, limits).unwrap();
            }
        }
        state
    }

    #[test]
    fn the_same_state_has_no_differences() {
        let running = state(&[(80, &[(1, 1), (2, 1)])]);
        assert_eq!(diff(&running, &running.clone()), []);
    }

    #[test]
    fn every_kind_of_difference_is_one_line() {
        let running = state(&[(80, &[(1, 1), (2, 1)]), (443, &[(1, 1)])]);
        let mut next = state(&[(80, &[(2, 3), (3, 1)]), (8080, &[(4, 1)])]);
        next.vips.get_mut(&vip(80)).unwrap().scheduler = Scheduler::LeastConnections;
        next.vips
            .get_mut(&vip(80))
            .unwrap()
            .backends
            .get_mut(&[198, 18, 1, 2].into())
            .unwrap()
            .draining = true;
        let lines: Vec<String> = diff(&running, &next).iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "- vip 198.18.0.10:443/tcp (and its 1 backends)",
                "~ vip 198.18.0.10:80/tcp: scheduler maglev -> least-connections",
                "- backend 198.18.1.1 of 198.18.0.10:80/tcp",
                "~ backend 198.18.1.2 of 198.18.0.10:80/tcp: weight 1 -> 3, draining false -> true",
                "+ backend 198.18.1.3 of 198.18.0.10:80/tcp (weight 1)",
                "+ vip 198.18.0.10:8080/tcp (1 backends)",
                "+ backend 198.18.1.4 of 198.18.0.10:8080/tcp (weight 1)",
            ]
        );
    }
}

//! The desired state an operator declares: VIPs and their backends, and the
//! rules every change must pass. Shared by the config file, the persisted
//! state, the control API and the daemon.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{CheckSpec, Forwarding, Rebalance, Vip};

/// Backend weights accepted, inclusive. A weight is relative to the other
/// backends of the same VIP.
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=256;
pub const DEFAULT_WEIGHT: u32 = 1;

/// One backend of a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub address: IpAddr,
    pub weight: u32,
    /// Receives no new flows; its established flows continue.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

impl BackendSpec {
    pub fn new(address: IpAddr, weight: u32) -> Self {
        Self { address, weight, draining: false }
    }
}

/// What a VIP hashes to pick a backend for a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Affinity {
    /// The whole flow (client address and port, VIP, protocol): connections
    /// spread evenly, even from one client.
    #[default]
    Flow,
    /// The client address only: all of a client's connections go to one
    /// backend (and to the same one on VIPs with the same backend set).
    ClientIp,
}

/// How a VIP shares new flows among its serving backends. Established flows
/// never move under either: the flow table pins them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// In proportion to the weights, by the Maglev table alone: every
    /// balancer with the same configuration picks the same backend.
    #[default]
    Maglev,
    /// Toward the backends with the fewest active flows for their weight, so
    /// that open connections even out after a restart or a scale-up.
    LeastConnections,
}

/// Writes a setting as the command line and the config spell it (`least-connections`).
pub(super) fn write_value_name(
    value: &impl clap::ValueEnum,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    match value.to_possible_value() {
        Some(possible) => f.write_str(possible.get_name()),
        None => Ok(()),
    }
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_value_name(self, f)
    }
}

impl std::fmt::Display for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_value_name(self, f)
    }
}

/// A VIP's configuration: how its backends are checked and chosen, and the backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipSpec {
    pub check: CheckSpec,
    pub affinity: Affinity,
    pub scheduler: Scheduler,
    pub rebalance: Rebalance,
    pub forwarding: Forwarding,
    pub backends: BTreeMap<IpAddr, BackendSpec>,
}

/// Everything configured: VIPs and their backends, ordered so that output and
/// table building are deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub vips: BTreeMap<Vip, VipSpec>,
}

/// Why a change to the desired state was refused. Each message names the
/// input and what would be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChangeError {
    #[error("VIP {0} already exists")]
    VipExists(Vip),
    #[error("VIP {0} does not exist (see `lb vip list`)")]
    UnknownVip(Vip),
    #[error("backend {backend} already serves VIP {vip}")]
    BackendExists { vip: Vip, backend: IpAddr },
    #[error("backend {backend} does not serve VIP {vip} (see `lb backend list`)")]
    UnknownBackend { vip: Vip, backend: IpAddr },
    #[error("weight {0} is out of range: expected {min} to {max}{hint}", min = WEIGHT_RANGE.start(), max = WEIGHT_RANGE.end(), hint = if *.0 == 0 { " (to stop new flows to a backend, drain it: `lb backend drain`, or draining = true in a file)" } else { "" })]
    WeightOutOfRange(u32),
    #[error(
        "backend {backend} is {backend_family} but VIP {vip} is {vip_family}: every forwarding mode needs the same family (IPv4 in IPv4, IPv6 in IPv6)"
    )]
    FamilyMismatch {
        vip: Vip,
        backend: IpAddr,
        vip_family: &'static str,
        backend_family: &'static str,
    },
    #[error("VIP address {0} is not usable: {1}")]
    BadVipAddress(IpAddr, &'static str),
    #[error("backend address {0} is not usable: {1}")]
    BadBackendAddress(IpAddr, &'static str),
    #[error(
        "backend {vip_address} is VIP {vip}'s own address: the balancer would send the VIP's packets back to itself; give the backend's own address"
    )]
    BackendIsVip { vip: Vip, vip_address: IpAddr },
    #[error("VIP port 0 is not usable")]
    PortZero,
    #[error("VIP {vip} would be the {count}th VIP, above the limit of {limit} (max_vips)")]
    TooManyVips { vip: Vip, count: usize, limit: u32 },
    #[error(
        "VIP {vip} would have {count} backends, above the limit of {limit} (max_backends, shared by all VIPs)"
    )]
    TooManyBackends { vip: Vip, count: usize, limit: u32 },
    #[error("{0}")]
    BadCheck(String),
    #[error("{0}")]
    BadRebalance(String),
    #[error("VIP {vip}: {reason}")]
    BadForwarding { vip: Vip, reason: &'static str },
}

fn family_name(address: IpAddr) -> &'static str {
    if address.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Why `address` can be neither a VIP nor a backend, if it cannot.
fn unusable(address: IpAddr) -> Option<&'static str> {
    if address.is_loopback() {
        return Some("a loopback address never leaves its host: use an address on the network");
    }
    if let IpAddr::V6(v6) = address
        && v6.to_ipv4_mapped().is_some()
    {
        return Some("an IPv4-mapped IPv6 address: write the IPv4 address itself");
    }
    (address.is_unspecified()
        || address.is_multicast()
        || address == IpAddr::from([255, 255, 255, 255]))
    .then_some("use a unicast address")
}

/// Why `vip` can never be a VIP, whatever else is configured: the checks a
/// command line makes before asking the daemon.
pub fn refuse_vip(vip: &Vip) -> Result<(), ChangeError> {
    if let Some(why) = unusable(vip.address) {
        return Err(ChangeError::BadVipAddress(vip.address, why));
    }
    if vip.port == 0 {
        return Err(ChangeError::PortZero);
    }
    Ok(())
}

/// Why `address` can never be a backend.
pub fn refuse_backend_address(address: IpAddr) -> Result<(), ChangeError> {
    unusable(address).map_or(Ok(()), |why| Err(ChangeError::BadBackendAddress(address, why)))
}

/// Why `weight` can never be a backend's weight.
pub fn refuse_weight(weight: u32) -> Result<(), ChangeError> {
    if WEIGHT_RANGE.contains(&weight) { Ok(()) } else { Err(ChangeError::WeightOutOfRange(weight)) }
}

/// Limits that come from map sizes, checked before any change is accepted.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_vips: u32,
    pub max_backends: u32,
}

impl DesiredState {
    pub fn add_vip(
        &mut self,
        vip: Vip,
        check: CheckSpec,
        affinity: Affinity,
        limits: Limits,
    ) -> Result<(), ChangeError> {
        check.validate().map_err(ChangeError::BadCheck)?;
        refuse_vip(&vip)?;
        if self.vips.contains_key(&vip) {
            return Err(ChangeError::VipExists(vip));
        }
        let count = self.vips.len() + 1;
        if count > limits.max_vips as usize {
            return Err(ChangeError::TooManyVips { vip, count, limit: limits.max_vips });
        }
        self.vips.insert(vip, VipSpec { check, affinity, ..VipSpec::default() });
        Ok(())
    }

    /// Changes how the VIP picks backends for new flows; established flows stay.
    pub fn set_scheduling(
        &mut self,
        vip: &Vip,
        affinity: Option<Affinity>,
        scheduler: Option<Scheduler>,
    ) -> Result<(), ChangeError> {
        self.configure(vip, affinity, scheduler, None, None)
    }

    /// [`Self::set_scheduling`], the rebalancer and the forwarding mode at
    /// once, checked together (rebalancing needs least-connections), so
    /// that one change can turn both on or both off. Nothing changes unless
    /// all of it is accepted.
    pub fn configure(
        &mut self,
        vip: &Vip,
        affinity: Option<Affinity>,
        scheduler: Option<Scheduler>,
        rebalance: Option<Rebalance>,
        forwarding: Option<Forwarding>,
    ) -> Result<(), ChangeError> {
        let spec = self.vips.get_mut(vip).ok_or(ChangeError::UnknownVip(*vip))?;
        let scheduler = scheduler.unwrap_or(spec.scheduler);
        let rebalance = rebalance.unwrap_or(spec.rebalance);
        let forwarding = forwarding.unwrap_or(spec.forwarding);
        rebalance.check(vip, scheduler)?;
        forwarding.check().map_err(|reason| ChangeError::BadForwarding { vip: *vip, reason })?;
        spec.affinity = affinity.unwrap_or(spec.affinity);
        spec.scheduler = scheduler;
        spec.rebalance = rebalance;
        spec.forwarding = forwarding;
        Ok(())
    }

    pub fn set_check(&mut self, vip: &Vip, check: CheckSpec) -> Result<(), ChangeError> {
        check.validate().map_err(ChangeError::BadCheck)?;
        self.vips.get_mut(vip).ok_or(ChangeError::UnknownVip(*vip))?.check = check;
        Ok(())
    }

    pub fn remove_vip(&mut self, vip: &Vip) -> Result<(), ChangeError> {
        self.vips.remove(vip).map(|_| ()).ok_or(ChangeError::UnknownVip(*vip))
    }

    pub fn add_backend(
        &mut self,
        vip: &Vip,
        backend: BackendSpec,
        limits: Limits,
    ) -> Result<(), ChangeError> {
        refuse_weight(backend.weight)?;
        refuse_backend_address(backend.address)?;
        if backend.address == vip.address {
            return Err(ChangeError::BackendIsVip { vip: *vip, vip_address: vip.address });
        }
        if backend.address.is_ipv4() != vip.address.is_ipv4() {
            return Err(ChangeError::FamilyMismatch {
                vip: *vip,
                backend: backend.address,
                vip_family: family_name(vip.address),
                backend_family: family_name(backend.address),
            });
        }
        let total: usize = self.vips.values().map(|spec| spec.backends.len()).sum();
        let backends = &mut self.vips.get_mut(vip).ok_or(ChangeError::UnknownVip(*vip))?.backends;
        if backends.contains_key(&backend.address) {
            return Err(ChangeError::BackendExists { vip: *vip, backend: backend.address });
        }
        if total + 1 > limits.max_backends as usize {
            return Err(ChangeError::TooManyBackends {
                vip: *vip,
                count: backends.len() + 1,
                limit: limits.max_backends,
            });
        }
        backends.insert(backend.address, backend);
        Ok(())
    }

    fn backend_mut(&mut self, vip: &Vip, backend: IpAddr) -> Result<&mut BackendSpec, ChangeError> {
        let backends = &mut self.vips.get_mut(vip).ok_or(ChangeError::UnknownVip(*vip))?.backends;
        backends.get_mut(&backend).ok_or(ChangeError::UnknownBackend { vip: *vip, backend })
    }

    /// Stops (or resumes) new flows to a backend; its established flows continue.
    pub fn set_draining(
        &mut self,
        vip: &Vip,
        backend: IpAddr,
        draining: bool,
    ) -> Result<(), ChangeError> {
        self.backend_mut(vip, backend)?.draining = draining;
        Ok(())
    }

    pub fn set_weight(
        &mut self,
        vip: &Vip,
        backend: IpAddr,
        weight: u32,
    ) -> Result<(), ChangeError> {
        refuse_weight(weight)?;
        self.backend_mut(vip, backend)?.weight = weight;
        Ok(())
    }

    pub fn remove_backend(&mut self, vip: &Vip, backend: IpAddr) -> Result<(), ChangeError> {
        let backends = &mut self.vips.get_mut(vip).ok_or(ChangeError::UnknownVip(*vip))?.backends;
        backends
            .remove(&backend)
            .map(|_| ())
            .ok_or(ChangeError::UnknownBackend { vip: *vip, backend })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, parse_address, parse_endpoint};

    const LIMITS: Limits = Limits { max_vips: 2, max_backends: 3 };

    fn vip(text: &str) -> Vip {
        Vip::new(parse_endpoint(text).unwrap(), Protocol::Tcp)
    }

    fn backend(text: &str, weight: u32) -> BackendSpec {
        BackendSpec::new(parse_address(text).unwrap(), weight)
    }

    #[test]
    fn endpoints_and_addresses_parse_or_say_why() {
        assert_eq!(vip("[fd00:198:18::10]:443").to_string(), "[fd00:198:18::10]:443/tcp");
        assert!(parse_endpoint("198.18.0.10").unwrap_err().contains("ADDRESS:PORT"));
        assert!(parse_address("198.18.1.1:80").unwrap_err().contains("without a port"));
        assert_eq!(parse_address("[fd00::1]").unwrap(), "fd00::1".parse::<IpAddr>().unwrap());
        assert!("sctp".parse::<Protocol>().unwrap_err().contains("tcp or udp"));
    }

    #[test]
    fn refused_changes_leave_the_state_as_it_was() {
        let mut state = DesiredState::default();
        let web = vip("198.18.0.10:80");
        state.add_vip(web, CheckSpec::default(), Affinity::Flow, LIMITS).unwrap();
        state.add_backend(&web, backend("198.18.1.1", 1), LIMITS).unwrap();
        let before = state.clone();

        let errors = [
            state.add_vip(web, CheckSpec::default(), Affinity::Flow, LIMITS).unwrap_err(),
            state.add_backend(&web, backend("198.18.1.1", 2), LIMITS).unwrap_err(),
            state.add_backend(&web, backend("198.18.1.2", 0), LIMITS).unwrap_err(),
            state.add_backend(&web, backend("198.18.1.2", 257), LIMITS).unwrap_err(),
            state.add_backend(&web, backend("fd00::2", 1), LIMITS).unwrap_err(),
            state
                .add_backend(&vip("198.18.0.11:80"), backend("198.18.1.2", 1), LIMITS)
                .unwrap_err(),
            state.remove_backend(&web, parse_address("198.18.1.9").unwrap()).unwrap_err(),
            state
                .add_vip(vip("0.0.0.0:80"), CheckSpec::default(), Affinity::Flow, LIMITS)
                .unwrap_err(),
            state
                .add_vip(vip("198.18.0.10:0"), CheckSpec::default(), Affinity::Flow, LIMITS)
                .unwrap_err(),
            state
                .add_vip(vip("127.0.0.1:80"), CheckSpec::default(), Affinity::Flow, LIMITS)
                .unwrap_err(),
            state
                .add_vip(
                    vip("[::ffff:198.18.0.12]:80"),
                    CheckSpec::default(),
                    Affinity::Flow,
                    LIMITS,
                )
                .unwrap_err(),
            state.add_backend(&web, backend("127.0.0.1", 1), LIMITS).unwrap_err(),
            state.add_backend(&web, backend("198.18.0.10", 1), LIMITS).unwrap_err(),
        ];
        assert_eq!(state, before);
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages[0], "VIP 198.18.0.10:80/tcp already exists");
        assert_eq!(messages[1], "backend 198.18.1.1 already serves VIP 198.18.0.10:80/tcp");
        assert!(messages[2].starts_with("weight 0 is out of range: expected 1 to 256 (to stop"));
        assert_eq!(messages[3], "weight 257 is out of range: expected 1 to 256");
        assert!(messages[4].contains("needs the same family"), "{}", messages[4]);
        assert!(messages[5].contains("does not exist"), "{}", messages[5]);
        assert!(messages[6].contains("does not serve"), "{}", messages[6]);
        assert!(messages[9].contains("loopback"), "{}", messages[9]);
        assert!(messages[10].contains("write the IPv4 address itself"), "{}", messages[10]);
        assert!(
            messages[11].contains("backend address 127.0.0.1 is not usable"),
            "{}",
            messages[11]
        );
        assert!(messages[12].contains("VIP 198.18.0.10:80/tcp's own address"), "{}", messages[12]);
    }

    #[test]
    fn limits_from_map_sizes_are_enforced() {
        let mut state = DesiredState::default();
        let web = vip("198.18.0.10:80");
        state.add_vip(web, CheckSpec::default(), Affinity::Flow, LIMITS).unwrap();
        state.add_vip(vip("198.18.0.11:80"), CheckSpec::default(), Affinity::Flow, LIMITS).unwrap();
        assert!(matches!(
            state.add_vip(vip("198.18.0.12:80"), CheckSpec::default(), Affinity::Flow, LIMITS),
            Err(ChangeError::TooManyVips { .. })
        ));
        for last in 1..=3 {
            state.add_backend(&web, backend(&format!("198.18.1.{last}"), 1), LIMITS).unwrap();
        }
        assert!(matches!(
            state.add_backend(&web, backend("198.18.1.4", 1), LIMITS),
            Err(ChangeError::TooManyBackends { .. })
        ));
    }
}

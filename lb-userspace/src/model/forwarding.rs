//! How a VIP's packets reach its backends: L2 direct server return on the
//! balancer's segment, or tunnelled (IPIP, GUE) to backends anywhere
//! routable. The datapath reads it from each backend slot
//! (`lb_common::Backend::forwarding`).

use serde::{Deserialize, Serialize};

use super::desired::write_value_name;

/// The mode, as `--forwarding` and `forwarding = "..."` spell it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingMode {
    /// L2 direct server return: only the MAC addresses change; every backend
    /// shares an L2 segment with the balancer and holds the VIP on loopback.
    #[default]
    Dsr,
    /// IPv4-in-IPv4 (RFC 2003) or IPv6-in-IPv6 (RFC 2473) to the backend's
    /// address, through the kernel's route to it.
    Ipip,
    /// The inner packet after an outer UDP header (GUE variant 1, Linux
    /// `fou` in `gue` mode), to `--gue-port`; the outer source port comes
    /// from the flow, so a backend's NIC spreads flows over its queues.
    Gue,
}

impl std::fmt::Display for ForwardingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_value_name(self, f)
    }
}

/// A VIP's forwarding: the mode and, for GUE, the backends' UDP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarding {
    pub mode: ForwardingMode,
    /// The UDP port GUE packets go to on each backend (ignored by other modes).
    pub gue_port: u16,
}

impl Default for Forwarding {
    fn default() -> Self {
        Self { mode: ForwardingMode::Dsr, gue_port: lb_common::DEFAULT_GUE_PORT }
    }
}

impl Forwarding {
    pub fn new(mode: ForwardingMode, gue_port: Option<u16>) -> Self {
        Self { mode, gue_port: gue_port.unwrap_or(lb_common::DEFAULT_GUE_PORT) }
    }

    /// Whether packets go through a tunnel (and so to the next hop's MAC).
    pub fn is_tunnel(&self) -> bool {
        self.mode != ForwardingMode::Dsr
    }

    /// The datapath's code and port for a backend slot.
    pub fn datapath(&self) -> (u8, u16) {
        match self.mode {
            ForwardingMode::Dsr => (lb_common::FORWARDING_DSR, 0),
            ForwardingMode::Ipip => (lb_common::FORWARDING_IPIP, 0),
            ForwardingMode::Gue => (lb_common::FORWARDING_GUE, self.gue_port),
        }
    }

    /// Refuses a port no backend can listen on.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.mode == ForwardingMode::Gue && self.gue_port == 0 {
            return Err("gue port 0 is not a port: give 1 to 65535 (default 6080)");
        }
        Ok(())
    }
}

impl std::fmt::Display for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.mode {
            ForwardingMode::Gue => write!(f, "gue to port {}", self.gue_port),
            mode => write!(f, "{mode}"),
        }
    }
}

/// Forwarding settings to change; what is left out keeps its value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct ForwardingOptions {
    /// How packets reach the backends: dsr (same L2 segment), ipip or gue
    /// (backends anywhere routable, which take the tunnel off: `lb decap`
    /// or the kernel's ipip/fou) [default: dsr].
    #[arg(
        id = "forwarding",
        long = "forwarding",
        value_enum,
        value_name = "MODE",
        group = "setting"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ForwardingMode>,
    /// The UDP port of GUE on the backends [default: 6080].
    #[arg(id = "gue_port", long = "gue-port", value_name = "PORT", group = "setting")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gue_port: Option<u16>,
}

impl ForwardingOptions {
    pub fn applied_to(&self, current: &Forwarding) -> Forwarding {
        Forwarding {
            mode: self.mode.unwrap_or(current.mode),
            gue_port: self.gue_port.unwrap_or(current.gue_port),
        }
    }
}

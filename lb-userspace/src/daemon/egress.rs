//! `lb run --egress IFACE`: the interfaces besides its own that backends
//! may be routed out of. Each is checked and described at start (its index,
//! MAC, MTU and tunnel sources), written into the datapath's egress maps
//! before the program is attached, and given the pass program when it runs
//! no XDP program (a driver may take redirected frames only then); that
//! link is pinned beside the datapath's, so it stays across restarts and
//! `lb unload` removes it.

use std::path::Path;

use anyhow::Context as _;
use aya::programs::Xdp;
use lb_common::{Egress, MAX_EGRESS};

use crate::datapath::{self, AttachMode, Datapath};
use crate::model::TunnelSource;
use crate::{interface, neighbour};

/// One `--egress` interface, as start-up found it.
pub(super) struct EgressInterface {
    pub name: String,
    pub ifindex: u32,
    pub egress: Egress,
}

/// The `--egress` interfaces in egress order (egress 1 first), checked:
/// each exists, is not `iface` and is named once. Their tunnel sources
/// follow the same rule as `iface`'s (`sources`, else the interface's own
/// first address of each family).
pub(super) fn describe(
    iface: &str,
    names: &[String],
    sources: &[TunnelSource],
) -> anyhow::Result<Vec<EgressInterface>> {
    if names.len() >= MAX_EGRESS as usize {
        anyhow::bail!("--egress was given {} interfaces: at most {}", names.len(), MAX_EGRESS - 1);
    }
    let mut found = Vec::new();
    for (index, name) in names.iter().enumerate() {
        if name == iface {
            anyhow::bail!(
                "--egress {name} is the interface lb run runs on (--iface): its backends are reached without it"
            );
        }
        if names[..index].contains(name) {
            anyhow::bail!("--egress {name} is given twice");
        }
        let ifindex = neighbour::interface_index(name)
            .with_context(|| format!("--egress {name}: interface not found (see `ip link`)"))?;
        let mac = neighbour::interface_mac(name).with_context(|| format!("--egress {name}"))?;
        let tunnel =
            interface::tunnel_config(name, sources).with_context(|| format!("--egress {name}"))?;
        let (source_v4, source_v6) = datapath::source_words(&tunnel);
        let egress = Egress { mac, _pad: 0, mtu: tunnel.mtu, source_v4, source_v6 };
        found.push(EgressInterface { name: name.clone(), ifindex, egress });
    }
    Ok(found)
}

/// Writes `interfaces` into the datapath's egress maps (egress 1, 2, ...)
/// and gives each that runs no XDP program the pass program, pinned in
/// `pins`. Before the balancer's program is attached: no backend names an
/// egress that is not there yet.
pub(super) async fn install(
    datapath: &mut Datapath,
    interfaces: &[EgressInterface],
    pins: &Path,
    mode: AttachMode,
) -> anyhow::Result<()> {
    if interfaces.is_empty() {
        return Ok(());
    }
    let mut pass = aya::Ebpf::load(datapath::PEER_PASS_OBJECT)?;
    let program: &mut Xdp =
        pass.program_mut("xdp_pass").context("the pass program is missing")?.try_into()?;
    program.load()?;
    for (index, each) in interfaces.iter().enumerate() {
        let index = index as u32 + 1;
        datapath.set_egress(index, each.ifindex, each.egress)?;
        let link_pin = datapath::egress_link_pin(pins, &each.name);
        let attached = interface::attached_program(each.ifindex).await?;
        if let Some(program) = attached.filter(|_| !link_pin.exists()) {
            tracing::info!(
                egress = %each.name, %program,
                "egress interface runs an XDP program already: redirected frames go out through it as they are"
            );
        } else {
            let attached = datapath::attach_xdp(program, &each.name, mode, Some(&link_pin))?;
            tracing::info!(egress = %each.name, how = attached.used, "pass program attached to egress interface");
        }
        tracing::info!(
            egress = %each.name, index, mtu = each.egress.mtu,
            mac = crate::model::format_mac(each.egress.mac),
            "backends routed out of this interface are sent there by XDP_REDIRECT"
        );
    }
    // The pinned links hold the pass program from here on.
    Ok(())
}

//! Loading and attaching the datapath at start, and undoing a start that
//! fails: whatever this `lb run` pinned or attached goes with it, while a
//! datapath an earlier one left forwarding stays as it was.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{RunOptions, active_flows};
use crate::datapath::{self, AttachMode, Datapath, Maps as _};
use crate::interface;

/// A loaded and attached datapath, with what start-up learnt of it.
pub(super) struct Loaded {
    pub datapath: Datapath,
    pub first_count: active_flows::ActiveFlows,
    /// The mode the kernel reports: `native` or `skb` (generic).
    pub attach_mode: &'static str,
    /// The kernel memory of all its maps (sizes are fixed once loaded).
    pub map_memory: Option<u64>,
}

/// Loads the datapath, adopting what an earlier `lb run` pinned in `pins`,
/// and attaches it, with the active flows of an adopted flow table, counted
/// by a walk of the whole table (about two seconds per million flows): that
/// delays start-up, never the loop, while the pinned program keeps
/// forwarding. Another program in the way is refused by name before
/// anything is loaded.
pub(super) async fn load_datapath(
    config: crate::model::DatapathConfig,
    pins: &Path,
    ifindex: u32,
    egress: &[super::egress::EgressInterface],
    options: &RunOptions,
) -> anyhow::Result<Loaded> {
    let iface = &options.iface;
    let attached = interface::attached_program(ifindex).await?;
    match (&attached, datapath::has_pinned_link(pins)) {
        (Some(program), false) => anyhow::bail!(
            "interface {iface} already has an XDP program attached ({program}) that is not the one pinned in {}: another lb run with another --pin-dir, or another tool. Remove it first (`lb unload --iface {iface} --pin-dir DIR` for an lb run, else `ip link set dev {iface} xdp off`)",
            pins.display()
        ),
        (Some(program), true) if !mode_agrees(options.xdp_mode, program.mode) => anyhow::bail!(
            "--xdp-mode {} was asked, but the datapath pinned in {} is attached in {} mode, and adopting it keeps that mode: drop --xdp-mode (or give --xdp-mode auto), or reattach: `lb unload --iface {iface}` (traffic to the VIPs stops until lb run attaches again)",
            mode_name(options.xdp_mode).unwrap_or_default(),
            pins.display(),
            program.mode
        ),
        _ => {}
    }
    let mut datapath = Datapath::load_pinned(config, pins)?;
    let mut first_count = active_flows::ActiveFlows::default();
    if datapath.adopted() {
        let forwarded =
            datapath::total_of(&datapath.reason_counters()?, lb_common::Reason::Forwarded);
        first_count = Arc::new(datapath.active_flows());
        tracing::info!(
            pins = %pins.display(), active_flows = first_count.values().sum::<u64>(), forwarded_packets = forwarded,
            "found a pinned datapath still forwarding: adopting its maps, flows and counters"
        );
    }
    super::egress::install(&mut datapath, egress, pins, options.xdp_mode).await?;
    let how = datapath.attach(iface, options.xdp_mode)?;
    // The mode the kernel reported before: a replacement in the adopted
    // link keeps it. Otherwise this attach chose the mode itself.
    let mode = attached.map_or(how, |program| program.mode);
    tracing::info!(%iface, mode, how, pins = %pins.display(), "XDP program attached");
    let map_memory = datapath::held_map_memory();
    tracing::info!(
        flows = datapath.config().flow_table_size,
        memory_bytes = datapath.flow_table_memory(),
        all_maps_bytes = map_memory,
        "flow table created"
    );
    Ok(Loaded { datapath, first_count, attach_mode: mode, map_memory })
}

fn mode_agrees(asked: AttachMode, attached: &str) -> bool {
    asked == AttachMode::Auto || mode_name(asked).as_deref() == Some(attached)
}

/// The mode as `--xdp-mode` spells it.
fn mode_name(mode: AttachMode) -> Option<String> {
    clap::ValueEnum::to_possible_value(&mode).map(|value| value.get_name().to_owned())
}

/// What a failed start undoes when dropped armed: the pins, when there were
/// none before (so the program detaches once this process lets go of it,
/// and the maps are freed), and the control socket this start bound.
pub(super) struct Rollback {
    pins: PathBuf,
    pinned_before: bool,
    socket: PathBuf,
    armed: bool,
}

impl Rollback {
    pub fn new(pins: &Path, socket: &Path) -> Self {
        let pinned_before = datapath::has_pins(pins);
        Self { pins: pins.to_owned(), pinned_before, socket: socket.to_owned(), armed: true }
    }

    /// The start succeeded: nothing to undo.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let _ = std::fs::remove_file(&self.socket);
        if self.pinned_before {
            tracing::info!(pins = %self.pins.display(), "start failed: the datapath pinned before is left as it was");
            return;
        }
        match datapath::remove_pins(&self.pins) {
            Ok(()) => {
                tracing::info!(pins = %self.pins.display(), "start failed: removed what it pinned; nothing stays attached")
            }
            Err(error) => {
                tracing::error!(pins = %self.pins.display(), %error, "start failed, and removing its pins failed too: remove them with `lb unload`")
            }
        }
    }
}

//! `lb decap`'s options: the interface, the GUE port, and the two other
//! actions (counters, removal).

use std::path::PathBuf;

use clap::Args;

use crate::daemon;
use crate::datapath::AttachMode;

#[derive(Args, Debug)]
pub struct DecapArgs {
    /// The interface tunnelled packets arrive on.
    #[arg(long)]
    pub iface: String,
    /// The UDP port GUE packets arrive on (the VIP's --gue-port).
    #[arg(long, value_name = "PORT", default_value_t = lb_common::DEFAULT_GUE_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub gue_port: u16,
    /// native (driver) mode, skb (generic) mode, or auto: native, else skb with a warning.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: AttachMode,
    /// The bpffs directory to pin in (the decapsulator goes in decap/IFACE below it).
    #[arg(long, default_value = daemon::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Print the decapsulator's counters per reason instead of loading it.
    #[arg(long, conflicts_with = "detach")]
    pub stats: bool,
    /// Detach and remove the decapsulator instead of loading it.
    #[arg(long)]
    pub detach: bool,
}

//! Pinning: the program link and every map live on a bpf filesystem, so the
//! datapath keeps forwarding while `lb run` restarts and a new one adopts it.
//! Also where pinned maps are checked against this configuration (`Layout`)
//! and removed (`lb unload`).

use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::{Array, MapData};
use aya::programs::Xdp;
use aya::programs::XdpMode;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use lb_common::{LAYOUT_VERSION, Layout, MAP_LAYOUT};

use super::{AttachMode, Datapath, DatapathError, map_error};
use crate::model::DatapathConfig;

/// The link's pin, beside the maps' pins in the pin directory.
const LINK_PIN: &str = "link";
/// Where bpf filesystems are mounted by convention.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Where one interface's datapath is pinned.
pub fn pin_dir_for(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(iface)
}

/// Whether `path` lies on a bpf filesystem (where pins can live).
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|stat| stat.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Mounts bpffs on /sys/fs/bpf when the pin directory is below it and it is
/// missing (as inside `ip netns exec`, which remounts /sys).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    let root = Path::new(BPFFS_ROOT);
    if !pin_dir.starts_with(root) || is_bpffs(root) {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|errno| DatapathError::PinDir { dir: root.to_owned(), error: errno.into() })?;
    tracing::info!("mounted bpffs on {BPFFS_ROOT}");
    Ok(())
}

impl Datapath {
    /// Like [`Self::load`], with every map pinned in `dir` (a directory on a
    /// bpf filesystem). Maps already pinned there, by an earlier `lb run`,
    /// are adopted with their contents, after checking they were made with
    /// this configuration's sizes and seed.
    pub fn load_pinned(config: DatapathConfig, dir: &Path) -> Result<Self, DatapathError> {
        let parent = dir.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent)
            .map_err(|error| DatapathError::PinDir { dir: dir.to_owned(), error })?;
        if !is_bpffs(parent) {
            return Err(DatapathError::NotBpffs { dir: parent.to_owned() });
        }
        std::fs::create_dir_all(dir)
            .map_err(|error| DatapathError::PinDir { dir: dir.to_owned(), error })?;
        Self::open(config, Some(dir))
    }

    /// Attaches to `iface`. Returns the mode actually used ("native" or "skb").
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<&'static str, DatapathError> {
        let link_pin = self.pin_dir.as_ref().map(|dir| dir.join(LINK_PIN));
        let attached = attach_xdp(self.program_mut(), iface, mode, link_pin.as_deref())?;
        self.attached = Some((iface.to_owned(), attached.used));
        self.link = attached.link;
        if attached.pinned.is_some() {
            self.pinned_link = attached.pinned;
        }
        Ok(attached.used)
    }

    /// Detaches the program that [`Self::attach`] attached without a pin
    /// directory. The maps, and the flows in them, stay: `attach` puts the
    /// program back where they left off. A pinned link is left alone; `lb
    /// unload` removes it.
    pub fn detach(&mut self) -> Result<(), DatapathError> {
        if let Some(link) = self.link.take() {
            self.program_mut().detach(link).map_err(DatapathError::Program)?;
            self.attached = None;
        }
        Ok(())
    }

    /// Removes every pin, so the program detaches and the maps go once this
    /// object is dropped: `lb run --detach-on-exit`.
    pub fn unpin(&mut self) -> Result<(), DatapathError> {
        if let Some(dir) = self.pin_dir.take() {
            remove_pins(&dir)?;
        }
        self.pinned_link = None;
        Ok(())
    }
}

/// How [`attach_xdp`] attached a program.
pub struct Attached {
    /// "native", "skb" or "pinned link (replaced atomically)".
    pub used: &'static str,
    /// The link, when not pinned (detached with the program's `detach`).
    pub link: Option<XdpLinkId>,
    /// The link's new pin, when it was pinned here.
    pub pinned: Option<PinnedLink>,
}

/// Attaches `program` to `iface`. With `link_pin`, the link lives on that
/// pin, so the program stays attached after this process exits: a link
/// already pinned there (by an earlier run) gets `program` swapped in
/// atomically, so no packet goes unhandled; otherwise the new link is
/// pinned there. `lb run` and `lb decap` attach through here.
pub fn attach_xdp(
    program: &mut Xdp,
    iface: &str,
    mode: AttachMode,
    link_pin: Option<&Path>,
) -> Result<Attached, DatapathError> {
    let attempt = |program: &mut Xdp, mode: XdpMode, name: &'static str| {
        program
            .attach(iface, mode)
            .map(|link| (link, name))
            .map_err(|error| DatapathError::Attach { iface: iface.to_owned(), mode: name, error })
    };
    if let Some(link_pin) = link_pin.filter(|path| path.exists()) {
        let failed = |error: String| DatapathError::PinnedLink { path: link_pin.to_owned(), error };
        let pinned = PinnedLink::from_pin(link_pin).map_err(|error| failed(error.to_string()))?;
        let link =
            XdpLink::try_from(FdLink::from(pinned)).map_err(|error| failed(error.to_string()))?;
        program.attach_to_link(link).map_err(|error| DatapathError::Attach {
            iface: iface.to_owned(),
            mode: "pinned link",
            error,
        })?;
        return Ok(Attached {
            used: "pinned link (replaced atomically)",
            link: None,
            pinned: None,
        });
    }
    let (link_id, used) = match mode {
        AttachMode::Native => attempt(program, XdpMode::Driver, "native")?,
        AttachMode::Skb => attempt(program, XdpMode::Skb, "skb")?,
        AttachMode::Auto => match attempt(program, XdpMode::Driver, "native") {
            Ok(used) => used,
            Err(native_error) => {
                tracing::warn!(
                    %iface, error = format!("{:#}", anyhow::Error::new(native_error)),
                    "native XDP unavailable; falling back to skb (generic) mode, which is much slower"
                );
                attempt(program, XdpMode::Skb, "skb")?
            }
        },
    };
    let Some(path) = link_pin else {
        return Ok(Attached { used, link: Some(link_id), pinned: None });
    };
    let link = program.take_link(link_id).map_err(DatapathError::Program)?;
    let failed = |error: String| DatapathError::PinnedLink { path: path.to_owned(), error };
    let pinned = FdLink::try_from(link)
        .map_err(|error| failed(error.to_string()))?
        .pin(path)
        .map_err(|error| failed(error.to_string()))?;
    Ok(Attached { used, link: None, pinned: Some(pinned) })
}

/// Whether `dir` holds a pinned link: an earlier `lb run`'s program is
/// attached through it.
pub fn has_pinned_link(dir: &Path) -> bool {
    dir.join(LINK_PIN).exists()
}

/// Pins of the links that keep the pass program on `--egress` interfaces
/// start with this (then the interface's name).
const EGRESS_LINK_PREFIX: &str = "egress-link-";

/// Where the link of the pass program on egress interface `iface` is pinned.
pub fn egress_link_pin(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("{EGRESS_LINK_PREFIX}{iface}"))
}

/// The egress links pinned in `dir`, by file name.
fn egress_link_pins(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(EGRESS_LINK_PREFIX))
        .collect()
}

/// Whether `dir` holds any pin of ours (link or map).
pub fn has_pins(dir: &Path) -> bool {
    std::iter::once(LINK_PIN).chain(lb_common::ALL_MAPS).any(|name| dir.join(name).exists())
        || !egress_link_pins(dir).is_empty()
}

/// Removes a pin directory's link and map pins, and those of its egress
/// links (`lb unload`). Objects still open elsewhere live on until closed;
/// once nothing holds a link, its program detaches.
pub fn remove_pins(dir: &Path) -> Result<(), DatapathError> {
    let egress = egress_link_pins(dir);
    let names = std::iter::once(LINK_PIN)
        .chain(lb_common::ALL_MAPS)
        .chain(egress.iter().map(String::as_str));
    remove_named_pins(dir, names).map(|_| ())
}

/// Removes the pins `names` in `dir`, then `dir` itself when it is empty
/// (`lb unload`, `lb decap --detach`). Returns whether any pin was there.
pub fn remove_named_pins<'a>(
    dir: &Path,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<bool, DatapathError> {
    let pin_error = |error| DatapathError::PinDir { dir: dir.to_owned(), error };
    let mut removed = false;
    for name in names {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => removed = true,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(pin_error(error)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(removed),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(removed),
        Err(error) => Err(pin_error(error)),
    }
}

/// The one-daemon-per-interface lock: an exclusive flock on the
/// interface's pin directory, released by the kernel when its holder exits.
pub struct InterfaceLock(
    #[expect(dead_code, reason = "held, never read")] nix::fcntl::Flock<std::fs::File>,
);

/// Takes the lock on `dir` (the interface's pin directory, created if
/// missing) without waiting: `lb run` before it loads or attaches anything,
/// `lb unload` before it removes pins.
pub fn lock_interface(dir: &Path) -> Result<InterfaceLock, DatapathError> {
    let pin_error = |error| DatapathError::PinDir { dir: dir.to_owned(), error };
    std::fs::create_dir_all(dir).map_err(pin_error)?;
    let file = std::fs::File::open(dir).map_err(pin_error)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(InterfaceLock(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            Err(DatapathError::Locked { dir: dir.to_owned() })
        }
        Err((_, errno)) => Err(pin_error(errno.into())),
    }
}

/// Writes the layout into fresh maps, or checks the layout of adopted ones.
/// Returns whether the maps were adopted.
pub(super) fn check_layout(
    ebpf: &mut Ebpf,
    config: &DatapathConfig,
    pin_dir: Option<&Path>,
) -> Result<bool, DatapathError> {
    let map =
        ebpf.map_mut(MAP_LAYOUT).ok_or(DatapathError::Missing { kind: "map", name: MAP_LAYOUT })?;
    let mut layout_map: Array<&mut MapData, Layout> =
        Array::try_from(map).map_err(map_error(MAP_LAYOUT))?;
    let wanted = Layout {
        version: LAYOUT_VERSION,
        hash_seed: config.hash_seed,
        table_size: config.table_size,
        max_vips: config.max_vips,
        max_backends: config.max_backends,
        flow_table_size: config.flow_table_size,
        udp_idle_timeout_ms: config.udp_idle_timeout_ms,
    };
    let found = layout_map.get(&0, 0).map_err(map_error(MAP_LAYOUT))?;
    if found == Layout::default() {
        layout_map.set(0, wanted, 0).map_err(map_error(MAP_LAYOUT))?;
        return Ok(false);
    }
    if found == wanted {
        return Ok(true);
    }
    let dir = pin_dir.map_or_else(PathBuf::new, Path::to_owned);
    let differences: Vec<String> = [
        ("layout version", u64::from(found.version), u64::from(wanted.version)),
        ("hash_seed", found.hash_seed.into(), wanted.hash_seed.into()),
        ("table_size", found.table_size.into(), wanted.table_size.into()),
        ("max_vips", found.max_vips.into(), wanted.max_vips.into()),
        ("max_backends", found.max_backends.into(), wanted.max_backends.into()),
        ("flow_table_size", found.flow_table_size.into(), wanted.flow_table_size.into()),
        ("udp_idle_timeout_ms", found.udp_idle_timeout_ms, wanted.udp_idle_timeout_ms),
    ]
    .into_iter()
    .filter(|(_, pinned, configured)| pinned != configured)
    .map(|(field, pinned, configured)| format!("{field} is {pinned} there but {configured} here"))
    .collect();
    Err(DatapathError::IncompatiblePins { dir, differences: differences.join(", ") })
}

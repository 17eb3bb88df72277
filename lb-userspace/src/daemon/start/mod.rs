//! What `lb run` starts from, settled before anything is attached: the
//! configuration (the file, the state or defaults), the flow-hash seed, and
//! the fleet settings (flow sync's socket, the announce table). With a
//! store, the desired state and the fleet-wide settings come from it
//! (`store_start`).

use std::path::Path;

use anyhow::Context as _;
use tokio::net::UdpSocket;

use super::RunOptions;
use crate::config::{self, Config, SyncConfig};
use crate::store::StoreConfig;
use crate::sync::{self, SyncOptions};

mod store_start;

pub(super) use store_start::StoreStart;

/// The configuration to start with, and the store when there is one (see
/// [`store_start`]); without one, [`local_config`] and [`hash_seed`].
pub(super) async fn configuration(
    options: &RunOptions,
) -> anyhow::Result<(Config, Option<StoreStart>)> {
    match store_config(options)? {
        Some(store) => {
            let (config, start) = store_start::join(options, store).await?;
            Ok((config, Some(start)))
        }
        None => {
            let mut config = local_config(options)?;
            config.datapath.hash_seed = hash_seed(options, &config)?;
            Ok((config, None))
        }
    }
}

/// The store `--store` and the `--store-*` options name, else the
/// configuration file's `[store]`, else (without `--config`) the state's;
/// the options replace the file's settings of the same name.
fn store_config(options: &RunOptions) -> anyhow::Result<Option<StoreConfig>> {
    let from_file = match (&options.config, &options.store.url) {
        (_, Some(_)) => None,
        (Some(path), None) => config::load(path)?.store,
        (None, None) if options.state.exists() => config::load(&options.state)?.store,
        (None, None) => None,
    };
    let Some(mut store) = options.store.url.clone().or(from_file) else {
        if options.store.any_set() {
            anyhow::bail!(
                "the --store-* options need a store: give --store etcd://HOST:PORT/PREFIX (or [store] in --config)"
            );
        }
        return Ok(None);
    };
    options.store.apply_to(&mut store);
    store.validate().map_err(|message| anyhow::anyhow!("store {}: {message}", store.url()))?;
    Ok(Some(store))
}

/// Without a store: `--config` when given (see [`from_file`]), else the
/// state file when it exists, else empty defaults.
fn local_config(options: &RunOptions) -> anyhow::Result<Config> {
    let config = if let Some(path) = &options.config {
        from_file(path, &options.state)?
    } else if options.state.exists() {
        let config = config::load(&options.state)?;
        tracing::info!(state = %options.state.display(), vips = config.desired.vips.len(), "state restored");
        config
    } else {
        tracing::info!(state = %options.state.display(), "no state yet: starting empty");
        Config::default()
    };
    Ok(config)
}

/// `--config FILE` at start. The state wins while it holds FILE as last
/// applied (same digest): it is FILE plus the changes made with `lb` since,
/// which a restart must not undo. A FILE that changed since is applied, and
/// the state it replaces is copied to `STATE.replaced` once the start has
/// succeeded ([`keep_replaced`]), so that nothing made with `lb` is lost
/// without a trace, and a start that fails keeps the earlier copy.
fn from_file(path: &Path, state_path: &Path) -> anyhow::Result<Config> {
    let file = config::load_source(path)?;
    if state_path.exists() {
        let state = config::load(state_path)?;
        if state.source_digest() == file.source_digest() {
            let changes = crate::model::diff::diff(&file.desired, &state.desired);
            tracing::info!(
                config = %path.display(), state = %state_path.display(), changes_since = changes.len(),
                "the configuration file is unchanged since it was applied: restoring the state, with the changes made with lb since"
            );
            return Ok(state);
        }
        let changes = crate::model::diff::diff(&state.desired, &file.desired);
        if !changes.is_empty() {
            tracing::warn!(
                config = %path.display(), changes = changes.len(),
                "the configuration file changed since it was last applied: applying it; the state it replaces is kept once lb run has started"
            );
            for change in &changes {
                tracing::info!(%change, "configuration file applied at start");
            }
        }
    }
    tracing::info!(config = %path.display(), vips = file.desired.vips.len(), "configuration loaded");
    Ok(file)
}

/// Copies the state file to `STATE.replaced` when `config`, about to be
/// saved over it, replaces a state of another file (or of changes made with
/// `lb`); see [`from_file`]. Called once the datapath is running.
pub(super) fn keep_replaced(config: &Config, state_path: &Path) -> anyhow::Result<()> {
    if config.source.is_none() || !state_path.exists() {
        return Ok(());
    }
    let state = config::load(state_path)?;
    if state.source_digest() == config.source_digest()
        || crate::model::diff::diff(&state.desired, &config.desired).is_empty()
    {
        return Ok(());
    }
    let mut kept = state_path.as_os_str().to_owned();
    kept.push(".replaced");
    std::fs::copy(state_path, &kept)
        .with_context(|| format!("keeping the state as {}", Path::new(&kept).display()))?;
    tracing::warn!(
        replaced_state = %Path::new(&kept).display(),
        "the state the configuration file replaced is kept"
    );
    Ok(())
}

/// The flow-hash seed: `--hash-seed`, else the configuration's, else the
/// state's, else, with flow sync, the one derived from the fleet's sync key
/// (so balancers started fresh with one key agree), else a random one
/// (saved in the state at start). A predictable seed would let anyone choose
/// source ports that all land on one backend.
fn hash_seed(options: &RunOptions, config: &Config) -> anyhow::Result<u32> {
    let derived = match sync_config(options, config)? {
        Some(sync) => Some(sync::fleet_seed(&sync::load_key(&sync.key_file)?)),
        None => None,
    };
    let kept = if let Some(seed) = options.hash_seed {
        Some(seed)
    } else if config.explicit.hash_seed {
        Some(config.datapath.hash_seed)
    } else if options.config.is_some() && options.state.exists() {
        Some(config::load(&options.state)?.datapath.hash_seed)
    } else {
        None
    };
    match (kept, derived) {
        (Some(seed), Some(derived)) if seed != derived && options.hash_seed.is_none() => {
            tracing::warn!(
                hash_seed = seed,
                derived_from_sync_key = derived,
                "this balancer's hash seed comes from its configuration or state, not from the sync key: every balancer of the fleet must use the same (set hash_seed = {seed} on all, or remove it everywhere and `lb unload` to take the key's)"
            );
            Ok(seed)
        }
        (Some(seed), _) => Ok(seed),
        (None, Some(derived)) => {
            tracing::info!(
                hash_seed = derived,
                "no hash_seed configured: derived one from the sync key, as every balancer sharing that key does"
            );
            Ok(derived)
        }
        (None, None) => {
            let seed = random_seed()?;
            tracing::info!(
                hash_seed = seed,
                state = %options.state.display(),
                "no hash_seed configured: picked a random one, kept in the state (balancers sharing VIPs must share it: set hash_seed or --hash-seed on all, or give them flow sync's key)"
            );
            Ok(seed)
        }
    }
}

/// A seed nobody can predict.
fn random_seed() -> anyhow::Result<u32> {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).map_err(|error| anyhow::anyhow!("no random hash seed: {error}"))?;
    Ok(u32::from_ne_bytes(bytes))
}

/// Sync as the command line and the config file set it together, if on.
fn sync_config(options: &RunOptions, config: &Config) -> anyhow::Result<Option<SyncConfig>> {
    let file = config.sync.as_ref();
    let peers = if options.sync_peers.is_empty() {
        file.map(|sync| sync.peers.clone()).unwrap_or_default()
    } else {
        options.sync_peers.clone()
    };
    let listen = options.sync_listen.or(file.map(|sync| sync.listen));
    let key_file = options.sync_key_file.clone().or(file.map(|sync| sync.key_file.clone()));
    match (peers.is_empty(), listen, key_file) {
        (true, None, None) => Ok(None),
        (false, Some(listen), Some(key_file)) => Ok(Some(SyncConfig { listen, peers, key_file })),
        (true, _, _) => {
            anyhow::bail!("flow sync needs at least one --sync-peer (or peers in [sync])")
        }
        (false, _, _) => anyhow::bail!(
            "flow sync needs both --sync-listen ADDR:PORT and --sync-key-file PATH (or listen and key_file in [sync])"
        ),
    }
}

/// How this balancer takes part in a fleet, settled before anything is
/// attached so that a bad key or a taken port is refused first.
pub(super) struct FleetStart {
    /// Flow sync's bound socket and options, when sync is on.
    pub sync: Option<(UdpSocket, SyncOptions)>,
    /// `--announce-table` (or the config's), when announcing.
    pub announce_table: Option<u32>,
}

pub(super) async fn join_fleet(
    options: &RunOptions,
    config: &Config,
) -> anyhow::Result<FleetStart> {
    let sync = match sync_config(options, config)? {
        Some(sync) => {
            let key = sync::load_key(&sync.key_file)?;
            let socket = sync::bind(sync.listen).await?;
            Some((socket, SyncOptions { listen: sync.listen, peers: sync.peers, key }))
        }
        None => None,
    };
    Ok(FleetStart { sync, announce_table: options.announce_table.or(config.announce_table) })
}

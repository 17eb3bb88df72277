//! Starting with a store (`--store` or `[store]`): the local settings come
//! from `--config` (which may not declare VIPs: those live in the store) or
//! the state; the fleet-wide settings and the desired state from the store.
//! When the store is unreachable, the state's copy of the last revision
//! applied is used, and the log says so; with no copy, `lb run` refuses to
//! start with nothing configured.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::RunOptions;
use crate::config::{self, Config, Explicit, StoreCopy};
use crate::model::{DesiredState, Vip};
use crate::store::keys::FORMAT;
use crate::store::{
    self, Cache, Client, FleetSettings, FleetWanted, Refused, StoreConfig, StoreError,
};

/// What the daemon follows the store with.
pub(in crate::daemon) struct StoreStart {
    pub config: StoreConfig,
    pub fleet: FleetSettings,
    /// The client and every key, when the store answered at start.
    pub joined: Option<(Client, Cache)>,
    pub refused: Vec<Refused>,
    pub leases: BTreeMap<(Vip, IpAddr), i64>,
    /// Started from the state's copy of this revision (the store did not answer).
    pub restored: Option<i64>,
}

pub(super) async fn join(
    options: &RunOptions,
    store: StoreConfig,
) -> anyhow::Result<(Config, StoreStart)> {
    let state = if options.state.exists() { Some(config::load(&options.state)?) } else { None };
    let mut config = match &options.config {
        Some(path) => {
            let file = config::load(path)?;
            if !file.desired.vips.is_empty() {
                anyhow::bail!(
                    "{} declares VIPs, but with a store ({}) the VIPs live in the store: load them into it once with `lb config apply {}` on any balancer, then remove the [[vip]] tables",
                    path.display(),
                    store.url(),
                    path.display()
                );
            }
            file
        }
        // The state's local settings; none of its fleet settings counts as
        // told: the store's win, and a pinned datapath of other sizes is
        // refused when it is adopted.
        None => Config { explicit: Explicit::default(), ..state.clone().unwrap_or_default() },
    };
    config.desired = DesiredState::default();
    config.source = None;
    config.store = Some(store.clone());
    config.store_copy = None;
    let wanted = fleet_wanted(options, &config, state.as_ref())?;
    let joined = match store::connect(&store).await {
        Ok(client) => store::open(client, wanted).await,
        Err(error) => Err(error),
    };
    let opened = match joined {
        Ok(opened) => opened,
        Err(error @ StoreError::Unreachable { .. }) => {
            return from_copy(options, config, store, wanted, state, &error);
        }
        Err(error) => return Err(error.into()),
    };
    let fleet = opened.fleet;
    set_fleet(&mut config, &fleet);
    let (cache, assembled) = (opened.cache, opened.assembled);
    config.desired = assembled.state.clone();
    config.store_copy =
        Some(StoreCopy::new(&store.prefix, cache.cluster_id, cache.revision, &assembled.leases));
    let backends: usize = config.desired.vips.values().map(|spec| spec.backends.len()).sum();
    tracing::info!(
        store = %store.url(), revision = cache.revision, vips = config.desired.vips.len(), backends,
        refused_keys = assembled.refused.len(), hash_seed = fleet.hash_seed, table_size = fleet.table_size,
        "{}", if opened.created_fleet {
            "joined the store as its first balancer: created its fleet settings"
        } else {
            "joined the store: its fleet settings and desired state"
        }
    );
    for refused in &assembled.refused {
        tracing::error!(key = %refused.key, reason = %refused.reason, "a key of the store is refused; nothing else changes because of it");
    }
    let start = StoreStart {
        config: store,
        fleet,
        joined: Some((opened.client, cache)),
        refused: assembled.refused,
        leases: assembled.leases,
        restored: None,
    };
    Ok((config, start))
}

/// The fleet settings this balancer was told (its command line, its
/// configuration file), and the whole set to create the fleet with if it is
/// the first: those, else the state's seed (a balancer moving to a store
/// keeps its seed), else a random one.
fn fleet_wanted(
    options: &RunOptions,
    config: &Config,
    state: Option<&Config>,
) -> anyhow::Result<FleetWanted> {
    let told = |set: bool, value: u32| set.then_some(value);
    let datapath = &config.datapath;
    let hash_seed = options.hash_seed.or(told(config.explicit.hash_seed, datapath.hash_seed));
    let first_seed = match hash_seed.or(state.map(|state| state.datapath.hash_seed)) {
        Some(seed) => seed,
        None => super::random_seed()?,
    };
    Ok(FleetWanted {
        hash_seed,
        table_size: told(config.explicit.table_size, datapath.table_size),
        max_vips: told(config.explicit.max_vips, datapath.max_vips),
        max_backends: told(config.explicit.max_backends, datapath.max_backends),
        first: FleetSettings {
            format: FORMAT,
            hash_seed: first_seed,
            table_size: datapath.table_size,
            max_vips: datapath.max_vips,
            max_backends: datapath.max_backends,
        },
    })
}

fn set_fleet(config: &mut Config, fleet: &FleetSettings) {
    config.datapath.hash_seed = fleet.hash_seed;
    config.datapath.table_size = fleet.table_size;
    config.datapath.max_vips = fleet.max_vips;
    config.datapath.max_backends = fleet.max_backends;
}

/// The store did not answer: the state's copy of it, if it has one.
fn from_copy(
    options: &RunOptions,
    mut config: Config,
    store: StoreConfig,
    wanted: FleetWanted,
    state: Option<Config>,
    error: &StoreError,
) -> anyhow::Result<(Config, StoreStart)> {
    let copied = state
        .filter(|state| state.store_copy.as_ref().is_some_and(|copy| copy.prefix == store.prefix));
    let Some(copied) = copied else {
        anyhow::bail!(
            "{error}; and {} holds no copy of {}: refusing to start with nothing configured (a pinned datapath keeps forwarding meanwhile; start lb run again once the store answers)",
            options.state.display(),
            store.prefix
        );
    };
    let copy = copied.store_copy.clone().expect("filtered on it");
    let datapath = &copied.datapath;
    let fleet = FleetSettings {
        format: FORMAT,
        hash_seed: datapath.hash_seed,
        table_size: datapath.table_size,
        max_vips: datapath.max_vips,
        max_backends: datapath.max_backends,
    };
    let conflicts = wanted.conflicts(&fleet);
    if !conflicts.is_empty() {
        anyhow::bail!(
            "{error}; the local copy of the store in {} has other fleet settings than this balancer is told ({}): refusing to start",
            options.state.display(),
            conflicts.join(", ")
        );
    }
    set_fleet(&mut config, &fleet);
    config.desired = copied.desired.clone();
    config.store_copy = Some(copy.clone());
    tracing::warn!(
        %error, state = %options.state.display(), revision = copy.revision, vips = config.desired.vips.len(),
        "the store is unreachable: starting from the local copy of its last revision applied; the store's changes are applied once it answers"
    );
    let start = StoreStart {
        config: store,
        fleet,
        joined: None,
        refused: Vec::new(),
        leases: copy.leases(),
        restored: Some(copy.revision),
    };
    Ok((config, start))
}

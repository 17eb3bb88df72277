//! Joining the fleet at start: the fleet settings settled once (created by
//! the first balancer, read by every other, compared with what this one was
//! told), then one full read of every key at one revision.

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::follow::Cache;
use super::keys::{self, Assembled, Entry, FleetSettings};
use super::{Client, StoreError};

/// What this balancer brings to the fleet settings: the ones its
/// configuration or command line set (which must match the store's), and
/// the whole set to create the fleet key with if it is the first.
#[derive(Clone, Copy, Debug)]
pub struct FleetWanted {
    pub hash_seed: Option<u32>,
    pub table_size: Option<u32>,
    pub max_vips: Option<u32>,
    pub max_backends: Option<u32>,
    pub first: FleetSettings,
}

impl FleetWanted {
    /// The settings this balancer was told that `settings` contradicts, as
    /// `name store -> ours`.
    pub fn conflicts(&self, settings: &FleetSettings) -> Vec<String> {
        let mut differ = Vec::new();
        for (name, ours, theirs) in [
            ("hash_seed", self.hash_seed, settings.hash_seed),
            ("table_size", self.table_size, settings.table_size),
            ("max_vips", self.max_vips, settings.max_vips),
            ("max_backends", self.max_backends, settings.max_backends),
        ] {
            if let Some(ours) = ours.filter(|ours| *ours != theirs) {
                differ.push(format!("{name} {theirs} in the store, {ours} here"));
            }
        }
        differ
    }
}

/// The fleet as this balancer joined it.
pub struct Opened {
    pub client: Client,
    pub fleet: FleetSettings,
    /// Whether this balancer created the fleet key.
    pub created_fleet: bool,
    /// Every key read, at one revision.
    pub cache: Cache,
    pub assembled: Assembled,
}

/// Settles the fleet settings and reads every key (see the module).
pub async fn open(client: Client, wanted: FleetWanted) -> Result<Opened, StoreError> {
    let (fleet, created_fleet) = settle(&client, &wanted).await?;
    let cache = read_all(&client).await?;
    let assembled = keys::assemble(client.keys(), &cache.entries, fleet.limits());
    Ok(Opened { client, fleet, created_fleet, cache, assembled })
}

/// The fleet key's settings: created from `wanted.first` when absent (one
/// transaction, so two first balancers cannot both create it), refused
/// when they contradict what this balancer was told.
pub(super) async fn settle(
    client: &Client,
    wanted: &FleetWanted,
) -> Result<(FleetSettings, bool), StoreError> {
    let key = client.keys().fleet();
    let create = Txn::new()
        .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.as_str(), wanted.first.encode(), None)])
        .or_else([TxnOp::get(key.as_str(), None)]);
    let response = client.call(client.kv().txn(create)).await?;
    let (settings, created) = if response.succeeded() {
        (wanted.first, true)
    } else {
        let value = response
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .unwrap_or_default();
        let settings = FleetSettings::decode(&value)
            .map_err(|reason| StoreError::BadFleet { key: key.clone(), reason })?;
        (settings, false)
    };
    let conflicts = wanted.conflicts(&settings);
    if !conflicts.is_empty() {
        return Err(StoreError::FleetConflict { key, differences: conflicts.join(", ") });
    }
    Ok((settings, created))
}

/// Every key under the prefix, at one revision.
pub(super) async fn read_all(client: &Client) -> Result<Cache, StoreError> {
    let options = GetOptions::new().with_prefix();
    let response = client.call(client.kv().get(client.keys().all(), Some(options))).await?;
    let header = response.header();
    let mut entries = BTreeMap::new();
    for kv in response.kvs() {
        // A key that is not UTF-8 is kept under a lossy name, to be refused.
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let entry = Entry {
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        };
        entries.insert(key, entry);
    }
    Ok(Cache {
        entries,
        revision: header.map_or(0, |header| header.revision()),
        cluster_id: header.map_or(0, |header| header.cluster_id()),
    })
}

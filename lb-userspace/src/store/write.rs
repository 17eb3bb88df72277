//! Writing a change to the store: a [`WritePlan`] as one etcd transaction,
//! conditioned on the revision the change was validated against, so that
//! two balancers (or an operator and an agent) racing never lose each
//! other's change: the loser is told so, with the store's revision, and the
//! daemon validates its change again against that revision before trying
//! once more.

use etcd_client::{Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp};
use tokio::sync::watch;

use super::{Client, StoreError, WritePlan};

/// How long a write is tried again while no member answers.
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(4);
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The store changed since the base revision: validate again.
    #[error("the store changed since revision {base} (now at {revision})")]
    Conflict { base: i64, revision: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Writes for the daemon, through the follower's connection while the
/// store answers.
#[derive(Clone)]
pub struct Writer {
    /// To connect afresh when the follower's channel does not answer.
    pub config: super::StoreConfig,
    pub connection: watch::Receiver<Option<Client>>,
}

impl Writer {
    /// Carries out `plan` as one transaction; returns the revision it made.
    /// A member that does not answer (it died, or its cluster is electing a
    /// leader) is tried again for [`RETRY_FOR`], on a fresh channel to
    /// whichever member answers; so is a follower that lost its connection
    /// and has not made a new one yet (its watch on a member that died ends
    /// before the write). The transaction is conditioned on its base
    /// revision, so a first attempt that did commit makes the next one a
    /// conflict, never a second change.
    pub async fn commit(&self, plan: WritePlan) -> Result<i64, WriteError> {
        let start = tokio::time::Instant::now();
        let mut client = self.connection.borrow().clone();
        loop {
            let attempt = match client.take() {
                Some(connected) => commit(&connected, &plan).await,
                None => match super::connect(&self.config).await {
                    Ok(fresh) => commit(&fresh, &plan).await,
                    Err(error) => Err(WriteError::Store(error)),
                },
            };
            match attempt {
                Err(WriteError::Store(StoreError::Unreachable { cause, .. }))
                    if start.elapsed() < RETRY_FOR =>
                {
                    tracing::debug!(%cause, "a store write found no member; trying again");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                outcome => return outcome,
            }
        }
    }
}

/// The transaction of `plan` (see [`WritePlan`]).
pub(super) fn transaction(client: &Client, plan: &WritePlan) -> Txn {
    let keys = client.keys();
    let unchanged_since = plan.base_revision + 1;
    let mut compares = vec![
        Compare::mod_revision(keys.vips(), CompareOp::Less, unchanged_since).with_prefix(),
        Compare::mod_revision(keys.backends(), CompareOp::Less, unchanged_since).with_prefix(),
    ];
    compares.extend(
        plan.must_exist
            .iter()
            .map(|key| Compare::create_revision(key.as_str(), CompareOp::Greater, 0)),
    );
    let mut operations = Vec::with_capacity(plan.operations());
    operations.extend(plan.deletes.iter().map(|key| TxnOp::delete(key.as_str(), None)));
    operations.extend(
        plan.delete_prefixes
            .iter()
            .map(|prefix| TxnOp::delete(prefix.as_str(), Some(DeleteOptions::new().with_prefix()))),
    );
    operations.extend(plan.puts.iter().map(|put| {
        // An existing key keeps its lease: an agent's registration stays one.
        let options = put.existing.then(|| PutOptions::new().with_ignore_lease());
        TxnOp::put(put.key.as_str(), put.value.as_str(), options)
    }));
    Txn::new().when(compares).and_then(operations)
}

pub(super) async fn commit(client: &Client, plan: &WritePlan) -> Result<i64, WriteError> {
    let response = client.call(client.kv().txn(transaction(client, plan))).await?;
    let revision = response.header().map_or(0, |header| header.revision());
    if response.succeeded() {
        Ok(revision)
    } else {
        Err(WriteError::Conflict { base: plan.base_revision, revision })
    }
}

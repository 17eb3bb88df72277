//! A backend's own registration, for `lb agent`: its key under every VIP it
//! serves, all under one lease of a short TTL that the agent keeps alive.
//! The backend dies, the lease expires, etcd deletes the keys, and every
//! balancer removes the backend. Draining is the same keys with
//! `draining: true`; leaving deletes them and revokes the lease.
//!
//! A key an operator wrote (no lease) is never taken over: the agent is
//! refused and says so. A key under another lease (this backend's agent
//! before a restart) is taken over.

use std::net::IpAddr;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};

use super::keys::backend_value;
use super::{Client, StoreError};
use crate::model::{BackendSpec, Vip};

/// Why a registration cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "VIP {vip} is not in the store at {url}: add it first (lb vip add {vip} on any balancer of the fleet)"
    )]
    UnknownVip { vip: Vip, url: String },
    #[error(
        "backend {address} of VIP {vip} was added by an operator ({key} has no lease): lb agent never takes over an operator's backend; remove it first (lb backend remove {vip} {address}) or leave it to the operator"
    )]
    OperatorOwned { vip: Vip, address: IpAddr, key: String },
    #[error("the store at {url} refused the registration: a VIP was removed meanwhile")]
    VipRemoved { url: String },
}

/// One backend's registration under every VIP it serves.
pub struct Registration {
    client: Client,
    vips: Vec<Vip>,
    backend: BackendSpec,
    ttl_seconds: i64,
    /// The lease the keys live under; 0 before [`Registration::register`].
    lease: i64,
}

impl Registration {
    /// Checks that every VIP is in the store and that no operator owns this
    /// backend's key under any of them.
    pub async fn prepare(
        client: Client,
        vips: Vec<Vip>,
        backend: BackendSpec,
        ttl_seconds: i64,
    ) -> Result<Self, RegistrationError> {
        let registration = Self { client, vips, backend, ttl_seconds, lease: 0 };
        for vip in &registration.vips {
            let keys = registration.client.keys();
            let found = registration.get(&keys.vip(vip)).await?;
            if found.is_none() {
                let url = registration.client.url().to_owned();
                return Err(RegistrationError::UnknownVip { vip: *vip, url });
            }
            let key = keys.backend(vip, registration.backend.address);
            if registration.get(&key).await? == Some(0) {
                let address = registration.backend.address;
                return Err(RegistrationError::OperatorOwned { vip: *vip, address, key });
            }
        }
        Ok(registration)
    }

    /// The lease of `key` (0 for none), or None when it does not exist.
    async fn get(&self, key: &str) -> Result<Option<i64>, StoreError> {
        let response = self.client.call(self.client.kv().get(key, None)).await?;
        Ok(response.kvs().first().map(|kv| kv.lease()))
    }

    pub fn lease(&self) -> i64 {
        self.lease
    }

    pub fn address(&self) -> IpAddr {
        self.backend.address
    }

    pub fn url(&self) -> &str {
        self.client.url()
    }

    /// Registers under a fresh lease, in one transaction that requires
    /// every VIP to exist and no operator's key to appear meanwhile.
    pub async fn register(&mut self) -> Result<(), RegistrationError> {
        let mut leases = self.client.etcd.lease_client();
        let granted = self.client.call(leases.grant(self.ttl_seconds, None)).await?;
        self.lease = granted.id();
        if let Err(error) = self.put(self.backend.draining, true).await {
            let _ = self.client.call(leases.revoke(self.lease)).await;
            return Err(error);
        }
        Ok(())
    }

    /// Writes the keys with `draining`, under the registration's lease.
    async fn put(&self, draining: bool, fresh: bool) -> Result<(), RegistrationError> {
        let keys = self.client.keys();
        let value = backend_value(&BackendSpec { draining, ..self.backend.clone() });
        let mut compares = Vec::new();
        let mut operations = Vec::new();
        for vip in &self.vips {
            let key = keys.backend(vip, self.backend.address);
            compares.push(Compare::create_revision(keys.vip(vip), CompareOp::Greater, 0));
            if !fresh {
                // Still ours: not deleted by an operator, not expired.
                compares.push(Compare::lease(key.as_str(), CompareOp::Equal, self.lease));
            }
            let options = PutOptions::new().with_lease(self.lease);
            operations.push(TxnOp::put(key, value.as_str(), Some(options)));
        }
        let transaction = Txn::new().when(compares).and_then(operations);
        let response = self.client.call(self.client.kv().txn(transaction)).await?;
        if response.succeeded() {
            Ok(())
        } else {
            Err(RegistrationError::VipRemoved { url: self.client.url().to_owned() })
        }
    }

    /// Renews the lease once; false when it has expired (register again).
    pub async fn keep_alive(&self) -> Result<bool, StoreError> {
        let mut leases = self.client.etcd.lease_client();
        let (mut keeper, mut answers) = self.client.call(leases.keep_alive(self.lease)).await?;
        self.client.call(keeper.keep_alive()).await?;
        let answer = self.client.call(answers.message()).await?;
        Ok(answer.is_some_and(|answer| answer.ttl() > 0))
    }

    /// Marks the backend draining under every VIP: no balancer sends it new flows.
    pub async fn drain(&mut self) -> Result<(), RegistrationError> {
        self.put(true, false).await?;
        self.backend.draining = true;
        Ok(())
    }

    /// Deletes the keys that are still this registration's and revokes the lease.
    pub async fn deregister(&self) -> Result<(), StoreError> {
        let keys = self.client.keys();
        for vip in &self.vips {
            let key = keys.backend(vip, self.backend.address);
            let ours = Compare::lease(key.as_str(), CompareOp::Equal, self.lease);
            let transaction = Txn::new().when([ours]).and_then([TxnOp::delete(key, None)]);
            self.client.call(self.client.kv().txn(transaction)).await?;
        }
        let mut leases = self.client.etcd.lease_client();
        self.client.call(leases.revoke(self.lease)).await?;
        Ok(())
    }
}

//! `lb agent`, run on each backend: registers it in the fleet store once its
//! own service answers a local check, keeps the registration's lease alive,
//! and on SIGTERM drains it (every balancer stops sending it new flows),
//! waits until its established connections on the VIPs are gone or
//! `--drain-timeout` passes, deregisters and exits 0. If the backend dies,
//! the lease expires and every balancer removes it. It talks only to the
//! store (never to a balancer): `store::registration` does the writes.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::model::{BackendSpec, CheckKind, CheckSpec, Vip};
use crate::store::{Registration, RegistrationError, StoreConfig, StoreError};

mod host;
pub mod sockets;

/// How often the drain looks at the established connections.
const DRAIN_POLL: Duration = Duration::from_millis(500);
/// How long to wait before trying an unreachable store again.
const RETRY: Duration = Duration::from_secs(1);

/// Everything `lb agent` was told.
#[derive(Debug)]
pub struct AgentOptions {
    pub store: StoreConfig,
    pub vips: Vec<Vip>,
    pub address: Option<IpAddr>,
    pub weight: u32,
    /// The local check, None for none.
    pub check: Option<CheckSpec>,
    pub ttl_seconds: u32,
    pub drain_timeout: Duration,
    pub configure_vip: bool,
}

/// Builds the local check of `--check`.
pub fn local_check(kind: CheckKind, port: Option<u16>, path: String) -> Option<CheckSpec> {
    (kind != CheckKind::None).then(|| CheckSpec { kind, port, path, ..CheckSpec::default() })
}

/// SIGTERM and SIGINT, either of which ends the agent.
struct Stop {
    terminate: Signal,
    interrupt: Signal,
}

impl Stop {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

/// Runs the agent until it has left the fleet.
pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    options.store.validate().map_err(anyhow::Error::msg)?;
    let vip_addresses: BTreeSet<IpAddr> = options.vips.iter().map(|vip| vip.address).collect();
    let ipv4 = options.vips[0].address.is_ipv4();
    if options.vips.iter().any(|vip| vip.address.is_ipv4() != ipv4) {
        bail!(
            "--vip: every VIP of one agent must be of one address family (run one agent per family)"
        );
    }
    let address = match options.address {
        Some(address) if address.is_ipv4() != ipv4 => {
            bail!("--address {address} is not of the VIPs' address family")
        }
        Some(address) => address,
        None => host::own_address(ipv4, &vip_addresses)?,
    };
    let mut stop = Stop::new()?;
    let client = crate::store::connect(&options.store).await?;
    let backend = BackendSpec { address, weight: options.weight, draining: false };
    let ttl = i64::from(options.ttl_seconds);
    let mut registration =
        Registration::prepare(client, options.vips.clone(), backend, ttl).await?;
    let loopback = if options.configure_vip {
        Some(host::LoopbackVips::configure(&vip_addresses).await?)
    } else {
        None
    };
    let outcome = serve(&options, &mut registration, &mut stop).await;
    if let Some(loopback) = loopback {
        loopback.undo().await;
    }
    outcome
}

/// Waits for the service, registers, keeps the lease, and drains on a signal.
async fn serve(
    options: &AgentOptions,
    registration: &mut Registration,
    stop: &mut Stop,
) -> anyhow::Result<()> {
    let vips: Vec<String> = options.vips.iter().map(Vip::to_string).collect();
    let vips = vips.join(", ");
    tokio::select! {
        () = wait_for_service(options, registration) => {}
        signal = stop.wait() => {
            tracing::info!(signal, "stopped before the service answered: never registered");
            return Ok(());
        }
    }
    register(registration, stop).await?;
    tracing::info!(
        vips = %vips, lease = registration.lease(), ttl_seconds = options.ttl_seconds, store = registration.url(),
        "registered: every balancer of the fleet adds this backend"
    );
    let renew = Duration::from_secs(u64::from(options.ttl_seconds)) / 3;
    let signal = loop {
        tokio::select! {
            () = tokio::time::sleep(renew) => keep(registration).await,
            signal = stop.wait() => break signal,
        }
    };
    tracing::info!(signal, "draining: every balancer stops sending this backend new flows");
    drain(options, registration, stop).await;
    match registration.deregister().await {
        Ok(()) => tracing::info!("deregistered: every balancer removes this backend"),
        Err(error) => tracing::warn!(
            error = %error, ttl_seconds = options.ttl_seconds,
            "could not deregister: the lease expires without renewal and every balancer then removes this backend"
        ),
    }
    Ok(())
}

/// Returns once the local check passes (at once without one).
async fn wait_for_service(options: &AgentOptions, registration: &Registration) {
    let Some(check) = &options.check else { return };
    let address = registration.address();
    let mut said = false;
    loop {
        let mut failed = None;
        for vip in &options.vips {
            if let Err(error) = crate::health::check_once(check, address, vip.port).await {
                failed = Some(error);
                break;
            }
        }
        let Some(error) = failed else { return };
        if !said {
            tracing::info!(error = %error, "waiting for the service to answer its local check before registering");
            said = true;
        }
        tokio::time::sleep(check.interval()).await;
    }
}

/// Registers, trying an unreachable store again until it answers or a
/// signal comes; any other refusal ends the agent with its reason.
async fn register(registration: &mut Registration, stop: &mut Stop) -> anyhow::Result<()> {
    loop {
        match registration.register().await {
            Ok(()) => return Ok(()),
            Err(RegistrationError::Store(StoreError::Unreachable { url, cause })) => {
                tracing::warn!(%url, %cause, "the store is unreachable: registering once it answers");
            }
            Err(error) => return Err(error.into()),
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            signal = stop.wait() => bail!("{signal} before the store answered: never registered"),
        }
    }
}

/// Renews the lease once; registers again when it has expired (the store
/// was unreachable for longer than the TTL, and the balancers removed the
/// backend meanwhile).
async fn keep(registration: &mut Registration) {
    match registration.keep_alive().await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(lease = registration.lease(), "the lease expired: registering again");
            match registration.register().await {
                Ok(()) => tracing::info!(lease = registration.lease(), "registered again"),
                Err(error) => tracing::warn!(error = %error, "registering again failed; retrying"),
            }
        }
        Err(error) => tracing::warn!(
            error = %error,
            "could not renew the lease; if the store stays unreachable past the TTL, the balancers remove this backend until it answers again"
        ),
    }
}

/// Marks the backend draining and waits until its established connections
/// on the VIPs are gone, `--drain-timeout` passes, or a second signal says
/// not to wait; the lease is kept alive meanwhile.
async fn drain(options: &AgentOptions, registration: &mut Registration, stop: &mut Stop) {
    let deadline = tokio::time::Instant::now() + options.drain_timeout;
    while let Err(error) = registration.drain().await {
        tracing::warn!(error = %error, "could not mark the backend draining; retrying");
        if tokio::time::Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(RETRY).await;
    }
    let endpoints: BTreeSet<SocketAddr> = options.vips.iter().map(Vip::endpoint).collect();
    let renew = Duration::from_secs(u64::from(options.ttl_seconds)) / 3;
    let mut renewed = tokio::time::Instant::now();
    let mut last = None;
    loop {
        let counted = tokio::task::spawn_blocking({
            let endpoints = endpoints.clone();
            move || sockets::established(&endpoints)
        })
        .await
        .context("counting connections")
        .and_then(|counted| counted);
        match counted {
            Ok(0) => {
                tracing::info!("drained: no established connection left on the VIPs");
                return;
            }
            Ok(count) if last != Some(count) => {
                tracing::info!(
                    connections = count,
                    "waiting for the established connections to end"
                );
                last = Some(count);
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "cannot count connections: waiting out --drain-timeout")
            }
        }
        if tokio::time::Instant::now() > deadline {
            tracing::warn!(
                connections = last.unwrap_or(0),
                timeout_seconds = options.drain_timeout.as_secs(),
                "--drain-timeout passed: deregistering with connections still open"
            );
            return;
        }
        if renewed.elapsed() >= renew {
            keep(registration).await;
            renewed = tokio::time::Instant::now();
        }
        tokio::select! {
            () = tokio::time::sleep(DRAIN_POLL) => {}
            signal = stop.wait() => {
                tracing::warn!(signal, connections = last.unwrap_or(0), "second signal: deregistering without waiting");
                return;
            }
        }
    }
}

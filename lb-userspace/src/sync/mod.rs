//! Flow-state sync between balancers: the task that tells peers about the
//! flows our datapath creates and closes, and writes theirs into our flow
//! table, so any balancer can take over any flow with its backend.
//!
//! The datapath reports flow changes in a ring buffer (never per packet);
//! this task drains it every 10 ms, translates slots into addresses, and
//! sends batches over UDP, sealed with the fleet's key (`wire`). Peers are
//! tracked in `peers`; translation and flow-table writes are in `flows`.
//! Besides the datapath, this task is the only writer of the flow table,
//! and it writes nothing else.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use aya::maps::MapData;
use lb_common::FlowSyncEvent;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinSet;

mod flows;
mod key;
mod peers;
pub mod wire;

pub use flows::Directory;
pub use key::{fleet_seed, load as load_key};
pub use peers::{PeerState, PeerStatus, Settings};
pub use wire::SyncKey;

use crate::datapath::SyncDatapath;

use flows::{Applied, FlowTable};
use peers::{Peer, Rejected};
use wire::{Body, FLOWS_PER_DATAGRAM, FlowRecord, Header, Refused};

/// The port sync listens on and peers are sent to when none is given.
pub const DEFAULT_PORT: u16 = 9470;
/// How often the datapath's ring buffer is drained (the most a flow change
/// waits before it is sent).
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// How often every peer gets a hello.
const HELLO_INTERVAL: Duration = Duration::from_secs(1);
/// A peer asking for a full resync gets at most one this often.
const DUMP_INTERVAL: Duration = Duration::from_secs(2);
/// A starting balancer waits this long at most for peers it cannot reach
/// before it counts its first sync as done (and lets its VIPs be announced).
pub const INITIAL_SYNC_LIMIT: Duration = Duration::from_secs(5);
/// Datagrams of a full resync sent before the sender pauses a millisecond,
/// so a large dump does not overrun the peer's socket buffer.
const DUMP_BURST: usize = 32;

/// How sync is set up: from `--sync-*` or the config's `[sync]`.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub listen: SocketAddr,
    pub peers: Vec<SocketAddr>,
    pub key: SyncKey,
}

/// What `lb stats` shows of sync.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub listen: Option<SocketAddr>,
    /// Every peer has finished its first full resync to us, refused us, or
    /// stayed unreachable for [`INITIAL_SYNC_LIMIT`]: VIPs may be announced.
    pub initial_sync_done: bool,
    pub peers: Vec<PeerStatus>,
    /// Flow changes of our datapath sent to peers (each counted once).
    pub flows_reported: u64,
    /// Datagrams dropped before use, by reason.
    pub dropped_unauthenticated: u64,
    pub dropped_stale: u64,
    pub dropped_malformed: u64,
    pub dropped_unknown_sender: u64,
    pub dropped_settings_differ: u64,
}

/// Everything the sync task runs on. The daemon keeps it, to start the task
/// again if it dies: the socket, the datapath's handles and the channels
/// outlive any one run.
#[derive(Clone)]
pub struct Inputs {
    pub socket: Arc<UdpSocket>,
    pub options: SyncOptions,
    pub settings: Settings,
    pub datapath: Arc<SyncDatapath>,
    pub directory: watch::Receiver<Arc<Directory>>,
    pub status: watch::Sender<SyncStatus>,
}

/// Our side of the protocol: the socket and what every datagram header says.
struct Sender {
    socket: Arc<UdpSocket>,
    key: SyncKey,
    settings: Settings,
    session: u64,
    sequence: AtomicU64,
}

impl Sender {
    async fn send(&self, to: SocketAddr, body: &Body) {
        let header = Header {
            hash_seed: self.settings.hash_seed,
            table_size: self.settings.table_size,
            session: self.session,
            sequence: self.sequence.fetch_add(1, Ordering::Relaxed),
            sent_at_ms: wall_ms(),
        };
        let datagram = wire::seal(&self.key, &header, body);
        if let Err(error) = self.socket.send_to(&datagram, to).await {
            tracing::debug!(peer = %to, %error, "sending a sync datagram failed");
        }
    }
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |t| t.as_millis() as u64)
}

fn open_table(fd: &OwnedFd) -> std::io::Result<FlowTable> {
    let map = MapData::from_fd(fd.try_clone()?).map_err(std::io::Error::other)?;
    FlowTable::try_from(aya::maps::Map::LruHashMap(map)).map_err(std::io::Error::other)
}

/// Binds the sync socket; done before anything is attached so that a
/// taken port is a clear startup error.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind(listen)
        .await
        .map_err(|error| anyhow::anyhow!("--sync-listen {listen}: {error}"))?;
    // Room for a peer's full resync arriving while we apply it.
    let _ = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &(8 << 20));
    Ok(socket)
}

/// Runs sync until the process ends. Started again after it dies, it
/// carries on with the counters last shown and a new session (peers take a
/// newer session as a restart of ours), and asks its peers for a resync.
pub async fn run(inputs: Inputs) -> anyhow::Result<()> {
    let Inputs { socket, options, settings, datapath, mut directory, status } = inputs;
    let flow_table = &datapath.flow_table;
    let mut ring = datapath.open_ring()?;
    let mut table = open_table(flow_table)?;
    let sender = Arc::new(Sender {
        socket,
        key: options.key.clone(),
        settings,
        session: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |t| t.as_nanos() as u64),
        sequence: AtomicU64::new(0),
    });
    let started = Instant::now();
    let mut peers: HashMap<IpAddr, Peer> =
        options.peers.iter().map(|address| (address.ip(), Peer::new(*address))).collect();
    let mut shown = SyncStatus { listen: Some(options.listen), ..status.borrow().clone() };
    let mut dumps: JoinSet<(SocketAddr, std::io::Result<u64>)> = JoinSet::new();
    let mut dumping: HashSet<IpAddr> = HashSet::new();
    let mut next_dump = 0u64;
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    let mut hello = tokio::time::interval(HELLO_INTERVAL);
    let mut buffer = vec![0u8; 65_536];
    tracing::info!(listen = %options.listen, peers = ?options.peers, "flow sync started");

    loop {
        tokio::select! {
            received = sender.socket.recv_from(&mut buffer) => {
                let (length, from) = received?;
                let Some(peer) = peers.get_mut(&from.ip()) else {
                    shown.dropped_unknown_sender += 1;
                    continue;
                };
                let (header, body) = match wire::open(&options.key, &buffer[..length]) {
                    Ok(opened) => opened,
                    Err(Refused::Unauthenticated) => { shown.dropped_unauthenticated += 1; continue }
                    Err(Refused::Malformed) => { shown.dropped_malformed += 1; continue }
                };
                let now = started.elapsed();
                match peer.accept(&header, settings, now, wall_ms()) {
                    Ok(()) => {}
                    Err(Rejected::Stale) => { shown.dropped_stale += 1; continue }
                    Err(Rejected::SettingsDiffer) => { shown.dropped_settings_differ += 1; continue }
                }
                match body {
                    Body::Hello { resync_wanted } => {
                        let due = peer.last_dump_sent.is_none_or(|sent| now.saturating_sub(sent) >= DUMP_INTERVAL);
                        if resync_wanted && due && dumping.insert(from.ip()) {
                            peer.last_dump_sent = Some(now);
                            next_dump += 1;
                            let (to, dump) = (peer.status.address, next_dump);
                            let (sender, fd) = (sender.clone(), flow_table.try_clone()?);
                            let snapshot = directory.borrow().clone();
                            dumps.spawn(async move { (to, send_dump(sender, fd, snapshot, to, dump).await) });
                        }
                    }
                    Body::Flows { dump, flows } => {
                        let snapshot = directory.borrow().clone();
                        for record in &flows {
                            match flows::apply(&mut table, &snapshot, record) {
                                Applied::Written | Applied::Kept => peer.status.flows_received += 1,
                                Applied::Refused => {
                                    peer.status.flows_refused += 1;
                                    tracing::debug!(peer = %peer.status.address, ?record, "refused a flow: its VIP or backend is not configured here");
                                }
                            }
                        }
                        if let Some(dump) = dump {
                            peer.dump_records(dump, flows.len() as u64);
                        }
                    }
                    Body::DumpDone { dump, flows } => {
                        if peer.dump_done(dump, flows) {
                            tracing::info!(peer = %peer.status.address, flows, "full resync from peer complete");
                        }
                    }
                }
            }
            _ = drain.tick() => {
                let snapshot = directory.borrow_and_update().clone();
                let mut batch = Vec::new();
                while let Some(item) = ring.next() {
                    if item.len() < size_of::<FlowSyncEvent>() {
                        continue;
                    }
                    // SAFETY: the datapath writes whole FlowSyncEvent records
                    // (length checked above); the type is plain data valid for
                    // any bytes, read unaligned from the ring's memory.
                    let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowSyncEvent>()) };
                    drop(item);
                    if let Some(record) = flows::record_of(&snapshot, &event) {
                        batch.push(record);
                    }
                }
                shown.flows_reported += batch.len() as u64;
                for chunk in batch.chunks(FLOWS_PER_DATAGRAM) {
                    let body = Body::Flows { dump: None, flows: chunk.to_vec() };
                    for peer in peers.values_mut().filter(|p| p.status.state != PeerState::Refused) {
                        sender.send(peer.status.address, &body).await;
                        peer.status.flows_sent += chunk.len() as u64;
                    }
                }
            }
            _ = hello.tick() => {
                let now = started.elapsed();
                let waited = now >= INITIAL_SYNC_LIMIT;
                for peer in peers.values_mut() {
                    peer.tick(now);
                    let body = Body::Hello { resync_wanted: peer.resync_wanted };
                    sender.send(peer.status.address, &body).await;
                }
                if !shown.initial_sync_done && peers.values().all(|peer| peer.settled(waited)) {
                    shown.initial_sync_done = true;
                    tracing::info!(after_ms = now.as_millis() as u64, "initial flow sync done");
                }
            }
            Some(finished) = dumps.join_next() => {
                if let Ok((to, _)) = &finished {
                    dumping.remove(&to.ip());
                }
                match finished {
                    Ok((to, Ok(count))) => {
                        if let Some(peer) = peers.get_mut(&to.ip()) {
                            peer.status.flows_sent += count;
                        }
                        tracing::info!(peer = %to, flows = count, "full resync sent");
                    }
                    Ok((to, Err(error))) => tracing::error!(peer = %to, %error, "full resync failed"),
                    Err(error) => tracing::error!(%error, "full resync task died"),
                }
            }
        }
        let mut listed: Vec<PeerStatus> = peers.values().map(|peer| peer.status.clone()).collect();
        listed.sort_by_key(|peer| peer.address);
        shown.peers = listed;
        crate::publish::if_changed(&status, &shown);
    }
}

/// Sends every flow we can name to `to`, then the count, paced.
async fn send_dump(
    sender: Arc<Sender>,
    flow_table: OwnedFd,
    directory: Arc<Directory>,
    to: SocketAddr,
    dump: u64,
) -> std::io::Result<u64> {
    let records: Vec<FlowRecord> = tokio::task::spawn_blocking(move || {
        open_table(&flow_table).map(|table| flows::dump(&table, &directory))
    })
    .await
    .map_err(std::io::Error::other)??;
    for (index, chunk) in records.chunks(FLOWS_PER_DATAGRAM).enumerate() {
        sender.send(to, &Body::Flows { dump: Some(dump), flows: chunk.to_vec() }).await;
        if index % DUMP_BURST == DUMP_BURST - 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let flows = records.len() as u64;
    sender.send(to, &Body::DumpDone { dump, flows }).await;
    Ok(flows)
}

/// `ADDR[:PORT]` of a peer, with [`DEFAULT_PORT`] when none is given.
pub fn parse_peer(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, DEFAULT_PORT)).map_err(|_| {
        format!("'{text}' is not ADDRESS[:PORT] (examples: 198.18.2.2, 198.18.2.2:{DEFAULT_PORT}, [fd00:198:18::2]:{DEFAULT_PORT})")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_peer_without_a_port_gets_the_default_one() {
        assert_eq!(super::parse_peer("198.18.2.2").unwrap().to_string(), "198.18.2.2:9470");
        assert_eq!(super::parse_peer("[fd00::2]:1").unwrap().to_string(), "[fd00::2]:1");
        assert_eq!(super::parse_peer("fd00::2").unwrap().to_string(), "[fd00::2]:9470");
        assert!(super::parse_peer("balancer-2").unwrap_err().contains("'balancer-2'"));
    }
}

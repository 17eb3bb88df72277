//! What we know of each peer balancer: whether it is alive and agrees with
//! our settings, which of its datagrams we have already seen (replays are
//! refused), and how far a full resync from it has come. Pure state: the
//! caller passes the time in, so every rule is unit-tested.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::wire::Header;

/// A peer that has sent nothing for this long is down, and is asked for a
/// full resync when it is heard again (we may have missed its changes).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Datagrams sent longer ago than this (by the sender's clock) are stale:
/// balancers' clocks must agree within it (NTP does far better).
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// How far back out-of-order datagrams of one session are still accepted.
const REPLAY_WINDOW: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerState {
    /// Never heard since we started.
    Connecting,
    /// Heard; its full resync to us has not finished yet.
    Syncing,
    /// Heard recently, and every flow it had is known here.
    InSync,
    /// Silent for longer than [`PEER_TIMEOUT`].
    Down,
    /// Its hash seed or table size differs from ours: nothing from it is used.
    Refused,
}

impl std::fmt::Display for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerState::Connecting => "connecting",
            PeerState::Syncing => "syncing",
            PeerState::InSync => "in-sync",
            PeerState::Down => "down",
            PeerState::Refused => "refused",
        })
    }
}

/// Counters and state of one peer, as `lb stats` shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub address: SocketAddr,
    pub state: PeerState,
    /// Why the peer is refused, when it is.
    pub refused_because: Option<String>,
    pub flows_sent: u64,
    pub flows_received: u64,
    /// Flows it sent that name a VIP or backend not configured here.
    pub flows_refused: u64,
    /// Full resyncs it completed to us.
    pub resyncs_received: u64,
    /// Milliseconds since we last heard from it.
    pub last_heard_ms: Option<u64>,
    /// How old its last datagram was on arrival (its clock against ours).
    pub lag_ms: Option<u64>,
}

impl PeerStatus {
    /// Heard within the sync timeout, and not refused.
    pub fn up(&self) -> bool {
        matches!(self.state, PeerState::Syncing | PeerState::InSync)
    }

    /// How old, now, the newest datagram from the peer is: its age on
    /// arrival plus the time since. It grows while the peer is silent, where
    /// the age on arrival alone would stay at its last (small) value.
    pub fn lag_now_ms(&self) -> Option<u64> {
        Some(self.lag_ms? + self.last_heard_ms.unwrap_or(0))
    }
}

/// Why a datagram from a known peer is not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Sent too long ago, by an earlier run of the peer, or seen before.
    Stale,
    /// The peer's hash seed or table size differs from ours.
    SettingsDiffer,
}

/// One configured peer.
#[derive(Debug)]
pub struct Peer {
    pub status: PeerStatus,
    /// When we last heard from it (our monotonic time).
    last_heard: Option<Duration>,
    /// Its current session, the highest sequence seen in it, and a bitmap
    /// of the [`REPLAY_WINDOW`] sequences below that one already seen.
    session: u64,
    highest: u64,
    seen: u64,
    /// We want all its flows (set at start and whenever it comes back).
    pub resync_wanted: bool,
    /// The full resync it is sending us: its id and the records received.
    dump: Option<(u64, u64)>,
    /// When we last started sending it our flows (to rate-limit requests).
    pub last_dump_sent: Option<Duration>,
}

/// Our own settings, which every peer must share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub hash_seed: u32,
    pub table_size: u32,
}

impl Peer {
    pub fn new(address: SocketAddr) -> Self {
        Self {
            status: PeerStatus {
                address,
                state: PeerState::Connecting,
                refused_because: None,
                flows_sent: 0,
                flows_received: 0,
                flows_refused: 0,
                resyncs_received: 0,
                last_heard_ms: None,
                lag_ms: None,
            },
            last_heard: None,
            session: 0,
            highest: 0,
            seen: 0,
            resync_wanted: true,
            dump: None,
            last_dump_sent: None,
        }
    }

    /// Checks an authenticated datagram's header; on success the peer is
    /// alive and the datagram must be acted on. `now` is our monotonic
    /// time, `wall_ms` our Unix time in milliseconds.
    pub fn accept(
        &mut self,
        header: &Header,
        ours: Settings,
        now: Duration,
        wall_ms: u64,
    ) -> Result<(), Rejected> {
        let age_ms = wall_ms.saturating_sub(header.sent_at_ms);
        if age_ms > STALE_AFTER.as_millis() as u64 || header.session < self.session {
            return Err(Rejected::Stale);
        }
        if header.session > self.session {
            // A new run of the peer: its earlier sessions are over for good.
            self.session = header.session;
            self.highest = header.sequence;
            self.seen = 0;
        } else if header.sequence > self.highest {
            let shift = header.sequence - self.highest;
            self.seen =
                if shift >= REPLAY_WINDOW { 0 } else { (self.seen << shift) | 1 << (shift - 1) };
            self.highest = header.sequence;
        } else {
            let behind = self.highest - header.sequence;
            if behind == 0 || behind > REPLAY_WINDOW || self.seen & (1 << (behind - 1)) != 0 {
                return Err(Rejected::Stale);
            }
            self.seen |= 1 << (behind - 1);
        }

        if header.hash_seed != ours.hash_seed || header.table_size != ours.table_size {
            let because = format!(
                "its hash_seed {} and table_size {} differ from ours ({} and {}): every balancer of a VIP must use the same",
                header.hash_seed, header.table_size, ours.hash_seed, ours.table_size
            );
            if self.status.state != PeerState::Refused {
                tracing::error!(peer = %self.status.address, %because, "sync peer refused");
            }
            self.status.state = PeerState::Refused;
            self.status.refused_because = Some(because);
            self.last_heard = Some(now);
            return Err(Rejected::SettingsDiffer);
        }
        self.status.refused_because = None;
        if matches!(self.status.state, PeerState::Down | PeerState::Connecting | PeerState::Refused)
        {
            tracing::info!(peer = %self.status.address, "sync peer heard: asking it for its flows");
            self.resync_wanted = true;
            self.status.state = PeerState::Syncing;
        }
        self.last_heard = Some(now);
        self.status.lag_ms = Some(age_ms);
        Ok(())
    }

    /// Records `count` records of full resync `dump`.
    pub fn dump_records(&mut self, dump: u64, count: u64) {
        match &mut self.dump {
            Some((id, received)) if *id == dump => *received += count,
            _ => self.dump = Some((dump, count)),
        }
    }

    /// The peer says resync `dump` held `flows` records: if we got them all,
    /// we are in sync with it; if some were lost, we ask again.
    pub fn dump_done(&mut self, dump: u64, flows: u64) -> bool {
        let received = match self.dump.take() {
            Some((id, received)) if id == dump => received,
            _ if flows == 0 => 0,
            _ => return false,
        };
        if received != flows {
            tracing::warn!(peer = %self.status.address, received, sent = flows, "full resync lost datagrams: asking again");
            return false;
        }
        self.resync_wanted = false;
        self.status.resyncs_received += 1;
        if self.status.state == PeerState::Syncing {
            self.status.state = PeerState::InSync;
        }
        true
    }

    /// Ages the peer: silent too long means down.
    pub fn tick(&mut self, now: Duration) {
        self.status.last_heard_ms =
            self.last_heard.map(|heard| now.saturating_sub(heard).as_millis() as u64);
        let silent = self.last_heard.is_some_and(|heard| now.saturating_sub(heard) > PEER_TIMEOUT);
        if silent && matches!(self.status.state, PeerState::Syncing | PeerState::InSync) {
            tracing::warn!(peer = %self.status.address, "sync peer silent: down");
            self.status.state = PeerState::Down;
            self.dump = None;
        }
    }

    /// Whether this peer no longer holds up our first announcement: it is
    /// in sync with us, refuses to be, or was never heard within `waited`.
    pub fn settled(&self, waited: bool) -> bool {
        match self.status.state {
            PeerState::InSync | PeerState::Refused => true,
            PeerState::Connecting | PeerState::Down => waited,
            PeerState::Syncing => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: Settings = Settings { hash_seed: 1, table_size: 251 };
    const NOW_MS: u64 = 1_700_000_000_000;

    fn header(session: u64, sequence: u64) -> Header {
        Header { hash_seed: 1, table_size: 251, session, sequence, sent_at_ms: NOW_MS }
    }

    fn peer() -> Peer {
        Peer::new("198.18.2.2:9470".parse().unwrap())
    }

    #[test]
    fn a_silent_peer_is_down_and_its_lag_grows() {
        let mut peer = peer();
        assert!(!peer.status.up() && peer.status.lag_now_ms().is_none(), "never heard");
        let heard = Duration::from_secs(1);
        assert_eq!(peer.accept(&header(10, 1), OURS, heard, NOW_MS), Ok(()));
        peer.tick(heard);
        assert!(peer.status.up());
        let fresh = peer.status.lag_now_ms().unwrap();
        peer.tick(heard + PEER_TIMEOUT + Duration::from_secs(30));
        assert_eq!(peer.status.state, PeerState::Down);
        assert!(!peer.status.up());
        let later = peer.status.lag_now_ms().unwrap();
        assert!(later >= fresh + 30_000, "lag {fresh} ms then {later} ms while silent");
    }

    #[test]
    fn a_datagram_is_accepted_once_even_out_of_order() {
        let mut peer = peer();
        let now = Duration::from_secs(1);
        let accept = |peer: &mut Peer, session, sequence| {
            peer.accept(&header(session, sequence), OURS, now, NOW_MS)
        };
        assert_eq!(accept(&mut peer, 10, 1), Ok(()));
        assert_eq!(peer.status.state, PeerState::Syncing);
        assert_eq!(accept(&mut peer, 10, 1), Err(Rejected::Stale));
        assert_eq!(accept(&mut peer, 10, 5), Ok(()));
        assert_eq!(accept(&mut peer, 10, 3), Ok(()), "late but unseen");
        assert_eq!(accept(&mut peer, 10, 3), Err(Rejected::Stale));
        assert_eq!(accept(&mut peer, 10, 5), Err(Rejected::Stale));
        assert_eq!(accept(&mut peer, 10, 200), Ok(()));
        assert_eq!(accept(&mut peer, 10, 100), Err(Rejected::Stale), "beyond the window");
        assert_eq!(accept(&mut peer, 9, 1_000), Err(Rejected::Stale), "an earlier run");
        assert_eq!(accept(&mut peer, 11, 1), Ok(()), "the peer restarted");
        assert_eq!(accept(&mut peer, 10, 201), Err(Rejected::Stale));
    }

    #[test]
    fn an_old_datagram_is_stale_and_other_settings_are_refused() {
        let mut peer = peer();
        let now = Duration::from_secs(1);
        let late = NOW_MS + STALE_AFTER.as_millis() as u64 + 1;
        assert_eq!(peer.accept(&header(10, 1), OURS, now, late), Err(Rejected::Stale));
        let other_seed = Header { hash_seed: 2, ..header(10, 2) };
        assert_eq!(peer.accept(&other_seed, OURS, now, NOW_MS), Err(Rejected::SettingsDiffer));
        assert_eq!(peer.status.state, PeerState::Refused);
        assert!(peer.status.refused_because.as_ref().unwrap().contains("hash_seed 2"));
        assert!(peer.settled(false), "a refused peer does not hold up announcing");
        assert_eq!(peer.accept(&header(10, 3), OURS, now, NOW_MS), Ok(()));
        assert_eq!(peer.status.state, PeerState::Syncing);
    }

    #[test]
    fn a_resync_completes_only_with_every_record() {
        let mut peer = peer();
        peer.accept(&header(10, 1), OURS, Duration::from_secs(1), NOW_MS).unwrap();
        assert!(!peer.settled(true), "syncing holds up announcing");
        peer.dump_records(7, 20);
        peer.dump_records(7, 5);
        assert!(!peer.dump_done(7, 30), "five records were lost");
        assert!(peer.resync_wanted);
        peer.dump_records(8, 20);
        peer.dump_records(8, 10);
        assert!(peer.dump_done(8, 30));
        assert_eq!(peer.status.state, PeerState::InSync);
        assert!(!peer.resync_wanted && peer.settled(false));

        peer.tick(Duration::from_secs(5));
        assert_eq!(peer.status.state, PeerState::Down);
        peer.accept(&header(10, 2), OURS, Duration::from_secs(6), NOW_MS).unwrap();
        assert_eq!(peer.status.state, PeerState::Syncing);
        assert!(peer.resync_wanted, "back after silence: we may have missed flows");
        assert!(peer.dump_done(9, 0), "an empty resync needs no records");
    }
}

//! The sync protocol's datagrams: a header in the clear, then the body
//! sealed with XChaCha20-Poly1305 under the fleet's shared key, the header
//! being the associated data. So every byte is authenticated, and client
//! addresses are not readable on the wire.
//!
//! ```text
//! magic "LBSY" | version u8 | 3 reserved | hash_seed u32 | table_size u32
//! session u64 | sequence u64 | sent_at_ms u64 | nonce [24] | sealed body + tag [16]
//! ```
//! All integers are big-endian. `session` names one run of the sender
//! (its start time in Unix nanoseconds), `sequence` counts its datagrams;
//! together they let the receiver refuse replays (see `peers`).

use std::net::{IpAddr, SocketAddr};

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use serde::{Deserialize, Serialize};

const MAGIC: [u8; 4] = *b"LBSY";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 40;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// The largest datagram we send: below a 1,500-byte MTU with IPv6 and UDP headers.
pub const MAX_DATAGRAM: usize = 1_400;

/// Flow records per datagram: 22 IPv6 records of at most 58 bytes fit in
/// [`MAX_DATAGRAM`] with the header, nonce and tag.
pub const FLOWS_PER_DATAGRAM: usize = 20;

/// The shared key of a fleet of balancers.
#[derive(Clone)]
pub struct SyncKey(pub [u8; 32]);

impl std::fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncKey(..)")
    }
}

/// What a datagram's clear header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The sender's flow-hash seed and Maglev table size: peers must agree.
    pub hash_seed: u32,
    pub table_size: u32,
    pub session: u64,
    pub sequence: u64,
    pub sent_at_ms: u64,
}

/// What one balancer tells another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Sent every second: "I am here". `resync_wanted` asks the receiver
    /// for all its flows (we started, restarted or lost contact).
    Hello { resync_wanted: bool },
    /// Flow changes. `dump` names the full resync these belong to, if any.
    Flows { dump: Option<u64>, flows: Vec<FlowRecord> },
    /// The end of full resync `dump`, which held `flows` records.
    DumpDone { dump: u64, flows: u64 },
}

/// One flow, in terms both balancers understand: addresses, never the
/// slots and indexes that are local to one balancer's maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub vip: SocketAddr,
    /// IP protocol number.
    pub protocol: u8,
    pub client: SocketAddr,
    pub backend: IpAddr,
    pub state: FlowState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlowState {
    Open,
    Closing,
    Reset,
}

/// Why a datagram was refused before it reached the peer state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("malformed")]
    Malformed,
    #[error("not authenticated by the shared key")]
    Unauthenticated,
}

/// Seals `body` into a datagram.
pub fn seal(key: &SyncKey, header: &Header, body: &Body) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(MAX_DATAGRAM);
    datagram.extend_from_slice(&MAGIC);
    datagram.extend_from_slice(&[VERSION, 0, 0, 0]);
    datagram.extend_from_slice(&header.hash_seed.to_be_bytes());
    datagram.extend_from_slice(&header.table_size.to_be_bytes());
    datagram.extend_from_slice(&header.session.to_be_bytes());
    datagram.extend_from_slice(&header.sequence.to_be_bytes());
    datagram.extend_from_slice(&header.sent_at_ms.to_be_bytes());
    let mut nonce = [0u8; NONCE_LEN];
    // A random 192-bit nonce never repeats in practice, across restarts and
    // balancers sharing the key alike; without the OS's randomness we cannot
    // seal safely at all.
    getrandom::fill(&mut nonce).expect("the OS random source works");
    datagram.extend_from_slice(&nonce);
    let plain = postcard::to_allocvec(body).expect("a body always serializes");
    let cipher = XChaCha20Poly1305::new(&key.0.into());
    let sealed = cipher
        .encrypt(&nonce.into(), Payload { msg: &plain, aad: &datagram[..HEADER_LEN] })
        .expect("sealing a buffer in memory cannot fail");
    datagram.extend_from_slice(&sealed);
    datagram
}

/// Opens a datagram: authenticated header and body, or why not.
pub fn open(key: &SyncKey, datagram: &[u8]) -> Result<(Header, Body), Refused> {
    if datagram.len() < HEADER_LEN + NONCE_LEN + TAG_LEN
        || datagram[..4] != MAGIC
        || datagram[4] != VERSION
    {
        return Err(Refused::Malformed);
    }
    let (header_bytes, rest) = datagram.split_at(HEADER_LEN);
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
    let cipher = XChaCha20Poly1305::new(&key.0.into());
    let plain = cipher
        .decrypt(&nonce.into(), Payload { msg: sealed, aad: header_bytes })
        .map_err(|_| Refused::Unauthenticated)?;
    let u32_at = |at: usize| u32::from_be_bytes(header_bytes[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_be_bytes(header_bytes[at..at + 8].try_into().unwrap());
    let header = Header {
        hash_seed: u32_at(8),
        table_size: u32_at(12),
        session: u64_at(16),
        sequence: u64_at(24),
        sent_at_ms: u64_at(32),
    };
    // Authenticated but undecodable: a peer of another version, or a bug.
    let body = postcard::from_bytes(&plain).map_err(|_| Refused::Malformed)?;
    Ok((header, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header { hash_seed: 7, table_size: 65_537, session: 1, sequence: 2, sent_at_ms: 3 }
    }

    fn record(v6: bool) -> FlowRecord {
        let (vip, client, backend) = if v6 {
            ("[fd00:198:18::10]:443", "[fd00:198:18:ffff::1234]:65535", "fd00:198:18:1::3")
        } else {
            ("198.18.0.10:80", "198.19.0.2:40000", "198.18.1.3")
        };
        FlowRecord {
            vip: vip.parse().unwrap(),
            protocol: 6,
            client: client.parse().unwrap(),
            backend: backend.parse().unwrap(),
            state: FlowState::Closing,
        }
    }

    #[test]
    fn a_sealed_datagram_opens_to_what_was_sent() {
        let key = SyncKey([9; 32]);
        let body = Body::Flows { dump: Some(4), flows: vec![record(false), record(true)] };
        let datagram = seal(&key, &header(), &body);
        assert_eq!(open(&key, &datagram), Ok((header(), body)));
    }

    #[test]
    fn a_full_batch_of_ipv6_records_fits_one_datagram() {
        let body =
            Body::Flows { dump: Some(u64::MAX), flows: vec![record(true); FLOWS_PER_DATAGRAM] };
        let length = seal(&SyncKey([1; 32]), &header(), &body).len();
        assert!(length <= MAX_DATAGRAM, "{length} bytes");
    }

    #[test]
    fn any_changed_byte_or_another_key_is_refused() {
        let key = SyncKey([9; 32]);
        let datagram = seal(&key, &header(), &Body::Hello { resync_wanted: true });
        assert_eq!(open(&SyncKey([8; 32]), &datagram), Err(Refused::Unauthenticated));
        for at in 5..datagram.len() {
            let mut forged = datagram.clone();
            forged[at] ^= 0x01;
            let refused = open(&key, &forged).unwrap_err();
            assert_eq!(refused, Refused::Unauthenticated, "byte {at}");
        }
        for length in 0..HEADER_LEN + NONCE_LEN + TAG_LEN {
            assert_eq!(open(&key, &datagram[..length]), Err(Refused::Malformed), "{length}");
        }
        let mut wrong_magic = datagram.clone();
        wrong_magic[0] = b'X';
        assert_eq!(open(&key, &wrong_magic), Err(Refused::Malformed));
    }
}

//! The flow key, the flow hash and Maglev table indexing: the one
//! definition the datapath, the daemon and `lb lookup` share.

use core::mem::size_of;

use core::net::IpAddr;

use crate::{SLOTS_PER_VIP, address_bytes};

/// The fields a flow is hashed on, laid out without padding so its bytes are
/// the hash input. Aligned to 8 so that building one on the BPF stack takes
/// a few wide stores rather than a memset call, which BPF cannot make.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowKey {
    pub client_address: [u8; 16],
    pub vip_address: [u8; 16],
    /// Network byte order.
    pub client_port: [u8; 2],
    /// Network byte order.
    pub vip_port: [u8; 2],
    /// The IP protocol number, widened to 32 bits: a zeroed byte array as
    /// padding would compile to a memset call, which BPF cannot make.
    pub protocol: u32,
}
const FLOW_KEY_LEN: usize = 40;
const _: () = assert!(size_of::<FlowKey>() == FLOW_KEY_LEN);

impl FlowKey {
    pub fn new(client: IpAddr, client_port: u16, vip: IpAddr, vip_port: u16, protocol: u8) -> Self {
        Self {
            client_address: address_bytes(client).0,
            vip_address: address_bytes(vip).0,
            client_port: client_port.to_be_bytes(),
            vip_port: vip_port.to_be_bytes(),
            protocol: u32::from(protocol),
        }
    }

    #[inline(always)]
    fn as_bytes(&self) -> &[u8; FLOW_KEY_LEN] {
        // SAFETY: FlowKey is repr(C), made only of u8 arrays (no padding between
        // fields) and exactly FLOW_KEY_LEN bytes long (asserted above), so it
        // needs no tail padding for its alignment of 8 either.
        unsafe { &*(self as *const FlowKey as *const [u8; FLOW_KEY_LEN]) }
    }
}

/// The flow hash: xxHash32 of the key's bytes with the configured seed.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    xxhash_rust::const_xxh32::xxh32(key.as_bytes(), seed)
}

/// The hash of a VIP with client-address affinity: a function of the
/// client's address alone, so all of a client's connections (to any VIP with
/// the same backend set) land on one backend. The address fills a whole
/// 40-byte key: hashing the 16 bytes alone leaves a bounds check in xxh32's
/// tail that the verifier rejects, and zeroed fields would need a memset.
#[inline(always)]
pub fn client_hash(key: &FlowKey, seed: u32) -> u32 {
    let address = key.client_address;
    let client_only = FlowKey {
        client_address: address,
        vip_address: address,
        client_port: [address[0], address[1]],
        vip_port: [address[2], address[3]],
        protocol: 0,
    };
    flow_hash(&client_only, seed)
}

/// Table entries per element of [`MAP_MAGLEV`]. The kernel rounds array
/// elements up to 8 bytes, so a plain `u32` array would not be dense when
/// mmap-ed; 16 entries make one 64-byte element (a cache line).
pub const MAGLEV_CHUNK: u32 = 16;
pub type MaglevChunk = [u32; MAGLEV_CHUNK as usize];

/// Elements of [`MAP_MAGLEV`] needed for `entries` table entries.
pub const fn maglev_elements(entries: u32) -> u32 {
    entries.div_ceil(MAGLEV_CHUNK)
}

/// Index (over all entries of all tables, see [`MAGLEV_CHUNK`]) of the entry
/// a flow hash selects.
#[inline(always)]
pub fn table_index(vip_index: u32, slot: u32, table_size: u32, hash: u32) -> u32 {
    (vip_index * SLOTS_PER_VIP + slot) * table_size + hash % table_size
}

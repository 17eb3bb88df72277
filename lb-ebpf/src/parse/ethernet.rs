//! Ethernet with up to two 802.1Q / 802.1ad tags.

use aya_ebpf::programs::XdpContext;
use lb_common::Reason;
use network_types::{eth::EthHdr, vlan::VlanHdr};

use super::ptr_at;

const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;

/// Tags we look through; QinQ (an S-tag then a C-tag) is the deepest in common use.
const MAX_VLAN_TAGS: usize = 2;
/// 16-bit words of the longest L2 header accepted: Ethernet and two tags.
pub const MAX_L2_WORDS: usize = (EthHdr::LEN + MAX_VLAN_TAGS * VlanHdr::LEN) / 2;

pub struct L2 {
    /// Host byte order: ETH_P_IPV4 or ETH_P_IPV6.
    pub ether_type: u16,
    pub l3_offset: usize,
}

/// Parses the Ethernet header; a frame whose destination is not `own_mac`
/// (see `lb_common::mac_word`; 0 accepts any) is not ours to forward.
#[inline(always)]
pub fn parse_ethernet(ctx: &XdpContext, own_mac: u64) -> Result<L2, Reason> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Reason::PassMalformed)?;
    // SAFETY: ptr_at checked the header is within the packet.
    let destination = lb_common::mac_word(unsafe { (*eth).dst_addr });
    if own_mac != 0 && destination != own_mac {
        return Err(Reason::PassNotForUs);
    }
    // SAFETY: ptr_at checked the header is within the packet.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan = ptr_at::<VlanHdr>(ctx, offset).ok_or(Reason::PassMalformed)?;
        // SAFETY: ptr_at checked the tag is within the packet.
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        offset += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IPV4 | ETH_P_IPV6 => Ok(L2 { ether_type, l3_offset: offset }),
        ETH_P_8021Q | ETH_P_8021AD => Err(Reason::PassVlanDepth),
        _ => Err(Reason::PassNotIp),
    }
}

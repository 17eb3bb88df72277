//! Forged and hostile flow-sync datagrams, sent from a peer's address to a
//! balancer, for the test that shows they change nothing and are counted.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime};

use lb_userspace::sync::SyncKey;
use lb_userspace::sync::wire::{Body, FlowRecord, FlowState, Header, seal};

/// What the forger sends, in order; the test knows what each should do.
pub struct Forgery {
    pub key: SyncKey,
    pub hash_seed: u32,
    pub table_size: u32,
    pub vip: SocketAddr,
    /// A backend the VIP has on the target (the control: it must be accepted).
    pub configured_backend: std::net::IpAddr,
    /// One it has not.
    pub stranger_backend: std::net::IpAddr,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |t| t.as_millis() as u64)
}

/// A flow from client port `port` of 198.19.0.1 to the VIP, on `backend`.
fn flows(forgery: &Forgery, port: u16, backend: std::net::IpAddr) -> Body {
    Body::Flows {
        dump: None,
        flows: vec![FlowRecord {
            vip: forgery.vip,
            protocol: lb_common::PROTO_TCP,
            client: SocketAddr::new("198.19.0.1".parse().expect("an address"), port),
            backend,
            state: FlowState::Open,
        }],
    }
}

/// Sends, from `socket` to `target`: garbage, a datagram sealed with another
/// key, one sent an hour ago, a valid flow (client port 5001, accepted),
/// the same datagram again (a replay), a flow naming a backend the VIP does
/// not have (client port 5002, refused), and one with another hash seed.
pub fn send_all(socket: &UdpSocket, target: SocketAddr, forgery: &Forgery) -> anyhow::Result<()> {
    // A session newer than any real one, as a restarted peer's would be.
    let session = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_nanos() as u64;
    let header = |sequence: u64| Header {
        hash_seed: forgery.hash_seed,
        table_size: forgery.table_size,
        session,
        sequence,
        sent_at_ms: now_ms(),
    };
    let pause = || std::thread::sleep(Duration::from_millis(50));
    let valid = flows(forgery, 5001, forgery.configured_backend);
    let datagrams = [
        b"not a sync datagram at all".to_vec(),
        seal(&SyncKey([0x55; 32]), &header(1), &valid),
        seal(&forgery.key, &Header { sent_at_ms: now_ms() - 3_600_000, ..header(2) }, &valid),
        seal(&forgery.key, &header(3), &valid),
    ];
    for datagram in &datagrams {
        socket.send_to(datagram, target)?;
        pause();
    }
    socket.send_to(&datagrams[3], target)?;
    pause();
    let stranger = flows(forgery, 5002, forgery.stranger_backend);
    socket.send_to(&seal(&forgery.key, &header(4), &stranger), target)?;
    pause();
    let other_seed = Header { hash_seed: forgery.hash_seed ^ 1, ..header(5) };
    socket.send_to(
        &seal(&forgery.key, &other_seed, &flows(forgery, 5003, forgery.configured_backend)),
        target,
    )?;
    pause();
    Ok(())
}

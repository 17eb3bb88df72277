//! Bulk downloads for the path-MTU test: a server that sends its name and a
//! fixed number of bytes on every connection, and a client that downloads
//! through the VIP and reports how far each download got.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Serves `name`, a newline, then `bytes` bytes on every connection to
/// `port` (IPv4 and IPv6) until `seconds` have passed.
pub fn serve(name: &str, port: u16, bytes: usize, seconds: u64) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let body = vec![b'x'; bytes];
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_write_timeout(Some(Duration::from_secs(30)))?;
                let (name, body) = (name.to_owned(), body.clone());
                // A stalled download must not hold up the next one.
                std::thread::spawn(move || {
                    let _ = writeln!(stream, "{name}").and_then(|()| stream.write_all(&body));
                });
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// What one download got.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Download {
    /// The server's name (its first line), or "" when none arrived.
    pub backend: String,
    /// Bytes after the name line.
    pub bytes: usize,
    pub seconds: f64,
}

/// `count` downloads from `address`, one after another, each given
/// `timeout` without progress before it is counted as stalled.
pub fn client(address: SocketAddr, count: usize, timeout: Duration) -> Vec<Download> {
    (0..count).map(|_| download(address, timeout)).collect()
}

fn download(address: SocketAddr, timeout: Duration) -> Download {
    let started = Instant::now();
    let mut received = Vec::new();
    if let Ok(mut stream) = TcpStream::connect_timeout(&address, timeout) {
        let _ = stream.set_read_timeout(Some(timeout));
        let mut buffer = [0u8; 65_536];
        while let Ok(read) = stream.read(&mut buffer) {
            if read == 0 {
                break;
            }
            received.extend_from_slice(&buffer[..read]);
        }
    }
    let (backend, bytes) = match received.iter().position(|byte| *byte == b'\n') {
        Some(end) => {
            (String::from_utf8_lossy(&received[..end]).into_owned(), received.len() - end - 1)
        }
        None => (String::new(), 0),
    };
    Download { backend, bytes, seconds: started.elapsed().as_secs_f64() }
}

/// `count` downloads from `address` run by `lb-testbed download` in
/// namespace `ns`.
pub fn downloads_in(ns: &str, address: &str, count: usize) -> Vec<Download> {
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(crate::harness::testbed_binary())
        .args(["download", address, &count.to_string(), "5"])
        .output()
        .expect("run the download client");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("the client prints JSON")
}

/// ICMP errors the balancer forwarded to each backend of `vip`, by address.
pub fn icmp_errors(daemon: &crate::harness::Daemon, vip: &str) -> Vec<(String, u64)> {
    let list = daemon.json(&["backend", "list", vip]).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|b| (b["address"].as_str().unwrap().to_owned(), b["icmp_errors"].as_u64().unwrap()))
        .collect()
}

/// Drops, in router namespace `router`, the "fragmentation needed" and
/// "packet too big" errors it sends to the test VIPs: the control of the
/// path-MTU tests. Backends cache a learnt path MTU per client address:
/// `backends` forget theirs first.
pub fn drop_errors_to_vips(router: &str, backends: &[String]) {
    use crate::netns::{VIP4, VIP6};
    forget_path_mtus(backends);
    let nft = |rule: &str| {
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", router, "nft"])
            .args(rule.split(' '))
            .status()
            .expect("nft");
        assert!(status.success(), "nft {rule}");
    };
    nft("add table inet lbtest");
    nft("add chain inet lbtest out { type filter hook output priority 0 ; }");
    nft(&format!(
        "add rule inet lbtest out ip daddr {VIP4} icmp type destination-unreachable drop"
    ));
    nft(&format!("add rule inet lbtest out ip6 daddr {VIP6} icmpv6 type packet-too-big drop"));
}

/// Namespaces `hosts` forget the path MTUs they learnt (they keep one per
/// destination address, whichever port or VIP taught it).
pub fn forget_path_mtus(hosts: &[String]) {
    for host in hosts {
        crate::netns::ip(host, &["route", "flush", "cache"]).unwrap();
        crate::netns::ip(host, &["-6", "route", "flush", "cache"]).unwrap();
    }
}

/// Eight downloads of `bytes` from `vip` in namespace `client`: every one
/// completes, each of `backends` (addresses, answering b1, b2, ... in
/// order) serves one, and the balancer forwarded an ICMP error to each
/// (its path MTU was learnt from the router's errors to the VIP).
pub fn assert_downloads_learn_the_path(
    daemon: &crate::harness::Daemon,
    client: &str,
    vip: &str,
    backends: &[String],
    bytes: usize,
) {
    let before = icmp_errors(daemon, vip);
    let got = downloads_in(client, vip, 8);
    let after = icmp_errors(daemon, vip);
    let summary: Vec<String> =
        got.iter().map(|d| format!("{} {} B {:.2} s", d.backend, d.bytes, d.seconds)).collect();
    println!("FIGURE {vip} across the narrow link: {}", summary.join(", "));
    println!("FIGURE {vip} ICMP errors forwarded per backend: before {before:?}, after {after:?}");
    assert!(got.iter().all(|d| d.bytes == bytes), "a download stalled: {summary:?}");
    for (index, address) in (1..).zip(backends) {
        let name = format!("b{index}");
        assert!(got.iter().any(|d| d.backend == name), "no download from {name}: {summary:?}");
        let count = |list: &[(String, u64)]| list.iter().find(|(a, _)| a == address).unwrap().1;
        assert!(count(&after) > count(&before), "no ICMP error reached {name}: {after:?}");
    }
}

/// The control: two downloads of `bytes` from `vip` in `client`, both stalled.
pub fn assert_downloads_stall(client: &str, vip: &str, bytes: usize) {
    let got = downloads_in(client, vip, 2);
    let received: Vec<usize> = got.iter().map(|d| d.bytes).collect();
    println!("FIGURE {vip} with the errors dropped at the router: {received:?} bytes of {bytes}");
    assert!(got.iter().all(|d| d.bytes < bytes), "completed without errors: {received:?}");
}

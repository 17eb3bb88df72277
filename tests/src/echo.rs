//! The testbed's request/answer servers and clients (`lb-testbed serve`,
//! `client`, `client-loop`, `connection-rate`): a server answers every TCP
//! connection and UDP datagram with its name, from the VIP; a client sends a
//! bounded number of requests from chosen source ports and prints who answered.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::netns;

/// New connections from `threads` threads until `duration` has passed:
/// (answered, failed).
pub fn connection_rate(
    address: SocketAddr,
    duration: Duration,
    threads: usize,
) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + duration;
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let answered =
                        std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
                            .and_then(|mut stream| {
                                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                                let mut answer = String::new();
                                stream.read_to_string(&mut answer).map(|_| !answer.is_empty())
                            });
                    if matches!(answered, Ok(true)) { ok += 1 } else { failed += 1 }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for worker in workers {
        let (o, f) = worker.join().map_err(|_| anyhow::anyhow!("worker panicked"))?;
        ok += o;
        failed += f;
    }
    Ok((ok, failed))
}

/// A request every `interval` for `duration`, each from the next source port.
pub fn client_loop(
    protocol: &str,
    vip: SocketAddr,
    source: IpAddr,
    first_port: u16,
    duration: Duration,
    interval: Duration,
) {
    let domain = if vip.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let start = Instant::now();
    let mut port = first_port;
    while start.elapsed() < duration {
        let sent = Instant::now();
        let local = SocketAddr::new(source, port);
        let answer = match protocol {
            "udp" => udp_request(domain, local, vip),
            _ => tcp_request(domain, local, vip),
        };
        let elapsed = sent.duration_since(start).as_millis();
        match answer {
            Ok(answer) => println!("{elapsed} {port} {answer}"),
            Err(error) => println!("{elapsed} {port} ERROR {error}"),
        }
        port = port.wrapping_add(1).max(1024);
        std::thread::sleep(interval.saturating_sub(sent.elapsed()));
    }
}

/// A UDP socket on `address` that shares its port with the others of the
/// server (the most specific bound address gets each datagram).
fn udp_socket(address: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(address), Type::DGRAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    Ok(socket.into())
}

pub fn serve(name: &str, port: u16, lifetime: Duration) -> anyhow::Result<()> {
    let any: SocketAddr = format!("[::]:{port}").parse()?;
    let tcp = TcpListener::bind(any)?;
    let deadline = Instant::now() + lifetime;
    // A UDP server behind DSR must answer from the VIP, as a TCP one does:
    // sockets bound to the testbed's VIPs (where this host has them) take the
    // datagrams sent there, and the wildcard one takes the rest (health checks).
    let mut udp_sockets = vec![udp_socket(any)?];
    for vip in [netns::VIP4, netns::VIP6] {
        if let Ok(socket) = udp_socket(SocketAddr::new(vip.parse()?, port)) {
            udp_sockets.push(socket);
        }
    }
    for udp in udp_sockets {
        let udp_name = name.to_owned();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 1500];
            udp.set_read_timeout(Some(Duration::from_millis(200))).ok();
            while Instant::now() < deadline {
                if let Ok((_, peer)) = udp.recv_from(&mut buffer) {
                    let _ = udp.send_to(udp_name.as_bytes(), peer);
                }
            }
        });
    }
    tcp.set_nonblocking(true)?;
    while Instant::now() < deadline {
        match tcp.accept() {
            Ok((mut stream, _)) => {
                let name = name.to_owned();
                // Answer, half-close, then drain what the client sent, so a client
                // that sends a request (a health check) reads the answer and EOF
                // rather than a reset.
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.write_all(name.as_bytes());
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut sink = [0u8; 1024];
                    while matches!(stream.read(&mut sink), Ok(read) if read > 0) {}
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    Ok(())
}

pub fn client(
    protocol: &str,
    vip: SocketAddr,
    source: std::net::IpAddr,
    first: u16,
    count: u16,
) -> anyhow::Result<()> {
    let domain = if vip.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    for port in first..first.saturating_add(count) {
        let local = SocketAddr::new(source, port);
        let answer = match protocol {
            "tcp" => tcp_request(domain, local, vip),
            "udp" => udp_request(domain, local, vip),
            other => anyhow::bail!("unknown protocol {other}"),
        };
        match answer {
            Ok(answer) => println!("{port} {answer}"),
            Err(error) => println!("{port} ERROR {error}"),
        }
    }
    Ok(())
}

fn tcp_request(domain: Domain, local: SocketAddr, vip: SocketAddr) -> anyhow::Result<String> {
    let socket = Socket::new(domain, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&local.into())?;
    socket.connect_timeout(&vip.into(), Duration::from_secs(2))?;
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

fn udp_request(domain: Domain, local: SocketAddr, vip: SocketAddr) -> anyhow::Result<String> {
    let socket = Socket::new(domain, Type::DGRAM, None)?;
    socket.bind(&local.into())?;
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buffer = [0u8; 1500];
    for _attempt in 0..3 {
        socket.send_to(b"hello", vip)?;
        if let Ok((length, _)) = socket.recv_from(&mut buffer) {
            return Ok(String::from_utf8_lossy(&buffer[..length]).into_owned());
        }
    }
    anyhow::bail!("no answer")
}

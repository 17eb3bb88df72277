//! The testbed's command line: build or remove the namespaces, and the test
//! servers and clients that run inside them. Every server stops by itself
//! after --seconds; every client sends a bounded number of requests.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use socket2::{Domain, Socket, Type};
use tests::netns;

const USAGE: &str = "usage:
  lb-testbed up [PREFIX] [BACKENDS]     create client, balancer (lb) and backend namespaces
  lb-testbed down [PREFIX]              remove them, whatever state they are in
  lb-testbed status [PREFIX]            list them
  lb-testbed serve NAME PORT SECONDS    TCP and UDP server answering NAME (stops after SECONDS)
  lb-testbed client tcp|udp VIP:PORT SOURCE FIRST_PORT COUNT
                                        COUNT requests from SOURCE:FIRST_PORT.., prints 'PORT ANSWER'
  lb-testbed http-get ADDR:PORT PATH    prints the body of an HTTP GET (5 s at most)
  lb-testbed generate PREFIX VIP:PORT FLOWS ADDRESSES COUNT SECONDS RATE [SIZE]
                                        UDP frames from the testbed's client to the VIP through the
                                        balancer with XDP live frames: FLOWS source ports, ADDRESSES
                                        client addresses (198.18.0.20..), at RATE pps (0: flat out),
                                        COUNT frames or SECONDS at most; prints a JSON summary
  lb-testbed conn-rate ADDR:PORT SECONDS THREADS
                                        new TCP connections (connect, read the answer, close)
                                        as fast as THREADS threads go for SECONDS; prints 'OK FAILED'
  lb-testbed ws-serve NAME PORT SECONDS WebSocket server answering NAME:message
  lb-testbed ws-clients VIP:PORT COUNT  COUNT WebSocket connections, then commands on stdin
                                        (round, open N, reconnect, quit), one JSON line each
  lb-testbed client-loop tcp|udp VIP:PORT SOURCE FIRST_PORT SECONDS INTERVAL_MS
                                        a request every INTERVAL_MS for SECONDS, each from the next
                                        port; prints 'MILLISECONDS PORT ANSWER'";

const DEFAULT_PREFIX: &str = "lbt-";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |index: usize| args.get(index).map(String::as_str);
    match arg(0) {
        Some("up") => {
            let prefix = arg(1).unwrap_or(DEFAULT_PREFIX);
            let backends = arg(2).map_or(Ok(3), str::parse).context("BACKENDS must be a number")?;
            let testbed = netns::Testbed::up(prefix, backends)?;
            println!("testbed {prefix}: namespaces {}", netns::list(prefix).join(" "));
            std::mem::forget(testbed); // stays up until `down`
        }
        Some("down") => netns::down(arg(1).unwrap_or(DEFAULT_PREFIX)),
        Some("status") => {
            let names = netns::list(arg(1).unwrap_or(DEFAULT_PREFIX));
            println!("{}", if names.is_empty() { "down".to_owned() } else { names.join(" ") });
        }
        Some("serve") => {
            let (Some(name), Some(port), Some(seconds)) = (arg(1), arg(2), arg(3)) else {
                anyhow::bail!("{USAGE}");
            };
            serve(name, port.parse()?, Duration::from_secs(seconds.parse()?))?;
        }
        Some("client") => {
            let (Some(protocol), Some(vip), Some(source), Some(first), Some(count)) =
                (arg(1), arg(2), arg(3), arg(4), arg(5))
            else {
                anyhow::bail!("{USAGE}");
            };
            client(protocol, vip.parse()?, source.parse()?, first.parse()?, count.parse()?)?;
        }
        Some("generate") => {
            let (
                Some(prefix),
                Some(vip),
                Some(flows),
                Some(addresses),
                Some(count),
                Some(seconds),
                Some(rate),
            ) = (arg(1), arg(2), arg(3), arg(4), arg(5), arg(6), arg(7))
            else {
                anyhow::bail!("{USAGE}");
            };
            let vip: SocketAddr = vip.parse()?;
            anyhow::ensure!(
                vip.is_ipv4(),
                "the generator sends IPv4 (it keeps the IPv4 header checksum right)"
            );
            let size: usize = arg(8).map_or(Ok(64), str::parse)?;
            let testbed = netns::Testbed { prefix: prefix.to_owned(), backends: 0 };
            let (client, balancer) = (testbed.client(), testbed.balancer());
            let source_mac = netns::mac(&client, netns::LB_IFACE)?;
            let balancer_mac = netns::mac(&balancer, netns::LB_IFACE)?;
            std::mem::forget(testbed); // not ours to remove
            let flow = tests::packets::Flow {
                client: "198.18.0.20".parse()?,
                client_port: 1024,
                vip: vip.ip(),
                vip_port: vip.port(),
                l4: tests::packets::L4::Udp,
            };
            let payload = vec![0u8; size.saturating_sub(14 + 20 + 8 + 4).max(1)];
            let mut frame = tests::packets::frame(flow, tests::packets::Shape::default(), &payload);
            frame[0..6].copy_from_slice(&balancer_mac);
            frame[6..12].copy_from_slice(&source_mac);
            netns::enter(&client)?;
            let ifindex = lb_userspace::neighbour::interface_index(netns::LB_IFACE)?;
            let ebpf = tests::generator::load(flows.parse()?, addresses.parse()?)?;
            let sent = tests::generator::send(
                &ebpf,
                &frame,
                ifindex,
                count.parse()?,
                seconds.parse()?,
                rate.parse()?,
            )?;
            println!("{}", serde_json::to_string(&sent)?);
        }
        Some("http-get") => {
            let (Some(address), Some(path)) = (arg(1), arg(2)) else {
                anyhow::bail!("{USAGE}");
            };
            let address: SocketAddr = address.parse()?;
            let mut stream =
                std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
            anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
            print!("{body}");
        }
        Some("conn-rate") => {
            let (Some(address), Some(seconds), Some(threads)) = (arg(1), arg(2), arg(3)) else {
                anyhow::bail!("{USAGE}");
            };
            let address: SocketAddr = address.parse()?;
            let deadline = Instant::now() + Duration::from_secs(seconds.parse()?);
            let workers: Vec<_> = (0..threads.parse::<usize>()?)
                .map(|_| {
                    std::thread::spawn(move || {
                        let (mut ok, mut failed) = (0u64, 0u64);
                        while Instant::now() < deadline {
                            let answered = std::net::TcpStream::connect_timeout(
                                &address,
                                Duration::from_secs(2),
                            )
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
            println!("{ok} {failed}");
        }
        Some("ws-serve") => {
            let (Some(name), Some(port), Some(seconds)) = (arg(1), arg(2), arg(3)) else {
                anyhow::bail!("{USAGE}");
            };
            let lifetime = Duration::from_secs(seconds.parse()?);
            runtime()?.block_on(tests::websocket::serve(
                name.to_owned(),
                port.parse()?,
                lifetime,
            ))?;
        }
        Some("ws-clients") => {
            let (Some(vip), Some(count)) = (arg(1), arg(2)) else {
                anyhow::bail!("{USAGE}");
            };
            runtime()?.block_on(tests::websocket::clients(vip.parse()?, count.parse()?))?;
        }
        Some("client-loop") => {
            let (
                Some(protocol),
                Some(vip),
                Some(source),
                Some(first),
                Some(seconds),
                Some(interval),
            ) = (arg(1), arg(2), arg(3), arg(4), arg(5), arg(6))
            else {
                anyhow::bail!("{USAGE}");
            };
            let duration = Duration::from_secs(seconds.parse()?);
            let interval = Duration::from_millis(interval.parse()?);
            let vip: SocketAddr = vip.parse()?;
            let source: std::net::IpAddr = source.parse()?;
            let domain = if vip.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
            let start = Instant::now();
            let mut port: u16 = first.parse()?;
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
        _ => anyhow::bail!("{USAGE}"),
    }
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

fn serve(name: &str, port: u16, lifetime: Duration) -> anyhow::Result<()> {
    let any: SocketAddr = format!("[::]:{port}").parse()?;
    let tcp = TcpListener::bind(any)?;
    let udp = UdpSocket::bind(any)?;
    let deadline = Instant::now() + lifetime;
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

fn client(
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

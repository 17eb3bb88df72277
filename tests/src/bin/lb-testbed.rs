//! The testbed's command line: build or remove the namespaces, and the test
//! servers and clients that run inside them. Every server stops by itself
//! after --seconds; every client sends a bounded number of requests.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use clap::{Parser, Subcommand};
use tests::{echo, netns};

const DEFAULT_PREFIX: &str = "lbt-";

/// The testbed's namespaces, and the servers and clients that run in them.
#[derive(Parser)]
#[command(name = "lb-testbed")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the client, balancer (lb) and backend namespaces; with
    /// --balancers, a fleet instead: a router running BIRD, and N balancers
    /// each running `lb run` (flow sync on, announcing) and BIRD.
    Up {
        #[arg(default_value = DEFAULT_PREFIX)]
        prefix: String,
        #[arg(default_value_t = 3)]
        backends: usize,
        /// Build a fleet of this many balancers (1 to 8) behind an ECMP router.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=8))]
        balancers: Option<u8>,
    },
    /// The scale-out demo of `cargo xtask run --balancers N`.
    FleetDemo {
        #[arg(value_parser = clap::value_parser!(u8).range(2..=8))]
        balancers: u8,
    },
    /// Remove them, whatever state they are in.
    Down {
        #[arg(default_value = DEFAULT_PREFIX)]
        prefix: String,
    },
    /// List them.
    Status {
        #[arg(default_value = DEFAULT_PREFIX)]
        prefix: String,
    },
    /// A TCP and UDP server answering NAME; stops after SECONDS.
    Serve { name: String, port: u16, seconds: u64 },
    /// COUNT requests from SOURCE:FIRST_PORT.., printing 'PORT ANSWER' each.
    Client {
        #[arg(value_parser = ["tcp", "udp"])]
        protocol: String,
        vip: SocketAddr,
        source: IpAddr,
        first_port: u16,
        count: u16,
    },
    /// Prints the body of an HTTP GET (5 s at most); fails on anything but 200.
    HttpGet { address: SocketAddr, path: String },
    /// UDP frames (or TCP SYNs or bare ACKs, --kind) from the testbed's
    /// client to the VIP through the balancer with XDP live frames: FLOWS
    /// source ports, ADDRESSES client addresses (198.18.0.20..), each tuple
    /// --repeat times in a row, at RATE pps (0: flat out), COUNT frames or
    /// SECONDS at most; prints a JSON summary.
    Generate {
        prefix: String,
        vip: SocketAddr,
        flows: u32,
        addresses: u32,
        count: u64,
        seconds: f64,
        rate: u64,
        #[arg(default_value_t = 64)]
        size: usize,
        #[arg(long, value_enum, default_value_t = FrameKind::Udp)]
        kind: FrameKind,
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// The first client address (IPv4); the others follow it.
        #[arg(long, default_value = "198.18.0.20")]
        source: std::net::Ipv4Addr,
    },
    /// New TCP connections (connect, read the answer, close) as fast as
    /// THREADS threads go for SECONDS; prints 'OK FAILED'.
    ConnRate { address: SocketAddr, seconds: u64, threads: usize },
    /// Sends NAME, a newline and BYTES bytes on every connection to PORT;
    /// stops after SECONDS.
    DownloadServe { name: String, port: u16, bytes: usize, seconds: u64 },
    /// COUNT downloads from ADDRESS one after another, each abandoned after
    /// TIMEOUT seconds without progress; prints them as JSON.
    Download { address: SocketAddr, count: usize, timeout: u64 },
    /// A WebSocket server answering NAME:message; stops after SECONDS.
    WsServe { name: String, port: u16, seconds: u64 },
    /// COUNT WebSocket connections, then commands on stdin (round, open N,
    /// reconnect, quit), one JSON line each.
    WsClients { vip: SocketAddr, count: usize },
    /// Forged flow-sync datagrams to TARGET (see tests/src/forge.rs), with the
    /// fleet's KEY_FILE, for VIP with CONFIGURED and STRANGER backends.
    ForgeSync {
        target: SocketAddr,
        key_file: std::path::PathBuf,
        vip: SocketAddr,
        configured: IpAddr,
        stranger: IpAddr,
        #[arg(long, default_value_t = 0)]
        hash_seed: u32,
        #[arg(long, default_value_t = lb_common::DEFAULT_TABLE_SIZE)]
        table_size: u32,
    },
    /// A request every INTERVAL_MS for SECONDS, each from the next port;
    /// prints 'MILLISECONDS PORT ANSWER'.
    ClientLoop {
        #[arg(value_parser = ["tcp", "udp"])]
        protocol: String,
        vip: SocketAddr,
        source: IpAddr,
        first_port: u16,
        seconds: u64,
        interval_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Up { prefix, backends, balancers: None } => {
            let testbed = netns::Testbed::up(&prefix, backends)?;
            println!("testbed {prefix}: namespaces {}", netns::list(&prefix).join(" "));
            std::mem::forget(testbed); // stays up until `down`
        }
        Command::Up { prefix, backends, balancers: Some(balancers) } => {
            fleet_up(&prefix, usize::from(balancers), backends)?
        }
        Command::FleetDemo { balancers } => tests::demo::fleet(usize::from(balancers))?,
        Command::Down { prefix } => tests::fleet::down(&prefix),
        Command::Status { prefix } => {
            let names = netns::list(&prefix);
            println!("{}", if names.is_empty() { "down".to_owned() } else { names.join(" ") });
        }
        Command::Serve { name, port, seconds } => {
            echo::serve(&name, port, Duration::from_secs(seconds))?
        }
        Command::Client { protocol, vip, source, first_port, count } => {
            echo::client(&protocol, vip, source, first_port, count)?
        }
        Command::Generate {
            prefix,
            vip,
            flows,
            addresses,
            count,
            seconds,
            rate,
            size,
            kind,
            repeat,
            source,
        } => {
            let shape = Generated { flows, addresses, kind, repeat, size, source };
            generate(&prefix, vip, &shape, count, seconds, rate)?
        }
        Command::HttpGet { address, path } => {
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
        Command::ConnRate { address, seconds, threads } => {
            let (ok, failed) =
                echo::connection_rate(address, Duration::from_secs(seconds), threads)?;
            println!("{ok} {failed}");
        }
        Command::DownloadServe { name, port, bytes, seconds } => {
            tests::download::serve(&name, port, bytes, seconds)?
        }
        Command::Download { address, count, timeout } => {
            let downloads = tests::download::client(address, count, Duration::from_secs(timeout));
            println!("{}", serde_json::to_string(&downloads)?);
        }
        Command::WsServe { name, port, seconds } => runtime()?
            .block_on(tests::websocket::serve(name, port, Duration::from_secs(seconds)))?,
        Command::WsClients { vip, count } => {
            runtime()?.block_on(tests::websocket::clients(vip, count))?
        }
        Command::ForgeSync {
            target,
            key_file,
            vip,
            configured,
            stranger,
            hash_seed,
            table_size,
        } => {
            let forgery = tests::forge::Forgery {
                key: lb_userspace::sync::load_key(&key_file)?,
                hash_seed,
                table_size,
                vip,
                configured_backend: configured,
                stranger_backend: stranger,
            };
            let socket = UdpSocket::bind(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0))?;
            tests::forge::send_all(&socket, target, &forgery)?;
        }
        Command::ClientLoop { protocol, vip, source, first_port, seconds, interval_ms } => {
            echo::client_loop(
                &protocol,
                vip,
                source,
                first_port,
                Duration::from_secs(seconds),
                Duration::from_millis(interval_ms),
            );
        }
    }
    Ok(())
}

/// Builds a fleet and leaves it running: BIRD everywhere, `lb run` on every
/// balancer. Prints where everything is.
fn fleet_up(prefix: &str, balancers: usize, backends: usize) -> anyhow::Result<()> {
    let mut fleet = tests::fleet::Fleet::up(prefix, balancers, backends)?;
    let etcd = fleet.etcd(3, false)?;
    let mut daemons = Vec::new();
    for index in 1..=balancers {
        daemons.push(fleet.start_lb_with_store(index, &etcd, &[])?);
        fleet.start_bird(&fleet.balancer(index))?;
    }
    println!("fleet {prefix}: namespaces {}", netns::list(prefix).join(" "));
    println!("files (sync key, BIRD configurations and logs, etcd): {}", fleet.files.display());
    println!("store: etcd {} (3 members), prefix /lb", etcd.endpoints());
    for (index, daemon) in daemons.iter().enumerate() {
        println!(
            "{}: lb run --iface eth0 {}
  lb --socket {} ...   (log: {})",
            fleet.balancer(index + 1),
            fleet.store_lb_args(index + 1, &etcd, &[]).join(" "),
            daemon.socket.display(),
            daemon.log.display()
        );
    }
    println!(
        "Start servers on the backends (lb-testbed serve) and add the VIP and backends on any \
         balancer: the store gives them to all (backends are {}..{}, or run lb agent on one); \
         the router then spreads the VIP over the balancers: ip -n {} route show {}   \
         (docs/scale-out.md, \"Trying it\")",
        tests::fleet::backend_address(1),
        tests::fleet::backend_address(backends),
        fleet.router(),
        netns::VIP4
    );
    for daemon in daemons {
        daemon.detach();
    }
    etcd.detach();
    fleet.detach(); // stays up until `down`
    Ok(())
}

/// What `generate` sends: UDP datagrams, TCP SYNs or bare TCP ACKs.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum FrameKind {
    Udp,
    Syn,
    Ack,
}

/// The frames `generate` sends, apart from how many and how fast.
struct Generated {
    flows: u32,
    addresses: u32,
    kind: FrameKind,
    repeat: u32,
    size: usize,
    source: std::net::Ipv4Addr,
}

fn generate(
    prefix: &str,
    vip: SocketAddr,
    shape: &Generated,
    count: u64,
    seconds: f64,
    rate: u64,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        vip.is_ipv4(),
        "the generator sends IPv4 (it keeps the IPv4 header checksum right)"
    );
    let testbed = netns::Testbed { prefix: prefix.to_owned(), backends: 0 };
    let (client, balancer) = (testbed.client(), testbed.balancer());
    let source_mac = netns::mac(&client, netns::LB_IFACE)?;
    let balancer_mac = netns::mac(&balancer, netns::LB_IFACE)?;
    std::mem::forget(testbed); // not ours to remove
    use tests::packets::{L4, Segment};
    let (l4, segment, header) = match shape.kind {
        FrameKind::Udp => (L4::Udp, Segment::Syn, 8),
        FrameKind::Syn => (L4::Tcp, Segment::Syn, 20),
        FrameKind::Ack => (L4::Tcp, Segment::Ack, 20),
    };
    let flow = tests::packets::Flow {
        client: IpAddr::V4(shape.source),
        client_port: 1024,
        vip: vip.ip(),
        vip_port: vip.port(),
        l4,
    };
    let payload = vec![0u8; shape.size.saturating_sub(14 + 20 + header + 4).max(1)];
    let frame_shape = tests::packets::Shape { segment, ..Default::default() };
    let mut frame = tests::packets::frame(flow, frame_shape, &payload);
    frame[0..6].copy_from_slice(&balancer_mac);
    frame[6..12].copy_from_slice(&source_mac);
    netns::enter(&client)?;
    let ifindex = lb_userspace::neighbour::interface_index(netns::LB_IFACE)?;
    let ebpf = tests::generator::load(&frame, shape.flows, shape.addresses, shape.repeat)?;
    let sent = tests::generator::send(&ebpf, &frame, ifindex, count, seconds, rate)?;
    println!("{}", serde_json::to_string(&sent)?);
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

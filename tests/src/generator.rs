//! The project's packet generator: BPF_PROG_TEST_RUN with live frames on the
//! bench programs' `bench_generator`, which varies the source port (and
//! address) of a template frame and transmits it. Used by the bench and by
//! `lb-testbed generate` (scripts/pktgen.sh where kernel pktgen is absent).
//! Where the kernel refuses live frames (EPERM on some machines), the same
//! frames go out through a packet socket, one test run each.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::programs::Xdp;
use aya::{Ebpf, EbpfLoader};
use lb_userspace::datapath::BENCH_OBJECT;

/// The bench programs with `bench_generator` loaded for `template` (the
/// frame later sent): `flows` source ports and `addresses` client addresses
/// cycled through, each tuple sent `repeat` times in a row.
pub fn load(template: &[u8], flows: u32, addresses: u32, repeat: u32) -> anyhow::Result<Ebpf> {
    let client_base = client_last_byte(template).context("template frame too short")?;
    let mut ebpf = EbpfLoader::new()
        .override_global("BENCH_FLOWS", &flows, true)
        .override_global("BENCH_ADDRESSES", &addresses, true)
        .override_global("BENCH_REPEAT", &repeat, true)
        .override_global("BENCH_CLIENT_BASE", &client_base, true)
        .load(BENCH_OBJECT)?;
    let program: &mut Xdp =
        ebpf.program_mut("bench_generator").context("bench_generator")?.try_into()?;
    program.load()?;
    Ok(ebpf)
}

/// The last byte of an untagged frame's source address: the byte the
/// generator varies per CPU and per address.
fn client_last_byte(frame: &[u8]) -> Option<u8> {
    let ipv6 = frame.get(12..14)? == [0x86, 0xdd];
    frame.get(if ipv6 { 14 + 8 + 15 } else { 14 + 12 + 3 }).copied()
}

/// What [`send`] did.
#[derive(Debug, serde::Serialize)]
pub struct Sent {
    pub packets: u64,
    pub seconds: f64,
    pub packets_per_second: f64,
}

/// Transmits `frame`, varied, out of `ifindex` (in this thread's network
/// namespace): `count` frames at most, for `seconds` at most, at `rate`
/// packets per second (0: as fast as possible).
pub fn send(
    ebpf: &Ebpf,
    frame: &[u8],
    ifindex: u32,
    count: u64,
    seconds: f64,
    rate: u64,
) -> anyhow::Result<Sent> {
    let program: &Xdp = ebpf.program("bench_generator").context("bench_generator")?.try_into()?;
    let fd = program.fd()?;
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    // Batches of a tenth of a second at the chosen rate (at least one frame):
    // each live-frames call costs milliseconds of set-up, so smaller batches
    // could not keep the rate.
    let batch = if rate == 0 { 262_144 } else { (rate / 10).max(1) };
    let mut sent = 0u64;
    let mut fallback: Option<PacketSocket> = None;
    while sent < count && start.elapsed() < limit {
        let repeat = batch.min(count - sent);
        match &fallback {
            None => match live_frames(fd, frame, ifindex, repeat as u32) {
                Err(error) if refused(&error) => {
                    eprintln!(
                        "live frames refused ({error:#}): sending through a packet socket instead"
                    );
                    fallback = Some(PacketSocket::open(ifindex)?);
                    continue;
                }
                result => result?,
            },
            Some(socket) => {
                for _ in 0..repeat {
                    let (action, out) = one_frame(fd, frame)?;
                    if action == crate::XDP_TX {
                        socket.send(&out)?;
                    }
                }
            }
        }
        sent += repeat;
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait.min(limit.saturating_sub(start.elapsed())));
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Sent { packets: sent, seconds, packets_per_second: sent as f64 / seconds.max(1e-9) })
}

/// Whether live frames were refused by the kernel (EPERM on some
/// machines, with no balancer involved).
fn refused(error: &anyhow::Error) -> bool {
    error
        .root_cause()
        .downcast_ref::<std::io::Error>()
        .is_some_and(|error| error.raw_os_error() == Some(libc::EPERM))
}

/// One frame of the generator by a plain test run (which advances its
/// per-CPU sequence as a live one would): its action and the frame.
fn one_frame(fd: &aya::programs::ProgramFd, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
    let (action, _, out) = crate::bpf::test_run_output(fd, frame, None, 1)?;
    Ok((action, out))
}

/// Where live frames are refused: the generator's frames, one test run
/// each, sent through an AF_PACKET socket bound to the interface. Slower
/// (a few microseconds a frame), the same frames.
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn open(ifindex: u32) -> anyhow::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain socket(2) and bind(2) calls; the address is a
        // zeroed sockaddr_ll with the fields the kernel reads set.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
            }
            let socket = Self(std::os::fd::OwnedFd::from_raw_fd(fd));
            let mut address: libc::sockaddr_ll = std::mem::zeroed();
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_ifindex = ifindex as i32;
            let length = size_of::<libc::sockaddr_ll>() as u32;
            if libc::bind(fd, (&raw const address).cast(), length) != 0 {
                return Err(std::io::Error::last_os_error()).context("binding the packet socket");
            }
            Ok(socket)
        }
    }

    fn send(&self, frame: &[u8]) -> anyhow::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: send(2) of a valid buffer on our socket.
        let sent = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if sent < 0 {
            let error = std::io::Error::last_os_error();
            // A full queue: the frame is lost, as a live frame would be.
            if error.raw_os_error() != Some(libc::ENOBUFS) {
                return Err(error).context("sending a frame");
            }
        }
        Ok(())
    }
}

/// BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES: every frame the
/// generator returns XDP_TX for leaves through `ifindex` for real.
pub fn live_frames(
    fd: &aya::programs::ProgramFd,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> anyhow::Result<()> {
    crate::bpf::test_run_fd(fd, frame, Some(ifindex), repeat).map(|_| ())
}

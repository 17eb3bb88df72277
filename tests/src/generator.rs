//! The project's packet generator: BPF_PROG_TEST_RUN with live frames on the
//! bench programs' `bench_generator`, which varies the source port (and
//! address) of a template frame and transmits it. Used by the bench and by
//! `lb-testbed generate` (scripts/pktgen.sh where kernel pktgen is absent).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use aya::programs::Xdp;
use aya::{Ebpf, EbpfLoader};
use lb_userspace::datapath::BENCH_OBJECT;

/// The bench programs with `bench_generator` loaded: `flows` source ports
/// and `addresses` client addresses (IPv4) cycled through, each tuple sent
/// `repeat` times in a row.
pub fn load(flows: u32, addresses: u32, repeat: u32) -> anyhow::Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .override_global("BENCH_FLOWS", &flows, true)
        .override_global("BENCH_ADDRESSES", &addresses, true)
        .override_global("BENCH_REPEAT", &repeat, true)
        .load(BENCH_OBJECT)?;
    let program: &mut Xdp =
        ebpf.program_mut("bench_generator").context("bench_generator")?.try_into()?;
    program.load()?;
    Ok(ebpf)
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
    while sent < count && start.elapsed() < limit {
        let repeat = batch.min(count - sent);
        live_frames(fd, frame, ifindex, repeat as u32)?;
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

/// BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES: every frame the
/// generator returns XDP_TX for leaves through `ifindex` for real.
pub fn live_frames(
    fd: &aya::programs::ProgramFd,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> anyhow::Result<()> {
    test_run_fd(fd, frame, Some(ifindex), repeat).map(|_| ())
}

/// BPF_PROG_TEST_RUN of the program `fd` on `frame`, `repeat` times, on
/// this thread's CPU: the program's return value of the last run and the
/// mean duration of one, in ns. With `live` (an ifindex), frames are sent
/// for real (BPF_F_TEST_XDP_LIVE_FRAMES). aya's TestRun needs the Xdp
/// object, which is not Send, so this calls the syscall through the
/// program's fd with the same attributes.
pub fn test_run_fd(
    fd: &aya::programs::ProgramFd,
    frame: &[u8],
    live: Option<u32>,
    repeat: u32,
) -> anyhow::Result<(u32, u32)> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let context: [u32; 6] = [0, frame.len() as u32, 0, live.unwrap_or(0), 0, 0];
    let mut out = vec![0u8; frame.len() + 256];
    // Pointers stay pointers (not integers) so that the compiler sees the
    // frame and context escape into the syscall and keeps them written.
    #[repr(C)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: *const u8,
        data_out: *mut u8,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: *const u32,
        ctx_out: *mut u8,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _tail: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
    let mut attr = TestAttr {
        prog_fd: fd.as_fd().as_raw_fd() as u32,
        retval: 0,
        data_size_in: frame.len() as u32,
        data_size_out: if live.is_some() { 0 } else { out.len() as u32 },
        data_in: frame.as_ptr(),
        data_out: if live.is_some() { std::ptr::null_mut() } else { out.as_mut_ptr() },
        repeat,
        duration: 0,
        ctx_size_in: if live.is_some() { size_of_val(&context) as u32 } else { 0 },
        ctx_size_out: 0,
        ctx_in: if live.is_some() { context.as_ptr() } else { std::ptr::null() },
        ctx_out: std::ptr::null_mut(),
        flags: if live.is_some() { BPF_F_TEST_XDP_LIVE_FRAMES } else { 0 },
        cpu: 0,
        batch_size: if live.is_some() { 64 } else { 0 },
        _tail: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_PROG_TEST_RUN whose
    // pointers (frame, output, context) outlive the call; the kernel reads
    // size_of::<TestAttr>() bytes of it.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestAttr,
            size_of::<TestAttr>() as u32,
        )
    };
    if result != 0 {
        bail!("test run: {}", std::io::Error::last_os_error());
    }
    Ok((attr.retval, attr.duration))
}

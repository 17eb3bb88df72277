//! The BPF system calls aya does not offer, made through a program's fd:
//! BPF_PROG_TEST_RUN from any thread (aya's TestRun needs the Xdp object,
//! which is not Send) and with live frames, and BPF_OBJ_GET_INFO_BY_FD with
//! the JIT image.

use anyhow::Context as _;

const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// bpf(2) with `command` and `attr`; the kernel reads `size_of::<A>()`
/// bytes of `attr` (a prefix of `union bpf_attr`) and may write back into it.
///
/// # Safety
/// `attr` must be a valid prefix of `union bpf_attr` for `command`, and every
/// pointer in it valid, for the kernel to read or write, during the call.
pub unsafe fn syscall<A>(command: libc::c_long, attr: &mut A) -> std::io::Result<()> {
    // SAFETY: the caller's contract above.
    let result =
        unsafe { libc::syscall(libc::SYS_bpf, command, attr as *mut A, size_of::<A>() as u32) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// BPF_PROG_TEST_RUN of the program `fd` on `frame`, `repeat` times, on
/// this thread's CPU: the program's return value of the last run and the
/// mean duration of one, in ns. With `live` (an ifindex), frames are sent
/// for real (BPF_F_TEST_XDP_LIVE_FRAMES).
pub fn test_run_fd(
    fd: &aya::programs::ProgramFd,
    frame: &[u8],
    live: Option<u32>,
    repeat: u32,
) -> anyhow::Result<(u32, u32)> {
    test_run_output(fd, frame, live, repeat).map(|(retval, duration, _)| (retval, duration))
}

/// [`test_run_fd`], also returning the frame as the last run left it
/// (empty with `live`).
pub fn test_run_output(
    fd: &aya::programs::ProgramFd,
    frame: &[u8],
    live: Option<u32>,
    repeat: u32,
) -> anyhow::Result<(u32, u32, Vec<u8>)> {
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
    // pointers (frame, output, context) outlive the call.
    unsafe { syscall(BPF_PROG_TEST_RUN, &mut attr) }.context("test run")?;
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, attr.duration, out))
}

//! The balancer's size as the kernel runs it: translated (xlated) BPF
//! instructions after the verifier, and the JIT image in bytes and in
//! machine instructions. Printed on every bench run, so a change that grows
//! the hot path shows in review.

use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::Context as _;
use aya::programs::Xdp;
use serde::Serialize;

#[derive(Serialize)]
pub struct ProgramSize {
    /// BPF instruction slots after the verifier's rewrites (8 bytes each; a
    /// 64-bit immediate load takes two).
    pub xlated_instructions: u32,
    pub jited_bytes: u32,
    /// Machine instructions in the JIT image; None off x86-64, or when the
    /// kernel does not hand the image out (kptr_restrict).
    pub jited_instructions: Option<usize>,
}

/// The leading fields of the kernel's `struct bpf_prog_info`: the kernel
/// fills no more than the size it is given.
#[repr(C)]
#[derive(Default)]
struct ProgInfoPrefix {
    kind: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
}

/// BPF_OBJ_GET_INFO_BY_FD on `program` into `info`.
fn program_info(program: &Xdp, info: &mut ProgInfoPrefix) -> anyhow::Result<()> {
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let fd = program.fd()?;
    let mut attr = InfoAttr {
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        info_len: size_of::<ProgInfoPrefix>() as u32,
        info: info as *mut ProgInfoPrefix as u64,
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_OBJ_GET_INFO_BY_FD;
    // `info` (and the buffer its jited_prog_insns may point at, of
    // jited_prog_len bytes) outlive the call, and the kernel writes at most
    // info_len bytes of it.
    unsafe { tests::bpf::syscall(tests::bpf::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }
        .context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(())
}

pub fn program_size(program: &Xdp) -> anyhow::Result<ProgramSize> {
    let mut info = ProgInfoPrefix::default();
    program_info(program, &mut info)?;
    let jited_bytes = info.jited_prog_len;
    let mut image = vec![0u8; jited_bytes as usize];
    let mut with_image = ProgInfoPrefix {
        jited_prog_len: jited_bytes,
        jited_prog_insns: image.as_mut_ptr() as u64,
        ..ProgInfoPrefix::default()
    };
    program_info(program, &mut with_image)?;
    let handed_out = with_image.jited_prog_len == jited_bytes && jited_bytes > 0;
    Ok(ProgramSize {
        xlated_instructions: info.xlated_prog_len / 8,
        jited_bytes,
        jited_instructions: (handed_out && cfg!(target_arch = "x86_64")).then(|| {
            iced_x86::Decoder::new(64, &image, iced_x86::DecoderOptions::NONE).iter().count()
        }),
    })
}

pub fn print_program_size(size: &ProgramSize) {
    let jited = size.jited_instructions.map_or("n/a".to_owned(), |count| count.to_string());
    println!(
        "program lb_xdp: {} BPF instructions after the verifier, JIT image {} bytes, {} machine instructions",
        size.xlated_instructions, size.jited_bytes, jited
    );
}

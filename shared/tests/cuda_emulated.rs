//! kernels.cu's kernels run on the CPU, without a GPU: the attention kernels (decode, prefill
//! f32 and tensor-core), the decode matmul and the device-routed experts, the tensor-core int8
//! matmul and the residual kernel. The source is compiled as C++ against `cuda_emu/emu.h` (a
//! fiber per CUDA thread, barriers for `__syncthreads`, the warp shuffles and the tensor-core
//! `mma`, whose fragment layout it follows from the PTX ISA) and checked by
//! `cuda_emu/harness.cpp` against double-precision references. It catches indexing, masking,
//! shuffle and merge mistakes before a GPU is at hand (the GPU tests in cuda_kernels.rs check
//! the rest on the device). Needs a C++20 compiler: `c++`, or the one `CXX` names.
//! `GROK_EMU_SANITIZE=1` builds the harness with AddressSanitizer and UndefinedBehaviorSanitizer
//! (out-of-bounds and misaligned vector accesses, which a GPU would fault on; ~2 minutes on 2
//! cores, so not in the default run).

use std::path::Path;
use std::process::Command;

/// kernels.cu with each `extern __shared__` array (dynamic shared memory) pointed at the
/// emulator's buffer, which `static` (what `__shared__` becomes) cannot express.
fn emulable_source() -> String {
    let src = grok_shared::cuda::device::KERNELS;
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        match line
            .trim_start()
            .strip_prefix("extern __shared__ float ")
            .and_then(|rest| rest.strip_suffix("[];"))
        {
            Some(name) => out.push_str(&format!("    float *{name} = (float *)emu_dyn_smem;")),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[test]
fn attention_and_residual_kernels_match_references_on_the_cpu() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu");
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("kernels_emu.cu"), emulable_source()).expect("write");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let exe = dir.path().join("harness");
    let sanitize = std::env::var("GROK_EMU_SANITIZE").is_ok_and(|v| v == "1");
    let sanitizers: &[&str] = if sanitize {
        &[
            "-g",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
        ]
    } else {
        &[]
    };
    let built = Command::new(&cxx)
        .args(sanitizers)
        .args(["-std=c++20", "-O1", "-w", "-I"])
        .arg(dir.path())
        .arg("-I")
        .arg(&here)
        .arg(here.join("harness.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| {
            panic!("running the C++ compiler `{cxx}` (set CXX to a C++20 one): {e}")
        });
    assert!(
        built.status.success(),
        "compiling kernels.cu for the CPU emulator with `{cxx}`:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    // The fibers switch stacks, which ASan's use-after-return detection cannot follow.
    let run = Command::new(&exe)
        .env("ASAN_OPTIONS", "detect_stack_use_after_return=0")
        .output()
        .expect("running the harness");
    let report = String::from_utf8_lossy(&run.stdout);
    println!("{report}");
    assert!(
        run.status.success(),
        "kernels differ from the references:\n{report}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(report.contains("0 failure(s)"), "{report}");
}

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
//!
//! The second half runs the backend's host code too: `cuda_emu/driver.cpp` makes the emulator
//! an emulated device behind the CUDA driver, NVRTC and cuBLAS calls, and GPU tests of
//! cuda_fixture.rs and cuda_kernels.rs (compiled in here as modules) run on it unchanged.

#[path = "cuda_emu/builder.rs"]
mod builder;

use builder::{compile, EmulatedDevice};
use std::process::Command;

/// Runs `cmd`, prints its output and returns it; fails with `what`, its output and its
/// errors when it does not succeed.
fn run_printed(cmd: &mut Command, what: &str) -> String {
    let run = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{out}");
    assert!(
        run.status.success(),
        "{what}:\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    out
}

#[test]
fn attention_and_residual_kernels_match_references_on_the_cpu() {
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = dir.path().join("harness");
    let sanitize = std::env::var("GROK_EMU_SANITIZE").is_ok_and(|v| v == "1");
    compile(dir.path(), "harness.cpp", &[], &exe, sanitize);
    // The fibers switch stacks, which ASan's use-after-return detection cannot follow.
    let report = run_printed(
        Command::new(&exe).env("ASAN_OPTIONS", "detect_stack_use_after_return=0"),
        "the kernel harness (kernels differ from the references)",
    );
    assert!(report.contains("0 failure(s)"), "{report}");
}

/// The CUDA backend's host code (`Gpu`, `CudaShard`) on the emulated device: `driver.cpp`
/// built as the CUDA driver, NVRTC and cuBLAS libraries cudarc loads, with the kernels run by
/// the emulator. Runs the GPU tests `tests` (by exact name, with `env` set) in a process of
/// their own that finds those libraries first (the loader reads `LD_LIBRARY_PATH` when a
/// process starts).
fn run_on_the_emulated_device(device: &EmulatedDevice, tests: &[&str], env: &[(&str, &str)]) {
    let mut child = Command::new(std::env::current_exe().expect("this test's executable"));
    device
        .setup(&mut child)
        .args(["--ignored", "--test-threads", "1", "--nocapture", "--exact"])
        .args(tests)
        .envs(env.iter().copied());
    let out = run_printed(
        &mut child,
        &format!("the CUDA backend on the emulated device ({env:?})"),
    );
    let all = format!("test result: ok. {} passed", tests.len());
    assert!(out.contains(&all), "not every check ran:\n{out}");
}

#[test]
fn the_cuda_backend_runs_on_the_emulated_device() {
    let dir = tempfile::tempdir().expect("temp dir");
    let device = EmulatedDevice::build(dir.path());
    run_on_the_emulated_device(&device, &ON_THE_EMULATOR, &[]);
    // The way around the decode attention kernel that the device check takes when its
    // canary fails (the generic attention and a separate combine of its key splits): decode
    // tiles once went to the prefill kernel there, whose partial outputs overran their buffer.
    run_on_the_emulated_device(
        &device,
        &["cuda_kernels::decode_steps_at_grok_head_size_match_the_cpu_engine"],
        &[("GROK_CUDA_DECODE_ATTENTION", "0")],
    );
}

#[test]
#[ignore = "six minutes: cargo test -p grok-shared --test cuda_emulated -- --ignored more_gpu_tests"]
fn more_gpu_tests_run_on_the_emulated_device() {
    let dir = tempfile::tempdir().expect("temp dir");
    let device = EmulatedDevice::build(dir.path());
    run_on_the_emulated_device(&device, &ALSO_ON_THE_EMULATOR, &[]);
    // The device check's other ways around kernels: the bf16 path without qgemm_wgmma, and
    // without its tensor-core kernels at all.
    let bf16_step = ["cuda_kernels::bf16_path_device_routing_matches_host_routing"];
    run_on_the_emulated_device(&device, &bf16_step, &[("GROK_CUDA_WGMMA", "0")]);
    run_on_the_emulated_device(&device, &bf16_step, &[("GROK_CUDA_TENSOR_CORES", "0")]);
}

/// The GPU tests, as they are, some run on the emulated device by name ([`ON_THE_EMULATOR`]).
#[path = "cuda_fixture.rs"]
mod cuda_fixture;
#[path = "cuda_kernels.rs"]
mod cuda_kernels;

/// The GPU tests the emulated device runs in the ordinary test run (with the decode steps
/// again without the decode kernel, about a minute and a half of kernels on the CPU):
/// - the start-up check of `qgemm_wgmma` against cuBLAS;
/// - the fixture against the release on the int8 path, head size 16 (the generic attention);
/// - head size 128, the decode steps of five sequences: the decode attention, the fused
///   residual and router kernel, the device-routed experts, bit for bit against host routing;
/// - a 24-sequence step on the bf16 path: `qgemm_wgmma` (96 prompt rows), the tensor-core
///   attention, `qmma` and the device-routed `qmma_experts_4`.
const ON_THE_EMULATOR: [&str; 4] = [
    "on_the_emulated_device::the_gpu_opens_with_every_kernel",
    "cuda_fixture::gpu_int8_path_matches_the_f32_reference_and_greedy_tokens",
    "cuda_kernels::decode_steps_at_grok_head_size_match_the_cpu_engine",
    "cuda_kernels::bf16_path_device_routing_matches_host_routing",
];

/// And with `--ignored more_gpu_tests` (about six minutes): the fixture on the bf16 path,
/// every parallel plan, prompts of 150 and 70 tokens in chunks at head size 128 (the f32
/// prefill attention with key splits; q/k/v separate and fused), decode steps and prompts at
/// head sizes 16 to 64, the split q/k/v product and the tiled decode matmul against f64; the
/// device check's canaries (`qmma`, `qgemm_wgmma` alone and with the GELU epilogue, and
/// `attention_tc` against the f32 attention, at smaller matrices than on a GPU); then the
/// bf16-path step without `qgemm_wgmma` and without tensor cores. Left to the GPU: NCCL and
/// the kernel tests at Grok-1's matrix sizes.
const ALSO_ON_THE_EMULATOR: [&str; 12] = [
    "cuda_fixture::gpu_bf16_cublas_path_is_within_bf16_tolerance_and_greedy_tokens_match",
    "cuda_fixture::every_plan_on_one_gpu_matches_the_world_of_one",
    "cuda_kernels::long_prompts_at_grok_head_size_match_the_cpu_engine",
    "cuda_kernels::long_prompts_with_fused_qkv_match_the_cpu_engine",
    "cuda_kernels::decode_steps_at_small_head_sizes_match_the_cpu_engine",
    "cuda_kernels::long_prompts_at_the_tiny_head_size_match_the_cpu_engine",
    "cuda_kernels::a_split_product_gives_each_part_its_columns",
    "cuda_kernels::tiled_decode_matmul_matches_the_reference_and_does_not_depend_on_the_batch",
    "cuda_kernels::tensor_core_int8_matmul_matches_dequantised_cublas",
    "cuda_kernels::wgmma_int8_matmul_matches_dequantised_cublas",
    "cuda_kernels::wgmma_expert_ffn_matches_the_unfused_products",
    "cuda_kernels::tensor_core_prefill_attention_is_within_bf16_of_the_f32_kernel",
];

/// The checks run by `the_cuda_backend_runs_on_the_emulated_device`, each in that process
/// only (ignored, and a no-op elsewhere: they need its libraries).
mod on_the_emulated_device {
    use grok_shared::cuda::device::Gpu;
    use grok_shared::test_support::on_emulated_device;

    fn here() -> bool {
        let on = on_emulated_device();
        if !on {
            println!("run by the_cuda_backend_runs_on_the_emulated_device");
        }
        on
    }

    #[test]
    #[ignore = "run by the_cuda_backend_runs_on_the_emulated_device"]
    fn the_gpu_opens_with_every_kernel() {
        if !here() {
            return;
        }
        let g = Gpu::open(0).unwrap();
        println!(
            "{}: wgmma {}, tensor cores {}",
            g.name,
            g.wgmma(),
            g.bf16_tensor_cores()
        );
        assert!(g.wgmma(), "{:?}", g.wgmma_fault());
    }
}

//! GPU worker processes without a GPU: `grok generate --worker-device cuda:0` with the workers
//! on the emulated device (shared/tests/cuda_emu: the CUDA driver, NVRTC and cuBLAS over host
//! memory, the kernels run on the CPU). As deploy/gpu/check.sh does on a GPU: 2 GPU workers
//! over gRPC (tp,ep = 2,2 and 1,2) and 1 GPU worker (`--worker-device auto`, which must pick
//! the GPU) continue the fixture's prompts with its greedy tokens, each worker saying in its
//! log that its slice is on the GPU (CPU workers would give the same tokens); asking for NCCL,
//! which the emulated device lacks, is a clear error.

#[path = "../shared/tests/cuda_emu/builder.rs"]
mod builder;

use grok_shared::test_support::{tiny_a_dir, TinyAExpected};
use std::process::Command;

#[test]
fn gpu_worker_processes_on_the_emulated_device_continue_the_fixture_greedily() {
    let dir = tempfile::tempdir().expect("temp dir");
    let e = TinyAExpected::load();
    let tg = e.greedy_len();
    let fixture = tiny_a_dir();
    let device = builder::EmulatedDevice::build(dir.path());
    // The fixture's first prompt (each generation costs seconds of emulated kernels).
    let generate = |worker_device: &str, flags: &[&str]| {
        let prompt: Vec<String> = e.greedy[..e.t].iter().map(u32::to_string).collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_grok"));
        device
            .setup(&mut cmd)
            // The workers log where their slices went.
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .arg("generate")
            .arg("--model")
            .arg(&fixture)
            .args(["--prompt-ids", &prompt.join(",")])
            .args(["--max-tokens", "6", "--print-ids"])
            .args(["--worker-device", worker_device])
            .args(flags);
        cmd.output().expect("running grok")
    };
    let want: Vec<String> = e.greedy[e.t..tg].iter().map(u32::to_string).collect();
    for (worker_device, workers, flags) in [
        ("cuda:0", 2, &["--tp", "2", "--ep", "2"][..]),
        ("cuda:0", 2, &["--tp", "1", "--ep", "2"]),
        ("auto", 1, &[]),
    ] {
        let n = workers.to_string();
        let flags = [&["--workers", n.as_str()][..], flags].concat();
        let out = generate(worker_device, &flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{flags:?}: {err}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want.join(" "),
            "{flags:?}: {err}"
        );
        let on_gpu = err
            .lines()
            .filter(|l| l.contains("slice resident") && l.contains("(emulated Hopper"))
            .count();
        assert_eq!(
            on_gpu, workers,
            "--worker-device {worker_device} {flags:?}: every worker's slice on the GPU:\n{err}"
        );
    }
    let out = generate("cuda:0", &["--workers", "1", "--collectives", "nccl"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "NCCL without libnccl: {err}");
    assert!(err.contains("NCCL") && !err.contains("panicked"), "{err}");
}

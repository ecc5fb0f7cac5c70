//! GPU worker processes without a GPU: `grok generate --worker-device cuda:0` with the workers
//! on the emulated device (shared/tests/cuda_emu: the CUDA driver, NVRTC and cuBLAS over host
//! memory, the kernels run on the CPU). As deploy/gpu/check.sh does on a GPU: 2 GPU workers
//! over gRPC (tp,ep = 2,2 and 1,2) and 1 GPU worker continue the fixture's prompts with its
//! greedy tokens; asking for NCCL, which the emulated device lacks, is a clear error.

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
    let generate = |flags: &[&str]| {
        let prompt: Vec<String> = e.greedy[..e.t].iter().map(u32::to_string).collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_grok"));
        device
            .setup(&mut cmd)
            .arg("generate")
            .arg("--model")
            .arg(&fixture)
            .args(["--prompt-ids", &prompt.join(",")])
            .args([
                "--max-tokens",
                "6",
                "--print-ids",
                "--worker-device",
                "cuda:0",
            ])
            .args(flags);
        cmd.output().expect("running grok")
    };
    let want: Vec<String> = e.greedy[e.t..tg].iter().map(u32::to_string).collect();
    for flags in [
        &["--workers", "2", "--tp", "2", "--ep", "2"][..],
        &["--workers", "2", "--tp", "1", "--ep", "2"],
        &["--workers", "1"],
    ] {
        let out = generate(flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{flags:?}: {err}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want.join(" "),
            "{flags:?}: {err}"
        );
    }
    let out = generate(&["--workers", "1", "--collectives", "nccl"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "NCCL without libnccl: {err}");
    assert!(err.contains("NCCL") && !err.contains("panicked"), "{err}");
}

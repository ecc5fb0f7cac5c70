//! Builds the CUDA emulator (emu.h, with kernels.cu compiled as C++): the kernel harness, and
//! the emulated device (driver.cpp as the CUDA driver, NVRTC and cuBLAS libraries). Shared by
//! the tests that use them (`#[path]` from shared/tests/cuda_emulated.rs and tests/).

use grok_shared::test_support::EMULATED_DEVICE;
use std::path::{Path, PathBuf};
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

/// Compiles `cuda_emu/<main>` (which includes emu.h and kernels.cu) into `out` with `extra`
/// flags; `sanitize` adds AddressSanitizer and UBSan.
pub fn compile(dir: &Path, main: &str, extra: &[&str], out: &Path, sanitize: bool) {
    let here = grok_shared::test_support::cuda_emulator_dir();
    std::fs::write(dir.join("kernels_emu.cu"), emulable_source()).expect("write");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
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
        .args(extra)
        .args(["-std=c++20", "-O1", "-w", "-I"])
        .arg(dir)
        .arg("-I")
        .arg(&here)
        .arg(here.join(main))
        .arg("-o")
        .arg(out)
        .output()
        .unwrap_or_else(|e| {
            panic!("running the C++ compiler `{cxx}` (set CXX to a C++20 one): {e}")
        });
    assert!(
        built.status.success(),
        "compiling {main} with kernels.cu for the CPU emulator with `{cxx}`:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
}

/// The emulated device, built in a directory: libcuda.so, and libnvrtc.so and libcublas.so
/// as links to it.
pub struct EmulatedDevice {
    dir: PathBuf,
}

impl EmulatedDevice {
    pub fn build(dir: &Path) -> Self {
        let names: String = grok_shared::cuda::device::kernel_names()
            .iter()
            .map(|n| format!("K({n})\n"))
            .collect();
        std::fs::write(dir.join("kernel_table.inc"), names).expect("write");
        let lib = dir.join("libcuda.so");
        // Never sanitized: under AddressSanitizer every fiber switch is a swapcontext, and the
        // checks did not finish in a quarter of an hour on 2 cores.
        compile(dir, "driver.cpp", &["-shared", "-fPIC"], &lib, false);
        for alias in ["libnvrtc.so", "libcublas.so"] {
            std::os::unix::fs::symlink(&lib, dir.join(alias)).expect("symlink");
        }
        EmulatedDevice {
            dir: dir.to_path_buf(),
        }
    }

    /// Sets up `cmd` to run on the emulated device: its loader finds these libraries first
    /// (the loader reads `LD_LIBRARY_PATH` when a process starts, so it must be a process of
    /// its own), and the kernel cache is here, never the user's (the emulated "PTX" must not
    /// meet a real GPU). Processes `cmd` starts inherit all of it.
    pub fn setup<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("LD_LIBRARY_PATH", &self.dir)
            .env(EMULATED_DEVICE, "1")
            .env("GROK_KERNEL_CACHE", self.dir.join("kernel-cache"))
    }
}

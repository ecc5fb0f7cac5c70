//! Builds the emulated device (`shared/tests/cuda_emu`: the CUDA driver, NVRTC and cuBLAS
//! libraries over host memory, every kernel of kernels.cu run on the CPU) into a directory,
//! for runs by hand such as `deploy/gpu/rehearse.sh`:
//!
//! ```sh
//! env $(cargo run -q -p grok-shared --example emulated_device -- DIR) PROGRAM
//! ```
//!
//! It prints the environment a program needs (`LD_LIBRARY_PATH=DIR GROK_EMULATED_DEVICE=1
//! GROK_KERNEL_CACHE=DIR/kernel-cache`): the kernel cache must be a private one, since the
//! emulated "PTX" must never meet a real GPU.
//! Needs a C++20 compiler (`c++`, or the one `CXX` names).

#[path = "../tests/cuda_emu/builder.rs"]
mod builder;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: emulated_device DIR (an empty or new directory)");
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(dir);
    let empty = |d: &PathBuf| d.read_dir().map(|mut e| e.next().is_none());
    match empty(&dir) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("emulated_device: {} is not empty", dir.display());
            return ExitCode::from(2);
        }
        Err(_) => {
            if let Err(e) = std::fs::create_dir_all(&dir) {
                eprintln!("emulated_device: creating {}: {e}", dir.display());
                return ExitCode::from(2);
            }
        }
    }
    // Absolute, so that the environment below works from any directory.
    let dir = match dir.canonicalize() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("emulated_device: {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    };
    // The environment a program needs to run on it, as the tests set it, on one line.
    let mut cmd = Command::new("program");
    builder::EmulatedDevice::build(&dir).setup(&mut cmd);
    let env: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_str()?, v?.to_str()?)))
        .collect();
    println!("{}", env.join(" "));
    ExitCode::SUCCESS
}

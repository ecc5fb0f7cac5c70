//! The CUDA backend: the same forward pass as [`crate::cpu`], on a GPU. The int8 weights stay
//! int8 on the device (decode streams them once through the int8 kernel); activations and the
//! KV pool are f32; large batches (prefill) go through cuBLAS with bf16 copies.
//!
//! Everything here loads the CUDA libraries at run time (cudarc's dynamic loading): the crate
//! builds, and its CPU tests run, on machines without CUDA; opening a GPU there is an error.

pub mod device;
pub mod shard;

pub use device::{cuda_available, Gpu};
pub use shard::CudaShard;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "the CUDA libraries (libcuda, libnvrtc, libcublas) are not loadable here: install the \
         NVIDIA driver and CUDA runtime, set LD_LIBRARY_PATH, or use --device cpu"
    )]
    NoCuda,
    #[error("no GPU {ordinal}: this machine has {count}")]
    NoSuchDevice { ordinal: usize, count: i32 },
    #[error("CUDA driver, {op}: {msg}")]
    Driver { op: &'static str, msg: String },
    #[error("allocating {bytes} bytes on the GPU: {msg}")]
    OutOfMemory { bytes: usize, msg: String },
    #[error("compiling the kernels with NVRTC: {0}")]
    Compile(String),
    #[error("launching kernel {kernel}: {msg}")]
    Launch { kernel: String, msg: String },
    #[error("cuBLAS, {op}: {msg}")]
    Blas { op: &'static str, msg: String },
    #[error("NCCL, {op}: {msg}")]
    Nccl { op: &'static str, msg: String },
    #[error(
        "{kernel} failed its start-up check on this GPU ({msg}); a kernel fault leaves the CUDA \
         context unusable, so the GPU did not open: set {env} to run without {kernel}"
    )]
    SelfCheck {
        kernel: &'static str,
        msg: String,
        env: &'static str,
    },
    #[error("not supported on the GPU backend: {0}")]
    Unsupported(String),
}

/// Whether the kernel switch `name` (an environment variable) leaves its kernels on: anything
/// but `0`, or unset.
pub(crate) fn switched_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v.trim() != "0")
}

/// GPUs CUDA sees here (0 where the CUDA libraries do not load).
pub fn gpu_count() -> usize {
    if !cuda_available() {
        return 0;
    }
    cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// Where a rank computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto` (GPU 0 when CUDA loads and a GPU exists).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "auto" => Ok(Self::auto()),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!(
                    "'{s}' is not a device: use cpu, cuda, cuda:N (N a GPU index) or auto"
                )),
            },
        }
    }

    fn auto() -> Self {
        if gpu_count() > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_or_say_what_is_valid() {
        assert_eq!(Device::parse("cpu"), Ok(Device::Cpu));
        assert_eq!(Device::parse("cuda"), Ok(Device::Cuda(0)));
        assert_eq!(Device::parse("cuda:3"), Ok(Device::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = Device::parse(bad).unwrap_err();
            assert!(e.contains("cuda:N"), "{bad}: {e}");
        }
        // Whatever this machine has, auto names a device that exists.
        let auto = Device::parse("auto").unwrap();
        if !cuda_available() {
            assert_eq!(auto, Device::Cpu);
        }
    }

    #[test]
    fn a_failed_self_check_says_how_to_run_without_the_kernel() {
        let e = CudaError::SelfCheck {
            kernel: "qgemm_wgmma",
            msg: "CUDA_ERROR_ILLEGAL_INSTRUCTION".into(),
            env: "GROK_CUDA_WGMMA=0",
        }
        .to_string();
        for part in [
            "qgemm_wgmma",
            "CUDA_ERROR_ILLEGAL_INSTRUCTION",
            "set GROK_CUDA_WGMMA=0",
        ] {
            assert!(e.contains(part), "{e}");
        }
    }

    #[test]
    fn opening_a_gpu_without_cuda_is_an_error_not_a_panic() {
        if cuda_available() {
            return; // covered by the device tests
        }
        assert!(matches!(Gpu::open(0), Err(CudaError::NoCuda)));
    }
}

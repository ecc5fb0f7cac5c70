//! One GPU: its context and stream, the layer kernels (CUDA C compiled by NVRTC, cached on
//! disk), cuBLAS, device buffers, and the matmul that picks between the int8 kernel and
//! cuBLAS.
//!
//! Buffers are passed to kernels as raw device addresses on one stream, so cudarc's
//! per-buffer event tracking is switched off: stream order is the only ordering needed.

use super::CudaError;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaFunction, CudaSlice};
use cudarc::driver::{CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The kernels' CUDA C source.
pub const KERNELS: &str = include_str!("kernels.cu");

/// Rows of one attention tile (tokens × q heads per kv head): the kernel comes in these sizes
/// (`attention_R` in kernels.cu), the small one for decode steps. Keys per shared-memory tile:
/// `ATT_KEYS`.
pub const ATT_ROWS: [usize; 2] = [16, 64];
pub const ATT_KEYS: usize = 32;
/// Threads of an attention block: one per column of a head.
pub const ATT_THREADS: usize = 128;

/// Matmuls of at least this many rows take the bf16 path (tensor cores: up to 64 rows the
/// int8 `qmma_*` kernel, beyond that a bf16 copy of the weight for cuBLAS); smaller ones
/// (decode) stream the int8 weights through the f32 kernel. `GROK_CUDA_GEMM_MIN_ROWS`
/// overrides it (a huge value keeps every matmul on the exact, batch-invariant int8 path).
pub const DEFAULT_GEMM_MIN_ROWS: usize = 9;

/// Threads of the one-block-per-row kernels.
const ROW_THREADS: u32 = 1024;

/// Warps per block of the tiled decode kernel (fixed: the order its partial sums are added
/// in depends on it).
const TILED_WARPS: usize = 8;
/// Rows of x the tiled kernels come in (`QGEMV_TILED(MR, ..)` in kernels.cu).
const TILED_ROWS: [usize; 3] = [1, 2, 4];
/// Rows of x the tensor-core int8 matmul comes in (`qmma_{rows / 16}` in kernels.cu): bf16-path
/// batches up to the largest take it instead of dequantisation + cuBLAS.
const MMA_ROWS: [usize; 3] = [16, 32, 64];
/// Which kernel a bf16-path product of some rows with some int8 matrix takes
/// ([`Gpu::bf16_kernel`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bf16Kernel {
    /// `qmma_*`: up to the largest of `MMA_ROWS`.
    Mma,
    /// `qgemm_wgmma_*`: past those, on Hopper.
    Wgmma,
    /// Dequantisation + cuBLAS: everything else.
    Cublas,
}
/// The most tokens of a device-routed step on the bf16 path (an expert gets one slot per token
/// at most, and its slots are one batch of `qmma_experts_4`, up to 64 rows).
pub const MMA_ROUTED_TOKENS: usize = 64;
/// Column tiles the tiled kernel's counters cover (matrices up to 2M columns wide).
const MAX_TILES: usize = 4096;
/// `qgemm_wgmma_N` (the bf16 path past `qmma_*` on Hopper): the token tiles N, the largest
/// `WG_TOK`; K rows per pipeline chunk; dynamic shared memory (`WG_TOK`, `WG_KC`, `WG_SMEM`
/// in kernels.cu).
const WG_TILES: [usize; 4] = [80, 96, 112, 128];
const WG_TOK: usize = 128;
const WG_KC: usize = 64;
const WG_SMEM: usize = 5 * (WG_TOK * 128 + WG_KC * 272) + 1024;
/// Head dimensions with attention kernels of their own: the register-tiled prefill
/// (`attention_prefill_*`), its tensor-core twin for the bf16 path (`attention_tc_*`) and the
/// decode kernel (`attention_decode_*`). Others take `attention_64` and `attention_16`.
pub const ATT_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];
/// Rows per tile the decode kernel comes in (`attention_decode_{HD}_{R}`): the smallest that
/// holds a step's largest tile runs.
pub const DECODE_ROWS: [usize; 2] = [8, 16];
/// Warps per block of the decode kernel and keys each lane loads per round (`DEC_WARPS`,
/// `DEC_U` in kernels.cu).
const DECODE_WARPS: usize = 4;
const DECODE_KEYS_PER_LANE: usize = 8;

/// Keys of one round of a whole `attention_decode_*` block at head size `head_dim` (a warp
/// loads 128 / head_dim keys at once): its key splits are multiples of this.
pub fn decode_key_granule(head_dim: usize) -> usize {
    DECODE_WARPS * DECODE_KEYS_PER_LANE * (128 / head_dim.max(1)).max(1)
}

/// The most key splits `attention_decode_*` merges (`DEC_MAX_SPLITS` in kernels.cu).
pub const DECODE_MAX_SPLITS: usize = 64;

/// Threads of an `attention_decode_*` block.
pub const DECODE_THREADS: usize = DECODE_WARPS * 32;

/// Which libraries a CUDA backend needs, and whether they load here.
pub fn cuda_available() -> bool {
    // SAFETY: each only tries to dlopen its library.
    unsafe {
        drv_sys::is_culib_present()
            && cudarc::nvrtc::sys::is_culib_present()
            && blas_sys::is_culib_present()
    }
}

/// A device allocation with its address (stable for its lifetime).
pub struct Buf<T> {
    slice: CudaSlice<T>,
    ptr: u64,
    len: usize,
}

impl<T: DeviceRepr> Buf<T> {
    fn wrap(slice: CudaSlice<T>, stream: &CudaStream) -> Self {
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(stream);
            ptr
        };
        let len = slice.len();
        Buf { slice, ptr, len }
    }

    /// The address of element `i`.
    pub fn at(&self, i: usize) -> u64 {
        debug_assert!(i <= self.len);
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// Keeps the allocation alive (the address is what kernels use).
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

/// A kernel argument.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device address.
    P(u64),
    I(i32),
    F(f32),
    /// A 64-bit count.
    N(u64),
}

/// An int8 matrix on the device: `[k, n]` with f32 scales `[k / gr, n]`. The weights are
/// stored tiled ([`tile_int8`]) when `n` is a multiple of 16, which is what the decode kernel
/// streams fastest; row-major otherwise.
pub struct DevQ {
    pub k: usize,
    pub n: usize,
    pub gr: usize,
    pub tiled: bool,
    pub w: Buf<i8>,
    pub s: Buf<f32>,
}

/// Same-shaped tiled matrices (one per expert, per kind) and their addresses on the device,
/// for [`Gpu::qmatmul_experts`].
pub struct ExpertSet {
    pub k: usize,
    pub n: usize,
    pub gr: usize,
    pub experts: usize,
    /// Matrices in the set (experts × kinds).
    pub len: usize,
    w_table: Buf<u64>,
    s_table: Buf<u64>,
}

/// Columns per tile of the tiled int8 layout (`QT` in kernels.cu).
pub const Q_TILE: usize = 512;

/// The tiled layout of a row-major `[k, n]` int8 matrix (`n` a multiple of 16): column tiles
/// of [`Q_TILE`] (the last one narrower), each holding its `k` rows back to back, so that the
/// decode kernel's warps each read one contiguous run.
pub fn tile_int8(w: &[i8], k: usize, n: usize) -> Vec<i8> {
    debug_assert_eq!(w.len(), k * n);
    let mut out = vec![0i8; k * n];
    if k == 0 {
        return out;
    }
    // Each tile fills its own run of the output, so the tiles go in parallel (loading
    // Grok-1's experts is otherwise bound by this shuffle, not by the upload).
    out.par_chunks_mut(Q_TILE * k)
        .enumerate()
        .for_each(|(t, dst)| {
            let (c0, width) = (t * Q_TILE, dst.len() / k);
            for (row, d) in w.chunks_exact(n).zip(dst.chunks_exact_mut(width)) {
                d.copy_from_slice(&row[c0..c0 + width]);
            }
        });
    out
}

impl DevQ {
    pub fn bytes(&self) -> usize {
        self.w.bytes() + self.s.bytes()
    }

    /// The output split of the tiled kernels that sends every column tile to `outs[0]` (a
    /// product with one output).
    fn one_output(&self) -> [usize; 2] {
        [self.n.div_ceil(Q_TILE); 2]
    }
}

pub struct Gpu {
    ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<String, CudaFunction>,
    sms: usize,
    /// Whether the bf16 path's own tensor-core kernels run (`qmma_*`, `attention_tc_*`):
    /// compute capability 8.0 or later, unless `GROK_CUDA_TENSOR_CORES=0`.
    tensor_cores: bool,
    /// Whether `qgemm_wgmma` can run here (compute capability 9.0: the kernels are built for
    /// sm_90a), and whether it does (`GROK_CUDA_WGMMA=0` or [`Gpu::set_wgmma`] turn it off).
    wgmma_here: bool,
    wgmma_on: AtomicBool,
    /// Why the start-up check turned `qgemm_wgmma` off, if it did.
    wgmma_fault: Option<String>,
    /// Blocks of the tiled decode kernel the whole GPU holds at once (its K split fills them).
    tiled_slots: usize,
    /// The same for each `qmma_*` (in `MMA_ROWS` order).
    mma_slots: [usize; 3],
    /// Counters for the last-block merges (the tiled and tensor-core matmuls: one per column
    /// tile or half tile; the decode attention: one per tile and kv head). Each launch leaves
    /// them at zero, and launches run in stream order, so they share one buffer.
    tile_counters: Buf<u32>,
    pub name: String,
    /// With `GROK_CUDA_PROFILE=1`: every launch timed on the GPU by a pair of events (no
    /// waits, so the step keeps its pace), per kernel name. Off by default: an event pair per
    /// launch costs the host time.
    profile: Option<std::sync::Mutex<Profile>>,
}

/// Launches timed by events, resolved into per-name totals (count, seconds) on report.
#[derive(Default)]
struct Profile {
    pending: Vec<(String, cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
    totals: HashMap<String, (u64, f64)>,
}

impl Profile {
    fn resolve(&mut self) -> Result<(), CudaError> {
        for (name, start, end) in self.pending.drain(..) {
            let ms = start
                .elapsed_ms(&end)
                .map_err(drv_err("reading a kernel's time"))?;
            let e = self.totals.entry(name).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += ms as f64 / 1e3;
        }
        Ok(())
    }
}

fn drv_err(op: &'static str) -> impl Fn(drv::DriverError) -> CudaError {
    move |e| CudaError::Driver {
        op,
        msg: e.to_string(),
    }
}

impl Gpu {
    /// Opens GPU `ordinal`, compiling (or loading from the cache) the kernels.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        if !cuda_available() {
            return Err(CudaError::NoCuda);
        }
        let count = CudaContext::device_count().map_err(drv_err("counting devices"))?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoSuchDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(drv_err("creating a context"))?;
        // SAFETY: every buffer is used on the one stream below, in stream order.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv_err("creating a stream"))?;
        keep_freed_memory(&ctx)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas {
            op: "creating a handle",
            msg: e.to_string(),
        })?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv_err("reading the compute capability"))?;
        let sms = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv_err("reading the SM count"))? as usize;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let ptx = compile_cached(major, minor)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(drv_err("loading the kernels"))?;
        let mut funcs = HashMap::new();
        for name in kernel_names() {
            let f = module
                .load_function(&name)
                .map_err(drv_err("finding a kernel"))?;
            funcs.insert(name, f);
        }
        // Kernels that may need more than the default 48 KiB of dynamic shared memory.
        let big_smem = TILED_ROWS
            .into_iter()
            .flat_map(|mr| {
                let bytes = Self::tiled_smem_bytes(mr) as i32;
                [
                    (format!("qgemv_tiled_{mr}"), bytes),
                    (format!("qgemv_experts_{mr}"), bytes),
                ]
            })
            .chain(ATT_HEAD_DIMS.iter().map(|&hd| {
                (
                    format!("attention_prefill_{hd}"),
                    Self::prefill_smem_bytes(hd) as i32,
                )
            }))
            .chain(ATT_ROWS.iter().map(|&rows| {
                (
                    format!("attention_{rows}"),
                    Self::attention_smem_bytes(rows, ATT_THREADS) as i32,
                )
            }));
        for (name, bytes) in big_smem {
            if let Some(f) = funcs.get(&name) {
                f.set_attribute(
                    drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes,
                )
                .map_err(drv_err("allowing a kernel its shared memory"))?;
            }
        }
        let tensor_cores = major >= 8 && super::switched_on("GROK_CUDA_TENSOR_CORES");
        // Hopper's warpgroup kernel: compiled for sm_90a only, and it needs 166 KiB of shared
        // memory (a GPU that will not grant it keeps the cuBLAS path).
        let max_smem =
            drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let wgmma_here = tensor_cores
            && (major, minor) == (9, 0)
            && WG_TILES.iter().all(|tile| {
                let f = funcs.get(&format!("qgemm_wgmma_{tile}"));
                f.is_some_and(|f| {
                    f.set_attribute(max_smem, WG_SMEM as i32)
                        .inspect_err(|e| {
                            tracing::warn!("qgemm_wgmma cannot have its shared memory: {e}")
                        })
                        .is_ok()
                })
            });
        let wgmma_on = wgmma_here && super::switched_on("GROK_CUDA_WGMMA");
        let per_sm = funcs
            .get("qgemv_tiled_1")
            .ok_or_else(|| CudaError::Unsupported("no kernel named qgemv_tiled_1".into()))?
            .occupancy_max_active_blocks_per_multiprocessor(
                (TILED_WARPS * 32) as u32,
                Self::tiled_smem_bytes(1),
                None,
            )
            .map_err(drv_err("reading the decode kernel's occupancy"))?;
        let tiled_slots = sms * (per_sm as usize).max(1);
        let mut mma_slots = [0; 3];
        for (slots, rows) in mma_slots.iter_mut().zip(MMA_ROWS) {
            let name = format!("qmma_{}", rows / 16);
            let per_sm = funcs
                .get(&name)
                .ok_or_else(|| CudaError::Unsupported(format!("no kernel named {name}")))?
                .occupancy_max_active_blocks_per_multiprocessor(256, 0, None)
                .map_err(drv_err("reading the tensor-core matmul's occupancy"))?;
            *slots = sms * (per_sm as usize).max(1);
        }
        let profile = std::env::var("GROK_CUDA_PROFILE")
            .is_ok_and(|v| v == "1")
            .then(|| std::sync::Mutex::new(Profile::default()));
        let tile_counters = Buf::wrap(
            stream
                .alloc_zeros::<u32>(MAX_TILES)
                .map_err(|e| CudaError::OutOfMemory {
                    bytes: MAX_TILES * 4,
                    msg: e.to_string(),
                })?,
            &stream,
        );
        let gpu = Gpu {
            ctx,
            stream,
            blas,
            funcs,
            sms,
            // Off by choice: the bf16 path then runs on cuBLAS and the f32 attention (to
            // compare the two, or to step around a kernel that misbehaves on some GPU).
            tensor_cores,
            wgmma_here,
            wgmma_on: AtomicBool::new(wgmma_on),
            tiled_slots,
            mma_slots,
            tile_counters,
            name,
            profile,
            wgmma_fault: None,
        };
        gpu.with_wgmma_checked()
    }

    /// Runs `qgemm_wgmma` once against dequantisation + cuBLAS (a partial token tile, scale
    /// groups, a narrow tile, a K split) and keeps it off if they disagree: its layouts are
    /// Hopper's, and a GPU or driver that reads them otherwise must not turn a prefill into
    /// noise. The reason stays in [`Gpu::wgmma_fault`] and goes to the log. A check that
    /// cannot run (a kernel fault leaves the context unusable for the whole process) makes
    /// opening the GPU fail, saying how to run without the kernel.
    fn with_wgmma_checked(mut self) -> Result<Self, CudaError> {
        if !self.wgmma() {
            return Ok(self);
        }
        match self.check_wgmma() {
            Ok(None) => {}
            Ok(Some(why)) => {
                tracing::warn!("qgemm_wgmma is off: {why}");
                self.wgmma_on.store(false, Ordering::Relaxed);
                self.wgmma_fault = Some(why);
            }
            Err(e) => {
                return Err(CudaError::SelfCheck {
                    kernel: "qgemm_wgmma",
                    msg: e.to_string(),
                    env: "GROK_CUDA_WGMMA=0",
                })
            }
        }
        Ok(self)
    }

    /// `Ok(None)` when `qgemm_wgmma` gives dequantisation + cuBLAS's numbers, `Ok(Some(why))`
    /// when it differs, `Err` when the check cannot run.
    fn check_wgmma(&self) -> Result<Option<String>, CudaError> {
        let (m, k, n) = (130, 1024, 528);
        let q = crate::test_support::random_qmatrix(k, n, 4, 7);
        let mut seed = 11;
        let x: Vec<f32> = (0..m * k)
            .map(|_| (crate::test_support::lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let dq = self.upload_q(&q)?;
        let xd = self.upload(&x)?;
        let run = |wgmma: bool| -> Result<Vec<f32>, CudaError> {
            let out = self.alloc::<f32>(m * n)?;
            if wgmma {
                self.qmatmul_wgmma(xd.ptr(), m, &dq, [out.ptr(); 3], dq.one_output())?;
            } else {
                self.qmatmul_cublas(xd.ptr(), m, &dq, out.ptr())?;
            }
            self.download_f32(out.ptr(), m * n)
        };
        let got = run(true)?;
        let want = run(false)?;
        let scale = want
            .iter()
            .fold(0f32, |a, w| a.max(w.abs()))
            .max(f32::MIN_POSITIVE);
        // Where it differs, so that a layout error can be fixed from the log.
        Ok(
            crate::mismatch::describe(&got, &want, m, n, 1e-4 * scale).map(|map| {
                format!(
                    "on a [{m} x {k}] x [{k} x {n}] check it differs from dequantisation + \
                     cuBLAS by more than 1e-4 of the largest output: {map}"
                )
            }),
        )
    }

    /// Why `qgemm_wgmma` is off on a GPU that could run it (its start-up check failed).
    pub fn wgmma_fault(&self) -> Option<&str> {
        self.wgmma_fault.as_deref()
    }

    pub fn sms(&self) -> usize {
        self.sms
    }

    /// Whether the bf16 path runs its tensor-core kernels (`mma.sync` m16n8k16 bf16: Ampere,
    /// compute capability 8.0, and later; `GROK_CUDA_TENSOR_CORES=0` turns them off).
    pub fn bf16_tensor_cores(&self) -> bool {
        self.tensor_cores
    }

    /// Whether the bf16 path's batches past 64 rows run `qgemm_wgmma` (int8 weights read once
    /// on Hopper's warpgroup tensor cores) instead of dequantisation + cuBLAS.
    pub fn wgmma(&self) -> bool {
        self.wgmma_on.load(Ordering::Relaxed)
    }

    /// Turns `qgemm_wgmma` on or off (on only where it can run); returns whether it is on. For
    /// an A/B of the two paths in one process.
    pub fn set_wgmma(&self, on: bool) -> bool {
        let on = on && self.wgmma_here && self.wgmma_fault.is_none();
        self.wgmma_on.store(on, Ordering::Relaxed);
        on
    }

    /// `n` zeroed u32 counters for a kernel's last-block merge (the tiled matmuls' and the
    /// decode attention's). The launches share them: each leaves them at zero, and they run
    /// in stream order.
    pub fn counters(&self, n: usize) -> Result<u64, CudaError> {
        if n > MAX_TILES {
            return Err(CudaError::Unsupported(format!(
                "{n} counters for one launch (at most {MAX_TILES})"
            )));
        }
        Ok(self.tile_counters.ptr())
    }

    /// Runs `f`, timing it under `what` when profiling (see [`Gpu::profile_report`]).
    fn timed<T>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, CudaError>,
    ) -> Result<T, CudaError> {
        let Some(p) = &self.profile else {
            return f();
        };
        let timing = Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .stream
            .record_event(timing)
            .map_err(drv_err("recording an event"))?;
        let r = f()?;
        let end = self
            .stream
            .record_event(timing)
            .map_err(drv_err("recording an event"))?;
        if let Ok(mut p) = p.lock() {
            p.pending.push((what.to_string(), start, end));
        }
        Ok(r)
    }

    /// (name, launches, seconds on the GPU) per kernel since the last report, most time
    /// first; empty unless `GROK_CUDA_PROFILE=1`.
    pub fn profile_report(&self) -> Result<Vec<(String, u64, f64)>, CudaError> {
        let Some(p) = &self.profile else {
            return Ok(Vec::new());
        };
        let Ok(mut p) = p.lock() else {
            return Ok(Vec::new());
        };
        p.resolve()?;
        let mut v: Vec<_> = p.totals.drain().map(|(k, (n, s))| (k, n, s)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        Ok(v)
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// An uninitialised buffer of `len` elements (every user writes it before reading).
    pub fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<Buf<T>, CudaError> {
        // SAFETY: the contents are unspecified until written; callers write before reading.
        let s =
            unsafe { self.stream.alloc::<T>(len.max(1)) }.map_err(|e| CudaError::OutOfMemory {
                bytes: len * std::mem::size_of::<T>(),
                msg: e.to_string(),
            })?;
        Ok(Buf::wrap(s, &self.stream))
    }

    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<Buf<T>, CudaError> {
        let s = self
            .stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| CudaError::OutOfMemory {
                bytes: len * std::mem::size_of::<T>(),
                msg: e.to_string(),
            })?;
        Ok(Buf::wrap(s, &self.stream))
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<Buf<T>, CudaError> {
        let b = self.alloc::<T>(host.len())?;
        self.copy_in(b.ptr(), host)?;
        Ok(b)
    }

    /// Host → device at address `dst` (stream-ordered; the host copy may be dropped after).
    pub fn copy_in<T>(&self, dst: u64, host: &[T]) -> Result<(), CudaError> {
        if host.is_empty() {
            return Ok(());
        }
        self.timed("copy to device", || {
            // SAFETY: dst is an allocation of at least host.len() elements (callers size it).
            unsafe { drv::memcpy_htod_async(dst, host, self.stream.cu_stream()) }
                .map_err(drv_err("copying to the device"))
        })
    }

    /// Device → host: waits for the stream, then copies `out.len()` elements from `src`.
    pub fn copy_out<T>(&self, src: u64, out: &mut [T]) -> Result<(), CudaError> {
        if out.is_empty() {
            return Ok(());
        }
        self.timed("copy to host", || {
            // SAFETY: src holds at least out.len() elements; the stream is synchronised after.
            unsafe { drv::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }
                .map_err(drv_err("copying to the host"))?;
            self.sync()
        })
    }

    pub fn copy_dd(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: both ranges lie inside live allocations (callers size them).
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(drv_err("copying on the device"))
    }

    pub fn download_f32(&self, src: u64, len: usize) -> Result<Vec<f32>, CudaError> {
        let mut v = vec![0f32; len];
        self.copy_out(src, &mut v)?;
        Ok(v)
    }

    pub fn sync(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(drv_err("running the step's kernels"))
    }

    /// Launches kernel `name` on the stream.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32),
        block: (u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        self.launch3(name, (grid.0, grid.1, 1), block, smem, args)
    }

    /// [`Gpu::launch`] with a three-dimensional grid.
    pub fn launch3(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        let f = self
            .funcs
            .get(name)
            .ok_or_else(|| CudaError::Unsupported(format!("no kernel named {name}")))?;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(v) | Arg::N(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block.0, block.1, 1),
            shared_mem_bytes: smem,
        };
        self.timed(name, || {
            // SAFETY: each kernel's arguments are built by the typed wrappers in this crate,
            // which match the signatures in kernels.cu and size every buffer they pass.
            unsafe { b.launch(cfg) }
                .map(|_| ())
                .map_err(|e| CudaError::Launch {
                    kernel: name.to_string(),
                    msg: e.to_string(),
                })
        })
    }

    /// One block per row with 1024 threads: decode steps have a row or two, and a row of
    /// Grok-1 (6144 values) is then 6 per thread, not a long chain of dependent loads.
    pub fn rows_launch(&self, name: &str, rows: usize, args: &[Arg]) -> Result<(), CudaError> {
        self.launch(name, (rows as u32, 1), (ROW_THREADS, 1), 0, args)
    }

    /// One thread per element.
    pub fn elems_launch(&self, name: &str, n: usize, args: &[Arg]) -> Result<(), CudaError> {
        self.launch(name, (n.div_ceil(256) as u32, 1), (256, 1), 0, args)
    }

    /// One thread per four elements (kernels that move a float4 at a time).
    fn quads_launch(&self, name: &str, n: usize, args: &[Arg]) -> Result<(), CudaError> {
        self.elems_launch(name, n.div_ceil(4), args)
    }

    /// `a = gelu_tanh(a) * b` over `n` f32 at `a` and `b`.
    pub fn gelu_mul(&self, a: u64, b: u64, n: usize) -> Result<(), CudaError> {
        self.quads_launch("gelu_mul", n, &[Arg::P(a), Arg::P(b), Arg::N(n as u64)])
    }

    /// Uploads an int8 matrix (tiled when its width allows).
    pub fn upload_q(&self, q: &crate::model::QMatrix) -> Result<DevQ, CudaError> {
        let tiled = q.n.is_multiple_of(16);
        let w = if tiled {
            self.upload(&tile_int8(q.weight_i8(), q.k, q.n))?
        } else {
            self.upload(q.weight_i8())?
        };
        Ok(DevQ {
            k: q.k,
            n: q.n,
            gr: q.group_rows,
            tiled,
            w,
            s: self.upload(&q.scales)?,
        })
    }

    /// The tiled kernel's K split for a `[k, n]` matrix: rows of K per warp and blocks per
    /// column tile. It depends on the matrix and the GPU only, never on the batch, so a row's
    /// result is the same whatever else is in its batch. One wave of blocks fills the GPU
    /// (each SM streams its share of the weights), each warp a multiple of 8 rows.
    pub fn tiled_split(&self, k: usize, n: usize) -> (usize, usize) {
        tiled_split(self.tiled_slots, k, n)
    }

    /// `x[m, k] · q` where `q` is three matrices side by side (a fused q, k, v projection;
    /// the first two `widths` whole tiles), each product into its own `outs` (row-major at
    /// its width). One launch for the three in the int8 kernel and in `qgemm_wgmma`; one
    /// `qmma_*` product split by columns up to 64 rows; one dequantisation and three GEMMs on
    /// the cuBLAS path.
    pub fn qmatmul_split(
        &self,
        x: u64,
        m: usize,
        q: &DevQ,
        widths: [usize; 3],
        outs: [u64; 3],
        gemm_min_rows: usize,
    ) -> Result<(), CudaError> {
        if !q.tiled
            || !widths[0].is_multiple_of(Q_TILE)
            || !widths[1].is_multiple_of(Q_TILE)
            || widths.iter().sum::<usize>() != q.n
        {
            return Err(CudaError::Unsupported(format!(
                "splitting a {}-wide int8 product into {widths:?}",
                q.n
            )));
        }
        if m == 0 {
            return Ok(());
        }
        let t1 = widths[0] / Q_TILE;
        let split = [t1, t1 + widths[1] / Q_TILE];
        if m < gemm_min_rows {
            return self.qmatmul_tiled(x, m, q, outs, split);
        }
        match self.bf16_kernel(m, q) {
            Bf16Kernel::Wgmma => self.qmatmul_wgmma(x, m, q, outs, split),
            Bf16Kernel::Mma => {
                // qmma_* into one [m, n] product, then each part's columns (a copy of m rows,
                // far less than dequantising the fused matrix for cuBLAS).
                let whole = self.alloc::<f32>(m * q.n)?;
                self.qmatmul_mma(x, m, q, whole.ptr())?;
                let mut col = 0;
                for (w, out) in widths.into_iter().zip(outs) {
                    self.rows_launch(
                        "split_cols",
                        m,
                        &[
                            Arg::P(whole.ptr()),
                            Arg::I(q.n as i32),
                            Arg::I(col as i32),
                            Arg::P(out),
                            Arg::I(w as i32),
                        ],
                    )?;
                    col += w;
                }
                Ok(())
            }
            Bf16Kernel::Cublas => {
                let (wb, xb) = self.bf16_operands(x, m, q)?;
                let mut col = 0;
                for (w, out) in widths.into_iter().zip(outs) {
                    self.gemm_bf16_ld(xb.ptr(), wb.at(col), q.n, out, m, w, q.k)?;
                    col += w;
                }
                Ok(())
            }
        }
    }

    /// `x[m, k] · q` on the tiled layout, four rows at a time at most; tiles before `split[0]`
    /// go to `outs[0]`, then to `outs[1]` before `split[1]`, the rest to `outs[2]`.
    fn qmatmul_tiled(
        &self,
        x: u64,
        m: usize,
        q: &DevQ,
        outs: [u64; 3],
        split: [usize; 2],
    ) -> Result<(), CudaError> {
        let (k, n) = (q.k, q.n);
        let tiles = n.div_ceil(Q_TILE);
        if tiles > MAX_TILES {
            return Err(CudaError::Unsupported(format!(
                "an int8 matrix {n} columns wide (the decode kernel takes up to {})",
                MAX_TILES * Q_TILE
            )));
        }
        let (per_warp, ky) = self.tiled_split(k, n);
        // Each output's width (rows of outs[i] are that far apart).
        let w0 = (split[0] * Q_TILE).min(n);
        let w1 = (split[1] * Q_TILE).min(n) - w0;
        let widths = [w0, w1, n - w0 - w1];
        let parts = if ky > 1 {
            Some(self.alloc::<f32>(ky * m.min(4) * n)?)
        } else {
            None
        };
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(4);
            let mr = tiled_rows(rows)?;
            let name = format!("qgemv_tiled_{mr}");
            self.launch(
                &name,
                (tiles as u32, ky as u32),
                (32, TILED_WARPS as u32),
                Self::tiled_smem_bytes(mr) as u32,
                &[
                    Arg::P(x + (r0 * k * 4) as u64),
                    Arg::I(rows as i32),
                    Arg::P(q.w.ptr()),
                    Arg::P(q.s.ptr()),
                    Arg::I(k as i32),
                    Arg::I(n as i32),
                    Arg::I(q.gr as i32),
                    Arg::P(outs[0] + (r0 * widths[0] * 4) as u64),
                    Arg::P(outs[1] + (r0 * widths[1] * 4) as u64),
                    Arg::P(outs[2] + (r0 * widths[2] * 4) as u64),
                    Arg::I(split[0] as i32),
                    Arg::I(split[1] as i32),
                    Arg::P(parts.as_ref().map_or(0, |p| p.ptr())),
                    Arg::P(self.tile_counters.ptr()),
                    Arg::I(per_warp as i32),
                ],
            )?;
            r0 += rows;
        }
        Ok(())
    }

    /// The experts of one MoE layer on a few tokens with the router's picks left on the
    /// device (`qgemv_experts_*` in kernels.cu): each picked expert's matrix of each kind in
    /// `set` serves the slots (token × choice, `slots` of them) that picked it; slot `s` reads
    /// row `s / in_div` of `x` and writes row `kind * slots + s` of `out`. `tokens` bounds
    /// how many slots one expert can get (taken 4 at a time). Each expert's rows get the bits
    /// the per-expert [`Gpu::qmatmul`] gives them on the int8 path.
    #[allow(clippy::too_many_arguments)]
    pub fn qmatmul_experts(
        &self,
        x: u64,
        picks: u64,
        slots: usize,
        in_div: usize,
        tokens: usize,
        set: &ExpertSet,
        out: u64,
    ) -> Result<(), CudaError> {
        let (k, n) = (set.k, set.n);
        let tiles = n.div_ceil(Q_TILE);
        let mats = set.len;
        // An expert gets at most one slot per token: its rows go in chunks of the kernel's.
        let mr = tiled_rows(tokens.min(TILED_ROWS[TILED_ROWS.len() - 1]))?;
        let chunks = tokens.div_ceil(mr).max(1);
        if tiles * mats * chunks > MAX_TILES {
            return Err(CudaError::Unsupported(format!(
                "{mats} expert matrices {n} columns wide for {tokens} tokens"
            )));
        }
        let (per_warp, ky) = self.tiled_split(k, n);
        let kinds = mats / set.experts;
        // One z slice per expert the slots can have picked, per kind.
        let per_kind = set.experts.min(slots);
        let rows = kinds * slots;
        let parts = self.alloc::<f32>(if ky > 1 { ky * rows * n } else { 0 })?;
        self.launch3(
            &format!("qgemv_experts_{mr}"),
            (tiles as u32, ky as u32, (kinds * per_kind) as u32),
            (32, TILED_WARPS as u32),
            Self::tiled_smem_bytes(mr) as u32,
            &self.experts_args(x, picks, slots, in_div, set, out, parts.ptr(), per_warp),
        )
    }

    /// The device tables of [`Gpu::qmatmul_experts`] for `mats` (tiled, all of one shape;
    /// `experts` per kind).
    pub fn expert_set(&self, mats: &[&DevQ], experts: usize) -> Result<ExpertSet, CudaError> {
        let first = mats
            .first()
            .ok_or_else(|| CudaError::Unsupported("an empty expert set".into()))?;
        let (k, n, gr) = (first.k, first.n, first.gr);
        if experts == 0
            || !mats.len().is_multiple_of(experts)
            || mats
                .iter()
                .any(|m| !m.tiled || (m.k, m.n, m.gr) != (k, n, gr))
        {
            return Err(CudaError::Unsupported(
                "device-routed experts need tiled matrices of one shape".into(),
            ));
        }
        let w: Vec<u64> = mats.iter().map(|m| m.w.ptr()).collect();
        let sc: Vec<u64> = mats.iter().map(|m| m.s.ptr()).collect();
        Ok(ExpertSet {
            k,
            n,
            gr,
            experts,
            len: w.len(),
            w_table: self.upload(&w)?,
            s_table: self.upload(&sc)?,
        })
    }

    /// Shared memory of `qgemv_tiled_{mr}`: every warp's partial sums of its rows.
    fn tiled_smem_bytes(mr: usize) -> usize {
        TILED_WARPS * mr * Q_TILE * 4
    }

    /// Shared memory of `attention_prefill_{head_dim}`.
    pub fn prefill_smem_bytes(head_dim: usize) -> usize {
        (2 * 64 * (head_dim + 4) + 64 * 68) * 4
    }

    /// `out[m, n] = x[m, k] · q` (row-major f32 at device addresses). Batches below
    /// `gemm_min_rows` stream the int8 weights through the f32 kernels (up to 4 rows per read
    /// on the tiled layout, 16 on the row-major one); larger ones take the bf16 path (see
    /// [`DEFAULT_GEMM_MIN_ROWS`]).
    pub fn qmatmul(
        &self,
        x: u64,
        m: usize,
        q: &DevQ,
        out: u64,
        gemm_min_rows: usize,
    ) -> Result<(), CudaError> {
        if m == 0 {
            return Ok(());
        }
        if m >= gemm_min_rows {
            return match self.bf16_kernel(m, q) {
                Bf16Kernel::Mma => self.qmatmul_mma(x, m, q, out),
                Bf16Kernel::Wgmma => self.qmatmul_wgmma(x, m, q, [out; 3], q.one_output()),
                Bf16Kernel::Cublas => self.qmatmul_cublas(x, m, q, out),
            };
        }
        if q.tiled {
            return self.qmatmul_tiled(x, m, q, [out; 3], q.one_output());
        }
        // Row-major (widths that are no multiple of 16): VEC columns per lane.
        let (k, n) = (q.k, q.n);
        let vec = if n.is_multiple_of(4) { 4 } else { 1 };
        let warps = 4;
        // The K split depends only on the matrix, so a row's sum is the same whatever else
        // is in the batch; enough blocks to fill the GPU several times over, each warp ≥ 16
        // rows of K.
        let ky = (8 * self.sms)
            .div_ceil(n.div_ceil(32 * vec))
            .min((k / (warps * 16)).max(1))
            .max(1);
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(16);
            let mr = [1, 2, 4, 8, 16]
                .into_iter()
                .find(|&r| r >= rows)
                .unwrap_or(16);
            let (name, cols) = (format!("qgemv_{mr}_{vec}"), vec);
            let gx = n.div_ceil(32 * cols);
            let smem = (warps * mr * 32 * cols * 4) as u32;
            let xs = x + (r0 * k * 4) as u64;
            let dst = out + (r0 * n * 4) as u64;
            let common = |target: u64| {
                [
                    Arg::P(xs),
                    Arg::I(rows as i32),
                    Arg::P(q.w.ptr()),
                    Arg::P(q.s.ptr()),
                    Arg::I(k as i32),
                    Arg::I(n as i32),
                    Arg::I(q.gr as i32),
                    Arg::P(target),
                    Arg::I(ky as i32),
                ]
            };
            if ky == 1 {
                self.launch(
                    &name,
                    (gx as u32, 1),
                    (32, warps as u32),
                    smem,
                    &common(dst),
                )?;
            } else {
                let parts = self.alloc::<f32>(ky * rows * n)?;
                self.launch(
                    &name,
                    (gx as u32, ky as u32),
                    (32, warps as u32),
                    smem,
                    &common(parts.ptr()),
                )?;
                let len = rows * n;
                self.elems_launch(
                    "qgemv_reduce",
                    len,
                    &[
                        Arg::P(parts.ptr()),
                        Arg::P(dst),
                        Arg::N(len as u64),
                        Arg::I(ky as i32),
                    ],
                )?;
            }
            r0 += rows;
        }
        Ok(())
    }

    /// Whether `qmma_*` takes `q`: tiled, and see [`Gpu::mma_takes_shape`].
    fn mma_takes(&self, q: &DevQ) -> bool {
        q.tiled && self.mma_takes_shape(q.k, q.n, q.gr)
    }

    /// Whether the tensor-core int8 kernels take a tiled `[k, n]` matrix with scale groups
    /// of `gr` rows: K and the groups whole mma steps (16 rows), on tensor cores that take
    /// bf16.
    pub fn mma_takes_shape(&self, k: usize, n: usize, gr: usize) -> bool {
        self.bf16_tensor_cores()
            && k.is_multiple_of(16)
            && gr.is_multiple_of(16)
            && 2 * n.div_ceil(Q_TILE) <= MAX_TILES
    }

    /// The K split of `qmma_*` (instance `i` of `MMA_ROWS`) for K = `k` over `halves` column
    /// halves: rows per block (whole mma steps) and blocks along y, one wave of blocks.
    fn mma_split(&self, k: usize, halves: usize, i: usize) -> (usize, usize) {
        let ky = (self.mma_slots[i] / halves.max(1)).clamp(1, (k / 16).max(1));
        let per_block = k.div_ceil(ky).next_multiple_of(16);
        (per_block, k.div_ceil(per_block).max(1))
    }

    /// The kernel an `m`-row product with `q` takes on the bf16 path: `qmma_*` up to 64 rows,
    /// `qgemm_wgmma` past them where it runs, else dequantisation + cuBLAS.
    fn bf16_kernel(&self, m: usize, q: &DevQ) -> Bf16Kernel {
        if m <= MMA_ROWS[MMA_ROWS.len() - 1] {
            if self.mma_takes(q) {
                return Bf16Kernel::Mma;
            }
        } else if self.wgmma_takes(q) {
            return Bf16Kernel::Wgmma;
        }
        Bf16Kernel::Cublas
    }

    /// Whether `qgemm_wgmma` takes `q`: on, tiled, K and the scale groups whole mma steps, and
    /// the column halves one grid dimension.
    fn wgmma_takes(&self, q: &DevQ) -> bool {
        self.wgmma()
            && q.tiled
            && q.k.is_multiple_of(16)
            && q.gr.is_multiple_of(16)
            && 2 * q.n.div_ceil(Q_TILE) <= u16::MAX as usize
    }

    /// `x[m, k] · q` on Hopper's warpgroup tensor cores (`qgemm_wgmma`): the numbers of
    /// dequantisation + cuBLAS from one read of the int8 weights. Output tiles as in
    /// [`Gpu::qmatmul_tiled`]: before `split[0]` to `outs[0]`, then `outs[1]`, then `outs[2]`.
    fn qmatmul_wgmma(
        &self,
        x: u64,
        m: usize,
        q: &DevQ,
        outs: [u64; 3],
        split: [usize; 2],
    ) -> Result<(), CudaError> {
        let xb = self.to_bf16(x, m * q.k)?;
        self.wgmma_launch(xb.ptr(), m, q, outs, split, 0)
    }

    /// An expert's `(gelu_tanh(x·gate) ⊙ (x·up))·down` for `m` rows of f32 `x` into f32 `out`
    /// on `qgemm_wgmma`, the GELU product in the up projection's epilogue (bf16, the down
    /// projection's operand, rounded as `to_bf16` rounds it): the numbers of the three
    /// [`Gpu::qmatmul`]s and `gelu_mul` on the bf16 path, without the f32 round trips.
    /// `Ok(false)`, having done nothing, where `qgemm_wgmma` does not take these (off, or 64
    /// rows or fewer: `qmma_*`'s).
    pub fn ffn_wgmma(
        &self,
        x: u64,
        m: usize,
        [gate, up, down]: [&DevQ; 3],
        out: u64,
    ) -> Result<bool, CudaError> {
        let takes = [gate, up, down]
            .iter()
            .all(|q| self.bf16_kernel(m, q) == Bf16Kernel::Wgmma)
            && gate.n == up.n
            && gate.k == up.k
            && down.k == up.n;
        if !takes {
            return Ok(false);
        }
        let (d, f) = (gate.k, gate.n);
        let xb = self.to_bf16(x, m * d)?;
        let a = self.alloc::<f32>(m * f)?;
        self.wgmma_launch(xb.ptr(), m, gate, [a.ptr(); 3], gate.one_output(), 0)?;
        let h = self.alloc::<u16>(m * f)?;
        self.wgmma_launch(xb.ptr(), m, up, [h.ptr(); 3], up.one_output(), a.ptr())?;
        self.wgmma_launch(h.ptr(), m, down, [out; 3], down.one_output(), 0)?;
        Ok(true)
    }

    /// `qgemm_wgmma` on bf16 rows at `xb`; with `gate` (not 0) the GELU epilogue into bf16
    /// `outs[0]`.
    fn wgmma_launch(
        &self,
        xb: u64,
        m: usize,
        q: &DevQ,
        outs: [u64; 3],
        split: [usize; 2],
        gate: u64,
    ) -> Result<(), CudaError> {
        let (k, n) = (q.k, q.n);
        let halves = 2 * n.div_ceil(Q_TILE);
        let tile = wgmma_tile(m);
        let token_tiles = m.div_ceil(tile);
        let blocks = token_tiles * halves;
        let (mut per_block, mut ky) = wgmma_split(blocks, k, self.sms);
        if ky > 1 && blocks > MAX_TILES {
            (per_block, ky) = (k.next_multiple_of(WG_KC), 1);
        }
        let parts = self.alloc::<f32>(if ky > 1 { ky * m * n } else { 0 })?;
        self.launch3(
            &format!("qgemm_wgmma_{tile}"),
            (token_tiles as u32, halves as u32, ky as u32),
            (256, 1),
            WG_SMEM as u32,
            &[
                Arg::P(xb),
                Arg::I(m as i32),
                Arg::P(q.w.ptr()),
                Arg::P(q.s.ptr()),
                Arg::I(k as i32),
                Arg::I(n as i32),
                Arg::I(q.gr as i32),
                Arg::P(outs[0]),
                Arg::P(outs[1]),
                Arg::P(outs[2]),
                Arg::I(split[0] as i32),
                Arg::I(split[1] as i32),
                Arg::P(parts.ptr()),
                Arg::P(self.tile_counters.ptr()),
                Arg::I(per_block as i32),
                Arg::P(gate),
            ],
        )
    }

    /// A bf16 copy of `len` f32 values at `x` (rounded to nearest even).
    pub fn to_bf16(&self, x: u64, len: usize) -> Result<Buf<u16>, CudaError> {
        let xb = self.alloc::<u16>(len)?;
        self.quads_launch(
            "to_bf16",
            len,
            &[Arg::P(x), Arg::P(xb.ptr()), Arg::N(len as u64)],
        )?;
        Ok(xb)
    }

    /// [`Gpu::qmatmul_experts`] on the bf16 path (`qmma_experts_4`): `xb` holds bf16 rows,
    /// and each picked expert's slots (at most 64: `tokens` bounds them) are one batch of the
    /// tensor-core kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn qmatmul_experts_mma(
        &self,
        xb: u64,
        picks: u64,
        slots: usize,
        in_div: usize,
        tokens: usize,
        set: &ExpertSet,
        out: u64,
    ) -> Result<(), CudaError> {
        let (k, n) = (set.k, set.n);
        if tokens > MMA_ROUTED_TOKENS || !self.mma_takes_shape(k, n, set.gr) {
            return Err(CudaError::Unsupported(format!(
                "the tensor-core experts on {tokens} tokens of [{k} x {n}] (gr {})",
                set.gr
            )));
        }
        let halves = 2 * n.div_ceil(Q_TILE);
        let kinds = set.len / set.experts.max(1);
        let z = kinds * set.experts.min(slots);
        if halves * z > MAX_TILES {
            return Err(CudaError::Unsupported(format!(
                "{} expert matrices {n} columns wide",
                set.len
            )));
        }
        let (per_block, ky) = self.mma_split(k, halves, MMA_ROWS.len() - 1);
        let rows = kinds * slots;
        let parts = self.alloc::<f32>(if ky > 1 { ky * rows * n } else { 0 })?;
        self.launch3(
            "qmma_experts_4",
            (halves as u32, ky as u32, z as u32),
            (32, 8),
            0,
            &self.experts_args(xb, picks, slots, in_div, set, out, parts.ptr(), per_block),
        )
    }

    /// The arguments both expert kernels take (`qgemv_experts_*`, `qmma_experts_4`), `split`
    /// being the K split's rows per warp or per block.
    #[allow(clippy::too_many_arguments)]
    fn experts_args(
        &self,
        x: u64,
        picks: u64,
        slots: usize,
        in_div: usize,
        set: &ExpertSet,
        out: u64,
        parts: u64,
        split: usize,
    ) -> [Arg; 14] {
        [
            Arg::P(x),
            Arg::P(picks),
            Arg::I(slots as i32),
            Arg::I(in_div as i32),
            Arg::P(set.w_table.ptr()),
            Arg::P(set.s_table.ptr()),
            Arg::I(set.experts as i32),
            Arg::I(set.k as i32),
            Arg::I(set.n as i32),
            Arg::I(set.gr as i32),
            Arg::P(out),
            Arg::P(parts),
            Arg::P(self.tile_counters.ptr()),
            Arg::I(split as i32),
        ]
    }

    /// `x[m, k] · q` for up to 64 rows on the tensor cores (`qmma_*`): the numbers of
    /// dequantisation + cuBLAS (bf16 operands, f32 sums) from one read of the int8 weights.
    /// The K split fills the GPU with one wave of blocks, as the decode kernel's does.
    fn qmatmul_mma(&self, x: u64, m: usize, q: &DevQ, out: u64) -> Result<(), CudaError> {
        let i = MMA_ROWS
            .iter()
            .position(|&r| r >= m)
            .ok_or_else(|| CudaError::Unsupported(format!("the tensor-core matmul on {m} rows")))?;
        let (k, n) = (q.k, q.n);
        let halves = 2 * n.div_ceil(Q_TILE);
        let (per_block, ky) = self.mma_split(k, halves, i);
        let xb = self.to_bf16(x, m * k)?;
        let parts = self.alloc::<f32>(if ky > 1 { ky * m * n } else { 0 })?;
        self.launch(
            &format!("qmma_{}", MMA_ROWS[i] / 16),
            (halves as u32, ky as u32),
            (32, 8),
            0,
            &[
                Arg::P(xb.ptr()),
                Arg::I(m as i32),
                Arg::P(q.w.ptr()),
                Arg::P(q.s.ptr()),
                Arg::I(k as i32),
                Arg::I(n as i32),
                Arg::I(q.gr as i32),
                Arg::P(out),
                Arg::P(parts.ptr()),
                Arg::P(self.tile_counters.ptr()),
                Arg::I(per_block as i32),
            ],
        )
    }

    /// `x[m, k] · q` through bf16 copies of `x` and the dequantised weight and one cuBLAS GEMM
    /// (f32 accumulation and output): what batches past `qmma_*`'s take.
    pub fn qmatmul_cublas(&self, x: u64, m: usize, q: &DevQ, out: u64) -> Result<(), CudaError> {
        let (wb, xb) = self.bf16_operands(x, m, q)?;
        self.gemm_bf16(xb.ptr(), wb.ptr(), out, m, q.n, q.k)
    }

    /// bf16 copies of the dequantised weight and of `x` (`[m, k]`), for cuBLAS.
    fn bf16_operands(&self, x: u64, m: usize, q: &DevQ) -> Result<(Buf<u16>, Buf<u16>), CudaError> {
        let (k, n) = (q.k, q.n);
        let wb = self.alloc::<u16>(k * n)?;
        let args = [
            Arg::P(q.w.ptr()),
            Arg::P(q.s.ptr()),
            Arg::P(wb.ptr()),
            Arg::I(k as i32),
            Arg::I(n as i32),
            Arg::I(q.gr as i32),
        ];
        if q.tiled {
            // One block row per matrix row, 16 columns per thread.
            self.launch(
                "dequant_bf16_tiled",
                (n.div_ceil(16 * 256) as u32, k as u32),
                (256, 1),
                0,
                &args,
            )?;
        } else {
            // One block row per matrix row, 4 columns per thread.
            self.launch(
                "dequant_bf16",
                (n.div_ceil(4 * 256) as u32, k as u32),
                (256, 1),
                0,
                &args,
            )?;
        }
        Ok((wb, self.to_bf16(x, m * k)?))
    }

    /// Row-major `c[m, n] = a[m, k] · b[k, n]`, bf16 inputs, f32 accumulation and output.
    pub fn gemm_bf16(
        &self,
        a: u64,
        b: u64,
        c: u64,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        self.gemm_bf16_ld(a, b, n, c, m, n, k)
    }

    /// [`Gpu::gemm_bf16`] with `b`'s rows `ldb` apart (columns of a wider matrix).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16_ld(
        &self,
        a: u64,
        b: u64,
        ldb: usize,
        c: u64,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        // Row-major C[m,n] = A[m,k] B[k,n] is column-major Cᵀ[n,m] = Bᵀ[n,k] Aᵀ[k,m].
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: the callers' buffers hold m*k bf16, k rows of ldb >= n bf16, m*n f32.
        self.timed("cublas_gemm_bf16", || unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                b as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                ldb as i32,
                a as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const _,
                c as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .map_err(|e| CudaError::Blas {
                op: "bf16 GEMM",
                msg: e.to_string(),
            })
        })
    }

    /// `out[rows, vocab] = x[rows, d] · embᵀ` in f32 (the tied head).
    pub fn head_matmul(
        &self,
        x: u64,
        rows: usize,
        d: usize,
        emb: u64,
        vocab: usize,
        out: u64,
    ) -> Result<(), CudaError> {
        let (alpha, beta) = (1f32, 0f32);
        // Column-major: C[vocab, rows] = Eᵀ... E is row-major [vocab, d] = column-major
        // [d, vocab], so op(A) = Aᵀ; x row-major [rows, d] = column-major [d, rows].
        // SAFETY: emb holds vocab*d, x rows*d and out rows*vocab f32.
        unsafe {
            blas::sgemm(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                vocab as i32,
                rows as i32,
                d as i32,
                &alpha,
                emb as *const f32,
                d as i32,
                x as *const f32,
                d as i32,
                &beta,
                out as *mut f32,
                vocab as i32,
            )
        }
        .map_err(|e| CudaError::Blas {
            op: "head SGEMM",
            msg: e.to_string(),
        })
    }

    /// Bytes of shared memory `attention_{rows}` needs for `head_dim`.
    pub fn attention_smem_bytes(rows: usize, head_dim: usize) -> usize {
        (rows * head_dim
            + ATT_KEYS * (head_dim + 1)
            + ATT_KEYS * head_dim
            + rows * ATT_KEYS
            + 3 * rows)
            * 4
    }
}

/// The smallest instance of the tiled kernels (`qgemv_tiled_*`, `qgemv_experts_*`) that
/// takes `rows` rows.
/// The token tile of `qgemm_wgmma_N` for `m` rows: as many tiles as 128 rows each would take,
/// the smallest of [`WG_TILES`] that covers the rows in that many (530 rows: 5 tiles of 112,
/// not 4 of 128 and a fifth of 18 that costs as much as a full one).
fn wgmma_tile(m: usize) -> usize {
    let per = m.div_ceil(m.div_ceil(WG_TOK).max(1));
    WG_TILES.into_iter().find(|&t| t >= per).unwrap_or(WG_TOK)
}

/// The K split of `qgemm_wgmma` for `blocks` blocks (token tiles × column halves) on `sms`
/// SMs, one block per SM: rows per block (whole chunks of [`WG_KC`]) and blocks along z. The
/// run takes waves × chunks per block; a split is taken only where it shortens that by a
/// tenth (its partial sums cost a pass), and keeps at least 4 chunks per block.
fn wgmma_split(blocks: usize, k: usize, sms: usize) -> (usize, usize) {
    let chunks = k.div_ceil(WG_KC).max(1);
    let time = |ky: usize| (blocks * ky).div_ceil(sms.max(1)) * chunks.div_ceil(ky);
    let mut best = 1;
    for ky in 2..=8 {
        if chunks.div_ceil(ky) < 4 {
            break;
        }
        if 10 * time(ky) < 9 * time(best) {
            best = ky;
        }
    }
    let per_block = chunks.div_ceil(best) * WG_KC;
    (per_block, k.div_ceil(per_block).max(1))
}

fn tiled_rows(rows: usize) -> Result<usize, CudaError> {
    TILED_ROWS
        .into_iter()
        .find(|&r| r >= rows)
        .ok_or_else(|| CudaError::Unsupported(format!("the tiled int8 kernel on {rows} rows")))
}

/// See [`Gpu::tiled_split`]: `slots` blocks of the kernel fit on the GPU at once.
fn tiled_split(slots: usize, k: usize, n: usize) -> (usize, usize) {
    let tiles = n.div_ceil(Q_TILE);
    let ky = (slots / tiles).max(1);
    let per_warp = k.div_ceil(ky * TILED_WARPS).next_multiple_of(8).max(16);
    (per_warp, k.div_ceil(per_warp * TILED_WARPS).max(1))
}

/// Freed stream-ordered allocations stay in the device's pool instead of going back to the
/// driver at every synchronisation: a step allocates its activations afresh, and remapping
/// them after each of its syncs cost more than the decode matmuls.
fn keep_freed_memory(ctx: &CudaContext) -> Result<(), CudaError> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool: drv_sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on this context's device with valid out-pointers.
    unsafe {
        drv_sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(drv_err("finding the memory pool"))?;
        drv_sys::cuMemPoolSetAttribute(
            pool,
            drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut _,
        )
        .result()
        .map_err(drv_err("setting the memory pool's release threshold"))?;
    }
    Ok(())
}

/// Every kernel [`Gpu::open`] looks up in the compiled module (the emulated device's driver,
/// in the tests, is built with exactly these).
pub fn kernel_names() -> Vec<String> {
    let mut v: Vec<String> = [
        "embed",
        "rmsnorm",
        "residual_norm",
        "rope_kv",
        "attention_16",
        "attention_64",
        "attention_combine",
        "gather_rows",
        "split_cols",
        "scatter_rows",
        "combine",
        "gelu_mul",
        "qgemv_reduce",
        "dequant_bf16",
        "dequant_bf16_tiled",
        "to_bf16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for mr in [1, 2, 4, 8, 16] {
        for vec in [4, 1] {
            v.push(format!("qgemv_{mr}_{vec}"));
        }
    }
    for rows in MMA_ROWS {
        v.push(format!("qmma_{}", rows / 16));
    }
    v.push("qmma_experts_4".into());
    for tile in WG_TILES {
        v.push(format!("qgemm_wgmma_{tile}"));
    }
    for mr in TILED_ROWS {
        v.push(format!("qgemv_tiled_{mr}"));
        v.push(format!("qgemv_experts_{mr}"));
    }
    for hd in ATT_HEAD_DIMS {
        v.push(format!("attention_prefill_{hd}"));
        v.push(format!("attention_tc_{hd}"));
        for rows in DECODE_ROWS {
            v.push(format!("attention_decode_{hd}_{rows}"));
        }
    }
    v
}

/// Where compiled kernels are kept: `GROK_KERNEL_CACHE`, else `$XDG_CACHE_HOME/grok/kernels`,
/// else `~/.cache/grok/kernels`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("GROK_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("grok").join("kernels"))
}

/// PTX for compute capability `major.minor`, from the cache when the same source was compiled
/// for the same architecture before (NVRTC takes seconds; a restarted rank should not).
fn compile_cached(major: i32, minor: i32) -> Result<String, CudaError> {
    let arch: &'static str = match (major, minor) {
        (7, 0) => "compute_70",
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        // The "a" target: Hopper's own instructions (wgmma), which compute_90 lacks.
        (9, 0) => "compute_90a",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        _ if major >= 9 => "compute_90",
        _ => "compute_80",
    };
    let key = xxhash_rust::xxh3::xxh3_64(format!("{arch}\n{KERNELS}").as_bytes());
    let file = cache_dir().map(|d| d.join(format!("{key:016x}-{arch}.ptx")));
    if let Some(f) = &file {
        if let Ok(ptx) = std::fs::read_to_string(f) {
            return Ok(ptx);
        }
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        // Exact libm-grade tanhf/expf/sqrtf: the fixture's tolerances are tight.
        use_fast_math: Some(false),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts)
        .map_err(|e| CudaError::Compile(format!("{e:?}")))?
        .to_src();
    if let Some(f) = &file {
        // A cache that cannot be written only costs the next start a compile.
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        let saved = f
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::write(&tmp, &ptx))
            .and_then(|_| std::fs::rename(&tmp, f));
        if let Err(e) = saved {
            tracing::warn!(path = %f.display(), "could not cache the compiled kernels: {e}");
        }
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the GPU looks up at start-up is defined in kernels.cu, by name or by a
    /// macro instance (a missing one would fail `Gpu::open` on the device).
    #[test]
    fn every_listed_kernel_is_in_the_source() {
        // (name prefix, the macro that defines such kernels, how its argument list starts)
        let macros = [
            ("attention_prefill_", "ATTENTION_TILED(attention_prefill, "),
            ("attention_decode_", "ATTENTION_DECODE("),
            ("attention_tc_", "ATTENTION_TILED(attention_tc, "),
            ("attention_", "ATTENTION("),
            ("qgemv_tiled_", "QGEMV_TILED("),
            ("qgemv_experts_", "QGEMV_TILED("),
            ("qgemv_", "QGEMV("),
            ("qmma_", "QMMA("),
            ("qgemm_wgmma_", "QGEMM_WGMMA("),
        ];
        for name in kernel_names() {
            // `void name(` or `void __launch_bounds__(..) name(` on one line.
            let direct = KERNELS
                .lines()
                .any(|l| l.contains("void ") && l.contains(&format!(" {name}(")));
            let by_macro = macros.iter().any(|(prefix, mac)| {
                name.strip_prefix(prefix).is_some_and(|rest| {
                    let args = rest.replace('_', ", ");
                    KERNELS.contains(&format!("\n{mac}{args})"))
                        || KERNELS.contains(&format!("\n{mac}{args},"))
                })
            });
            assert!(
                direct || by_macro,
                "kernel {name} is not defined in kernels.cu"
            );
        }
    }

    #[test]
    fn tiling_puts_each_tiles_rows_back_to_back() {
        let (k, n) = (3, 1040); // tiles of 512, 512 and 16 columns
        let w: Vec<i8> = (0..k * n).map(|i| (i % 251) as i8).collect();
        let t = tile_int8(&w, k, n);
        assert_eq!(t.len(), w.len());
        for row in 0..k {
            for col in 0..n {
                let (tile, c) = (col / Q_TILE, col % Q_TILE);
                let width = Q_TILE.min(n - tile * Q_TILE);
                let at = tile * Q_TILE * k + row * width + c;
                assert_eq!(t[at], w[row * n + col], "row {row} col {col}");
            }
        }
    }

    #[test]
    fn the_split_covers_k_in_one_wave_of_whole_warps() {
        // Grok-1's matrices on a GPU holding 132 x 4 blocks, and odd small ones.
        for (k, n) in [
            (6144, 32768),
            (32768, 6144),
            (6144, 6144),
            (6144, 1024),
            (96, 272),
        ] {
            for slots in [1, 528, 4096] {
                let (per_warp, ky) = tiled_split(slots, k, n);
                assert!(per_warp.is_multiple_of(8) && per_warp >= 16);
                assert!(per_warp * TILED_WARPS * ky >= k, "{k}x{n}: K not covered");
                // No block without rows of K to read.
                assert!(
                    per_warp * TILED_WARPS * (ky - 1) < k,
                    "{k}x{n}: an idle block"
                );
                let tiles = n.div_ceil(Q_TILE);
                if tiles <= slots {
                    assert!(tiles * ky <= slots, "{k}x{n}: more than one wave");
                }
            }
        }
    }

    #[test]
    fn the_wgmma_split_fills_the_gpu_in_whole_chunks() {
        // A 2048-token prefill's expert of 512 tokens on 132 SMs: gate and up (4 x 128 blocks)
        // fill 4 waves unsplit; down (4 x 24 blocks, K = 32768) would leave 36 SMs idle for
        // its whole run, and 4 splits make it 3 waves of a quarter each.
        assert_eq!(wgmma_split(512, 6144, 132), (6144, 1));
        assert_eq!(wgmma_split(96, 32768, 132), (8192, 4));
        for (blocks, k) in [(1, 16), (1, 6144), (24, 32768), (96, 200), (5000, 6144)] {
            let (per_block, ky) = wgmma_split(blocks, k, 132);
            assert!(per_block.is_multiple_of(WG_KC), "{blocks} blocks, k {k}");
            assert!(
                per_block * ky >= k && per_block * (ky - 1) < k,
                "{blocks} blocks, k {k}"
            );
            assert!(
                ky == 1 || per_block >= 4 * WG_KC,
                "{blocks} blocks, k {k}: short splits"
            );
        }
    }

    #[test]
    fn the_wgmma_token_tile_wastes_under_16_rows_of_each_tile() {
        for m in 65..5000 {
            let tile = wgmma_tile(m);
            let tiles = m.div_ceil(tile);
            assert_eq!(
                tiles,
                m.div_ceil(WG_TOK),
                "{m} rows: more tiles than 128 would take"
            );
            assert!(
                tiles * tile - m < 16 * tiles || tile == 80,
                "{m} rows in tiles of {tile}"
            );
        }
        assert_eq!(wgmma_tile(530), 112);
        assert_eq!(wgmma_tile(512), 128);
        assert_eq!(wgmma_tile(65), 80);
    }

    /// gather_chunk spreads a chunk of keys over exactly the launch's threads.
    #[test]
    fn the_prefill_attention_chunks_match_the_launch_threads() {
        let line = format!("#define ATT_CHUNK_THREADS {ATT_THREADS}\n");
        assert!(
            KERNELS.contains(&line),
            "kernels.cu lacks `{}`",
            line.trim()
        );
    }

    /// The host's sizes of `qgemm_wgmma` are the kernel's.
    #[test]
    fn the_wgmma_constants_match_the_kernel() {
        for (name, value) in [("WG_TOK", WG_TOK), ("WG_KC", WG_KC)] {
            let line = format!("#define {name} {value}\n");
            assert!(
                KERNELS.contains(&line),
                "kernels.cu lacks `{}`",
                line.trim()
            );
        }
        assert!(
            KERNELS.contains("#define WG_STAGES 5\n") && KERNELS.contains("#define WG_WROW 272")
        );
        assert!(KERNELS.contains("#define WG_SMEM (WG_STAGES * WG_STAGE + 1024)"));
        for tile in WG_TILES {
            assert!(
                KERNELS.contains(&format!("\nQGEMM_WGMMA({tile})\n")),
                "tile {tile}"
            );
            assert!(
                KERNELS.contains(&format!("\nWGMMA_M64({tile}, ")),
                "tile {tile}"
            );
        }
    }
}

//! Grok-1 layers at real dimensions on one GPU (random weights from the same generator as
//! `grok init --preset grok-1 --layers N`): ms per layer for decode at batch 1, 8 and 64 with
//! 1024 positions of context, and a 2048-token prefill; the weight bytes/s decode achieves
//! against a device-to-device copy measured in the same run, and prefill FLOP/s against a
//! bf16 cuBLAS GEMM of the prefill's expert shape measured in the same run; and the decode
//! matmul alone at the experts' shapes. On Hopper, the bf16 path's large int8 matmul
//! (`qgemm_wgmma`) against the dequantisation + cuBLAS it replaces, alone at the prefill's
//! shapes and in the prefill, in the same run. With `GROK_CUDA_PROFILE=1` each step's GPU
//! time is broken down by kernel.
//!
//! `cargo bench -p grok-shared --bench cuda_layer`; env: GROK_BENCH_LAYERS (default 1),
//! GROK_BENCH_MODEL (a directory to reuse; default a fresh temporary one), GROK_BENCH_JSON
//! (also write the results there), GROK_BENCH_PRESET=tiny (every shape from the tiny preset,
//! 64 positions of context and a 128-token prefill: a run of the bench's own code in
//! seconds, as on the emulated device of shared/tests/cuda_emu). Prints a note and exits where
//! there is no GPU.

use grok_shared::checkpoint::init::init_random;
use grok_shared::checkpoint::open_model;
use grok_shared::comm::local::LocalComm;
use grok_shared::config::ModelConfig;
use grok_shared::cuda::{cuda_available, gpu_count, CudaShard, Gpu};
use grok_shared::model::{LogitsMode, ModelWeights, RankBackend, SeqStep};
use grok_shared::parallel::Plan;
use grok_shared::test_support::random_qmatrix;
use std::time::{Duration, Instant};

const BS: usize = 16;
const ITERS: usize = 10;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !cuda_available() || gpu_count() == 0 {
        println!("cuda_layer: no CUDA GPU here; nothing to measure");
        return;
    }
    let layers = env_usize("GROK_BENCH_LAYERS", 1).max(1);
    let preset = std::env::var("GROK_BENCH_PRESET").unwrap_or_else(|_| "grok-1".into());
    let mut cfg = match ModelConfig::preset(&preset) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("cuda_layer: GROK_BENCH_PRESET: {e} (grok-1 or tiny)");
            std::process::exit(2);
        }
    };
    cfg.num_hidden_layers = layers;
    // Context of the decode steps, prefill tokens, and bytes of the copy-bandwidth buffers.
    let (ctx, prompt_len, copy_bytes) = if preset == "tiny" {
        (64usize, 128usize, 64usize << 20)
    } else {
        (1024, 2048, 2usize << 30)
    };
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let tmp;
    // A model left by an earlier run is reused only if it is the one asked for: the preset's
    // shapes and the layers (the figures are divided by that count).
    let reusable =
        |d: &std::ffi::OsStr| open_model(std::path::Path::new(d)).is_ok_and(|m| m.config == cfg);
    let dir = match std::env::var_os("GROK_BENCH_MODEL") {
        Some(d) if reusable(&d) => d.into(),
        other => {
            let path = match other {
                Some(d) if std::path::Path::new(&d).exists() => {
                    eprintln!(
                        "cuda_layer: GROK_BENCH_MODEL={} holds another model than {layers} \
                         layer(s) of {preset}: remove it or name another directory",
                        std::path::Path::new(&d).display()
                    );
                    std::process::exit(2);
                }
                Some(d) => std::path::PathBuf::from(d),
                None => {
                    tmp = tempfile::tempdir().expect("temp dir");
                    tmp.path().join("grok-1-bench")
                }
            };
            let t = Instant::now();
            init_random(&cfg, 0, &path, &mut |_| {}).expect("init");
            println!(
                "init: {layers} layer(s) of {preset} in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            path
        }
    };
    let t = Instant::now();
    let model = open_model(&dir).expect("open");
    let weights = ModelWeights::load(model.source.as_ref(), &model.config).expect("load");
    let plan = Plan::new(&model.config, 1, 1, 1).expect("plan");
    // Room for 64 sequences of ctx + 1 positions, and the prompt.
    let per_seq = (ctx + 1).div_ceil(BS);
    let blocks = 64 * per_seq + prompt_len.div_ceil(BS);
    let mut shard = CudaShard::new(weights, plan, 0, 0, blocks, BS).expect("shard");
    println!(
        "GPU: {} ({} SMs); weights {:.2} GB, KV pool {:.2} GB, loaded in {:.1} s; bf16 path \
         tensor-core kernels {} (GROK_CUDA_TENSOR_CORES)",
        shard.gpu().name,
        shard.gpu().sms(),
        shard.weight_bytes() as f64 / 1e9,
        shard.kv_bytes() as f64 / 1e9,
        t.elapsed().as_secs_f64(),
        if shard.gpu().bf16_tensor_cores() {
            "on"
        } else {
            "off"
        }
    );
    println!(
        "decode attention: {} (GROK_CUDA_DECODE_ATTENTION)",
        if shard.decode_attention {
            "attention_decode_*"
        } else {
            "the generic attention_16"
        }
    );
    println!(
        "decode MoE routing: {} (GROK_CUDA_DEVICE_ROUTING)",
        if shard.device_routing {
            "on the device where it applies"
        } else {
            "on the host"
        }
    );
    match (shard.gpu().wgmma(), shard.gpu().wgmma_fault()) {
        (true, _) => println!("bf16 path past 64 rows: qgemm_wgmma (GROK_CUDA_WGMMA)"),
        (false, Some(why)) => println!("bf16 path past 64 rows: cuBLAS; qgemm_wgmma is off: {why}"),
        (false, None) => println!("bf16 path past 64 rows: dequantisation + cuBLAS"),
    }
    let comm = LocalComm::group(1, Duration::from_secs(60)).remove(0);

    let copy_bw = copy_bandwidth(&shard, copy_bytes);
    // The peak is cuBLAS on random operands (what it reaches on real data); on zeros the
    // tensor cores draw less power and clock higher, which is printed beside it. The shape
    // is the prefill's up projection of every token.
    let (m, n, k) = (prompt_len, f, d);
    let (gemm_tflops, gemm_ms) = cublas_peak(&shard, (m, n, k), true);
    let (zeros_tflops, _) = cublas_peak(&shard, (m, n, k), false);
    println!("device copy: {:.2} TB/s (read + write)", copy_bw / 1e12);
    println!(
        "cuBLAS bf16 [{m} x {k}] x [{k} x {n}], random operands: {gemm_ms:.3} ms, {:.0} \
         TFLOP/s (on zeros: {zeros_tflops:.0} TFLOP/s)",
        gemm_tflops
    );

    // The decode matmul alone, one row, at the expert shapes: how close the kernel itself
    // streams to the copy bandwidth (the layer adds the small kernels and launch gaps).
    let mut alone = Vec::new();
    for (k, n) in [(d, f), (f, d)] {
        let (us, tb_s) = decode_matmul_alone(&shard, k, n);
        println!(
            "int8 decode matmul alone, 1 row, [{k} x {n}]: {us:.1} us, {tb_s:.2} TB/s of weights \
             ({:.0}% of the copy bandwidth)",
            100.0 * tb_s * 1e12 / copy_bw
        );
        alone.push(format!("\"matmul_{k}x{n}_tb_s\": {tb_s:.3}"));
    }
    // The prefill's int8 products alone, both ways: an expert's share of the tokens (2048 x
    // top-2 / 8 = 512 for Grok-1) through gate/up and down (8 scale groups where they divide
    // it, as in the release's down projections), and the q projection of every token.
    let mut wg_json = Vec::new();
    if shard.gpu().wgmma() {
        let share = prompt_len * cfg.num_experts_per_tok / cfg.num_local_experts;
        let down_groups = if f % 8 == 0 { 8 } else { 1 };
        for (m, k, n, groups) in [
            (share, d, f, 1usize),
            (share, f, d, down_groups),
            (prompt_len, d, cfg.q_dim(), 1),
        ] {
            let (wg_ms, cublas_ms) = prefill_matmul_alone(&shard, m, k, n, groups);
            let tf = |ms: f64| 2.0 * (m * k * n) as f64 / (ms / 1e3) / 1e12;
            println!(
                "int8 prefill matmul [{m} x {k}] x [{k} x {n}]: qgemm_wgmma {wg_ms:.3} ms \
                 ({:.0} TFLOP/s), dequantise + cuBLAS {cublas_ms:.3} ms ({:.0} TFLOP/s): {:.2}x",
                tf(wg_ms),
                tf(cublas_ms),
                cublas_ms / wg_ms
            );
            wg_json.push(format!(
                "\"wgmma_{m}x{k}x{n}\": {{\"ms\": {wg_ms:.4}, \"cublas_ms\": {cublas_ms:.4}}}"
            ));
        }
    }
    let mut json = vec![
        format!("\"gpu\": \"{}\"", shard.gpu().name),
        format!("\"layers\": {layers}"),
        format!("\"copy_tb_s\": {:.4}", copy_bw / 1e12),
        format!("\"cublas_bf16_tflops\": {gemm_tflops:.1}"),
        format!("\"cublas_bf16_zeros_tflops\": {zeros_tflops:.1}"),
    ];
    json.extend(alone);
    json.extend(wg_json);
    println!("\n| step | ms / step | ms / layer | weight GB read | GB/s | floor ms | x floor |");
    println!("|---|---|---|---|---|---|---|");
    for b in [1usize, 8, 64] {
        let tables: Vec<Vec<u32>> = (0..b)
            .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
            .collect();
        let toks: Vec<Vec<u32>> = (0..b)
            .map(|i| vec![((1000 + 7 * i) % cfg.vocab_size) as u32])
            .collect();
        // The cache holds ctx positions (zeros: the arithmetic and bytes are the same).
        let batch: Vec<SeqStep> = (0..b)
            .map(|i| SeqStep {
                tokens: &toks[i],
                start: ctx,
                blocks: &tables[i],
                logits: LogitsMode::None,
            })
            .collect();
        let (ms, out) = time_steps(&mut shard, &comm, &batch);
        let bytes = shard.step_weight_bytes(&out.expert_tokens) as f64;
        let floor_ms = bytes / copy_bw * 1e3;
        println!(
            "| decode b={b} | {ms:.3} | {:.3} | {:.2} | {:.0} | {floor_ms:.3} | {:.2} |",
            ms / layers as f64,
            bytes / 1e9,
            bytes / (ms / 1e3) / 1e9,
            ms / floor_ms
        );
        json.push(format!(
            "\"decode_b{b}\": {{\"ms_per_layer\": {:.4}, \"weight_bytes\": {bytes}, \
             \"x_floor\": {:.3}}}",
            ms / layers as f64,
            ms / floor_ms
        ));
    }
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|i| ((i * 37 + 11) % cfg.vocab_size) as u32)
        .collect();
    let table: Vec<u32> = ((64 * per_seq) as u32..blocks as u32).collect();
    let batch = [SeqStep {
        tokens: &prompt,
        start: 0,
        blocks: &table,
        logits: LogitsMode::None,
    }];
    let (ms, _) = time_steps(&mut shard, &comm, &batch);
    // The same prefill with the large products on dequantisation + cuBLAS, as before
    // qgemm_wgmma (and as on GPUs other than Hopper).
    let baseline_ms = if shard.gpu().wgmma() {
        shard.gpu().set_wgmma(false);
        let (b, _) = time_steps(&mut shard, &comm, &batch);
        shard.gpu().set_wgmma(true);
        Some(b)
    } else {
        None
    };
    let c = shard.config().clone();
    let (d, f, qd, kvd) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.q_dim() as f64,
        c.kv_dim() as f64,
    );
    let t = prompt_len as f64;
    // Projections, top-2 expert FFNs, and causal attention (scores and values, half the
    // square on average).
    let flops_layer = t * 2.0 * (d * (qd + 2.0 * kvd) + qd * d)
        + t * c.num_experts_per_tok as f64 * 3.0 * 2.0 * d * f
        + 2.0 * 2.0 * (t * t / 2.0) * qd;
    let tflops = flops_layer * layers as f64 / (ms / 1e3) / 1e12;
    println!(
        "| prefill {prompt_len} | {ms:.3} | {:.3} | | {tflops:.0} TFLOP/s | | {:.0}% of cuBLAS bf16 \
         ({:.0}% of its figure on zeros) |",
        ms / layers as f64,
        100.0 * tflops / gemm_tflops,
        100.0 * tflops / zeros_tflops
    );
    json.push(format!(
        "\"prefill_{prompt_len}\": {{\"ms_per_layer\": {:.4}, \"tflops\": {tflops:.1}, \
         \"of_cublas\": {:.3}}}",
        ms / layers as f64,
        tflops / gemm_tflops
    ));
    if let Some(b) = baseline_ms {
        let bt = flops_layer * layers as f64 / (b / 1e3) / 1e12;
        println!(
            "| prefill {prompt_len}, dequantise + cuBLAS | {b:.3} | {:.3} | | {bt:.0} TFLOP/s | | {:.0}% \
             of cuBLAS bf16 |",
            b / layers as f64,
            100.0 * bt / gemm_tflops
        );
        println!(
            "qgemm_wgmma prefill: {:.2}x the dequantise + cuBLAS prefill",
            b / ms
        );
        json.push(format!(
            "\"prefill_{prompt_len}_dequant_cublas\": {{\"ms_per_layer\": {:.4}}}",
            b / layers as f64
        ));
    }
    if let Ok(path) = std::env::var("GROK_BENCH_JSON") {
        let body = format!("{{{}}}\n", json.join(", "));
        if let Err(e) = std::fs::write(&path, body) {
            eprintln!("writing {path}: {e}");
        }
    }
}

/// Median ms of ITERS steps after 3 warm-ups, and the last step's output.
fn time_steps(
    shard: &mut CudaShard,
    comm: &LocalComm,
    batch: &[SeqStep<'_>],
) -> (f64, grok_shared::model::ShardOutput) {
    let mut out = None;
    for _ in 0..3 {
        out = Some(shard.step(comm, batch).expect("step"));
    }
    shard.gpu().profile_report().expect("profile"); // drops the warm-ups' entries
    let mut times = Vec::with_capacity(ITERS);
    for _ in 0..ITERS {
        let t = Instant::now();
        out = Some(shard.step(comm, batch).expect("step"));
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    // GROK_CUDA_PROFILE=1: where a step's GPU time goes, and how much of the step is gaps
    // between kernels (launches, waits for the host).
    let report = shard.gpu().profile_report().expect("profile");
    if !report.is_empty() {
        let busy: f64 = report.iter().map(|r| r.2).sum::<f64>() * 1e3 / ITERS as f64;
        let mean = times.iter().sum::<f64>() / ITERS as f64;
        println!(
            "    GPU busy {busy:.3} ms of a {mean:.3} ms step (mean): {:.3} ms between kernels",
            mean - busy
        );
        for (name, n, secs) in report.into_iter().take(14) {
            println!(
                "    {name:<24} {:>6} calls {:>9.3} ms/step",
                n / ITERS as u64,
                secs * 1e3 / ITERS as f64
            );
        }
    }
    (times[ITERS / 2], out.expect("ran"))
}

/// Device-to-device copy of `n` bytes, counted as bytes read plus bytes written per second.
fn copy_bandwidth(shard: &CudaShard, n: usize) -> f64 {
    let g = shard.gpu();
    let a = g.zeros::<u8>(n).expect("alloc");
    let b = g.zeros::<u8>(n).expect("alloc");
    for _ in 0..2 {
        g.copy_dd(b.ptr(), a.ptr(), n).expect("copy");
    }
    g.sync().expect("sync");
    let t = Instant::now();
    for _ in 0..ITERS {
        g.copy_dd(b.ptr(), a.ptr(), n).expect("copy");
    }
    g.sync().expect("sync");
    2.0 * (n * ITERS) as f64 / t.elapsed().as_secs_f64()
}

/// Microseconds per 1-row product with a random int8 `[k, n]` matrix (the kernel's work does
/// not depend on the values), and the weight bytes streamed per second, in TB/s.
fn decode_matmul_alone(shard: &CudaShard, k: usize, n: usize) -> (f64, f64) {
    let g = shard.gpu();
    let dq = g.upload_q(&random_qmatrix(k, n, 1, 1)).expect("upload");
    let x = g.upload(&vec![0.5f32; k]).expect("upload");
    let out = g.alloc::<f32>(n).expect("alloc");
    let s = gpu_seconds(g, 50, || {
        g.qmatmul(x.ptr(), 1, &dq, out.ptr(), usize::MAX)
            .expect("matmul")
    });
    (s * 1e6, (k * n) as f64 / s / 1e12)
}

/// Seconds per call of `run` (launches on the GPU's stream) over `iters` calls after 3
/// warm-ups, the stream drained before and after.
fn gpu_seconds(g: &Gpu, iters: usize, run: impl Fn()) -> f64 {
    for _ in 0..3 {
        run();
    }
    g.sync().expect("sync");
    let t = Instant::now();
    for _ in 0..iters {
        run();
    }
    g.sync().expect("sync");
    t.elapsed().as_secs_f64() / iters as f64
}

/// ms of the bf16 path's `[m, k] · [k, n]` product with a random int8 matrix both ways:
/// `qgemm_wgmma` and dequantisation + cuBLAS.
fn prefill_matmul_alone(
    shard: &CudaShard,
    m: usize,
    k: usize,
    n: usize,
    groups: usize,
) -> (f64, f64) {
    let g = shard.gpu();
    let dq = g
        .upload_q(&random_qmatrix(k, n, groups, (k + n) as u64))
        .expect("upload");
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let x = g.upload(&x).expect("upload");
    let out = g.alloc::<f32>(m * n).expect("alloc");
    let wgmma = gpu_seconds(g, ITERS, || {
        g.qmatmul(x.ptr(), m, &dq, out.ptr(), 1).expect("matmul")
    });
    let cublas = gpu_seconds(g, ITERS, || {
        g.qmatmul_cublas(x.ptr(), m, &dq, out.ptr())
            .expect("matmul")
    });
    (wgmma * 1e3, cublas * 1e3)
}

/// TFLOP/s and ms of a bf16 GEMM `[m, k] x [k, n]`, on random operands or on zeros.
fn cublas_peak(shard: &CudaShard, (m, n, k): (usize, usize, usize), random: bool) -> (f64, f64) {
    let g = shard.gpu();
    let operand = |len: usize, seed: u64| {
        if !random {
            return g.zeros::<u16>(len).expect("alloc");
        }
        let mut s = seed;
        // bf16 of random sign and mantissa, magnitudes from 2^-8 to 1.
        let host: Vec<u16> = (0..len)
            .map(|_| {
                let r = grok_shared::test_support::lcg(&mut s) as u16;
                (r & 0x807f) | ((119 + (r >> 7) % 8) << 7)
            })
            .collect();
        g.upload(&host).expect("upload")
    };
    let a = operand(m * k, 1);
    let b = operand(k * n, 2);
    let c = g.zeros::<f32>(m * n).expect("alloc");
    let s = gpu_seconds(g, ITERS, || {
        g.gemm_bf16(a.ptr(), b.ptr(), c.ptr(), m, n, k)
            .expect("gemm")
    });
    (2.0 * (m * n * k) as f64 / s / 1e12, s * 1e3)
}

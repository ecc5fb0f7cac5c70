//! CPU backend benchmark: prefill and decode tokens/s on the `tiny` preset and on a larger
//! random model whose weights do not fit in cache, with decode expressed as achieved weight
//! bandwidth against a memory-copy bandwidth measured in the same run, and the int8 prefill
//! matmul against the `gemm` crate's own f32 throughput on the same shapes.
//!
//! `cargo bench -p grok-shared --bench cpu_backend` (set `GROK_BENCH_QUICK=1` for a short run;
//! `GROK_BENCH_ONLY=head` runs only the f32 head at decode batch sizes).

use grok_shared::checkpoint::{init, open_model};
use grok_shared::config::{ffn_width, ModelConfig};
use grok_shared::cpu::matmul::{matmul_bt, matmul_f32, qmatmul};
use grok_shared::cpu::CpuModel;
use grok_shared::model::{LogitsMode, ModelWeights, SeqKv};
use rayon::prelude::*;
use std::time::Instant;

fn quick() -> bool {
    std::env::var_os("GROK_BENCH_QUICK").is_some()
}

/// Best of `reps` timings of `f`, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Resident set size of this process, from /proc (Linux); 0 where unavailable.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Memory bandwidth with all threads, bytes/s: copy (read + written, STREAM's convention)
/// and read-only (a sum over the buffer).
#[derive(Clone, Copy)]
struct Memory {
    copy: f64,
    read: f64,
}

/// `bw` as shares of both baselines.
fn share(bw: f64, mem: Memory) -> String {
    format!(
        "{:.0}% of copy (read + write), {:.0}% of read-only",
        100.0 * bw / mem.copy,
        100.0 * bw / mem.read
    )
}

fn memory_bandwidth() -> Memory {
    let bytes = 512usize << 20;
    let threads = rayon::current_num_threads();
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let chunk = bytes / threads;
    let copy = best_of(5, || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    let read = best_of(5, || {
        let s: u64 = src
            .par_chunks(chunk)
            .map(|c| {
                // u64 lanes so the sum is a pure stream of loads.
                c.chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
                    .fold(0u64, u64::wrapping_add)
            })
            .sum();
        std::hint::black_box(s);
    });
    std::hint::black_box(&dst);
    Memory {
        copy: 2.0 * bytes as f64 / copy,
        read: bytes as f64 / read,
    }
}

/// Weight bytes one decode token reads: every attention matrix, the router, norms, the two
/// (top-k) experts of each layer, one embedding row and the whole tied f32 head.
fn decode_weight_bytes(w: &ModelWeights) -> f64 {
    let c = &w.config;
    let mut b = 0usize;
    for l in &w.layers {
        b += [&l.wq, &l.wk, &l.wv, &l.wo]
            .iter()
            .map(|m| m.stored_bytes())
            .sum::<usize>();
        b += (l.router.len() + 4 * c.hidden_size) * 4;
        let e = &l.experts[0];
        b += c.num_experts_per_tok
            * (e.w_gate.stored_bytes() + e.w_up.stored_bytes() + e.w_down.stored_bytes());
    }
    b += w.embeddings.len() * 4 + (c.hidden_size + w.final_norm.len()) * 4;
    b as f64
}

fn bench_model(name: &str, cfg: &ModelConfig, mem: Memory, prompt_len: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let t = Instant::now();
    init::init_random(cfg, 1, dir.path(), &mut |_| {}).expect("init");
    let init_s = t.elapsed().as_secs_f64();
    let rss0 = rss_bytes();
    let m = open_model(dir.path()).expect("open");
    let weights = ModelWeights::load(m.source.as_ref(), &m.config).expect("load");
    let stored = weights.stored_bytes();
    let model = CpuModel::new(weights).expect("model");
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 7919 + 13) % cfg.vocab_size as u32)
        .collect();

    // Prefill: the whole prompt in one forward.
    let reps = if quick() { 2 } else { 4 };
    let prefill = best_of(reps, || {
        let mut cache = SeqKv::new(&model);
        let out = cache
            .step(&model, &prompt, LogitsMode::Last)
            .expect("forward");
        std::hint::black_box(out);
    });

    // Decode at batch 1 after a 16-token prompt.
    let steps = if quick() { 8 } else { 32 };
    let mut cache = SeqKv::new(&model);
    cache
        .step(&model, &prompt[..16], LogitsMode::Last)
        .expect("prefill");
    let mut tok = 42u32;
    let t = Instant::now();
    for _ in 0..steps {
        let out = cache
            .step(&model, &[tok], LogitsMode::Last)
            .expect("decode");
        tok = grok_shared::sampling::argmax(&out).unwrap_or(0) as u32;
    }
    let per_token = t.elapsed().as_secs_f64() / steps as f64;
    let bytes = decode_weight_bytes(model.weights());
    let bw = bytes / per_token;
    let rss = rss_bytes().saturating_sub(rss0);
    println!(
        "{name}: weights {:.1} MB stored (init {:.1} s)\n  prefill {prompt_len} tokens: {:.1} ms, {:.0} tokens/s\n  decode batch 1: {:.2} ms/token, {:.1} tokens/s; reads {:.1} MB/token = {:.2} GB/s = {}\n  resident after decode: {:.1} MB (stored weights {:.1} MB + KV cache {:.2} MB = {:.1} MB; ratio {:.3})",
        stored as f64 / 1e6,
        init_s,
        prefill * 1e3,
        prompt_len as f64 / prefill,
        per_token * 1e3,
        1.0 / per_token,
        bytes / 1e6,
        bw / 1e9,
        share(bw, mem),
        rss as f64 / 1e6,
        stored as f64 / 1e6,
        // The pool spans the whole context, but only the filled positions' pages are touched.
        cache.used_bytes() as f64 / 1e6,
        (stored + cache.used_bytes()) as f64 / 1e6,
        rss as f64 / (stored + cache.used_bytes()) as f64,
    );
}

/// The int8 matmul (tile dequantisation + gemm) against gemm on the same shapes in f32.
fn bench_prefill_matmul(m: usize, k: usize, n: usize, groups: usize) {
    let mut seed = 1u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let q = grok_shared::model::QMatrix {
        k,
        n,
        group_rows: k / groups,
        weight: grok_shared::bytes::ByteView::from_vec((0..k * n).map(|_| next() as u8).collect()),
        scales: (0..groups * n)
            .map(|_| 1e-3 + (next() % 100) as f32 * 1e-5)
            .collect(),
    };
    let dense = q.dequantize();
    let x: Vec<f32> = (0..m * k)
        .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let mut out = vec![0f32; m * n];
    let reps = if quick() { 2 } else { 5 };
    let ours = best_of(reps, || qmatmul(&x, m, &q, &mut out));
    let base = best_of(reps, || matmul_f32(&x, m, k, &dense, n, &mut out));
    let flops = 2.0 * (m * k * n) as f64;
    println!(
        "  [{m} x {k}] x [{k} x {n}]: int8 {:.1} GFLOP/s, gemm f32 {:.1} GFLOP/s: ratio {:.2}",
        flops / ours / 1e9,
        flops / base / 1e9,
        base / ours
    );
}

/// Batch-1 products, as weight bytes read per second: the int8 stream kernel and the f32 head.
fn bench_decode_matmul(k: usize, n: usize, groups: usize, mem: Memory) {
    let q = grok_shared::model::QMatrix {
        k,
        n,
        group_rows: k / groups,
        weight: grok_shared::bytes::ByteView::from_vec(
            (0..k * n).map(|i| (i * 31 % 251) as u8).collect(),
        ),
        scales: vec![1e-3; groups * n],
    };
    let x = vec![0.5f32; k];
    let mut out = vec![0f32; n];
    let t = best_of(20, || qmatmul(&x, 1, &q, &mut out));
    let bw = q.stored_bytes() as f64 / t;
    println!(
        "  int8 [1 x {k}] x [{k} x {n}]: {:.0} us, {:.2} GB/s = {}",
        t * 1e6,
        bw / 1e9,
        share(bw, mem)
    );
    let head = vec![0.25f32; n * k];
    let t = best_of(20, || matmul_bt(&x, 1, k, &head, n, &mut out));
    let bw = (n * k * 4) as f64 / t;
    println!(
        "  f32 head [1 x {k}] x [{n} x {k}]^T: {:.0} us, {:.2} GB/s = {}",
        t * 1e6,
        bw / 1e9,
        share(bw, mem)
    );
}

/// The tied f32 head (`matmul_bt`, tiny preset shape) at decode batch sizes: the time per
/// batch against batch 1, i.e. how much a batched decode step pays for its head. The sizes
/// take turns within each repetition, so a change in load (other processes, memory traffic)
/// affects them all alike.
fn bench_head_batches(k: usize, n: usize) {
    const BATCHES: [usize; 4] = [1, 4, 8, 16];
    let head: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let xs: Vec<Vec<f32>> = BATCHES
        .iter()
        .map(|&m| {
            (0..m * k)
                .map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0)
                .collect()
        })
        .collect();
    let mut out = vec![0f32; BATCHES[BATCHES.len() - 1] * n];
    let reps = if quick() { 5 } else { 20 };
    let mut best = [f64::INFINITY; BATCHES.len()];
    for _ in 0..reps {
        for (i, (&m, x)) in BATCHES.iter().zip(&xs).enumerate() {
            let o = &mut out[..m * n];
            best[i] = best[i].min(best_of(1, || matmul_bt(x, m, k, &head, n, o)));
        }
    }
    println!("f32 head [m x {k}] x [{n} x {k}]^T (best of {reps}):");
    for (i, &m) in BATCHES.iter().enumerate() {
        println!(
            "  m = {m:2}: {:6.2} ms = {:.2}x batch 1 ({:.2} ms per row)",
            best[i] * 1e3,
            best[i] / best[0],
            best[i] * 1e3 / m as f64,
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let tiny = ModelConfig::tiny();
    if std::env::var("GROK_BENCH_ONLY").as_deref() == Ok("head") {
        bench_head_batches(tiny.hidden_size, tiny.vocab_size);
        return;
    }
    let threads = rayon::current_num_threads();
    let mem = memory_bandwidth();
    println!(
        "memory ({threads} threads): copy {:.2} GB/s (read + write), read-only {:.2} GB/s",
        mem.copy / 1e9,
        mem.read / 1e9
    );

    println!("decode products (batch 1):");
    bench_decode_matmul(2048, 10928, 1, mem);
    bench_decode_matmul(10928, 2048, 8, mem);

    bench_model("tiny preset", &tiny, mem, 128);
    bench_head_batches(tiny.hidden_size, tiny.vocab_size);

    let d = 2048;
    let large = ModelConfig {
        vocab_size: 32768,
        hidden_size: d,
        head_dim: 128,
        num_attention_heads: 16,
        num_key_value_heads: 8,
        num_hidden_layers: if quick() { 2 } else { 4 },
        widening_factor: 8.0,
        intermediate_size: ffn_width(d, 8.0),
        attn_output_multiplier: 1.0 / (128f32).sqrt(),
        embedding_multiplier_scale: (d as f32).sqrt(),
        ..ModelConfig::grok1()
    };
    bench_model(
        "large random (d 2048, f 10928, 8 experts)",
        &large,
        mem,
        128,
    );

    println!("prefill matmul, int8 weights vs the gemm crate in f32 on the same shapes:");
    let f = large.intermediate_size;
    bench_prefill_matmul(256, d, f, 1);
    bench_prefill_matmul(256, f, d, 8);
    bench_prefill_matmul(256, d, large.q_dim(), 1);
}

//! The CUDA kernels at shapes the tiny fixture does not reach: the tiled int8 decode matmul
//! (several column tiles, a narrow last tile, K split over many blocks, scale groups) against
//! an f64 reference and across batch sizes, and long prompts (many key tiles, key splits,
//! Grok-1's head size) through the GPU shard against the CPU engine. Needs a GPU:
//! `cargo test -p grok-shared --test cuda_kernels -- --ignored`. Some of them also run on the
//! emulated device (cuda_emulated.rs), with shorter prompts there.

use grok_shared::checkpoint::init::init_random;
use grok_shared::checkpoint::{open_model, ModelDir};
use grok_shared::comm::local::LocalComm;
use grok_shared::config::ModelConfig;
use grok_shared::cpu::CpuModel;
use grok_shared::cuda::device::{Arg, DevQ, Gpu};
use grok_shared::cuda::CudaShard;
use grok_shared::mismatch;
use grok_shared::model::{LogitsMode, ModelWeights, RankBackend, SeqKv, SeqStep};
use grok_shared::parallel::Plan;
use grok_shared::test_support::{
    lcg, max_abs_diff, on_emulated_device, qmatmul_reference, random_qmatrix, worst,
};
use std::time::Duration;

fn run(g: &Gpu, dq: &DevQ, x: &[f32], m: usize, min_rows: usize) -> Vec<f32> {
    let xd = g.upload(x).unwrap();
    let out = g.alloc::<f32>(m * dq.n).unwrap();
    g.qmatmul(xd.ptr(), m, dq, out.ptr(), min_rows).unwrap();
    g.download_f32(out.ptr(), m * dq.n).unwrap()
}

/// Largest |got - want| over the largest |want| (infinite where got is not a number).
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |a, w| a.max(w.abs()));
    worst(got.iter().zip(want).map(|(&g, w)| (g as f64 - w).abs())) / scale
}

/// For a failure message: where `got` (`[rows, cols]`) is off `want` by more than `rel` of
/// the largest |want| (these kernels first run on GPUs that sessions rarely reach).
fn where_off(got: &[f32], want: &[f64], rows: usize, cols: usize, rel: f64) -> String {
    let scale = want.iter().fold(0f64, |a, w| a.max(w.abs()));
    let want: Vec<f32> = want.iter().map(|&w| w as f32).collect();
    mismatch::describe(got, &want, rows, cols, (rel * scale) as f32).unwrap_or_default()
}

#[test]
#[ignore = "needs a GPU"]
fn tiled_decode_matmul_matches_the_reference_and_does_not_depend_on_the_batch() {
    let g = Gpu::open(0).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    let mut unit = move || (lcg(&mut seed) % 2000) as f32 / 1000.0 - 1.0;
    // (k, n, scale groups): Grok-1-like split over many blocks; a last tile 16 wide and a K
    // that is no multiple of 8; one tile narrower than 512.
    for (k, n, groups) in [
        (4096, 2560, 8),
        (1000, 1040, 1),
        (6144, 1024, 1),
        (96, 272, 3),
    ] {
        let q = random_qmatrix(k, n, groups, (k * n) as u64);
        let dq = g.upload_q(&q).unwrap();
        assert!(dq.tiled, "{k}x{n} should take the tiled layout");
        let m_max = 9;
        let x: Vec<f32> = (0..m_max * k).map(|_| unit()).collect();
        let want = qmatmul_reference(&x, m_max, &q);
        let full = run(&g, &dq, &x, m_max, usize::MAX);
        let err = rel_err(&full, &want);
        println!("tiled int8 {k}x{n} (G={groups}): relative error {err:.2e}");
        assert!(
            err < 1e-5,
            "{k}x{n}: relative error {err}: {}",
            where_off(&full, &want, m_max, n, 1e-5)
        );
        // Every batch size gives each row the same bits.
        for m in 1..m_max {
            let part = run(&g, &dq, &x[..m * k], m, usize::MAX);
            assert!(
                part.iter()
                    .zip(&full)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{k}x{n}: a batch of {m} changed a row's result"
            );
        }
        // Same numbers through the row-major kernel and through bf16 cuBLAS.
        let flat = DevQ {
            k,
            n,
            gr: q.group_rows,
            tiled: false,
            w: g.upload(q.weight_i8()).unwrap(),
            s: g.upload(&q.scales).unwrap(),
        };
        let err = rel_err(&run(&g, &flat, &x, m_max, usize::MAX), &want);
        assert!(err < 1e-5, "{k}x{n} row-major: relative error {err}");
        let bf16 = run(&g, &dq, &x, m_max, 1);
        let err = rel_err(&bf16, &want);
        println!("bf16 path (9 rows) from the tiled layout {k}x{n}: relative error {err:.2e}");
        assert!(
            err < 2e-2,
            "{k}x{n} bf16: relative error {err}: {}",
            where_off(&bf16, &want, m_max, n, 2e-2)
        );
    }
}

#[test]
#[ignore = "needs a GPU"]
fn a_split_product_gives_each_part_its_columns() {
    let g = Gpu::open(0).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1d;
    let mut unit = move || (lcg(&mut seed) % 2000) as f32 / 1000.0 - 1.0;
    // q, k and v side by side: two whole tiles and a narrow last part.
    let (k, widths) = (1024, [1024, 512, 272]);
    let n: usize = widths.iter().sum();
    let q = random_qmatrix(k, n, 1, 5);
    let dq = g.upload_q(&q).unwrap();
    // 1 and 5 rows on the int8 path; 9 and 200 on the bf16 path (200: qgemm_wgmma on Hopper).
    for (m, min_rows, tol) in [
        (1, usize::MAX, 1e-5),
        (5, usize::MAX, 1e-5),
        (9, 1, 2e-2),
        (200, 1, 2e-2),
    ] {
        let x: Vec<f32> = (0..m * k).map(|_| unit()).collect();
        let want = qmatmul_reference(&x, m, &q);
        let xd = g.upload(&x).unwrap();
        let outs: Vec<_> = widths
            .iter()
            .map(|&w| g.alloc::<f32>(m * w).unwrap())
            .collect();
        g.qmatmul_split(
            xd.ptr(),
            m,
            &dq,
            widths,
            [outs[0].ptr(), outs[1].ptr(), outs[2].ptr()],
            min_rows,
        )
        .unwrap();
        let mut col = 0;
        for (out, &w) in outs.iter().zip(&widths) {
            let got = g.download_f32(out.ptr(), m * w).unwrap();
            let part: Vec<f64> = (0..m)
                .flat_map(|r| want[r * n + col..r * n + col + w].to_vec())
                .collect();
            let err = rel_err(&got, &part);
            assert!(
                err < tol,
                "rows {m}, columns {col}..{}: error {err}",
                col + w
            );
            col += w;
        }
    }
    // Checked before anything runs (no rows here, so nothing would).
    let ok = g.qmatmul_split(0, 0, &dq, [512, 512, n - 1024], [0; 3], usize::MAX);
    assert!(ok.is_ok(), "tile-aligned splits are fine");
    let err = g.qmatmul_split(0, 0, &dq, [1000, 536, 272], [0; 3], usize::MAX);
    assert!(err.is_err(), "a split inside a tile is refused");
    let err = g.qmatmul_split(0, 0, &dq, [1024, 512, 100], [0; 3], usize::MAX);
    assert!(err.is_err(), "widths that do not add up are refused");
}

/// Largest |got - want| over the largest |want| (logits against the CPU engine's; infinite
/// where got is not a number).
fn rel_diff(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f32, |a, w| a.max(w.abs())) as f64;
    max_abs_diff(got, want) as f64 / scale
}

/// The tiny preset with two layers, these attention heads and this vocabulary.
fn two_layers(head_dim: usize, heads: usize, kv_heads: usize, vocab: usize) -> ModelConfig {
    let mut cfg = ModelConfig::tiny();
    cfg.head_dim = head_dim;
    cfg.num_attention_heads = heads;
    cfg.num_key_value_heads = kv_heads;
    cfg.num_hidden_layers = 2;
    cfg.vocab_size = vocab;
    cfg
}

/// Random weights for `cfg` (the `grok init` generator) in a temporary directory, opened; the
/// directory lives as long as the returned guard.
fn random_model(cfg: &ModelConfig, seed: u64) -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model");
    init_random(cfg, seed, &path, &mut |_| {}).unwrap();
    let model = open_model(&path).unwrap();
    (dir, model)
}

/// A random Grok-shaped model with `head_dim` (and FFN width `ffn`) and its GPU shard's
/// logits for every position of long prompts (one of them continued by a second chunk),
/// then for a decode step of both, against the CPU engine's. The decode step runs with the
/// router's picks on the device and through the host, and must give the same bits.
fn long_prompts_match_the_cpu(head_dim: usize, heads: usize, kv_heads: usize, ffn: usize) {
    let mut cfg = two_layers(head_dim, heads, kv_heads, 4096);
    cfg.intermediate_size = ffn;
    let (_dir, model) = random_model(&cfg, 7);
    let load = || ModelWeights::load(model.source.as_ref(), &model.config).unwrap();
    let cpu = CpuModel::new(load()).unwrap();
    let plan = Plan::new(&model.config, 1, 1, 1).unwrap();
    let comm = LocalComm::group(1, Duration::from_secs(60)).remove(0);
    let (la, lb, split) = if on_emulated_device() {
        (150, 70, 100)
    } else {
        (700, 300, 400)
    };
    let a: Vec<u32> = (0..la).map(|i| (i * 37 + 11) % 4096).collect();
    let b: Vec<u32> = (0..lb).map(|i| (i * 101 + 5) % 4096).collect();
    let (next_a, next_b) = ([17u32], [4000u32]);
    let (ta, tb): (Vec<u32>, Vec<u32>) = ((0..64).collect(), (64..128).collect());
    let (a1, a2) = a.split_at(split);
    // Step 1: all of b and the first tokens of a; step 2: the rest of a; step 3: one token
    // of each.
    let seq = |tokens, start, blocks, logits| SeqStep {
        tokens,
        start,
        blocks,
        logits,
    };
    let steps: Vec<Vec<SeqStep>> = vec![
        vec![
            seq(a1, 0, &ta, LogitsMode::All),
            seq(&b, 0, &tb, LogitsMode::All),
        ],
        vec![seq(a2, split, &ta, LogitsMode::All)],
        vec![
            seq(&next_a, la as usize, &ta, LogitsMode::Last),
            seq(&next_b, lb as usize, &tb, LogitsMode::Last),
        ],
    ];
    let run = |device_routing: bool| -> Vec<Vec<Vec<f32>>> {
        let mut shard = CudaShard::new(load(), plan, 0, 0, 256, 16).unwrap();
        shard.gemm_min_rows = usize::MAX;
        shard.device_routing = device_routing;
        steps
            .iter()
            .map(|st| shard.step(&comm, st).unwrap().logits.unwrap())
            .collect()
    };
    let got = run(true);
    let mut kva = SeqKv::new(&cpu);
    let mut kvb = SeqKv::new(&cpu);
    let want = [
        (
            &got[0][0],
            kva.step(&cpu, a1, LogitsMode::All).unwrap(),
            "prompt a, first chunk",
        ),
        (
            &got[0][1],
            kvb.step(&cpu, &b, LogitsMode::All).unwrap(),
            "prompt b",
        ),
        (
            &got[1][0],
            kva.step(&cpu, a2, LogitsMode::All).unwrap(),
            "prompt a, second chunk",
        ),
        (
            &got[2][0],
            kva.step(&cpu, &next_a, LogitsMode::Last).unwrap(),
            "decode a",
        ),
        (
            &got[2][1],
            kvb.step(&cpu, &next_b, LogitsMode::Last).unwrap(),
            "decode b",
        ),
    ];
    let mut worst = 0f64;
    for (got, want, what) in want {
        assert_eq!(got.len(), want.len(), "{what}");
        let err = rel_diff(got, &want);
        worst = worst.max(err);
        assert!(
            err < 1e-4,
            "head_dim {head_dim}, {what}: relative error {err}"
        );
    }
    println!("head_dim {head_dim}: long prompts within {worst:.2e} (relative) of the CPU engine");
    let host = run(false);
    let same = |x: &[f32], y: &[f32]| {
        x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
    };
    assert_eq!(got[2].len(), host[2].len(), "decode rows");
    for (i, (d, h)) in got[2].iter().zip(&host[2]).enumerate() {
        assert!(
            same(d, h),
            "decode row {i}: device routing changed the logits"
        );
    }
}

#[test]
#[ignore = "needs a GPU"]
fn long_prompts_at_grok_head_size_match_the_cpu_engine() {
    long_prompts_match_the_cpu(128, 6, 1, 512);
}

#[test]
#[ignore = "needs a GPU"]
fn long_prompts_with_fused_qkv_match_the_cpu_engine() {
    // q 1024 and k, v 512 wide: one launch for the three projections.
    long_prompts_match_the_cpu(128, 8, 4, 512);
}

#[test]
#[ignore = "needs a GPU"]
fn long_prompts_at_the_tiny_head_size_match_the_cpu_engine() {
    long_prompts_match_the_cpu(32, 8, 4, ModelConfig::tiny().intermediate_size);
}

/// One step of sequences `seqs` (indexes into `blocks`), each with its new tokens from its
/// start, every position's logits.
fn seq_steps<'a>(
    seqs: &[usize],
    tokens: &'a [Vec<u32>],
    starts: &[usize],
    blocks: &'a [Vec<u32>],
) -> Vec<SeqStep<'a>> {
    seqs.iter()
        .zip(tokens)
        .zip(starts)
        .map(|((&s, t), &start)| SeqStep {
            tokens: t,
            start,
            blocks: &blocks[s],
            logits: LogitsMode::All,
        })
        .collect()
}

/// Decode steps (the `attention_decode_*` kernels) against the CPU engine: five sequences of
/// 1 to 1100 tokens prefilled, then steps of one token each (key splits, some of them past a
/// short sequence's end), of two tokens each (tiles of 2 × group rows, the 16-row kernel when
/// that is over 8), and of the longest sequence alone (the most splits). Then the same steps
/// with the router's picks brought to the host: the same bits.
fn decode_steps_match_the_cpu(head_dim: usize, heads: usize, kv_heads: usize) {
    let mut cfg = two_layers(head_dim, heads, kv_heads, 512);
    cfg.intermediate_size = 512; // tiled experts: device routing applies
    let (_dir, model) = random_model(&cfg, 11);
    let load = || ModelWeights::load(model.source.as_ref(), &model.config).unwrap();
    let cpu = CpuModel::new(load()).unwrap();
    let plan = Plan::new(&model.config, 1, 1, 1).unwrap();
    let comm = LocalComm::group(1, Duration::from_secs(60)).remove(0);
    let (block, per_seq) = (16usize, 80u32); // 80 blocks of 16: 1280 positions each
    let new_shard = || {
        let mut shard = CudaShard::new(load(), plan, 0, 0, 5 * per_seq as usize, block).unwrap();
        shard.gemm_min_rows = usize::MAX;
        shard
    };
    // Routing as GROK_CUDA_DEVICE_ROUTING leaves it: the device check runs this test again
    // with it off when it fails, to tell the routed experts from the rest.
    let mut shard = new_shard();
    let device_routed = shard.device_routing;
    assert_eq!(
        shard.device_routes(5),
        device_routed,
        "the 5-token steps keep the picks on the device unless that is switched off"
    );
    let lens = if on_emulated_device() {
        [1usize, 7, 40, 70, 130]
    } else {
        [1usize, 7, 40, 300, 1100]
    };
    let blocks: Vec<Vec<u32>> = (0..5u32)
        .map(|s| (s * per_seq..(s + 1) * per_seq).collect())
        .collect();
    let mut kvs: Vec<SeqKv> = lens.iter().map(|_| SeqKv::new(&cpu)).collect();
    let mut pos = [0usize; 5];
    let mut seed = 5u64;
    let mut worst = 0f64;
    // (sequences in the step, tokens each)
    let steps: [(&[usize], usize); 6] = [
        (&[0, 1, 2, 3, 4], 0), // the prompts
        (&[0, 1, 2, 3, 4], 1),
        (&[0, 1, 2, 3, 4], 1),
        (&[0, 1, 2, 3, 4], 2),
        (&[4], 1),
        (&[2, 4], 1),
    ];
    let mut ran = Vec::new(); // (step, its tokens, their starts, the logits)
    for (i, &(seqs, n)) in steps.iter().enumerate() {
        let tokens: Vec<Vec<u32>> = seqs
            .iter()
            .map(|&s| {
                let len = if n == 0 { lens[s] } else { n };
                (0..len).map(|_| (lcg(&mut seed) % 512) as u32).collect()
            })
            .collect();
        let starts: Vec<usize> = seqs.iter().map(|&s| pos[s]).collect();
        let batch = seq_steps(seqs, &tokens, &starts, &blocks);
        let got = shard.step(&comm, &batch).unwrap().logits.unwrap();
        for ((&s, t), got) in seqs.iter().zip(&tokens).zip(&got) {
            let want = kvs[s].step(&cpu, t, LogitsMode::All).unwrap();
            assert_eq!(got.len(), want.len());
            let err = rel_diff(got, &want);
            worst = worst.max(err);
            assert!(
                err < 1e-4,
                "head_dim {head_dim}, group {}: step {i}, sequence {s}: relative error {err}",
                heads / kv_heads
            );
            pos[s] += t.len();
        }
        ran.push((i, tokens, starts, got));
    }
    // The router's picks on the device (steps of up to 8 tokens, 5 here: an expert may get
    // more than the decode kernel's 4 rows) give the bits of the host's grouping.
    if device_routed {
        let mut host = new_shard();
        host.device_routing = false;
        for (i, tokens, starts, got) in &ran {
            let (seqs, _) = steps[*i];
            let batch = seq_steps(seqs, tokens, starts, &blocks);
            let want = host.step(&comm, &batch).unwrap().logits.unwrap();
            let bits =
                |v: &[Vec<f32>]| -> Vec<u32> { v.iter().flatten().map(|x| x.to_bits()).collect() };
            let same = bits(got) == bits(&want);
            assert!(same, "step {i}: device routing changed the logits");
        }
    }
    println!(
        "decode head_dim {head_dim}, group {}: within {worst:.2e} (relative) of the CPU engine; \
         device routing {}",
        heads / kv_heads,
        if device_routed {
            "on, the same bits as the host's"
        } else {
            "switched off"
        }
    );
}

#[test]
#[ignore = "needs a GPU"]
fn decode_steps_at_grok_head_size_match_the_cpu_engine() {
    decode_steps_match_the_cpu(128, 12, 2); // group 6: two tokens are a 12-row tile
}

#[test]
#[ignore = "needs a GPU"]
fn decode_steps_at_small_head_sizes_match_the_cpu_engine() {
    decode_steps_match_the_cpu(16, 16, 2); // group 8: 8 keys per warp-wide load
    decode_steps_match_the_cpu(32, 4, 1); // group 4
    decode_steps_match_the_cpu(64, 8, 8); // group 1
}

/// The tensor-core prefill attention (the bf16 path) against the f32 one on the same inputs:
/// a 700-token prompt in 64-row tiles, paged slots in random order, with and without key
/// splits, at Grok-1's heads (group 6) and at head size 64 (group 1).
#[test]
#[ignore = "needs a GPU"]
fn tensor_core_prefill_attention_is_within_bf16_of_the_f32_kernel() {
    let g = Gpu::open(0).unwrap();
    if !g.bf16_tensor_cores() {
        println!(
            "{}: no bf16 tensor cores; attention_tc does not run here",
            g.name
        );
        return;
    }
    let mut seed = 9u64;
    let uni = |n: usize, seed: &mut u64| -> Vec<f32> {
        (0..n)
            .map(|_| (lcg(seed) % 20001) as f32 / 10000.0 - 1.0)
            .collect()
    };
    // On the emulated device, a 200-token prompt and a quarter of the heads (still group 6).
    let (n, quarter) = if on_emulated_device() {
        (200, 4)
    } else {
        (700usize, 1)
    };
    for (hd, heads, kvh) in [(128usize, 48 / quarter, 8 / quarter), (64, 8, 8)] {
        let group = heads / kvh;
        let (qd, kvd) = (heads * hd, kvh * hd);
        let per_tile = (64 / group).max(1);
        let q = g.upload(&uni(n * qd, &mut seed)).unwrap();
        let kc = g.upload(&uni(n * kvd, &mut seed)).unwrap();
        let vc = g.upload(&uni(n * kvd, &mut seed)).unwrap();
        let mut perm: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            perm.swap(i, (lcg(&mut seed) % (i as u64 + 1)) as usize);
        }
        let slots = g.upload(&perm).unwrap();
        let tiles: Vec<i32> = (0..n)
            .step_by(per_tile)
            .flat_map(|t| [t as i32, per_tile.min(n - t) as i32, t as i32, 0])
            .collect();
        let num_tiles = tiles.len() / 4;
        let tiles = g.upload(&tiles).unwrap();
        for splits in [1usize, 3] {
            let run = |kernel: &str, smem: usize| -> Vec<f32> {
                let out = g.alloc::<f32>(n * qd).unwrap();
                let parts = splits * num_tiles * kvh * 64;
                let part_o = g.alloc::<f32>(parts * hd).unwrap();
                let part_ml = g.alloc::<f32>(parts * 2).unwrap();
                let args = [
                    Arg::P(q.ptr()),
                    Arg::P(kc.ptr()),
                    Arg::P(vc.ptr()),
                    Arg::P(out.ptr()),
                    Arg::P(tiles.ptr()),
                    Arg::P(slots.ptr()),
                    Arg::I(heads as i32),
                    Arg::I(kvh as i32),
                    Arg::I(hd as i32),
                    Arg::F(0.3),
                    Arg::F(2.0),
                    Arg::I(splits as i32),
                    Arg::P(part_o.ptr()),
                    Arg::P(part_ml.ptr()),
                ];
                let grid = (num_tiles as u32, (kvh * splits) as u32);
                g.launch(kernel, grid, (128, 1), smem as u32, &args)
                    .unwrap();
                if splits > 1 {
                    let combine = [
                        Arg::P(part_o.ptr()),
                        Arg::P(part_ml.ptr()),
                        Arg::P(out.ptr()),
                        Arg::P(tiles.ptr()),
                        Arg::I(heads as i32),
                        Arg::I(kvh as i32),
                        Arg::I(hd as i32),
                        Arg::I(splits as i32),
                        Arg::I(64),
                    ];
                    let grid = (num_tiles as u32, kvh as u32, 64);
                    g.launch3("attention_combine", grid, (128, 1), 0, &combine)
                        .unwrap();
                }
                g.download_f32(out.ptr(), n * qd).unwrap()
            };
            let exact = run(
                &format!("attention_prefill_{hd}"),
                Gpu::prefill_smem_bytes(hd),
            );
            let tc = run(&format!("attention_tc_{hd}"), 0);
            let worst = max_abs_diff(&exact, &tc);
            println!(
                "attention_tc_{hd}: group {group}, {splits} split(s): within {worst:.2e} of the \
                 f32 kernel"
            );
            assert!(
                worst < 1.5e-2,
                "attention_tc_{hd}, {splits} splits: {worst}: [token, head * {hd} + dim] {}",
                mismatch::describe(&tc, &exact, n, qd, 1.5e-2).unwrap_or_default()
            );
        }
    }
}

/// The tensor-core int8 matmul (`qmma_*`, the bf16 path up to 64 rows) gives the numbers of
/// dequantisation + cuBLAS: the same bf16 operands, only the order of the f32 sums differs.
#[test]
#[ignore = "needs a GPU"]
fn tensor_core_int8_matmul_matches_dequantised_cublas() {
    let g = Gpu::open(0).unwrap();
    if !g.bf16_tensor_cores() {
        println!("{}: no bf16 tensor cores; qmma does not run here", g.name);
        return;
    }
    // Grok-1's expert shapes (G = 8 where the release has it), a narrow last tile. On the
    // emulated device, smaller matrices with the same features (several tiles, 8 scale groups).
    let rows = &[9usize, 20, 64][..];
    let shapes: &[(usize, usize, usize, &[usize])] = if on_emulated_device() {
        &[
            (1024, 2560, 1, &[9, 64]),
            (4096, 1024, 8, &[20]),
            (256, 1040, 2, rows),
        ]
    } else {
        &[
            (6144, 32768, 1, rows),
            (32768, 6144, 8, rows),
            (256, 1040, 2, rows),
        ]
    };
    bf16_path_matches_cublas(&g, "qmma", shapes, 77);
}

/// For each (k, n, scale groups, row counts): `Gpu::qmatmul` on the bf16 path against
/// dequantisation + cuBLAS, within 1e-4 of the largest output (the same bf16 operands, sums
/// in another order).
fn bf16_path_matches_cublas(
    g: &Gpu,
    kernel: &str,
    shapes: &[(usize, usize, usize, &[usize])],
    mut seed: u64,
) {
    for &(k, n, groups, rows) in shapes {
        let q = random_qmatrix(k, n, groups, (k * 3 + n) as u64);
        let dq = g.upload_q(&q).unwrap();
        for &m in rows {
            let x: Vec<f32> = (0..m * k)
                .map(|_| (lcg(&mut seed) % 2000) as f32 / 1000.0 - 1.0)
                .collect();
            let got = run(g, &dq, &x, m, 1);
            let xd = g.upload(&x).unwrap();
            let out = g.alloc::<f32>(m * n).unwrap();
            g.qmatmul_cublas(xd.ptr(), m, &dq, out.ptr()).unwrap();
            let cublas = g.download_f32(out.ptr(), m * n).unwrap();
            let want: Vec<f64> = cublas.iter().map(|&v| v as f64).collect();
            let err = rel_err(&got, &want);
            println!("{kernel} {m} rows, {k}x{n} (G={groups}): within {err:.2e} of cuBLAS");
            assert!(
                err < 1e-4,
                "{kernel} {m} rows, {k}x{n}: relative error {err}: {}",
                where_off(&got, &want, m, n, 1e-4)
            );
        }
    }
}

/// Whether `qgemm_wgmma` runs on `g`: no on a GPU before Hopper (a skip); a failure where its
/// start-up check switched it off.
fn wgmma_runs(g: &Gpu) -> bool {
    assert!(g.wgmma_fault().is_none(), "{:?}", g.wgmma_fault());
    if !g.wgmma() {
        println!("{}: qgemm_wgmma does not run here (Hopper only)", g.name);
    }
    g.wgmma()
}

/// The prefill's int8 matmul on Hopper (`qgemm_wgmma`, the bf16 path past 64 rows) gives the
/// numbers of dequantisation + cuBLAS: the same bf16 operands, only the order of the f32 sums
/// differs. Grok-1's shapes at an expert's share of a prefill and at a whole prompt (K split
/// over blocks for the down projection), every token tile (80 to 128) with partial ones,
/// narrow column tiles, scale groups.
#[test]
#[ignore = "needs a GPU"]
fn wgmma_int8_matmul_matches_dequantised_cublas() {
    let g = Gpu::open(0).unwrap();
    if !wgmma_runs(&g) {
        return;
    }
    // On the emulated device, smaller matrices with the same features (several weight tiles,
    // every token tile, a K split with 8 scale groups); no 2048-token prompt.
    let shapes: &[(usize, usize, usize, &[usize])] = if on_emulated_device() {
        &[
            (1024, 2048, 1, &[65, 256]),
            (4096, 1024, 8, &[100]),
            (256, 1040, 2, &[300, 270]),
            (704, 272, 11, &[129]),
        ]
    } else {
        &[
            (6144, 32768, 1, &[65, 512]),
            (32768, 6144, 8, &[512, 100]),
            (6144, 6144, 1, &[2048]),
            (256, 1040, 2, &[300, 270]),
            (704, 272, 11, &[129]),
        ]
    };
    bf16_path_matches_cublas(&g, "wgmma", shapes, 91);
}

/// An expert's FFN on `qgemm_wgmma` with the GELU product in the up projection's epilogue
/// (`Gpu::ffn_wgmma`) against the same three products and `gelu_mul` run one by one: the
/// same operands and sums, so the results agree to the odd bf16 rounding of the GELU product.
#[test]
#[ignore = "needs a GPU"]
fn wgmma_expert_ffn_matches_the_unfused_products() {
    let g = Gpu::open(0).unwrap();
    if !wgmma_runs(&g) {
        return;
    }
    let (d, f, m) = if on_emulated_device() {
        (256, 1024, 100)
    } else {
        (1024, 4096, 300)
    };
    let mats: Vec<DevQ> = [(d, f, 1), (d, f, 2), (f, d, 4)]
        .iter()
        .enumerate()
        .map(|(i, &(k, n, groups))| {
            g.upload_q(&random_qmatrix(k, n, groups, 40 + i as u64))
                .unwrap()
        })
        .collect();
    let mut seed = 5u64;
    let x: Vec<f32> = (0..m * d)
        .map(|_| (lcg(&mut seed) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let xd = g.upload(&x).unwrap();
    let fused = g.alloc::<f32>(m * d).unwrap();
    assert!(g
        .ffn_wgmma(xd.ptr(), m, [&mats[0], &mats[1], &mats[2]], fused.ptr())
        .unwrap());
    let (a, b) = (
        g.alloc::<f32>(m * f).unwrap(),
        g.alloc::<f32>(m * f).unwrap(),
    );
    g.qmatmul(xd.ptr(), m, &mats[0], a.ptr(), 1).unwrap();
    g.qmatmul(xd.ptr(), m, &mats[1], b.ptr(), 1).unwrap();
    g.gelu_mul(a.ptr(), b.ptr(), m * f).unwrap();
    let apart = g.alloc::<f32>(m * d).unwrap();
    g.qmatmul(a.ptr(), m, &mats[2], apart.ptr(), 1).unwrap();
    let got = g.download_f32(fused.ptr(), m * d).unwrap();
    let want: Vec<f64> = g
        .download_f32(apart.ptr(), m * d)
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let err = rel_err(&got, &want);
    println!("wgmma expert FFN, GELU in the epilogue: within {err:.2e} of the unfused products");
    assert!(
        err < 1e-3,
        "relative error {err}: {}",
        where_off(&got, &want, m, d, 1e-3)
    );
}

/// A decode step of 24 sequences takes the bf16 path (24 rows: the tensor-core matmul and,
/// with the picks on the device, `qmma_experts_4`). Device and host routing then give the
/// same operands with sums in another order, and the host runs experts of fewer than 9 rows
/// on the int8 path: the logits agree to bf16 precision.
#[test]
#[ignore = "needs a GPU"]
fn bf16_path_device_routing_matches_host_routing() {
    let mut cfg = two_layers(128, 12, 2, 512);
    cfg.intermediate_size = 512;
    let (_dir, model) = random_model(&cfg, 13);
    let load = || ModelWeights::load(model.source.as_ref(), &model.config).unwrap();
    let plan = Plan::new(&model.config, 1, 1, 1).unwrap();
    let comm = LocalComm::group(1, Duration::from_secs(60)).remove(0);
    let (seqs, per_seq) = (24usize, 4u32);
    // Prompts of 96 rows in all on the emulated device: still past 64, so qgemm_wgmma.
    let plen = if on_emulated_device() { 4 } else { 30 };
    let blocks: Vec<Vec<u32>> = (0..seqs as u32)
        .map(|s| (s * per_seq..(s + 1) * per_seq).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = (0..seqs)
        .map(|s| (0..plen).map(|i| ((s * 31 + i * 7) % 512) as u32).collect())
        .collect();
    let next: Vec<Vec<u32>> = (0..seqs).map(|s| vec![(s * 13 % 512) as u32]).collect();
    let run = |device_routing: bool| {
        let mut shard = CudaShard::new(load(), plan, 0, 0, seqs * per_seq as usize, 16).unwrap();
        shard.device_routing = device_routing;
        let tensor_cores = shard.gpu().bf16_tensor_cores();
        assert_eq!(shard.device_routes(seqs), device_routing && tensor_cores);
        let step = |shard: &mut CudaShard, tokens: &[Vec<u32>], start: usize| {
            let batch: Vec<SeqStep> = tokens
                .iter()
                .zip(&blocks)
                .map(|(t, b)| SeqStep {
                    tokens: t,
                    start,
                    blocks: b,
                    logits: LogitsMode::Last,
                })
                .collect();
            shard.step(&comm, &batch).unwrap().logits.unwrap()
        };
        step(&mut shard, &prompts, 0);
        step(&mut shard, &next, plen)
    };
    let (device, host) = (run(true), run(false));
    let worst = worst(device.iter().zip(&host).map(|(d, h)| rel_diff(d, h)));
    println!("bf16 path, 24-token decode step: device routing within {worst:.2e} of host routing");
    assert!(worst < 5e-2, "relative difference {worst}");
}

//! The CPU engine against the release's own outputs on the `grok1-tiny-a` fixture, loaded
//! from its `ckpt-0/` as shipped.

use grok_shared::checkpoint::open_model;
use grok_shared::cpu::CpuModel;
use grok_shared::generate::generate;
use grok_shared::model::{
    blocks_for, BlockAllocator, Forward, LogitsMode, ModelWeights, PagedKv, SeqKv, SeqStep,
};
use grok_shared::sampling::{Sampler, SamplingParams};
use grok_shared::test_support::{max_abs_diff, tiny_a_dir, TinyAExpected};

const BLOCK: usize = 16;

/// A pool with room for `seqs` sequences of `len` positions, and each sequence's blocks.
fn pool_for(model: &dyn Forward, seqs: usize, len: usize) -> (PagedKv, Vec<Vec<u32>>) {
    let per = blocks_for(len, BLOCK);
    let mut alloc = BlockAllocator::new(seqs * per);
    let tables = (0..seqs).map(|_| alloc.alloc(per).unwrap()).collect();
    (model.new_kv(alloc.total(), BLOCK), tables)
}

/// One step of `seqs` (each from position 0) in a fresh pool: every sequence's logits.
fn forward_fresh(model: &dyn Forward, seqs: &[&[u32]], logits: LogitsMode) -> Vec<Vec<f32>> {
    let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let (mut kv, tables) = pool_for(model, seqs.len(), len);
    let batch: Vec<SeqStep> = seqs
        .iter()
        .zip(&tables)
        .map(|(s, blocks)| SeqStep {
            tokens: s,
            start: 0,
            blocks,
            logits,
        })
        .collect();
    model.forward(&mut kv, &batch).unwrap()
}

pub fn check_model_against_fixture(model: &dyn Forward) {
    let e = TinyAExpected::load();
    let tg = e.t + 6;
    let v = e.vocab;
    // Full causal forward of each greedy row, all rows in one batch.
    let rows: Vec<&[u32]> = (0..e.b).map(|b| &e.greedy[b * tg..(b + 1) * tg]).collect();
    let out = forward_fresh(model, &rows, LogitsMode::All);
    let mut worst = 0f32;
    for (b, row_logits) in out.iter().enumerate() {
        for t in 0..tg {
            if e.stable[b * tg + t] != 1 {
                continue;
            }
            let ours = &row_logits[t * v..(t + 1) * v];
            let want = &e.logits_f32[(b * tg + t) * v..(b * tg + t + 1) * v];
            worst = worst.max(max_abs_diff(ours, want));
        }
        // The release's bf16 logits over the prompt: close on average.
        let mut sum = 0f64;
        for t in 0..e.t {
            let ours = &row_logits[t * v..(t + 1) * v];
            let want = &e.logits_bf16[(b * e.t + t) * v..(b * e.t + t + 1) * v];
            sum += ours
                .iter()
                .zip(want)
                .map(|(a, w)| (a - w).abs() as f64)
                .sum::<f64>();
        }
        let mean = sum / (e.t * v) as f64;
        eprintln!("row {b}: mean |ours - release bf16| = {mean:.5}");
        assert!(
            mean < 0.1,
            "row {b}: mean abs diff to the release's bf16 logits {mean}"
        );
    }
    eprintln!("max |ours - logits_f32_reference| over stable positions = {worst:.3e}");
    assert!(
        worst <= 2e-3,
        "max abs diff to logits_f32_reference {worst}"
    );

    // Greedy decoding with the KV cache from each prompt.
    for b in 0..e.b {
        let prompt = &e.tokens[b * e.t..(b + 1) * e.t];
        let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
        let g = generate(model, prompt, 6, &mut sampler, None, |_| {}).unwrap();
        assert_eq!(g.tokens, &e.greedy[b * tg + e.t..(b + 1) * tg], "row {b}");
    }
}

fn load_fixture() -> CpuModel {
    let dir = open_model(&tiny_a_dir()).unwrap();
    CpuModel::new(ModelWeights::load(dir.source.as_ref(), &dir.config).unwrap()).unwrap()
}

#[test]
fn ckpt0_matches_release_logits_and_greedy_tokens() {
    check_model_against_fixture(&load_fixture());
}

#[test]
fn incremental_decoding_equals_full_forward() {
    let model = load_fixture();
    let e = TinyAExpected::load();
    let tg = e.t + 6;
    let v = e.vocab;
    let row = &e.greedy[..tg];
    let full = forward_fresh(&model, &[row], LogitsMode::All).remove(0);
    // prefill 5 tokens, then chunks of 1, 3, 1, ...
    let mut cache = SeqKv::new(&model);
    let mut pos = 0;
    let mut chunk = 5;
    let mut worst = 0f32;
    while pos < tg {
        let end = (pos + chunk).min(tg);
        let out = cache.step(&model, &row[pos..end], LogitsMode::All).unwrap();
        worst = worst.max(max_abs_diff(&out, &full[pos * v..end * v]));
        pos = end;
        chunk = if chunk == 1 { 3 } else { 1 };
    }
    assert_eq!(cache.len(), tg);
    assert!(worst <= 1e-4, "incremental vs full: {worst}");
}

#[test]
fn batch_of_unequal_sequences_equals_each_alone() {
    let model = load_fixture();
    let e = TinyAExpected::load();
    let tg = e.t + 6;
    let seqs: Vec<&[u32]> = vec![
        &e.greedy[..tg],
        &e.greedy[tg..tg + 3],
        &e.greedy[2 * tg..2 * tg + 11],
    ];
    let alone: Vec<Vec<f32>> = seqs
        .iter()
        .map(|s| forward_fresh(&model, &[s], LogitsMode::All).remove(0))
        .collect();
    // Room for one more token each: the decode step below.
    let (mut kv, tables) = pool_for(&model, seqs.len(), tg + 1);
    let batch: Vec<SeqStep> = seqs
        .iter()
        .zip(&tables)
        .map(|(s, blocks)| SeqStep {
            tokens: s,
            start: 0,
            blocks,
            logits: LogitsMode::All,
        })
        .collect();
    let together = model.forward(&mut kv, &batch).unwrap();
    for (a, b) in together.iter().zip(&alone) {
        assert_eq!(a.len(), b.len());
        let worst = max_abs_diff(a, b);
        assert!(worst <= 1e-4, "batched vs alone: {worst}");
    }
    // Then a batched decode step of one token each continues each cache correctly.
    let next: Vec<u32> = vec![5, 6, 7];
    let batch: Vec<SeqStep> = next
        .iter()
        .zip(&seqs)
        .zip(&tables)
        .map(|((t, s), blocks)| SeqStep {
            tokens: std::slice::from_ref(t),
            start: s.len(),
            blocks,
            logits: LogitsMode::Last,
        })
        .collect();
    let step = model.forward(&mut kv, &batch).unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let mut full: Vec<u32> = s.to_vec();
        full.push(next[i]);
        let want = forward_fresh(&model, &[&full], LogitsMode::Last);
        let worst = max_abs_diff(&step[i], &want[0]);
        assert!(worst <= 1e-4, "batched decode vs alone: {worst}");
    }
}

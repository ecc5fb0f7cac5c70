//! Causal grouped-query attention over each sequence's KV cache, with Grok-1's soft cap
//! (`cap · tanh(s / cap)`) applied to the scaled logits before the f32 softmax.

use super::matmul::dot;
use crate::config::ModelConfig;
use crate::model::SeqStep;
use rayon::prelude::*;

/// Attention output `[rows, q_dim]` for the new tokens of every sequence; `q` is `[rows, q_dim]`
/// (rotated) and each cache already holds this step's keys and values for layer `l`.
pub fn attend(c: &ModelConfig, q: &[f32], batch: &[SeqStep<'_>], l: usize) -> Vec<f32> {
    let (hd, qd, kvd) = (c.head_dim, c.q_dim(), c.kv_dim());
    let group = c.num_attention_heads / c.num_key_value_heads;
    // (sequence, first row of its new tokens) for each task, one task per (sequence, head).
    let mut seq_rows = Vec::with_capacity(batch.len());
    let mut row = 0;
    for s in batch {
        seq_rows.push(row);
        row += s.tokens.len();
    }
    let tasks: Vec<(usize, usize)> = (0..batch.len())
        .flat_map(|s| (0..c.num_attention_heads).map(move |h| (s, h)))
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(si, head)| {
            let s = &batch[si];
            let t = s.tokens.len();
            let start = s.cache.len();
            let keys = &s.cache.keys[l];
            let values = &s.cache.values[l];
            let kvh = head / group;
            let mut out = vec![0f32; t * hd];
            let mut scores = vec![0f32; start + t];
            for i in 0..t {
                let qrow = &q[(seq_rows[si] + i) * qd + head * hd..][..hd];
                let visible = start + i + 1;
                for (j, sc) in scores[..visible].iter_mut().enumerate() {
                    let krow = &keys[j * kvd + kvh * hd..][..hd];
                    let a = dot(qrow, krow) * c.attn_output_multiplier;
                    *sc = c.max_attn_value * (a / c.max_attn_value).tanh();
                }
                super::ops::softmax(&mut scores[..visible]);
                let o = &mut out[i * hd..(i + 1) * hd];
                for (j, &p) in scores[..visible].iter().enumerate() {
                    let vrow = &values[j * kvd + kvh * hd..][..hd];
                    for (ov, &vv) in o.iter_mut().zip(vrow) {
                        *ov += p * vv;
                    }
                }
            }
            out
        })
        .collect();
    let mut out = vec![0f32; row * qd];
    for (&(si, head), r) in tasks.iter().zip(results) {
        for (i, chunk) in r.chunks_exact(hd).enumerate() {
            let base = (seq_rows[si] + i) * qd + head * hd;
            out[base..base + hd].copy_from_slice(chunk);
        }
    }
    out
}

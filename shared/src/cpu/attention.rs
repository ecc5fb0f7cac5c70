//! Causal grouped-query attention over each sequence's blocks of the paged KV cache, with
//! Grok-1's soft cap (`cap · tanh(s / cap)`) applied to the scaled logits before the f32
//! softmax.

use super::matmul::dot;
use crate::config::ModelConfig;
use crate::model::{PagedKv, SeqStep};
use rayon::prelude::*;

/// Attention output `[rows, q_dim]` for the new tokens of every sequence; `q` is `[rows, q_dim]`
/// (rotated) and `kv` already holds this step's keys and values for layer `l`. Position `j`
/// of a sequence is read from block `blocks[j / block_size]`, row `j % block_size`; the
/// caller has checked every table covers its sequence.
pub fn attend(
    c: &ModelConfig,
    q: &[f32],
    kv: &PagedKv,
    batch: &[SeqStep<'_>],
    l: usize,
) -> Vec<f32> {
    let (hd, qd, kvd) = (c.head_dim, c.q_dim(), c.kv_dim());
    let group = c.num_attention_heads / c.num_key_value_heads;
    // (sequence, first row of its new tokens) for each task, one task per (sequence, head).
    let mut seq_rows = Vec::with_capacity(batch.len());
    let mut row = 0;
    for s in batch {
        seq_rows.push(row);
        row += s.tokens.len();
    }
    let (keys, values) = (kv.keys(l), kv.values(l));
    let tasks: Vec<(usize, usize)> = (0..batch.len())
        .flat_map(|s| (0..c.num_attention_heads).map(move |h| (s, h)))
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(si, head)| {
            let s = &batch[si];
            let t = s.tokens.len();
            let start = s.start;
            let kvh = head / group;
            // Pool row of every visible position, resolved once for all query rows.
            let slots: Vec<usize> = (0..start + t).map(|j| kv.slot(s.blocks, j)).collect();
            let mut out = vec![0f32; t * hd];
            let mut scores = vec![0f32; start + t];
            for i in 0..t {
                let qrow = &q[(seq_rows[si] + i) * qd + head * hd..][..hd];
                let visible = start + i + 1;
                for (sc, &slot) in scores[..visible].iter_mut().zip(&slots) {
                    let krow = &keys[slot * kvd + kvh * hd..][..hd];
                    let a = dot(qrow, krow) * c.attn_output_multiplier;
                    *sc = c.max_attn_value * (a / c.max_attn_value).tanh();
                }
                super::ops::softmax(&mut scores[..visible]);
                let o = &mut out[i * hd..(i + 1) * hd];
                for (&p, &slot) in scores[..visible].iter().zip(&slots) {
                    let vrow = &values[slot * kvd + kvh * hd..][..hd];
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

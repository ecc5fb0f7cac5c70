//! The CPU backend: the Grok-1 forward pass over a batch of sequences of any lengths, with
//! each sequence's KV cache, computed in f32 from int8 weights dequantised per tile.

pub mod attention;
pub mod matmul;
pub mod ops;

use crate::config::ModelConfig;
use crate::model::weights::LayerWeights;
use crate::model::{Forward, KvCache, LogitsMode, ModelError, ModelWeights, SeqStep};
use matmul::{matmul_bt, qmatmul};

pub struct CpuModel {
    weights: ModelWeights,
    inv_freq: Vec<f32>,
}

impl CpuModel {
    pub fn new(weights: ModelWeights) -> Self {
        let c = &weights.config;
        let inv_freq = ops::rope_inv_freq(c.head_dim, c.rope_theta);
        CpuModel { weights, inv_freq }
    }

    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    fn layer(
        &self,
        l: usize,
        lw: &LayerWeights,
        h: &mut [f32],
        batch: &mut [SeqStep<'_>],
        positions: &[usize],
    ) {
        let c = &self.weights.config;
        let (d, n) = (c.hidden_size, positions.len());
        let mut x = vec![0f32; n * d];
        ops::rmsnorm(h, &lw.attn_norm, c.rms_norm_eps, &mut x);
        let mut q = vec![0f32; n * c.q_dim()];
        let mut k = vec![0f32; n * c.kv_dim()];
        let mut v = vec![0f32; n * c.kv_dim()];
        qmatmul(&x, n, &lw.wq, &mut q);
        qmatmul(&x, n, &lw.wk, &mut k);
        qmatmul(&x, n, &lw.wv, &mut v);
        for (i, &p) in positions.iter().enumerate() {
            ops::rope(
                &mut q[i * c.q_dim()..(i + 1) * c.q_dim()],
                c.head_dim,
                p,
                &self.inv_freq,
            );
            ops::rope(
                &mut k[i * c.kv_dim()..(i + 1) * c.kv_dim()],
                c.head_dim,
                p,
                &self.inv_freq,
            );
        }
        let mut row = 0;
        for s in batch.iter_mut() {
            let t = s.tokens.len();
            s.cache.keys[l].extend_from_slice(&k[row * c.kv_dim()..(row + t) * c.kv_dim()]);
            s.cache.values[l].extend_from_slice(&v[row * c.kv_dim()..(row + t) * c.kv_dim()]);
            row += t;
        }
        let attn = attention::attend(c, &q, batch, l);
        let mut o = vec![0f32; n * d];
        qmatmul(&attn, n, &lw.wo, &mut o);
        ops::add_rmsnorm(h, &o, &lw.post_attn_norm, c.rms_norm_eps);

        ops::rmsnorm(h, &lw.moe_norm, c.rms_norm_eps, &mut x);
        let y = self.moe(lw, &x, n);
        ops::add_rmsnorm(h, &y, &lw.post_moe_norm, c.rms_norm_eps);
    }

    /// Router (f32 softmax, top-k, gates not renormalised) and the selected experts.
    fn moe(&self, lw: &LayerWeights, x: &[f32], n: usize) -> Vec<f32> {
        let c = &self.weights.config;
        let (d, e, f) = (c.hidden_size, c.num_local_experts, c.intermediate_size);
        let mut logits = vec![0f32; n * e];
        matmul::matmul_f32(x, n, d, &lw.router, e, &mut logits);
        // rows routed to each expert, with their gate
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        for (t, p) in logits.chunks_exact_mut(e).enumerate() {
            ops::softmax(p);
            for (ex, gate) in ops::top_k(p, c.num_experts_per_tok) {
                routed[ex].push((t, gate));
            }
        }
        let mut y = vec![0f32; n * d];
        for (ex, rows) in routed.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let m = rows.len();
            let w = &lw.experts[ex];
            let mut xs = Vec::with_capacity(m * d);
            for &(t, _) in rows {
                xs.extend_from_slice(&x[t * d..(t + 1) * d]);
            }
            let mut a = vec![0f32; m * f];
            let mut b = vec![0f32; m * f];
            qmatmul(&xs, m, &w.w_gate, &mut a);
            qmatmul(&xs, m, &w.w_up, &mut b);
            for (av, &bv) in a.iter_mut().zip(&b) {
                *av = ops::gelu_tanh(*av) * bv;
            }
            let mut out = vec![0f32; m * d];
            qmatmul(&a, m, &w.w_down, &mut out);
            for (i, &(t, gate)) in rows.iter().enumerate() {
                for (yv, &ov) in y[t * d..(t + 1) * d]
                    .iter_mut()
                    .zip(&out[i * d..(i + 1) * d])
                {
                    *yv += gate * ov;
                }
            }
        }
        y
    }
}

impl Forward for CpuModel {
    fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    fn new_cache(&self) -> KvCache {
        let c = &self.weights.config;
        KvCache::new(c.num_hidden_layers, c.kv_dim())
    }

    fn forward(
        &self,
        batch: &mut [SeqStep<'_>],
        mode: LogitsMode,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.weights.config;
        let (d, vocab) = (c.hidden_size, c.vocab_size);
        let mut positions = Vec::new();
        for (i, s) in batch.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(ModelError::EmptySequence { index: i });
            }
            if s.cache.kv_dim() != c.kv_dim() || s.cache.keys.len() != c.num_hidden_layers {
                return Err(ModelError::BadTensor {
                    name: format!("kv cache of batch entry {i}"),
                    msg: "was made for a different model".into(),
                });
            }
            let end = s.cache.len() + s.tokens.len();
            if end > c.max_seq_len {
                return Err(ModelError::ContextOverflow {
                    len: end,
                    max: c.max_seq_len,
                });
            }
            if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(ModelError::TokenOutOfRange { id, vocab });
            }
            positions.extend(s.cache.len()..end);
        }
        let n = positions.len();
        let mut h = Vec::with_capacity(n * d);
        for s in batch.iter() {
            for &t in s.tokens {
                let row = &self.weights.embeddings[t as usize * d..(t as usize + 1) * d];
                h.extend(row.iter().map(|v| v * c.embedding_multiplier_scale));
            }
        }
        for (l, lw) in self.weights.layers.iter().enumerate() {
            self.layer(l, lw, &mut h, batch, &positions);
        }
        for s in batch.iter_mut() {
            s.cache.advance(s.tokens.len());
        }

        // Final norm and the tied head, only on the rows asked for.
        let mut rows = Vec::new();
        let mut start = 0;
        for s in batch.iter() {
            let t = s.tokens.len();
            match mode {
                LogitsMode::All => rows.extend(start..start + t),
                LogitsMode::Last => rows.push(start + t - 1),
            }
            start += t;
        }
        let mut sel = Vec::with_capacity(rows.len() * d);
        for &r in &rows {
            sel.extend_from_slice(&h[r * d..(r + 1) * d]);
        }
        let mut normed = vec![0f32; sel.len()];
        ops::rmsnorm(&sel, &self.weights.final_norm, c.rms_norm_eps, &mut normed);
        let mut logits = vec![0f32; rows.len() * vocab];
        matmul_bt(
            &normed,
            rows.len(),
            d,
            &self.weights.embeddings,
            vocab,
            &mut logits,
        );
        for v in logits.iter_mut() {
            *v *= c.output_multiplier_scale;
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut rest = logits.as_slice();
        for s in batch.iter() {
            let r = match mode {
                LogitsMode::All => s.tokens.len(),
                LogitsMode::Last => 1,
            };
            let (mine, tail) = rest.split_at(r * vocab);
            out.push(mine.to_vec());
            rest = tail;
        }
        Ok(out)
    }
}

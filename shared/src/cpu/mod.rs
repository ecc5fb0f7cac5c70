//! The CPU backend: the Grok-1 forward pass over a batch of sequences of any lengths, with
//! each sequence's KV cache, computed in f32 from int8 weights dequantised per tile.
//!
//! [`CpuShard`] is one rank of a parallel plan (its heads, experts and FFN slices), exchanging
//! activations through a [`Communicator`]; [`CpuModel`] is the whole model as a world of one.

pub mod attention;
pub mod matmul;
pub mod ops;

use crate::comm::local::LocalComm;
use crate::comm::Communicator;
use crate::config::ModelConfig;
use crate::model::weights::{ExpertWeights, LayerWeights, Slices};
use crate::model::{Forward, KvCache, LogitsMode, ModelError, ModelWeights, SeqStep};
use crate::parallel::plan::{split_range, Plan};
use matmul::{matmul_bt, qmatmul};
use std::time::Duration;

/// One rank's part of the model and the math it runs each step.
pub struct CpuShard {
    weights: ModelWeights,
    plan: Plan,
    rank: usize,
    /// The config with this rank's head counts: what its attention and KV cache see.
    local: ModelConfig,
    inv_freq: Vec<f32>,
}

/// Checks a batch against the model before any state changes; returns every token's position.
fn check_batch(
    c: &ModelConfig,
    kv_dim: usize,
    batch: &[SeqStep<'_>],
) -> Result<Vec<usize>, ModelError> {
    let mut positions = Vec::new();
    for (i, s) in batch.iter().enumerate() {
        if s.tokens.is_empty() {
            return Err(ModelError::EmptySequence { index: i });
        }
        if s.cache.kv_dim() != kv_dim || s.cache.keys.len() != c.num_hidden_layers {
            return Err(ModelError::BadTensor {
                name: format!("kv cache of batch entry {i}"),
                msg: "was made for a different model or shard".into(),
            });
        }
        let end = s.cache.len() + s.tokens.len();
        if end > c.max_seq_len {
            return Err(ModelError::ContextOverflow {
                len: end,
                max: c.max_seq_len,
            });
        }
        if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab: c.vocab_size,
            });
        }
        positions.extend(s.cache.len()..end);
    }
    Ok(positions)
}

/// Router: f32 softmax over the experts, top-k; gates are the probabilities, not renormalised.
pub fn route(c: &ModelConfig, router: &[f32], x: &[f32], n: usize) -> Vec<Vec<(usize, f32)>> {
    let e = c.num_local_experts;
    let mut logits = vec![0f32; n * e];
    matmul::matmul_f32(x, n, c.hidden_size, router, e, &mut logits);
    logits
        .chunks_exact_mut(e)
        .map(|p| {
            ops::softmax(p);
            ops::top_k(p, c.num_experts_per_tok)
        })
        .collect()
}

/// One expert's FFN (or its FFN-width slice, giving a partial sum) on `m` rows:
/// `(gelu_tanh(x W) ⊙ (x V)) W1`.
pub fn expert_ffn(w: &ExpertWeights, xs: &[f32], m: usize) -> Vec<f32> {
    let f = w.w_gate.n;
    let mut a = vec![0f32; m * f];
    let mut b = vec![0f32; m * f];
    qmatmul(xs, m, &w.w_gate, &mut a);
    qmatmul(xs, m, &w.w_up, &mut b);
    for (av, &bv) in a.iter_mut().zip(&b) {
        *av = ops::gelu_tanh(*av) * bv;
    }
    let mut out = vec![0f32; m * w.w_down.n];
    qmatmul(&a, m, &w.w_down, &mut out);
    out
}

impl CpuShard {
    /// `weights` must hold exactly the slices `plan` gives `rank`.
    pub fn new(weights: ModelWeights, plan: Plan, rank: usize) -> Result<Self, ModelError> {
        let c = weights.config.clone();
        let want = Slices::for_rank(&plan, &c, rank);
        if weights.slices != want {
            return Err(ModelError::BadTensor {
                name: format!("weights of rank {rank}"),
                msg: format!(
                    "hold {:?}, but the plan gives this rank {want:?}",
                    weights.slices
                ),
            });
        }
        let local = ModelConfig {
            num_attention_heads: want.q_heads.len(),
            num_key_value_heads: want.kv_heads.len(),
            ..c.clone()
        };
        let inv_freq = ops::rope_inv_freq(c.head_dim, c.rope_theta);
        Ok(CpuShard {
            weights,
            plan,
            rank,
            local,
            inv_freq,
        })
    }

    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// A cache for this rank's kv heads.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.local.num_hidden_layers, self.local.kv_dim())
    }

    /// One step for the sequences of this rank's data-parallel group (the same batch on every
    /// rank of its TP group). Every rank of the world must call this in lockstep, with an empty
    /// batch if its group has no work. Returns the logits on the group's first rank, `None`
    /// on the others.
    pub fn forward(
        &self,
        comm: &dyn Communicator,
        batch: &mut [SeqStep<'_>],
        mode: LogitsMode,
    ) -> Result<Option<Vec<Vec<f32>>>, ModelError> {
        let c = &self.weights.config;
        let positions = check_batch(c, self.local.kv_dim(), batch)?;
        let (d, n, tp) = (c.hidden_size, positions.len(), self.plan.tp);
        let group = self.plan.tp_group(self.rank);
        let my_rows = split_range(n, tp, self.rank % tp);
        let counts: Vec<usize> = (0..tp).map(|i| split_range(n, tp, i).len() * d).collect();

        let mut h = Vec::with_capacity(n * d);
        for s in batch.iter() {
            for &t in s.tokens {
                let row = &self.weights.embeddings[t as usize * d..(t as usize + 1) * d];
                h.extend(row.iter().map(|v| v * c.embedding_multiplier_scale));
            }
        }
        for (l, lw) in self.weights.layers.iter().enumerate() {
            // Attention over the group's tokens, partial sums of this rank's heads...
            let o = self.attention(l, lw, &h, batch, &positions);
            // ...summed over the group, each rank keeping its shard of the tokens.
            let o = if tp == 1 {
                o
            } else {
                comm.reduce_scatter(&group, &o, &counts)?
            };
            let mut h_shard = h[my_rows.start * d..my_rows.end * d].to_vec();
            ops::add_rmsnorm(&mut h_shard, &o, &lw.post_attn_norm, c.rms_norm_eps);
            let mut x = vec![0f32; h_shard.len()];
            ops::rmsnorm(&h_shard, &lw.moe_norm, c.rms_norm_eps, &mut x);
            let y = self.moe(comm, l, lw, &x, my_rows.len())?;
            ops::add_rmsnorm(&mut h_shard, &y, &lw.post_moe_norm, c.rms_norm_eps);
            h = if tp == 1 {
                h_shard
            } else {
                comm.all_gather_v(&group, &h_shard)?.concat()
            };
        }
        for s in batch.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        if !self.rank.is_multiple_of(tp) {
            return Ok(None);
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
        let vocab = c.vocab_size;
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
        Ok(Some(out))
    }

    /// This rank's heads of attention for all `h` rows, through its slice of the output
    /// projection: a partial `[rows, d]` sum over the TP group.
    fn attention(
        &self,
        l: usize,
        lw: &LayerWeights,
        h: &[f32],
        batch: &mut [SeqStep<'_>],
        positions: &[usize],
    ) -> Vec<f32> {
        let c = &self.local;
        let (d, n) = (c.hidden_size, positions.len());
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let mut x = vec![0f32; n * d];
        ops::rmsnorm(h, &lw.attn_norm, c.rms_norm_eps, &mut x);
        let mut q = vec![0f32; n * qd];
        let mut k = vec![0f32; n * kvd];
        let mut v = vec![0f32; n * kvd];
        qmatmul(&x, n, &lw.wq, &mut q);
        qmatmul(&x, n, &lw.wk, &mut k);
        qmatmul(&x, n, &lw.wv, &mut v);
        for (i, &p) in positions.iter().enumerate() {
            ops::rope(&mut q[i * qd..(i + 1) * qd], c.head_dim, p, &self.inv_freq);
            ops::rope(
                &mut k[i * kvd..(i + 1) * kvd],
                c.head_dim,
                p,
                &self.inv_freq,
            );
        }
        let mut row = 0;
        for s in batch.iter_mut() {
            let t = s.tokens.len();
            s.cache.keys[l].extend_from_slice(&k[row * kvd..(row + t) * kvd]);
            s.cache.values[l].extend_from_slice(&v[row * kvd..(row + t) * kvd]);
            row += t;
        }
        let attn = attention::attend(c, &q, batch, l);
        let mut o = vec![0f32; n * d];
        qmatmul(&attn, n, &lw.wo, &mut o);
        o
    }

    /// The MoE on this rank's token shard `x` (`[m, d]`): route, send each token to the ranks
    /// holding its experts (all-to-all), run the local experts' FFN slices on what arrives,
    /// send the partial sums back (all-to-all), and add them up with the gates.
    fn moe(
        &self,
        comm: &dyn Communicator,
        l: usize,
        lw: &LayerWeights,
        x: &[f32],
        m: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let c = &self.weights.config;
        let d = c.hidden_size;
        let world = self.plan.world;
        let everyone: Vec<usize> = (0..world).collect();
        let routes = route(c, &lw.router, x, m);

        // Dispatch: rows and their expert ids per destination rank; remember (token, gate).
        let mut rows: Vec<Vec<f32>> = vec![Vec::new(); world];
        let mut experts: Vec<Vec<f32>> = vec![Vec::new(); world];
        let mut pending: Vec<Vec<(usize, f32)>> = vec![Vec::new(); world];
        for (t, picks) in routes.iter().enumerate() {
            for &(e, gate) in picks {
                for dst in self.plan.expert_ranks(c, e) {
                    rows[dst].extend_from_slice(&x[t * d..(t + 1) * d]);
                    experts[dst].push(e as f32);
                    pending[dst].push((t, gate));
                }
            }
        }
        let got_experts = comm.all_to_all_v(&everyone, experts)?;
        let got_rows = comm.all_to_all_v(&everyone, rows)?;

        // Run each local expert once on everything routed to it.
        let mine = &self.weights.slices.experts;
        let mut per_expert: Vec<Vec<(usize, usize)>> = vec![Vec::new(); mine.len()];
        let mut replies: Vec<Vec<f32>> = Vec::with_capacity(world);
        for (src, ids) in got_experts.iter().enumerate() {
            if got_rows[src].len() != ids.len() * d {
                return Err(ModelError::Peer {
                    rank: src,
                    msg: format!(
                        "layer {l}: sent {} values for {} tokens",
                        got_rows[src].len(),
                        ids.len()
                    ),
                });
            }
            for (i, &e) in ids.iter().enumerate() {
                let e = e as usize;
                if !mine.contains(&e) {
                    return Err(ModelError::Peer {
                        rank: src,
                        msg: format!(
                            "layer {l}: sent a token for expert {e}, which rank {} does not hold",
                            self.rank
                        ),
                    });
                }
                per_expert[e - mine.start].push((src, i));
            }
            replies.push(vec![0f32; ids.len() * d]);
        }
        for (j, list) in per_expert.iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            let mut xs = Vec::with_capacity(list.len() * d);
            for &(src, i) in list {
                xs.extend_from_slice(&got_rows[src][i * d..(i + 1) * d]);
            }
            let out = expert_ffn(&lw.experts[j], &xs, list.len());
            for (r, &(src, i)) in list.iter().enumerate() {
                replies[src][i * d..(i + 1) * d].copy_from_slice(&out[r * d..(r + 1) * d]);
            }
        }
        let partials = comm.all_to_all_v(&everyone, replies)?;

        // Combine: the gate times each returned partial sum, in send order.
        let mut y = vec![0f32; m * d];
        for (dst, list) in pending.iter().enumerate() {
            if partials[dst].len() != list.len() * d {
                return Err(ModelError::Peer {
                    rank: dst,
                    msg: format!(
                        "layer {l}: returned {} values for {} tokens",
                        partials[dst].len(),
                        list.len()
                    ),
                });
            }
            for (i, &(t, gate)) in list.iter().enumerate() {
                for (yv, &pv) in y[t * d..(t + 1) * d]
                    .iter_mut()
                    .zip(&partials[dst][i * d..(i + 1) * d])
                {
                    *yv += gate * pv;
                }
            }
        }
        Ok(y)
    }
}

/// The whole model in this process: a world of one rank.
pub struct CpuModel {
    shard: CpuShard,
    comm: LocalComm,
}

impl CpuModel {
    pub fn new(weights: ModelWeights) -> Result<Self, ModelError> {
        let plan = Plan {
            world: 1,
            tp: 1,
            ep: 1,
        };
        let shard = CpuShard::new(weights, plan, 0)?;
        // A world of one never waits on a peer, so the deadline is never reached.
        let comm = LocalComm::group(1, Duration::from_secs(1)).remove(0);
        Ok(CpuModel { shard, comm })
    }

    pub fn weights(&self) -> &ModelWeights {
        self.shard.weights()
    }
}

impl Forward for CpuModel {
    fn config(&self) -> &ModelConfig {
        &self.shard.weights.config
    }

    fn new_cache(&self) -> KvCache {
        self.shard.new_cache()
    }

    fn forward(
        &self,
        batch: &mut [SeqStep<'_>],
        mode: LogitsMode,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        // A world of one is always its group's first rank, so logits are always returned.
        Ok(self
            .shard
            .forward(&self.comm, batch, mode)?
            .unwrap_or_default())
    }
}

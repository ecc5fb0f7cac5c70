//! The CPU backend: the Grok-1 forward pass over a batch of sequences of any lengths, each
//! with its block table into a paged KV pool, computed in f32 from int8 weights dequantised
//! per tile.
//!
//! [`CpuShard`] is one rank of a parallel plan (its heads, experts and FFN slices), exchanging
//! activations through a [`Communicator`]; [`CpuModel`] is the whole model as a world of one.

pub mod attention;
pub mod matmul;
pub mod ops;

use crate::comm::local::LocalComm;
use crate::comm::{Communicator, Timed};
use crate::config::ModelConfig;
use crate::model::weights::{ExpertWeights, LayerWeights, Slices};
pub use crate::model::ShardOutput;
use crate::model::{check_steps, Forward, ModelError, ModelWeights, PagedKv, RankBackend, SeqStep};
use crate::parallel::dispatch::{split_messages, Arrivals, Dispatch};
use crate::parallel::plan::Plan;
use matmul::{matmul_bt, qmatmul};
use std::time::Duration;

/// One rank's part of the model and the math it runs each step.
pub struct CpuShard {
    weights: ModelWeights,
    plan: Plan,
    rank: usize,
    /// The config with this rank's head counts: what its attention and KV pool see.
    local: ModelConfig,
    inv_freq: Vec<f32>,
}

#[cfg(test)]
thread_local! {
    /// Rows the tied head was computed for on this thread (tests check `None` costs none).
    static HEAD_ROWS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Checks a batch against the model and the pool before any state changes; returns every
/// token's position.
fn check_batch(
    c: &ModelConfig,
    kv_dim: usize,
    kv: &PagedKv,
    batch: &[SeqStep<'_>],
) -> Result<Vec<usize>, ModelError> {
    if kv.layers() != c.num_hidden_layers || kv.kv_dim() != kv_dim {
        return Err(ModelError::WrongPool {
            layers: kv.layers(),
            kv_dim: kv.kv_dim(),
            want_layers: c.num_hidden_layers,
            want_kv_dim: kv_dim,
        });
    }
    check_steps(c, kv.block_size(), kv.num_blocks(), batch)
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
        let (_, local) = weights.check_rank(&plan, rank)?;
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

    /// A KV pool of `num_blocks` blocks of `block_size` positions for this rank's kv heads.
    pub fn new_kv(&self, num_blocks: usize, block_size: usize) -> PagedKv {
        PagedKv::new(
            self.local.num_hidden_layers,
            self.local.kv_dim(),
            block_size,
            num_blocks,
        )
    }

    /// Bytes one KV block of `block_size` positions takes on `rank` of `plan` (its kv heads
    /// × head_dim, every layer): what sizes a rank's pool.
    pub fn kv_block_bytes(cfg: &ModelConfig, plan: &Plan, rank: usize, block_size: usize) -> usize {
        let kv_heads = Slices::for_rank(plan, cfg, rank).kv_heads.len();
        PagedKv::block_bytes(cfg.num_hidden_layers, kv_heads * cfg.head_dim, block_size)
    }

    /// One step for the sequences of this rank's data-parallel group (the same batch on every
    /// rank of its TP group, each rank with its own pool of the same block ids). Every rank of
    /// the world must call this in lockstep, with an empty batch if its group has no work.
    ///
    /// The batch is checked whole before anything is written; an error from a peer part-way
    /// leaves the blocks of this step's positions half-written (the caller recomputes them).
    pub fn forward(
        &self,
        comm: &dyn Communicator,
        kv: &mut PagedKv,
        batch: &[SeqStep<'_>],
    ) -> Result<ShardOutput, ModelError> {
        let c = &self.weights.config;
        let positions = check_batch(c, self.local.kv_dim(), kv, batch)?;
        let (d, n, tp) = (c.hidden_size, positions.len(), self.plan.tp);
        let experts = c.num_local_experts;
        let group = self.plan.tp_group(self.rank);
        let (my_rows, counts) = self.plan.token_shard(n, self.rank, d);
        let mut comm = Timed {
            comm,
            spent: Duration::ZERO,
        };
        let mut expert_tokens = vec![0u64; c.num_hidden_layers * experts];

        let mut h = Vec::with_capacity(n * d);
        for s in batch {
            for &t in s.tokens {
                let row = &self.weights.embeddings[t as usize * d..(t as usize + 1) * d];
                h.extend(row.iter().map(|v| v * c.embedding_multiplier_scale));
            }
        }
        for (l, lw) in self.weights.layers.iter().enumerate() {
            // Attention over the group's tokens, partial sums of this rank's heads...
            let o = self.attention(l, lw, &h, kv, batch, &positions);
            // ...summed over the group, each rank keeping its shard of the tokens.
            let o = if tp == 1 {
                o
            } else {
                comm.run(|cm| cm.reduce_scatter(&group, &o, &counts))?
            };
            let mut h_shard = h[my_rows.start * d..my_rows.end * d].to_vec();
            ops::add_rmsnorm(&mut h_shard, &o, &lw.post_attn_norm, c.rms_norm_eps);
            let mut x = vec![0f32; h_shard.len()];
            ops::rmsnorm(&h_shard, &lw.moe_norm, c.rms_norm_eps, &mut x);
            let routed = &mut expert_tokens[l * experts..(l + 1) * experts];
            let y = self.moe(&mut comm, l, lw, &x, my_rows.len(), routed)?;
            ops::add_rmsnorm(&mut h_shard, &y, &lw.post_moe_norm, c.rms_norm_eps);
            h = if tp == 1 {
                h_shard
            } else {
                comm.run(|cm| cm.all_gather_v(&group, &h_shard))?.concat()
            };
        }
        let mut out = ShardOutput {
            logits: None,
            expert_tokens,
            comm_time: comm.spent,
        };
        if !self.rank.is_multiple_of(tp) {
            return Ok(out);
        }
        out.logits = Some(self.head(&h, batch));
        Ok(out)
    }

    /// Final norm and the tied head, only on the rows the sequences ask for: the head is by
    /// far the largest product of a small model, so rows nobody reads are skipped.
    fn head(&self, h: &[f32], batch: &[SeqStep<'_>]) -> Vec<Vec<f32>> {
        let c = &self.weights.config;
        let d = c.hidden_size;
        let mut rows = Vec::new();
        let mut start = 0;
        for s in batch {
            let t = s.tokens.len();
            rows.extend((start + t - s.logits.rows(t))..start + t);
            start += t;
        }
        let vocab = c.vocab_size;
        let mut logits = vec![0f32; rows.len() * vocab];
        if !rows.is_empty() {
            let mut sel = Vec::with_capacity(rows.len() * d);
            for &r in &rows {
                sel.extend_from_slice(&h[r * d..(r + 1) * d]);
            }
            let mut normed = vec![0f32; sel.len()];
            ops::rmsnorm(&sel, &self.weights.final_norm, c.rms_norm_eps, &mut normed);
            // The output scale goes on the d inputs of each row rather than its vocab-many
            // logits: one pass less over the largest buffer of a decode step.
            for v in normed.iter_mut() {
                *v *= c.output_multiplier_scale;
            }
            matmul_bt(
                &normed,
                rows.len(),
                d,
                &self.weights.embeddings,
                vocab,
                &mut logits,
            );
            #[cfg(test)]
            HEAD_ROWS.with(|n| n.set(n.get() + rows.len()));
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut rest = logits.as_slice();
        for s in batch {
            let (mine, tail) = rest.split_at(s.logits.rows(s.tokens.len()) * vocab);
            out.push(mine.to_vec());
            rest = tail;
        }
        out
    }

    /// This rank's heads of attention for all `h` rows, through its slice of the output
    /// projection: a partial `[rows, d]` sum over the TP group. Writes this step's keys and
    /// values of layer `l` into each sequence's blocks first.
    fn attention(
        &self,
        l: usize,
        lw: &LayerWeights,
        h: &[f32],
        kv: &mut PagedKv,
        batch: &[SeqStep<'_>],
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
        for s in batch {
            for p in s.start..s.start + s.tokens.len() {
                let slot = kv.slot(s.blocks, p);
                let dst = slot * kvd..(slot + 1) * kvd;
                kv.keys[l][dst.clone()].copy_from_slice(&k[row * kvd..(row + 1) * kvd]);
                kv.values[l][dst].copy_from_slice(&v[row * kvd..(row + 1) * kvd]);
                row += 1;
            }
        }
        let attn = attention::attend(c, &q, kv, batch, l);
        let mut o = vec![0f32; n * d];
        qmatmul(&attn, n, &lw.wo, &mut o);
        o
    }

    /// The MoE on this rank's token shard `x` (`[m, d]`): route, send each token to the ranks
    /// holding its experts (all-to-all), run the local experts' FFN slices on what arrives,
    /// send the partial sums back (all-to-all), and add them up with the gates.
    /// Adds to `routed[e]` the tokens sent to expert `e`.
    fn moe(
        &self,
        comm: &mut Timed<'_>,
        l: usize,
        lw: &LayerWeights,
        x: &[f32],
        m: usize,
        routed: &mut [u64],
    ) -> Result<Vec<f32>, ModelError> {
        let c = &self.weights.config;
        let d = c.hidden_size;
        let world = self.plan.world;
        let everyone: Vec<usize> = (0..world).collect();
        let routes = route(c, &lw.router, x, m);

        let dispatch = Dispatch::new(&self.plan, c, &routes, routed);
        let got = comm.run(|cm| cm.all_to_all_v(&everyone, dispatch.messages(x, d)))?;
        let got = split_messages(l, &got, d)?;

        // Run each local expert once on everything routed to it.
        let ids: Vec<&[f32]> = got.iter().map(|&(ids, _)| ids).collect();
        let arrivals = Arrivals::new(l, self.rank, self.weights.slices.experts.clone(), &ids)?;
        let mut replies: Vec<Vec<f32>> = ids.iter().map(|i| vec![0f32; i.len() * d]).collect();
        for (j, list) in arrivals.per_expert.iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            let mut xs = Vec::with_capacity(list.len() * d);
            for &(src, i) in list {
                xs.extend_from_slice(&got[src].1[i * d..(i + 1) * d]);
            }
            let out = expert_ffn(&lw.experts[j], &xs, list.len());
            for (r, &(src, i)) in list.iter().enumerate() {
                replies[src][i * d..(i + 1) * d].copy_from_slice(&out[r * d..(r + 1) * d]);
            }
        }
        let partials = comm.run(|cm| cm.all_to_all_v(&everyone, replies))?;
        dispatch.check_replies(l, &partials, d)?;

        // Combine: the gate times each returned partial sum, in send order.
        let mut y = vec![0f32; m * d];
        for (list, part) in dispatch.sent.iter().zip(&partials) {
            for (i, &(t, gate)) in list.iter().enumerate() {
                for (yv, &pv) in y[t * d..(t + 1) * d]
                    .iter_mut()
                    .zip(&part[i * d..(i + 1) * d])
                {
                    *yv += gate * pv;
                }
            }
        }
        Ok(y)
    }
}

/// A CPU rank for a worker: its shard and its KV pool.
pub struct CpuRank {
    shard: CpuShard,
    kv: PagedKv,
}

impl CpuRank {
    /// `shard` with a pool of `num_blocks` blocks of `block_size` positions.
    pub fn new(shard: CpuShard, num_blocks: usize, block_size: usize) -> Self {
        let kv = shard.new_kv(num_blocks, block_size);
        CpuRank { shard, kv }
    }
}

impl RankBackend for CpuRank {
    fn rank(&self) -> usize {
        self.shard.rank
    }

    fn plan(&self) -> &Plan {
        &self.shard.plan
    }

    fn config(&self) -> &ModelConfig {
        &self.shard.weights.config
    }

    fn device(&self) -> String {
        "cpu".into()
    }

    fn step(
        &mut self,
        comm: &dyn Communicator,
        batch: &[SeqStep<'_>],
    ) -> Result<ShardOutput, ModelError> {
        self.shard.forward(comm, &mut self.kv, batch)
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

    fn new_kv(&self, num_blocks: usize, block_size: usize) -> PagedKv {
        self.shard.new_kv(num_blocks, block_size)
    }

    fn forward(
        &self,
        kv: &mut PagedKv,
        batch: &[SeqStep<'_>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        // A world of one is always its group's first rank, so logits are always returned.
        Ok(self
            .shard
            .forward(&self.comm, kv, batch)?
            .logits
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::open_model;
    use crate::model::{blocks_for, BlockAllocator, LogitsMode, SeqKv};

    fn fixture() -> CpuModel {
        let dir = open_model(&crate::test_support::tiny_a_dir()).unwrap();
        CpuModel::new(ModelWeights::load(dir.source.as_ref(), &dir.config).unwrap()).unwrap()
    }

    fn tokens(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| (i * 37 + seed) % 1024).collect()
    }

    fn head_rows() -> usize {
        HEAD_ROWS.with(|n| n.get())
    }

    /// Runs `toks` through `model` in chunks of `chunks` (cycled), with `blocks` of `bs`
    /// positions in a pool of `pool` blocks; every position's logits, concatenated.
    fn chunked(
        model: &CpuModel,
        toks: &[u32],
        chunks: &[usize],
        bs: usize,
        pool: usize,
        blocks: &[u32],
    ) -> Vec<f32> {
        let mut kv = model.new_kv(pool, bs);
        let mut out = Vec::new();
        let (mut pos, mut i) = (0, 0);
        while pos < toks.len() {
            let end = (pos + chunks[i % chunks.len()]).min(toks.len());
            let step = [SeqStep {
                tokens: &toks[pos..end],
                start: pos,
                blocks,
                logits: LogitsMode::All,
            }];
            out.extend(model.forward(&mut kv, &step).unwrap().remove(0));
            pos = end;
            i += 1;
        }
        out
    }

    #[test]
    fn scattered_blocks_give_the_logits_of_one_contiguous_cache() {
        let model = fixture();
        let ctx = model.config().max_seq_len;
        let toks = tokens(30, 5);
        // One block holding the whole context: the layout of a contiguous per-sequence cache.
        let contiguous = chunked(&model, &toks, &[7, 1, 13], ctx, 1, &[0]);
        let in_order = chunked(&model, &toks, &[7, 1, 13], 4, 64, &[0, 1, 2, 3, 4, 5, 6, 7]);
        let scattered = chunked(
            &model,
            &toks,
            &[7, 1, 13],
            4,
            64,
            &[17, 3, 40, 9, 25, 60, 1, 33],
        );
        assert_eq!(contiguous.len(), 30 * 1024);
        // The same arithmetic in the same order: identical, not merely close.
        assert_eq!(in_order, contiguous);
        assert_eq!(scattered, contiguous);
        // And one sequence at a time equals interleaved blocks shared with another sequence.
        let other = tokens(9, 11);
        let mut kv = model.new_kv(16, 4);
        let (a, b): (Vec<u32>, Vec<u32>) = ((0..8).map(|i| 2 * i).collect(), vec![1, 3, 5]);
        let out = model
            .forward(
                &mut kv,
                &[
                    SeqStep {
                        tokens: &toks,
                        start: 0,
                        blocks: &a,
                        logits: LogitsMode::All,
                    },
                    SeqStep {
                        tokens: &other,
                        start: 0,
                        blocks: &b,
                        logits: LogitsMode::Last,
                    },
                ],
            )
            .unwrap();
        let worst = crate::test_support::max_abs_diff(&out[0], &contiguous);
        assert!(worst <= 1e-4, "batched with interleaved blocks: {worst}");
        let mut alone = SeqKv::new(&model);
        let want = alone.step(&model, &other, LogitsMode::Last).unwrap();
        let worst = crate::test_support::max_abs_diff(&out[1], &want);
        assert!(worst <= 1e-4, "second sequence: {worst}");
    }

    #[test]
    fn bad_steps_are_refused_before_the_pool_changes() {
        let model = fixture();
        let mut kv = model.new_kv(8, 4);
        let t = tokens(6, 1);
        let step = |tokens: &'static [u32], start, blocks: &'static [u32]| SeqStep {
            tokens,
            start,
            blocks,
            logits: LogitsMode::Last,
        };
        let t: &'static [u32] = Box::leak(t.into_boxed_slice());
        let cases: Vec<(Vec<SeqStep>, &str)> = vec![
            (vec![step(t, 0, &[0, 8])], "block id 8 is outside"),
            (vec![step(t, 0, &[0])], "needs 2"),
            (vec![step(t, 4, &[0, 1])], "needs 3"),
            (vec![step(t, 0, &[2, 2])], "appears twice"),
            (
                vec![step(t, 0, &[0, 1]), step(t, 0, &[1, 2])],
                "block 1 is written by batch entry 0 and also used by batch entry 1",
            ),
            // Reading a block another entry writes is refused too.
            (
                vec![step(&t[..1], 4, &[3, 4]), step(&t[..1], 4, &[4, 5])],
                "block 4 is written by batch entry 0 and also used by batch entry 1",
            ),
            (vec![step(&[], 0, &[0])], "no tokens"),
            (vec![step(&[4096], 0, &[0])], "outside the vocabulary"),
            (vec![step(t, 254, &[0; 65])], "beyond the model's context"),
        ];
        for (batch, want) in cases {
            let err = model.forward(&mut kv, &batch).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: got {err}");
        }
        assert!(kv
            .keys
            .iter()
            .chain(&kv.values)
            .flatten()
            .all(|&v| v == 0.0));
        // Two sequences may read (not write) the same block: a shared prefix.
        model.forward(&mut kv, &[step(&t[..4], 0, &[0])]).unwrap();
        model
            .forward(
                &mut kv,
                &[step(&t[..1], 4, &[0, 1]), step(&t[..1], 4, &[0, 2])],
            )
            .unwrap();
        // A pool made for another shard (fewer kv heads, other layer count) is refused.
        for mut wrong in [PagedKv::new(3, 64, 4, 8), PagedKv::new(2, 128, 4, 8)] {
            let err = model
                .forward(&mut wrong, &[step(t, 0, &[0, 1])])
                .unwrap_err();
            assert!(matches!(err, ModelError::WrongPool { .. }), "{err}");
        }
    }

    #[test]
    fn logits_none_returns_nothing_and_skips_the_head() {
        let model = fixture();
        let mut kv = model.new_kv(8, 16);
        let t = tokens(10, 3);
        let before = head_rows();
        let out = model
            .forward(
                &mut kv,
                &[
                    SeqStep {
                        tokens: &t[..6],
                        start: 0,
                        blocks: &[0],
                        logits: LogitsMode::None,
                    },
                    SeqStep {
                        tokens: &t,
                        start: 0,
                        blocks: &[1],
                        logits: LogitsMode::None,
                    },
                ],
            )
            .unwrap();
        assert_eq!(out, vec![Vec::<f32>::new(), Vec::new()]);
        assert_eq!(head_rows(), before, "no head rows for LogitsMode::None");
        // Mixed modes in one step: only the rows asked for.
        let out = model
            .forward(
                &mut kv,
                &[
                    SeqStep {
                        tokens: &t[6..],
                        start: 6,
                        blocks: &[0],
                        logits: LogitsMode::Last,
                    },
                    SeqStep {
                        tokens: &t[..3],
                        start: 0,
                        blocks: &[2],
                        logits: LogitsMode::All,
                    },
                    SeqStep {
                        tokens: &t[..2],
                        start: 0,
                        blocks: &[3],
                        logits: LogitsMode::None,
                    },
                ],
            )
            .unwrap();
        assert_eq!(
            out.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1024, 3 * 1024, 0]
        );
        assert_eq!(head_rows(), before + 4);
        // The prefill done without logits continues like one done whole.
        let mut alone = SeqKv::new(&model);
        let want = alone.step(&model, &t, LogitsMode::Last).unwrap();
        assert!(crate::test_support::max_abs_diff(&out[0], &want) <= 1e-4);
    }

    #[test]
    fn expert_tokens_count_every_token_top_k_times_per_layer() {
        let model = fixture();
        let c = model.config().clone();
        let mut kv = model.new_kv(8, 16);
        let (a, b) = (tokens(13, 2), tokens(4, 9));
        let out = model
            .shard
            .forward(
                &model.comm,
                &mut kv,
                &[
                    SeqStep {
                        tokens: &a,
                        start: 0,
                        blocks: &[0],
                        logits: LogitsMode::Last,
                    },
                    SeqStep {
                        tokens: &b,
                        start: 0,
                        blocks: &[5],
                        logits: LogitsMode::None,
                    },
                ],
            )
            .unwrap();
        let e = c.num_local_experts;
        assert_eq!(out.expert_tokens.len(), c.num_hidden_layers * e);
        for l in 0..c.num_hidden_layers {
            let per_layer: u64 = out.expert_tokens[l * e..(l + 1) * e].iter().sum();
            assert_eq!(per_layer, (17 * c.num_experts_per_tok) as u64, "layer {l}");
        }
        assert!(out.logits.is_some());
    }

    #[test]
    fn allocator_blocks_drive_several_sequences_through_one_pool() {
        let model = fixture();
        let bs = 4;
        let mut alloc = BlockAllocator::new(12);
        let mut kv = model.new_kv(alloc.total(), bs);
        let (a, b) = (tokens(10, 4), tokens(7, 8));
        let ba = alloc.alloc(blocks_for(a.len(), bs)).unwrap();
        let bb = alloc.alloc(blocks_for(b.len(), bs)).unwrap();
        let out = model
            .forward(
                &mut kv,
                &[
                    SeqStep {
                        tokens: &a,
                        start: 0,
                        blocks: &ba,
                        logits: LogitsMode::Last,
                    },
                    SeqStep {
                        tokens: &b,
                        start: 0,
                        blocks: &bb,
                        logits: LogitsMode::Last,
                    },
                ],
            )
            .unwrap();
        // Sequence a finishes; its blocks go to c, which must not see a's keys.
        alloc.release(&ba);
        let c_toks = tokens(5, 4);
        let bc = alloc.alloc(blocks_for(c_toks.len(), bs)).unwrap();
        let got = model
            .forward(
                &mut kv,
                &[SeqStep {
                    tokens: &c_toks,
                    start: 0,
                    blocks: &bc,
                    logits: LogitsMode::Last,
                }],
            )
            .unwrap();
        let mut alone = SeqKv::new(&model);
        assert_eq!(
            got[0],
            alone.step(&model, &c_toks, LogitsMode::Last).unwrap()
        );
        let mut alone = SeqKv::new(&model);
        let want = alone.step(&model, &b, LogitsMode::Last).unwrap();
        assert!(crate::test_support::max_abs_diff(&out[1], &want) <= 1e-4);
    }
}

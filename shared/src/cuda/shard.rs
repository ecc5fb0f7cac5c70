//! One rank's slice of the model on a GPU, with its KV pool in device memory: the step of
//! [`crate::cpu::CpuShard::forward`] (same plan, same collectives, same order of sums across
//! ranks), computed by the kernels of [`super::device`].
//!
//! The collectives trait works on host vectors, so a rank of a larger world copies the few
//! activations each collective moves; a world of one keeps the whole step on the device and
//! only brings back the router's choices (the expert batch sizes the launches need; decode
//! steps of a few tokens leave them on the device until the step ends) and the logits.

use super::device::{
    decode_key_granule, Arg, Buf, DevQ, ExpertSet, Gpu, ATT_HEAD_DIMS, ATT_KEYS, ATT_ROWS,
    ATT_THREADS, DECODE_MAX_SPLITS, DECODE_ROWS, DECODE_THREADS, DEFAULT_GEMM_MIN_ROWS,
    MMA_ROUTED_TOKENS, Q_TILE,
};
use super::CudaError;
use crate::bytes::ByteView;
use crate::comm::{Communicator, Timed};
use crate::config::ModelConfig;
use crate::model::weights::{QMatrix, Slices};
use crate::model::{check_steps, ModelError, ModelWeights, RankBackend, SeqStep, ShardOutput};
use crate::parallel::dispatch::{split_messages, Arrivals, Dispatch};
use crate::parallel::plan::Plan;
use std::time::Duration;

/// What a residual update adds to the stream.
#[derive(Clone, Copy)]
enum Update<'a> {
    /// A row per token.
    Rows(&'a Buf<f32>),
    /// The experts' `k` output rows per token (`[m * k, d]`) and their gates at a device
    /// address, combined in choice order by the residual kernel.
    Slots { ys: &'a Buf<f32>, gates: u64 },
}

/// A router fused into a residual kernel: its weights and where the picks (i32) and gates
/// (f32) go, `k` per row (device addresses).
#[derive(Clone, Copy)]
struct Route {
    router: u64,
    picks: u64,
    gates: u64,
}

/// Key splits per (tile, kv head): enough blocks to fill the GPU four times over, each split
/// at least `granule` keys (a decode step's few blocks are otherwise one per SM, waiting on
/// their loads). At least one.
fn key_splits(blocks: usize, sms: usize, longest: usize, granule: usize) -> usize {
    if blocks == 0 || blocks >= 4 * sms {
        return 1;
    }
    (4 * sms)
        .div_ceil(blocks)
        .min(longest.div_ceil(granule))
        .max(1)
}

struct DevExpert {
    gate: DevQ,
    up: DevQ,
    down: DevQ,
}

/// A layer's q, k and v projections.
enum Qkv {
    /// Side by side in one tiled matrix (widths of q, k, v): one launch for the three.
    Fused { w: DevQ, widths: [usize; 3] },
    /// q, k, v (boxed: the variants' sizes differ a lot).
    Separate(Box<[DevQ; 3]>),
}

impl Qkv {
    fn upload(gpu: &Gpu, wq: &QMatrix, wk: &QMatrix, wv: &QMatrix) -> Result<Self, CudaError> {
        let fusable = wq.n.is_multiple_of(Q_TILE)
            && wk.n.is_multiple_of(Q_TILE)
            && wv.n.is_multiple_of(16)
            && [wk, wv]
                .iter()
                .all(|m| m.k == wq.k && m.group_rows == wq.group_rows);
        if !fusable {
            return Ok(Qkv::Separate(Box::new([
                gpu.upload_q(wq)?,
                gpu.upload_q(wk)?,
                gpu.upload_q(wv)?,
            ])));
        }
        let parts = [wq, wk, wv];
        let n: usize = parts.iter().map(|m| m.n).sum();
        let mut w = Vec::with_capacity(wq.k * n);
        for row in 0..wq.k {
            for m in parts {
                w.extend_from_slice(&m.weight.as_slice()[row * m.n..(row + 1) * m.n]);
            }
        }
        let mut scales = Vec::with_capacity(wq.scales.len() / wq.n * n);
        for g in 0..wq.k / wq.group_rows {
            for m in parts {
                scales.extend_from_slice(&m.scales[g * m.n..(g + 1) * m.n]);
            }
        }
        let fused = QMatrix {
            k: wq.k,
            n,
            group_rows: wq.group_rows,
            weight: ByteView::from_vec(w),
            scales,
        };
        Ok(Qkv::Fused {
            w: gpu.upload_q(&fused)?,
            widths: [wq.n, wk.n, wv.n],
        })
    }

    fn bytes(&self) -> usize {
        match self {
            Qkv::Fused { w, .. } => w.bytes(),
            Qkv::Separate(m) => m.iter().map(|m| m.bytes()).sum(),
        }
    }
}

/// A layer's experts as device tables, for routing on the device (world of one).
struct DeviceRouted {
    /// Every expert's gate matrix, then every expert's up matrix.
    gate_up: ExpertSet,
    down: ExpertSet,
}

struct DevLayer {
    attn_norm: Buf<f32>,
    post_attn_norm: Buf<f32>,
    moe_norm: Buf<f32>,
    post_moe_norm: Buf<f32>,
    qkv: Qkv,
    wo: DevQ,
    router: Buf<f32>,
    experts: Vec<DevExpert>,
    routed: Option<DeviceRouted>,
}

pub struct CudaShard {
    gpu: Gpu,
    config: ModelConfig,
    /// The config with this rank's head counts.
    local: ModelConfig,
    plan: Plan,
    rank: usize,
    ordinal: usize,
    slices: Slices,
    embeddings: Buf<f32>,
    final_norm: Buf<f32>,
    layers: Vec<DevLayer>,
    inv_freq: Buf<f32>,
    /// Per layer, the pool's keys and values: `[num_blocks * block_size, kv_dim]`.
    keys: Vec<Buf<f32>>,
    values: Vec<Buf<f32>>,
    block_size: usize,
    num_blocks: usize,
    weight_bytes: usize,
    /// Batches of at least this many rows use cuBLAS (bf16) instead of the int8 kernel.
    pub gemm_min_rows: usize,
    /// Decode steps in a world of one keep the router's picks on the GPU (no wait for the
    /// host inside a layer) where the experts' matrices allow it (see `device_routes`): up
    /// to [`DEVICE_ROUTED_TOKENS`] tokens on the int8 path, the same bits either way; up to
    /// [`MMA_ROUTED_TOKENS`] on the bf16 path, the same operands with the sums in another
    /// order. Off (`GROK_CUDA_DEVICE_ROUTING=0`), every step routes on the host (to compare
    /// the two, or to step around `qgemv_experts_*` / `qmma_experts_4` on a GPU where they
    /// misbehave).
    pub device_routing: bool,
    /// Decode tiles take `attention_decode_*` where it is built for the head size; off
    /// (`GROK_CUDA_DECODE_ATTENTION=0`), the generic `attention_16` and its combine (to
    /// compare the two, or to step around one that misbehaves on some GPU).
    pub decode_attention: bool,
}

/// The most tokens a step may have for the device-routed experts (an expert's rows go through
/// the decode kernel 4 at a time; with more than 8 an expert could reach the bf16 path's 9
/// rows on the host-routed path, and the two would no longer give the same bits).
pub const DEVICE_ROUTED_TOKENS: usize = 8;

/// Per-step tables every layer shares (device addresses inside one buffer).
struct StepMeta {
    n: usize,
    /// The step's tokens.
    tokens: u64,
    positions: u64,
    /// Pool row of each new token.
    write_slots: u64,
    /// `[tiles, 4]`: see the attention kernel.
    tiles: u64,
    num_tiles: usize,
    /// Rows per attention tile: 16 for decode steps, 64 for prefill (which kernels run).
    tile_rows: usize,
    /// Rows of the largest tile (the decode kernel's size is the smallest that holds it).
    max_rows: usize,
    /// Key splits per tile (flash-decoding: a small grid splits each tile's keys).
    splits: usize,
    /// Pool rows of every visible position of every sequence, concatenated.
    read_slots: u64,
    _buf: Buf<u32>,
}

impl CudaShard {
    /// Uploads `weights` (exactly the slices `plan` gives `rank`) to GPU `ordinal` and makes a
    /// pool of `num_blocks` blocks of `block_size` positions there.
    pub fn new(
        weights: ModelWeights,
        plan: Plan,
        rank: usize,
        ordinal: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, ModelError> {
        let c = weights.config.clone();
        let (want, local) = weights.check_rank(&plan, rank)?;
        let group = c.num_attention_heads / c.num_key_value_heads.max(1);
        if c.head_dim > ATT_THREADS || group > ATT_ROWS[0] || c.num_local_experts > 64 {
            return Err(CudaError::Unsupported(format!(
                "head_dim {} (at most {ATT_THREADS}), {group} query heads per kv head (at most \
                 {}), {} experts (at most 64)",
                c.head_dim, ATT_ROWS[0], c.num_local_experts
            ))
            .into());
        }
        if num_blocks == 0 || block_size == 0 {
            return Err(ModelError::BadTensor {
                name: "KV pool".into(),
                msg: "needs at least one block of at least one position".into(),
            });
        }
        let gpu = Gpu::open(ordinal)?;
        let up = |v: &[f32]| gpu.upload(v);
        let mut weight_bytes = 0;
        let mut layers = Vec::with_capacity(weights.layers.len());
        for lw in &weights.layers {
            let q = |m| gpu.upload_q(m);
            let experts = lw
                .experts
                .iter()
                .map(|e| {
                    Ok(DevExpert {
                        gate: q(&e.w_gate)?,
                        up: q(&e.w_up)?,
                        down: q(&e.w_down)?,
                    })
                })
                .collect::<Result<Vec<_>, CudaError>>()?;
            // Every expert in full on this rank: tables for routing on the device.
            let routed = if plan.world == 1 && experts.len() == c.num_local_experts {
                let gate_up: Vec<&DevQ> = experts
                    .iter()
                    .map(|e| &e.gate)
                    .chain(experts.iter().map(|e| &e.up))
                    .collect();
                let down: Vec<&DevQ> = experts.iter().map(|e| &e.down).collect();
                let n = experts.len();
                match (gpu.expert_set(&gate_up, n), gpu.expert_set(&down, n)) {
                    (Ok(gate_up), Ok(down)) => Some(DeviceRouted { gate_up, down }),
                    // Untiled widths: the host groups the rows instead.
                    _ => None,
                }
            } else {
                None
            };
            let layer = DevLayer {
                attn_norm: up(&lw.attn_norm)?,
                post_attn_norm: up(&lw.post_attn_norm)?,
                moe_norm: up(&lw.moe_norm)?,
                post_moe_norm: up(&lw.post_moe_norm)?,
                qkv: Qkv::upload(&gpu, &lw.wq, &lw.wk, &lw.wv)?,
                wo: q(&lw.wo)?,
                router: up(&lw.router)?,
                experts,
                routed,
            };
            weight_bytes += layer.qkv.bytes()
                + layer.wo.bytes()
                + layer
                    .experts
                    .iter()
                    .map(|e| e.gate.bytes() + e.up.bytes() + e.down.bytes())
                    .sum::<usize>()
                + layer.router.bytes()
                + 4 * layer.attn_norm.bytes();
            layers.push(layer);
        }
        let embeddings = up(&weights.embeddings)?;
        let final_norm = up(&weights.final_norm)?;
        weight_bytes += embeddings.bytes() + final_norm.bytes();
        let inv_freq = up(&crate::cpu::ops::rope_inv_freq(c.head_dim, c.rope_theta))?;
        let pool = num_blocks
            .checked_mul(block_size)
            .and_then(|p| p.checked_mul(local.kv_dim()))
            .ok_or_else(|| ModelError::BadTensor {
                name: "KV pool".into(),
                msg: format!("{num_blocks} blocks of {block_size} positions overflow"),
            })?;
        let mut keys = Vec::with_capacity(c.num_hidden_layers);
        let mut values = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            keys.push(gpu.zeros::<f32>(pool)?);
            values.push(gpu.zeros::<f32>(pool)?);
        }
        gpu.sync()?;
        Ok(CudaShard {
            gpu,
            config: c,
            local,
            plan,
            rank,
            ordinal,
            slices: want,
            embeddings,
            final_norm,
            layers,
            inv_freq,
            keys,
            values,
            block_size,
            num_blocks,
            weight_bytes,
            gemm_min_rows: std::env::var("GROK_CUDA_GEMM_MIN_ROWS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_GEMM_MIN_ROWS),
            device_routing: super::switched_on("GROK_CUDA_DEVICE_ROUTING"),
            decode_attention: super::switched_on("GROK_CUDA_DECODE_ATTENTION"),
        })
    }

    /// Whether a step's tiles take `attention_decode_*`: decode-sized tiles at a head size it
    /// is built for, unless it is switched off.
    fn decode_kernel(&self, tile_rows: usize) -> bool {
        self.decode_attention
            && tile_rows == ATT_ROWS[0]
            && ATT_HEAD_DIMS.contains(&self.local.head_dim)
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Bytes of weights resident on the GPU (int8 matrices, f32 scales and vectors).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Weight bytes a step reads, given its `expert_tokens` (per layer, this rank's experts):
    /// every attention matrix and the router, and each local expert that got a token.
    pub fn step_weight_bytes(&self, expert_tokens: &[u64]) -> usize {
        let experts = self.config.num_local_experts;
        let mine = self.slices.experts.clone();
        let mut total = 0;
        for (l, lw) in self.layers.iter().enumerate() {
            total += lw.qkv.bytes() + lw.wo.bytes();
            total += lw.router.bytes();
            for (j, e) in lw.experts.iter().enumerate() {
                let used = expert_tokens
                    .get(l * experts + mine.start + j)
                    .is_some_and(|&n| n > 0);
                if used {
                    total += e.gate.bytes() + e.up.bytes() + e.down.bytes();
                }
            }
        }
        total
    }

    /// Bytes of the KV pool on the GPU.
    pub fn kv_bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|b| b.bytes())
            .sum()
    }

    fn step_meta(&self, batch: &[SeqStep<'_>], positions: &[usize]) -> Result<StepMeta, CudaError> {
        let bs = self.block_size;
        let group = self.local.num_attention_heads / self.local.num_key_value_heads;
        // Decode steps (a token or two per sequence) take the small tile.
        let tile_rows = if batch.iter().all(|s| s.tokens.len() * group <= ATT_ROWS[0]) {
            ATT_ROWS[0]
        } else {
            ATT_ROWS[1]
        };
        let per_tile = (tile_rows / group).max(1);
        let slot = |blocks: &[u32], p: usize| blocks[p / bs] * bs as u32 + (p % bs) as u32;
        let mut write = Vec::with_capacity(positions.len());
        let mut tiles = Vec::new();
        let mut read = Vec::new();
        let mut row = 0;
        let mut max_rows = 0;
        for s in batch {
            let end = s.start + s.tokens.len();
            let off = read.len();
            read.extend((0..end).map(|p| slot(s.blocks, p)));
            write.extend((s.start..end).map(|p| slot(s.blocks, p)));
            let mut t = 0;
            while t < s.tokens.len() {
                let nt = per_tile.min(s.tokens.len() - t);
                max_rows = max_rows.max(nt * group);
                tiles.extend([
                    (row + t) as i32,
                    nt as i32,
                    (s.start + t) as i32,
                    off as i32,
                ]);
                t += nt;
            }
            row += s.tokens.len();
        }
        let pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let num_tiles = tiles.len() / 4;
        let blocks = num_tiles * self.local.num_key_value_heads;
        let longest = batch
            .iter()
            .map(|s| s.start + s.tokens.len())
            .max()
            .unwrap_or(0);
        let hd = self.local.head_dim;
        let (granule, most) = if self.decode_kernel(tile_rows) {
            (decode_key_granule(hd), DECODE_MAX_SPLITS)
        } else {
            (ATT_KEYS, usize::MAX)
        };
        let splits = key_splits(blocks, self.gpu.sms(), longest, granule).min(most);
        // One upload for all of them (and the step's tokens): a step starts with the GPU
        // idle, waiting for these.
        let tokens = batch.iter().flat_map(|s| s.tokens.iter().copied());
        let mut all: Vec<u32> = Vec::with_capacity(3 * pos.len() + tiles.len() + read.len());
        all.extend(tokens);
        let p_at = all.len();
        all.extend_from_slice(&pos);
        let w_at = all.len();
        all.extend_from_slice(&write);
        let t_at = all.len();
        all.extend(tiles.iter().map(|&v| v as u32));
        let r_at = all.len();
        all.extend_from_slice(&read);
        let buf = self.gpu.upload(&all)?;
        Ok(StepMeta {
            tile_rows,
            max_rows,
            splits,
            n: positions.len(),
            tokens: buf.ptr(),
            positions: buf.at(p_at),
            write_slots: buf.at(w_at),
            num_tiles,
            tiles: buf.at(t_at),
            read_slots: buf.at(r_at),
            _buf: buf,
        })
    }

    /// One step, as [`crate::cpu::CpuShard::forward`] (in lockstep with every rank).
    pub fn forward(
        &mut self,
        comm: &dyn Communicator,
        batch: &[SeqStep<'_>],
    ) -> Result<ShardOutput, ModelError> {
        let c = &self.config;
        let positions = check_steps(c, self.block_size, self.num_blocks, batch)?;
        // The engine may step on any thread (a rayon scope, say): make the context current.
        self.gpu
            .context()
            .bind_to_thread()
            .map_err(|e| CudaError::Driver {
                op: "binding the context",
                msg: e.to_string(),
            })?;
        let (d, n, tp) = (c.hidden_size, positions.len(), self.plan.tp);
        let experts = c.num_local_experts;
        let group = self.plan.tp_group(self.rank);
        let (my_rows, counts) = self.plan.token_shard(n, self.rank, d);
        let mut comm = Timed {
            comm,
            spent: Duration::ZERO,
        };
        let mut expert_tokens = vec![0u64; c.num_hidden_layers * experts];
        let g = &self.gpu;
        let meta = self.step_meta(batch, &positions)?;
        let mut h = g.alloc::<f32>(n * d)?;
        g.rows_launch(
            "embed",
            n,
            &[
                Arg::P(h.ptr()),
                Arg::P(self.embeddings.ptr()),
                Arg::P(meta.tokens),
                Arg::I(d as i32),
                Arg::F(c.embedding_multiplier_scale),
            ],
        )?;
        let m = my_rows.len();
        let k = c.num_experts_per_tok;
        let device_routed = self.device_routes(m);
        // Every layer's routing: its picks (i32), then their gates, m * k of each. Device
        // routing reads the picks once after the step; host routing after each router.
        let routing = g.alloc::<u32>(self.layers.len() * 2 * m * k)?;
        // The next layer's attention input, when this layer's last kernel can make it.
        let mut x_next = None;
        for l in 0..self.layers.len() {
            let o = self.attention(l, &h, x_next.take(), &meta)?;
            let o_shard = if tp == 1 {
                o
            } else {
                let host = g.download_f32(o.ptr(), n * d)?;
                let mine = comm.run(|cm| cm.reduce_scatter(&group, &host, &counts))?;
                g.upload(&mine)?
            };
            let h_shard = if tp == 1 {
                h
            } else {
                let s = g.alloc::<f32>(m * d)?;
                g.copy_dd(s.ptr(), h.at(my_rows.start * d), m * d * 4)?;
                s
            };
            let lw = &self.layers[l];
            let x = g.alloc::<f32>(m * d)?;
            let route = Route {
                router: lw.router.ptr(),
                picks: routing.at(2 * l * m * k),
                gates: routing.at((2 * l + 1) * m * k),
            };
            let then = Some((&lw.moe_norm, &x));
            let update = Update::Rows(&o_shard);
            self.residual(&h_shard, update, &lw.post_attn_norm, then, Some(route), m)?;
            let routed = &mut expert_tokens[l * experts..(l + 1) * experts];
            let y = if device_routed {
                self.moe_device_routed(l, &x, m, route.picks)?
            } else {
                self.moe(&mut comm, l, &x, m, route.picks, routed)?
            };
            // Device routing leaves the per-slot outputs: the residual kernel combines them.
            let update = if device_routed {
                Update::Slots {
                    ys: &y,
                    gates: route.gates,
                }
            } else {
                Update::Rows(&y)
            };
            match self.layers.get(l + 1) {
                // Without TP the residual stays here: norm it for the next layer too.
                Some(next) if tp == 1 => {
                    let x = g.alloc::<f32>(m * d)?;
                    let then = Some((&next.attn_norm, &x));
                    self.residual(&h_shard, update, &lw.post_moe_norm, then, None, m)?;
                    x_next = Some(x);
                }
                _ => self.residual(&h_shard, update, &lw.post_moe_norm, None, None, m)?,
            }
            h = if tp == 1 {
                h_shard
            } else {
                let host = g.download_f32(h_shard.ptr(), m * d)?;
                let all = comm.run(|cm| cm.all_gather_v(&group, &host))?.concat();
                g.upload(&all)?
            };
        }
        let mut out = ShardOutput {
            logits: None,
            expert_tokens,
            comm_time: comm.spent,
        };
        if self.rank.is_multiple_of(tp) {
            out.logits = Some(self.head(&h, batch)?);
        } else {
            g.sync()?;
        }
        if device_routed {
            let mut all = vec![0u32; routing.len()];
            g.copy_out(routing.ptr(), &mut all)?;
            for (l, layer) in all.chunks_exact(2 * m * k).enumerate() {
                for &e in &layer[..m * k] {
                    let e = e as i32;
                    let e = usize::try_from(e)
                        .ok()
                        .filter(|&e| e < experts)
                        .ok_or_else(|| ModelError::Peer {
                            rank: self.rank,
                            msg: format!("layer {l}: the router kernel chose expert {e}"),
                        })?;
                    out.expert_tokens[l * experts + e] += 1;
                }
            }
        }
        Ok(out)
    }

    fn rmsnorm(
        &self,
        x: &Buf<f32>,
        w: &Buf<f32>,
        out: &Buf<f32>,
        rows: usize,
        post: f32,
    ) -> Result<(), CudaError> {
        let c = &self.config;
        self.gpu.rows_launch(
            "rmsnorm",
            rows,
            &[
                Arg::P(x.ptr()),
                Arg::P(w.ptr()),
                Arg::P(out.ptr()),
                Arg::I(c.hidden_size as i32),
                Arg::F(c.rms_norm_eps),
                Arg::F(post),
            ],
        )
    }

    /// `h += rmsnorm(update) * w`; with `then = (w2, out)` also `out = rmsnorm(h) * w2` in
    /// the same kernel (the norm that follows a residual update), and with `route` the
    /// router's top-k of `out` too (`residual_norm` in kernels.cu).
    fn residual(
        &self,
        h: &Buf<f32>,
        update: Update<'_>,
        w: &Buf<f32>,
        then: Option<(&Buf<f32>, &Buf<f32>)>,
        route: Option<Route>,
        rows: usize,
    ) -> Result<(), CudaError> {
        let c = &self.config;
        let (y, gates) = match update {
            Update::Rows(y) => (y.ptr(), 0),
            Update::Slots { ys, gates } => (ys.ptr(), gates),
        };
        let (w2, out) = then.map_or((0, 0), |(w2, out)| (w2.ptr(), out.ptr()));
        let route = route.unwrap_or(Route {
            router: 0,
            picks: 0,
            gates: 0,
        });
        self.gpu.rows_launch(
            "residual_norm",
            rows,
            &[
                Arg::P(h.ptr()),
                Arg::P(y),
                Arg::P(gates),
                Arg::I(c.num_experts_per_tok as i32),
                Arg::P(w.ptr()),
                Arg::P(w2),
                Arg::P(out),
                Arg::I(c.hidden_size as i32),
                Arg::F(c.rms_norm_eps),
                Arg::F(1.0),
                Arg::P(route.router),
                Arg::I(c.num_local_experts as i32),
                Arg::P(route.picks),
                Arg::P(route.gates),
            ],
        )
    }

    fn mm(&self, x: u64, m: usize, q: &DevQ, out: u64) -> Result<(), CudaError> {
        self.gpu.qmatmul(x, m, q, out, self.gemm_min_rows)
    }

    /// This rank's heads of attention for all rows of `h`, through its slice of the output
    /// projection: a partial `[rows, d]` sum over the TP group.
    /// `x` is `h` through the layer's attention norm when the previous layer made it already.
    fn attention(
        &self,
        l: usize,
        h: &Buf<f32>,
        x: Option<Buf<f32>>,
        meta: &StepMeta,
    ) -> Result<Buf<f32>, CudaError> {
        let (g, c, lw) = (&self.gpu, &self.local, &self.layers[l]);
        let (d, n) = (c.hidden_size, meta.n);
        let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let x = match x {
            Some(x) => x,
            None => {
                let x = g.alloc::<f32>(n * d)?;
                self.rmsnorm(h, &lw.attn_norm, &x, n, 1.0)?;
                x
            }
        };
        let q = g.alloc::<f32>(n * qd)?;
        let k = g.alloc::<f32>(n * kvd)?;
        let v = g.alloc::<f32>(n * kvd)?;
        match &lw.qkv {
            Qkv::Fused { w, widths } => g.qmatmul_split(
                x.ptr(),
                n,
                w,
                *widths,
                [q.ptr(), k.ptr(), v.ptr()],
                self.gemm_min_rows,
            )?,
            Qkv::Separate(m) => {
                for (w, out) in m.iter().zip([&q, &k, &v]) {
                    self.mm(x.ptr(), n, w, out.ptr())?;
                }
            }
        }
        g.rows_launch(
            "rope_kv",
            n,
            &[
                Arg::P(q.ptr()),
                Arg::P(k.ptr()),
                Arg::P(v.ptr()),
                Arg::P(self.keys[l].ptr()),
                Arg::P(self.values[l].ptr()),
                Arg::P(meta.positions),
                Arg::P(meta.write_slots),
                Arg::P(self.inv_freq.ptr()),
                Arg::I(c.num_attention_heads as i32),
                Arg::I(c.num_key_value_heads as i32),
                Arg::I(hd as i32),
            ],
        )?;
        let att = g.alloc::<f32>(n * qd)?;
        let (rows, splits, kvh) = (meta.tile_rows, meta.splits, c.num_key_value_heads);
        let parts = splits * meta.num_tiles * kvh * rows;
        // Partial outputs only when the keys are split.
        let (part_o, part_ml) = if splits > 1 {
            (g.alloc::<f32>(parts * hd)?, g.alloc::<f32>(parts * 2)?)
        } else {
            (g.alloc::<f32>(0)?, g.alloc::<f32>(0)?)
        };
        let grid = (meta.num_tiles as u32, (kvh * splits) as u32);
        let mut args = vec![
            Arg::P(q.ptr()),
            Arg::P(self.keys[l].ptr()),
            Arg::P(self.values[l].ptr()),
            Arg::P(att.ptr()),
            Arg::P(meta.tiles),
            Arg::P(meta.read_slots),
            Arg::I(c.num_attention_heads as i32),
            Arg::I(kvh as i32),
            Arg::I(hd as i32),
            Arg::F(c.attn_output_multiplier),
            Arg::F(c.max_attn_value),
            Arg::I(splits as i32),
            Arg::P(part_o.ptr()),
            Arg::P(part_ml.ptr()),
        ];
        if self.decode_kernel(rows) {
            // It merges its own key splits (counters per tile and kv head).
            let r = DECODE_ROWS
                .into_iter()
                .find(|&r| r >= meta.max_rows)
                .ok_or_else(|| {
                    CudaError::Unsupported(format!("a decode tile of {} rows", meta.max_rows))
                })?;
            let counters = if splits > 1 {
                g.counters(meta.num_tiles * kvh)?
            } else {
                0
            };
            args.push(Arg::P(counters));
            let kernel = format!("attention_decode_{hd}_{r}");
            g.launch(&kernel, grid, (DECODE_THREADS as u32, 1), 0, &args)?;
        } else {
            // Prefill tiles take the register-tiled kernel where it is built for the head size;
            // on the bf16 path (this step's projections ran with bf16 operands) its tensor-core
            // twin, which rounds q, k, v and the weights to bf16 as the release does. Both lay
            // out their key splits' partial outputs for 64-row tiles: decode tiles (the decode
            // kernel switched off) take the generic kernel of their size.
            let bf16_path = n >= self.gemm_min_rows && g.bf16_tensor_cores();
            let prefill_kernels = rows == ATT_ROWS[1] && ATT_HEAD_DIMS.contains(&hd);
            let (kernel, smem) = if prefill_kernels && bf16_path {
                (format!("attention_tc_{hd}"), 0)
            } else if prefill_kernels {
                (
                    format!("attention_prefill_{hd}"),
                    Gpu::prefill_smem_bytes(hd),
                )
            } else {
                (
                    format!("attention_{rows}"),
                    Gpu::attention_smem_bytes(rows, hd),
                )
            };
            g.launch(&kernel, grid, (ATT_THREADS as u32, 1), smem as u32, &args)?;
            if splits > 1 {
                g.launch3(
                    "attention_combine",
                    (meta.num_tiles as u32, kvh as u32, rows as u32),
                    (ATT_THREADS as u32, 1),
                    0,
                    &[
                        Arg::P(part_o.ptr()),
                        Arg::P(part_ml.ptr()),
                        Arg::P(att.ptr()),
                        Arg::P(meta.tiles),
                        Arg::I(c.num_attention_heads as i32),
                        Arg::I(kvh as i32),
                        Arg::I(hd as i32),
                        Arg::I(splits as i32),
                        Arg::I(rows as i32),
                    ],
                )?;
            }
        }
        let o = g.alloc::<f32>(n * d)?;
        self.mm(att.ptr(), n, &lw.wo, o.ptr())?;
        Ok(o)
    }

    /// The MoE on this rank's token shard `x` (`[m, d]`), as the CPU backend runs it: the
    /// router's picks (`m * k` i32 at `routing`, then their gates), the dispatch to the ranks
    /// holding each expert, the local experts, the combine with the gates in the CPU
    /// backend's order.
    fn moe(
        &self,
        comm: &mut Timed<'_>,
        l: usize,
        x: &Buf<f32>,
        m: usize,
        routing: u64,
        routed: &mut [u64],
    ) -> Result<Buf<f32>, ModelError> {
        let (g, c) = (&self.gpu, &self.config);
        let (d, k) = (c.hidden_size, c.num_experts_per_tok);
        let world = self.plan.world;
        let lw = &self.layers[l];
        let y = g.zeros::<f32>(m * d)?;
        if m == 0 && world == 1 {
            return Ok(y);
        }
        // The picks, then the gates' bits: one copy (one wait) brings both back.
        let mut back = vec![0u32; 2 * m * k];
        g.copy_out(routing, &mut back)?;
        let (picks, gate_bits) = back.split_at(m * k);

        // The router's picks, checked, then the dispatch the CPU backend makes of them.
        let mut routes = Vec::with_capacity(m);
        for t in 0..m {
            let mut choice = Vec::with_capacity(k);
            for j in 0..k {
                let e = picks[t * k + j] as i32;
                let e = usize::try_from(e)
                    .ok()
                    .filter(|&e| e < c.num_local_experts)
                    .ok_or_else(|| ModelError::Peer {
                        rank: self.rank,
                        msg: format!("layer {l}: the router kernel chose expert {e}"),
                    })?;
                choice.push((e, f32::from_bits(gate_bits[t * k + j])));
            }
            routes.push(choice);
        }
        let dispatch = Dispatch::new(&self.plan, c, &routes, routed);
        let mine = self.slices.experts.clone();

        // What arrives: each source's expert ids, grouped by local expert, and where its rows
        // are on the device (in arrival order). In a world of one they are rows of `x`.
        let recv_buf;
        let (arrivals, recv, arrival_rows): (_, u64, Option<Vec<u32>>) = if world == 1 {
            let tokens: Vec<u32> = dispatch.sent[0].iter().map(|&(t, _)| t as u32).collect();
            let arrivals = Arrivals::new(l, self.rank, mine, &[&dispatch.experts[0]])?;
            (arrivals, x.ptr(), Some(tokens))
        } else {
            let host_x = g.download_f32(x.ptr(), m * d)?;
            let everyone: Vec<usize> = (0..world).collect();
            let got = comm.run(|cm| cm.all_to_all_v(&everyone, dispatch.messages(&host_x, d)))?;
            let got = split_messages(l, &got, d)?;
            let ids: Vec<&[f32]> = got.iter().map(|&(ids, _)| ids).collect();
            let arrivals = Arrivals::new(l, self.rank, mine, &ids)?;
            let rows: Vec<f32> = got.iter().flat_map(|&(_, rows)| rows).copied().collect();
            recv_buf = g.upload(&rows)?;
            (arrivals, recv_buf.ptr(), None)
        };

        // Every index the rest of the layer needs, in one upload: the rows each local expert
        // reads (grouped by expert), the arrival order they go back to (only for the senders
        // of a world of several), and per token its (row, gate) entries in the dispatch's
        // combine order.
        let order = arrivals.expert_order();
        let total = order.len();
        let mut index: Vec<u32> = match &arrival_rows {
            Some(src) => order.iter().map(|&o| src[o as usize]).collect(),
            None => order.clone(),
        };
        if world > 1 {
            index.extend_from_slice(&order);
        }
        let combine_at = index.len();
        index.push(0);
        let mut entries = Vec::new();
        for list in dispatch.combine_order(m) {
            entries.extend(list);
            index.push(entries.len() as u32);
        }
        let rows_at = index.len();
        if world == 1 {
            // The combine reads each row's output where the experts left it (expert order),
            // through the inverse of `order`: no scatter back to arrival order.
            let at = inverse_permutation(&order).ok_or_else(|| ModelError::Peer {
                rank: self.rank,
                msg: format!("layer {l}: the experts' row order is not a permutation"),
            })?;
            for &(r, _) in &entries {
                index.push(at.get(r).copied().ok_or_else(|| ModelError::Peer {
                    rank: self.rank,
                    msg: format!("layer {l}: combine row {r} of {total}"),
                })?);
            }
        } else {
            index.extend(entries.iter().map(|&(r, _)| r as u32));
        }
        index.extend(entries.iter().map(|&(_, gate)| gate.to_bits()));
        let index_d = g.upload(&index)?;

        // Each local expert runs once on all of its rows.
        let xs = g.alloc::<f32>(total * d)?;
        g.rows_launch(
            "gather_rows",
            total,
            &[
                Arg::P(recv),
                Arg::P(index_d.ptr()),
                Arg::P(xs.ptr()),
                Arg::I(d as i32),
            ],
        )?;
        let ys = g.alloc::<f32>(total * d)?;
        let mut at = 0;
        for (j, list) in arrivals.per_expert.iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            self.expert_ffn(&lw.experts[j], xs.at(at * d), list.len(), ys.at(at * d))?;
            at += list.len();
        }
        let parts = if world == 1 {
            ys
        } else {
            // Back to arrival order (replies[row] for every received row), for the senders.
            let replies = g.alloc::<f32>(total * d)?;
            g.rows_launch(
                "scatter_rows",
                total,
                &[
                    Arg::P(ys.ptr()),
                    Arg::P(index_d.at(total)),
                    Arg::P(replies.ptr()),
                    Arg::I(d as i32),
                ],
            )?;
            let host = g.download_f32(replies.ptr(), total * d)?;
            let back: Vec<Vec<f32>> = arrivals
                .from
                .iter()
                .map(|r| host[r.start * d..r.end * d].to_vec())
                .collect();
            let everyone: Vec<usize> = (0..world).collect();
            let partials = comm.run(|cm| cm.all_to_all_v(&everyone, back))?;
            dispatch.check_replies(l, &partials, d)?;
            g.upload(&partials.concat())?
        };

        let gates_at = rows_at + entries.len();
        g.rows_launch(
            "combine",
            m,
            &[
                Arg::P(parts.ptr()),
                Arg::P(index_d.at(combine_at)),
                Arg::P(index_d.at(rows_at)),
                Arg::P(index_d.at(gates_at)),
                Arg::P(y.ptr()),
                Arg::I(d as i32),
            ],
        )?;
        Ok(y)
    }

    /// The MoE of a world of one on `m` tokens (see `device_routes`) with the router's picks
    /// left on the device (at `picks`): each expert's matrices run on the slots that picked
    /// it. Returns the `[m * k, d]` per-slot outputs, which the next
    /// residual kernel combines with the gates in choice order (for top-2 the CPU backend's
    /// sum, bit for bit).
    fn moe_device_routed(
        &self,
        l: usize,
        x: &Buf<f32>,
        m: usize,
        picks: u64,
    ) -> Result<Buf<f32>, CudaError> {
        let (g, c, lw) = (&self.gpu, &self.config, &self.layers[l]);
        let Some(sets) = &lw.routed else {
            return Err(CudaError::Unsupported(
                "device routing without expert tables".into(),
            ));
        };
        let (d, k) = (c.hidden_size, c.num_experts_per_tok);
        let slots = m * k;
        let f = sets.gate_up.n;
        // The bf16 path (as the host-routed experts would take): bf16 rows into the
        // tensor-core kernel.
        let bf16 = m >= self.gemm_min_rows;
        // Gate and up rows of every slot: [2, slots, f].
        let ab = g.alloc::<f32>(2 * slots * f)?;
        if bf16 {
            let xb = g.to_bf16(x.ptr(), m * d)?;
            g.qmatmul_experts_mma(xb.ptr(), picks, slots, k, m, &sets.gate_up, ab.ptr())?;
        } else {
            g.qmatmul_experts(x.ptr(), picks, slots, k, m, &sets.gate_up, ab.ptr())?;
        }
        g.gelu_mul(ab.ptr(), ab.at(slots * f), slots * f)?;
        let ys = g.alloc::<f32>(slots * d)?;
        if bf16 {
            let hb = g.to_bf16(ab.ptr(), slots * f)?;
            g.qmatmul_experts_mma(hb.ptr(), picks, slots, 1, m, &sets.down, ys.ptr())?;
        } else {
            g.qmatmul_experts(ab.ptr(), picks, slots, 1, m, &sets.down, ys.ptr())?;
        }
        Ok(ys)
    }

    /// Whether a step with `m` rows on this rank keeps the router's picks on the device: a
    /// world of one with every layer's expert tables, and either the int8 path (under
    /// `gemm_min_rows`, at most [`DEVICE_ROUTED_TOKENS`]: the same bits as host routing) or
    /// the bf16 path on the tensor cores (at most [`MMA_ROUTED_TOKENS`]: the same operands
    /// as host routing, sums in another order).
    pub fn device_routes(&self, m: usize) -> bool {
        let g = &self.gpu;
        let tables = self.layers.iter().all(|l| l.routed.is_some());
        let on_mma = self.layers.iter().all(|l| {
            l.routed.as_ref().is_some_and(|r| {
                [&r.gate_up, &r.down]
                    .iter()
                    .all(|s| g.mma_takes_shape(s.k, s.n, s.gr))
            })
        });
        let fits = if m < self.gemm_min_rows {
            m <= DEVICE_ROUTED_TOKENS
        } else {
            m <= MMA_ROUTED_TOKENS && on_mma
        };
        self.device_routing && self.plan.world == 1 && m >= 1 && tables && fits
    }

    /// `(gelu_tanh(x W) ⊙ (x V)) W1` for `rows` rows at `x`, into `out`.
    fn expert_ffn(&self, w: &DevExpert, x: u64, rows: usize, out: u64) -> Result<(), CudaError> {
        let g = &self.gpu;
        if rows >= self.gemm_min_rows && g.ffn_wgmma(x, rows, [&w.gate, &w.up, &w.down], out)? {
            return Ok(());
        }
        let f = w.gate.n;
        let a = g.alloc::<f32>(rows * f)?;
        let b = g.alloc::<f32>(rows * f)?;
        self.mm(x, rows, &w.gate, a.ptr())?;
        self.mm(x, rows, &w.up, b.ptr())?;
        g.gelu_mul(a.ptr(), b.ptr(), rows * f)?;
        self.mm(a.ptr(), rows, &w.down, out)
    }

    /// Final norm (with the output multiplier folded in) and the tied head, only on the rows
    /// the sequences ask for.
    fn head(&self, h: &Buf<f32>, batch: &[SeqStep<'_>]) -> Result<Vec<Vec<f32>>, CudaError> {
        let (g, c) = (&self.gpu, &self.config);
        let (d, vocab) = (c.hidden_size, c.vocab_size);
        let mut rows = Vec::new();
        let mut start = 0;
        for s in batch {
            let t = s.tokens.len();
            rows.extend(((start + t - s.logits.rows(t))..start + t).map(|r| r as u32));
            start += t;
        }
        let mut logits = vec![0f32; rows.len() * vocab];
        if !rows.is_empty() {
            let sel_idx = g.upload(&rows)?;
            let sel = g.alloc::<f32>(rows.len() * d)?;
            g.rows_launch(
                "gather_rows",
                rows.len(),
                &[
                    Arg::P(h.ptr()),
                    Arg::P(sel_idx.ptr()),
                    Arg::P(sel.ptr()),
                    Arg::I(d as i32),
                ],
            )?;
            let normed = g.alloc::<f32>(rows.len() * d)?;
            self.rmsnorm(
                &sel,
                &self.final_norm,
                &normed,
                rows.len(),
                c.output_multiplier_scale,
            )?;
            let out = g.alloc::<f32>(rows.len() * vocab)?;
            g.head_matmul(
                normed.ptr(),
                rows.len(),
                d,
                self.embeddings.ptr(),
                vocab,
                out.ptr(),
            )?;
            g.copy_out(out.ptr(), &mut logits)?;
        } else {
            g.sync()?;
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut rest = logits.as_slice();
        for s in batch {
            let (mine, tail) = rest.split_at(s.logits.rows(s.tokens.len()) * vocab);
            out.push(mine.to_vec());
            rest = tail;
        }
        Ok(out)
    }
}

impl RankBackend for CudaShard {
    fn rank(&self) -> usize {
        self.rank
    }

    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.gpu.name)
    }

    fn step(
        &mut self,
        comm: &dyn Communicator,
        batch: &[SeqStep<'_>],
    ) -> Result<ShardOutput, ModelError> {
        self.forward(comm, batch)
    }
}

/// `at` with `at[order[i]] = i`, or `None` when `order` is not a permutation of `0..len`.
fn inverse_permutation(order: &[u32]) -> Option<Vec<u32>> {
    let mut at = vec![u32::MAX; order.len()];
    for (i, &o) in order.iter().enumerate() {
        let slot = at.get_mut(o as usize)?;
        if *slot != u32::MAX {
            return None;
        }
        *slot = i as u32;
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_permutation_maps_back_and_rejects_what_is_not_one() {
        assert_eq!(inverse_permutation(&[2, 0, 3, 1]), Some(vec![1, 3, 0, 2]));
        assert_eq!(inverse_permutation(&[]), Some(vec![]));
        assert_eq!(inverse_permutation(&[0, 0]), None, "a repeat");
        assert_eq!(inverse_permutation(&[0, 2]), None, "out of range");
    }

    #[test]
    fn key_splits_fill_the_gpu_in_whole_granules() {
        // Grok-1 decode on 132 SMs, 1025 keys, the decode kernel's 32-key granule.
        assert_eq!(
            key_splits(8, 132, 1025, 32),
            33,
            "batch 1: one granule per split"
        );
        assert_eq!(key_splits(64, 132, 1025, 32), 9, "batch 8: 4 x 132 blocks");
        assert_eq!(key_splits(512, 132, 1025, 32), 2);
        assert_eq!(
            key_splits(528, 132, 1025, 32),
            1,
            "a full GPU needs no split"
        );
        assert_eq!(key_splits(0, 132, 0, 32), 1);
        assert_eq!(key_splits(8, 132, 1, 32), 1, "one key");
        assert_eq!(decode_key_granule(128), 32);
        assert_eq!(decode_key_granule(16), 256);
    }
}

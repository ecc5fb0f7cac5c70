//! Model weights in memory, in their stored precision: int8 matrices stay int8 (viewing the
//! mapped checkpoint bytes) with their per-group scales; norms, router and embeddings are f32.

use super::ModelError;
use crate::bytes::ByteView;
use crate::checkpoint::layout::{layer_tensor, EMBEDDINGS, FINAL_NORM};
use crate::checkpoint::{DType, RawTensor, StoredTensor, TensorSource};
use crate::config::ModelConfig;
use std::ops::Range;

/// f32 values viewing mapped little-endian bytes in place when they are 4-byte aligned (the
/// native format's large embedding matrix), or owned (converted from bf16, or unaligned as in
/// the release's pickles) otherwise: either way one copy of the weights in memory.
pub enum F32Data {
    Mapped(ByteView),
    Owned(Vec<f32>),
}

impl F32Data {
    pub fn from_raw(t: &RawTensor) -> Self {
        let bytes = t.data.as_slice();
        let aligned = bytes.as_ptr().align_offset(std::mem::align_of::<f32>()) == 0;
        if t.dtype == DType::F32 && aligned && cfg!(target_endian = "little") {
            F32Data::Mapped(t.data.clone())
        } else {
            F32Data::Owned(t.to_f32_vec())
        }
    }
}

impl std::ops::Deref for F32Data {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32Data::Mapped(b) => {
                let bytes = b.as_slice();
                // SAFETY: `from_raw` checked 4-byte alignment and the f32 dtype; the length is
                // a multiple of 4 (RawTensor::new checked it); little-endian f32 is native.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, bytes.len() / 4) }
            }
            F32Data::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for F32Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            F32Data::Mapped(b) => write!(f, "F32Data::Mapped({} values)", b.len() / 4),
            F32Data::Owned(v) => write!(f, "F32Data::Owned({} values)", v.len()),
        }
    }
}

/// An int8 matrix `[k, n]` (row-major) with scales `[k / group_rows, n]`:
/// `w[k][n] = weight[k][n] * scales[k / group_rows][n]`.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub k: usize,
    pub n: usize,
    /// Rows of K sharing one scale row.
    pub group_rows: usize,
    pub weight: ByteView,
    pub scales: Vec<f32>,
}

impl QMatrix {
    /// The `rows × cols` part of a stored `[K, N]` (or, with `expert`, `[E, K, N]`) matrix.
    /// Row slices must hold whole scale groups or lie inside one group.
    pub fn slice(
        name: &str,
        weight: &RawTensor,
        scales: &RawTensor,
        expert: Option<usize>,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::BadTensor {
            name: name.to_string(),
            msg,
        };
        let (mut w, mut s) = (weight.clone(), scales.clone());
        if let Some(e) = expert {
            let drop_lead = |t: &RawTensor| {
                t.narrow(0, e, 1).map(|t| RawTensor {
                    shape: t.shape[1..].to_vec(),
                    ..t
                })
            };
            match (drop_lead(&w), drop_lead(&s)) {
                (Some(a), Some(b)) => (w, s) = (a, b),
                _ => return Err(bad(format!("has no expert {e}"))),
            }
        }
        let (&[k, n], &[g, _]) = (w.shape.as_slice(), s.shape.as_slice()) else {
            return Err(bad(format!(
                "expected 2-D matrices, got {:?} and {:?}",
                w.shape, s.shape
            )));
        };
        if g == 0
            || k % g != 0
            || rows.end > k
            || cols.end > n
            || rows.is_empty()
            || cols.is_empty()
        {
            return Err(bad(format!(
                "cannot take rows {rows:?} and columns {cols:?} of {:?} with {g} scale groups",
                w.shape
            )));
        }
        if rows != (0..k) {
            let gr = k / g;
            let (r0, len) = (rows.start, rows.len());
            let (g0, gl) = if r0 % gr == 0 && len % gr == 0 {
                (r0 / gr, len / gr)
            } else if r0 / gr == (rows.end - 1) / gr {
                (r0 / gr, 1)
            } else {
                return Err(bad(format!(
                    "rows {rows:?} straddle scale groups of {gr} rows"
                )));
            };
            match (w.narrow(0, r0, len), s.narrow(0, g0, gl)) {
                (Some(a), Some(b)) => (w, s) = (a, b),
                _ => return Err(bad(format!("rows {rows:?} out of range"))),
            }
        }
        if cols != (0..n) {
            match (
                w.narrow(1, cols.start, cols.len()),
                s.narrow(1, cols.start, cols.len()),
            ) {
                (Some(a), Some(b)) => (w, s) = (a, b),
                _ => return Err(bad(format!("columns {cols:?} out of range"))),
            }
        }
        Self::from_raw(name, &w, &s)
    }

    /// Builds from a stored int8 weight `[k, n]` and scales `[g, n]` (leading axes already
    /// removed), checking every relation the kernels rely on.
    pub fn from_raw(
        name: &str,
        weight: &RawTensor,
        scales: &RawTensor,
    ) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::BadTensor {
            name: name.to_string(),
            msg,
        };
        let (&[k, n], &[g, sn]) = (weight.shape.as_slice(), scales.shape.as_slice()) else {
            return Err(bad(format!(
                "expected a 2-D weight and scales, got {:?} and {:?}",
                weight.shape, scales.shape
            )));
        };
        if weight.dtype != DType::I8 || !scales.dtype.is_float() {
            return Err(bad(format!(
                "expected int8 weight and float scales, got {} and {}",
                weight.dtype, scales.dtype
            )));
        }
        if sn != n || g == 0 || k % g != 0 {
            return Err(bad(format!(
                "scales {:?} do not fit weight {:?}",
                scales.shape, weight.shape
            )));
        }
        Ok(QMatrix {
            k,
            n,
            group_rows: k / g,
            weight: weight.data.clone(),
            scales: scales.to_f32_vec(),
        })
    }

    pub fn weight_i8(&self) -> &[i8] {
        let b = self.weight.as_slice();
        // SAFETY: i8 and u8 have the same size and alignment; every bit pattern is valid.
        unsafe { std::slice::from_raw_parts(b.as_ptr() as *const i8, b.len()) }
    }

    /// Stored bytes: the int8 payload plus the scales as stored (bf16).
    pub fn stored_bytes(&self) -> usize {
        self.weight.len() + self.scales.len() * 2
    }

    /// The dequantised matrix, row-major `[k, n]` (tests and reference paths only).
    pub fn dequantize(&self) -> Vec<f32> {
        let w = self.weight_i8();
        let mut out = vec![0f32; self.k * self.n];
        for kk in 0..self.k {
            let s = &self.scales[(kk / self.group_rows) * self.n..][..self.n];
            for j in 0..self.n {
                out[kk * self.n + j] = w[kk * self.n + j] as f32 * s[j];
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// `[d, f]`, the GELU branch (`moe/linear`).
    pub w_gate: QMatrix,
    /// `[d, f]`, the linear branch (`moe/linear_v`).
    pub w_up: QMatrix,
    /// `[f, d]`, the down projection (`moe/linear_1`).
    pub w_down: QMatrix,
}

#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub post_attn_norm: Vec<f32>,
    pub moe_norm: Vec<f32>,
    pub post_moe_norm: Vec<f32>,
    pub wq: QMatrix,
    pub wk: QMatrix,
    pub wv: QMatrix,
    pub wo: QMatrix,
    /// `[d, experts]`, f32.
    pub router: Vec<f32>,
    pub experts: Vec<ExpertWeights>,
}

#[derive(Debug)]
pub struct ModelWeights {
    pub config: ModelConfig,
    /// `[vocab, d]`, tied with the output head.
    pub embeddings: F32Data,
    pub final_norm: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    /// The part of the model held; `layers[l].experts[i]` is expert `slices.experts.start + i`.
    pub slices: Slices,
}

/// Which part of the model a process holds: query heads, kv heads, experts and the slice of
/// each expert's FFN width. [`Slices::full`] is the whole model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slices {
    pub q_heads: Range<usize>,
    pub kv_heads: Range<usize>,
    pub experts: Range<usize>,
    pub ffn: Range<usize>,
}

impl Slices {
    pub fn full(cfg: &ModelConfig) -> Self {
        Slices {
            q_heads: 0..cfg.num_attention_heads,
            kv_heads: 0..cfg.num_key_value_heads,
            experts: 0..cfg.num_local_experts,
            ffn: 0..cfg.intermediate_size,
        }
    }
}

impl Slices {
    /// What `plan` gives `rank`.
    pub fn for_rank(plan: &crate::parallel::Plan, cfg: &ModelConfig, rank: usize) -> Self {
        Slices {
            q_heads: plan.q_heads(cfg, rank),
            kv_heads: plan.kv_heads(cfg, rank),
            experts: plan.experts(cfg, rank),
            ffn: plan.ffn_slice(cfg, rank),
        }
    }
}

impl ModelWeights {
    /// Checks these are exactly the slices `plan` gives `rank`; returns them and the config
    /// with that rank's head counts (what its attention and KV pool see). Every backend's
    /// shard starts here.
    pub fn check_rank(
        &self,
        plan: &crate::parallel::Plan,
        rank: usize,
    ) -> Result<(Slices, ModelConfig), ModelError> {
        let want = Slices::for_rank(plan, &self.config, rank);
        if self.slices != want {
            return Err(ModelError::BadTensor {
                name: format!("weights of rank {rank}"),
                msg: format!(
                    "hold {:?}, but the plan gives this rank {want:?}",
                    self.slices
                ),
            });
        }
        let local = ModelConfig {
            num_attention_heads: want.q_heads.len(),
            num_key_value_heads: want.kv_heads.len(),
            ..self.config.clone()
        };
        Ok((want, local))
    }

    /// Loads every tensor of `cfg` from `source` (which the caller has validated).
    pub fn load(source: &dyn TensorSource, cfg: &ModelConfig) -> Result<Self, ModelError> {
        Self::load_slices(source, cfg, &Slices::full(cfg))
    }

    /// Loads only `slices` of the attention and expert matrices (touching only those bytes of
    /// the mapped checkpoint); norms, router and the embeddings are loaded whole.
    pub fn load_slices(
        source: &dyn TensorSource,
        cfg: &ModelConfig,
        slices: &Slices,
    ) -> Result<Self, ModelError> {
        Self::load_slices_with_progress(source, cfg, slices, &mut |_| {})
    }

    /// [`Self::load_slices`], calling `progress(layers_done)` after each layer.
    pub fn load_slices_with_progress(
        source: &dyn TensorSource,
        cfg: &ModelConfig,
        slices: &Slices,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Self, ModelError> {
        let plain_data = |name: &str, shape: &[usize]| -> Result<F32Data, ModelError> {
            match source.load(name)? {
                StoredTensor::Plain(t) if t.shape == shape && t.dtype.is_float() => {
                    Ok(F32Data::from_raw(&t))
                }
                other => Err(ModelError::BadTensor {
                    name: name.to_string(),
                    msg: format!(
                        "expected a float array of shape {shape:?}, got {:?}",
                        other.shape()
                    ),
                }),
            }
        };
        let plain = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ModelError> {
            plain_data(name, shape).map(|d| d.to_vec())
        };
        let quantized = |name: &str| -> Result<(RawTensor, RawTensor), ModelError> {
            match source.load(name)? {
                StoredTensor::Quantized { weight, scales } => Ok((weight, scales)),
                StoredTensor::Plain(_) => Err(ModelError::BadTensor {
                    name: name.to_string(),
                    msg: "expected an int8 QuantizedWeight8bit".into(),
                }),
            }
        };
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let all_d = 0..d;
        let q_cols = slices.q_heads.start * hd..slices.q_heads.end * hd;
        let kv_cols = slices.kv_heads.start * hd..slices.kv_heads.end * hd;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let attn = |leaf: &str, rows: &Range<usize>, cols: &Range<usize>| {
                let name = layer_tensor(l, leaf);
                let (w, s) = quantized(&name)?;
                QMatrix::slice(&name, &w, &s, None, rows.clone(), cols.clone())
            };
            let (gate_w, gate_s) = quantized(&layer_tensor(l, "moe/linear/w"))?;
            let (up_w, up_s) = quantized(&layer_tensor(l, "moe/linear_v/w"))?;
            let (down_w, down_s) = quantized(&layer_tensor(l, "moe/linear_1/w"))?;
            let mut experts = Vec::with_capacity(slices.experts.len());
            for e in slices.experts.clone() {
                let ffn = slices.ffn.clone();
                experts.push(ExpertWeights {
                    w_gate: QMatrix::slice(
                        &layer_tensor(l, "moe/linear/w"),
                        &gate_w,
                        &gate_s,
                        Some(e),
                        all_d.clone(),
                        ffn.clone(),
                    )?,
                    w_up: QMatrix::slice(
                        &layer_tensor(l, "moe/linear_v/w"),
                        &up_w,
                        &up_s,
                        Some(e),
                        all_d.clone(),
                        ffn.clone(),
                    )?,
                    w_down: QMatrix::slice(
                        &layer_tensor(l, "moe/linear_1/w"),
                        &down_w,
                        &down_s,
                        Some(e),
                        ffn,
                        all_d.clone(),
                    )?,
                });
            }
            layers.push(LayerWeights {
                attn_norm: plain(&layer_tensor(l, "rms_norm/scale"), &[d])?,
                post_attn_norm: plain(&layer_tensor(l, "rms_norm_1/scale"), &[d])?,
                moe_norm: plain(&layer_tensor(l, "rms_norm_2/scale"), &[d])?,
                post_moe_norm: plain(&layer_tensor(l, "rms_norm_3/scale"), &[d])?,
                wq: attn("multi_head_attention/query/w", &all_d, &q_cols)?,
                wk: attn("multi_head_attention/key/w", &all_d, &kv_cols)?,
                wv: attn("multi_head_attention/value/w", &all_d, &kv_cols)?,
                wo: attn("multi_head_attention/linear/w", &q_cols, &all_d)?,
                router: plain(&layer_tensor(l, "router/w"), &[d, cfg.num_local_experts])?,
                experts,
            });
            progress(l + 1);
        }
        Ok(ModelWeights {
            config: cfg.clone(),
            slices: slices.clone(),
            embeddings: plain_data(EMBEDDINGS, &[cfg.vocab_size, d])?,
            final_norm: plain(FINAL_NORM, &[d])?,
            layers,
        })
    }

    /// Weight bytes as stored (int8 + bf16 scales + f32 arrays).
    pub fn stored_bytes(&self) -> usize {
        let f32s = |v: &Vec<f32>| v.len() * 4;
        let mut total = self.embeddings.len() * 4 + f32s(&self.final_norm);
        for l in &self.layers {
            total += f32s(&l.attn_norm)
                + f32s(&l.post_attn_norm)
                + f32s(&l.moe_norm)
                + f32s(&l.post_moe_norm)
                + f32s(&l.router);
            for m in [&l.wq, &l.wk, &l.wv, &l.wo] {
                total += m.stored_bytes();
            }
            for x in &l.experts {
                total += x.w_gate.stored_bytes() + x.w_up.stored_bytes() + x.w_down.stored_bytes();
            }
        }
        total
    }
}

//! Model weights in memory, in their stored precision: int8 matrices stay int8 (viewing the
//! mapped checkpoint bytes) with their per-group scales; norms, router and embeddings are f32.

use super::ModelError;
use crate::bytes::ByteView;
use crate::checkpoint::layout::{layer_tensor, EMBEDDINGS, FINAL_NORM};
use crate::checkpoint::{DType, RawTensor, StoredTensor, TensorSource};
use crate::config::ModelConfig;

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
}

impl ModelWeights {
    /// Loads every tensor of `cfg` from `source` (which the caller has validated).
    pub fn load(source: &dyn TensorSource, cfg: &ModelConfig) -> Result<Self, ModelError> {
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
        let matrix = |l: usize, leaf: &str| -> Result<QMatrix, ModelError> {
            let name = layer_tensor(l, leaf);
            let (w, s) = quantized(&name)?;
            QMatrix::from_raw(&name, &w, &s)
        };
        let d = cfg.hidden_size;
        let e = cfg.num_local_experts;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let gate = expert_stack(source, l, "moe/linear/w", e)?;
            let up = expert_stack(source, l, "moe/linear_v/w", e)?;
            let down = expert_stack(source, l, "moe/linear_1/w", e)?;
            let experts = gate
                .into_iter()
                .zip(up)
                .zip(down)
                .map(|((w_gate, w_up), w_down)| ExpertWeights {
                    w_gate,
                    w_up,
                    w_down,
                })
                .collect();
            layers.push(LayerWeights {
                attn_norm: plain(&layer_tensor(l, "rms_norm/scale"), &[d])?,
                post_attn_norm: plain(&layer_tensor(l, "rms_norm_1/scale"), &[d])?,
                moe_norm: plain(&layer_tensor(l, "rms_norm_2/scale"), &[d])?,
                post_moe_norm: plain(&layer_tensor(l, "rms_norm_3/scale"), &[d])?,
                wq: matrix(l, "multi_head_attention/query/w")?,
                wk: matrix(l, "multi_head_attention/key/w")?,
                wv: matrix(l, "multi_head_attention/value/w")?,
                wo: matrix(l, "multi_head_attention/linear/w")?,
                router: plain(&layer_tensor(l, "router/w"), &[d, e])?,
                experts,
            });
        }
        Ok(ModelWeights {
            config: cfg.clone(),
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

/// The `experts` matrices of a stacked `[experts, K, N]` expert tensor, each viewing its part.
fn expert_stack(
    source: &dyn TensorSource,
    l: usize,
    leaf: &str,
    experts: usize,
) -> Result<Vec<QMatrix>, ModelError> {
    let name = layer_tensor(l, leaf);
    let StoredTensor::Quantized { weight, scales } = source.load(&name)? else {
        return Err(ModelError::BadTensor {
            name,
            msg: "expected an int8 QuantizedWeight8bit".into(),
        });
    };
    let one = |t: &RawTensor, x: usize| {
        t.narrow(0, x, 1).map(|t| RawTensor {
            shape: t.shape[1..].to_vec(),
            ..t
        })
    };
    (0..experts)
        .map(|x| match (one(&weight, x), one(&scales, x)) {
            (Some(w), Some(s)) => QMatrix::from_raw(&name, &w, &s),
            _ => Err(ModelError::BadTensor {
                name: name.clone(),
                msg: format!("has no expert {x}"),
            }),
        })
        .collect()
}

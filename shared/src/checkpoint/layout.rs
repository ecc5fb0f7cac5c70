//! The tensors a Grok-1 checkpoint holds for a given config, in the release's file order
//! (JAX tree order: layers sorted as strings, `decoder_layer_0, _1, _10, ...`).

use super::{DType, StoredTensor};
use crate::config::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// A float array (float32 in the release).
    Plain,
    /// `QuantizedWeight8bit` with `groups` scale groups along the contracting axis.
    Quantized { groups: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: TensorKind,
}

impl ExpectedTensor {
    /// The scales' shape: the weight's shape with K (second to last axis) replaced by G.
    pub fn scales_shape(&self) -> Option<Vec<usize>> {
        match self.kind {
            TensorKind::Plain => None,
            TensorKind::Quantized { groups } => {
                let mut s = self.shape.clone();
                let k = s.len() - 2;
                s[k] = groups;
                Some(s)
            }
        }
    }

    /// Every way `t` differs from what is expected, as messages naming the tensor.
    pub fn check(&self, t: &StoredTensor) -> Vec<String> {
        let n = &self.name;
        let mut p = Vec::new();
        match (self.kind, t) {
            (TensorKind::Plain, StoredTensor::Plain(a)) => {
                if a.shape != self.shape {
                    p.push(format!(
                        "'{n}': shape {:?}, expected {:?}",
                        a.shape, self.shape
                    ));
                }
                if !a.dtype.is_float() {
                    p.push(format!("'{n}': dtype {}, expected a float type", a.dtype));
                }
            }
            (TensorKind::Quantized { .. }, StoredTensor::Quantized { weight, scales }) => {
                if weight.shape != self.shape {
                    p.push(format!(
                        "'{n}': weight shape {:?}, expected {:?}",
                        weight.shape, self.shape
                    ));
                }
                if weight.dtype != DType::I8 {
                    p.push(format!(
                        "'{n}': weight dtype {}, expected int8",
                        weight.dtype
                    ));
                }
                let want = self.scales_shape().unwrap_or_default();
                if scales.shape != want {
                    p.push(format!(
                        "'{n}': scales shape {:?}, expected {:?}",
                        scales.shape, want
                    ));
                }
                if !scales.dtype.is_float() {
                    p.push(format!(
                        "'{n}': scales dtype {}, expected bfloat16",
                        scales.dtype
                    ));
                }
            }
            (TensorKind::Plain, StoredTensor::Quantized { .. }) => p.push(format!(
                "'{n}': stored quantized, expected a plain float array"
            )),
            (TensorKind::Quantized { .. }, StoredTensor::Plain(_)) => p.push(format!(
                "'{n}': stored as a plain array, expected an int8 QuantizedWeight8bit"
            )),
        }
        p
    }
}

pub const EMBEDDINGS: &str = "language_model/in_out_embed/embeddings";
pub const FINAL_NORM: &str = "language_model/rms_norm/scale";

/// Name of a tensor of layer `l`, e.g. `layer_tensor(3, "moe/linear/w")`.
pub fn layer_tensor(l: usize, leaf: &str) -> String {
    format!("transformer/decoder_layer_{l}/{leaf}")
}

pub fn expected_tensors(cfg: &ModelConfig) -> Vec<ExpectedTensor> {
    let d = cfg.hidden_size;
    let f = cfg.intermediate_size;
    let e = cfg.num_local_experts;
    let g = ModelConfig::K_SHARDED_GROUPS;
    let q = |groups| TensorKind::Quantized { groups };
    let mut out = vec![
        ExpectedTensor {
            name: EMBEDDINGS.into(),
            shape: vec![cfg.vocab_size, d],
            kind: TensorKind::Plain,
        },
        ExpectedTensor {
            name: FINAL_NORM.into(),
            shape: vec![d],
            kind: TensorKind::Plain,
        },
    ];
    let mut layers: Vec<usize> = (0..cfg.num_hidden_layers).collect();
    layers.sort_by_key(|l| l.to_string());
    for l in layers {
        let leaves: [(&str, Vec<usize>, TensorKind); 12] = [
            ("moe/linear/w", vec![e, d, f], q(1)),
            ("moe/linear_1/w", vec![e, f, d], q(g)),
            ("moe/linear_v/w", vec![e, d, f], q(1)),
            ("multi_head_attention/key/w", vec![d, cfg.kv_dim()], q(1)),
            ("multi_head_attention/linear/w", vec![cfg.q_dim(), d], q(g)),
            ("multi_head_attention/query/w", vec![d, cfg.q_dim()], q(1)),
            ("multi_head_attention/value/w", vec![d, cfg.kv_dim()], q(1)),
            ("rms_norm/scale", vec![d], TensorKind::Plain),
            ("rms_norm_1/scale", vec![d], TensorKind::Plain),
            ("rms_norm_2/scale", vec![d], TensorKind::Plain),
            ("rms_norm_3/scale", vec![d], TensorKind::Plain),
            ("router/w", vec![d, e], TensorKind::Plain),
        ];
        for (leaf, shape, kind) in leaves {
            out.push(ExpectedTensor {
                name: layer_tensor(l, leaf),
                shape,
                kind,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order and shapes must equal the release's manifest exactly.
    #[test]
    fn grok1_layout_equals_release_manifest() {
        let p = crate::test_support::reference_dir().join("grok1/ckpt-0-manifest.json");
        let text = std::fs::read_to_string(p).unwrap();
        let manifest: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let ours = expected_tensors(&ModelConfig::grok1());
        assert_eq!(manifest.len(), 770);
        assert_eq!(ours.len(), 770);
        for (m, o) in manifest.iter().zip(&ours) {
            assert_eq!(m["path"].as_str().unwrap(), o.name);
            let shape: Vec<usize> = serde_json::from_value(m["shape"].clone()).unwrap();
            assert_eq!(shape, o.shape, "{}", o.name);
            if m["storage"] == "QuantizedWeight8bit" {
                let s: Vec<usize> = serde_json::from_value(m["scales_shape"].clone()).unwrap();
                assert_eq!(Some(s), o.scales_shape(), "{}", o.name);
            } else {
                assert_eq!(o.kind, TensorKind::Plain, "{}", o.name);
            }
        }
    }
}

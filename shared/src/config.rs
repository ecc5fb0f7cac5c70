//! Model configuration: the `config.json` of a model directory (HF-style field names, as in
//! the `grok1-tiny-a` fixture) and the built-in presets.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is not valid JSON for a Grok-1 config: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config {origin}: {problems}")]
    Invalid { origin: String, problems: String },
    #[error("unknown preset '{0}': use one of: grok-1, tiny")]
    UnknownPreset(String),
}

/// The shape and constants of a Grok-1-structured model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub head_dim: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub num_hidden_layers: usize,
    #[serde(default)]
    pub widening_factor: f64,
    /// Expert FFN width.
    pub intermediate_size: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub attn_output_multiplier: f32,
    pub max_attn_value: f32,
    pub embedding_multiplier_scale: f32,
    pub output_multiplier_scale: f32,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_seq_len: usize,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

fn default_model_type() -> String {
    "grok-1".to_string()
}

/// Grok-1's rule for the expert width: int(widening × d) × 2 // 3, rounded up to a multiple of 8.
pub fn ffn_width(hidden: usize, widening: f64) -> usize {
    let f = ((widening * hidden as f64) as usize) * 2 / 3;
    f.div_ceil(8) * 8
}

impl ModelConfig {
    /// The released Grok-1 shape.
    pub fn grok1() -> Self {
        ModelConfig {
            model_type: default_model_type(),
            vocab_size: 131072,
            hidden_size: 6144,
            head_dim: 128,
            num_attention_heads: 48,
            num_key_value_heads: 8,
            num_hidden_layers: 64,
            widening_factor: 8.0,
            intermediate_size: ffn_width(6144, 8.0),
            num_local_experts: 8,
            num_experts_per_tok: 2,
            attn_output_multiplier: 0.088_388_35,
            max_attn_value: 30.0,
            embedding_multiplier_scale: 78.383_67,
            output_multiplier_scale: 0.577_350_26,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_seq_len: 8192,
            pad_token_id: 0,
            bos_token_id: 1,
            eos_token_id: 2,
        }
    }

    /// Grok-1's structure (8 experts, top-2, GQA 2:1, post-norms, soft cap) at laptop size,
    /// with the real vocabulary so the released tokenizer works.
    pub fn tiny() -> Self {
        ModelConfig {
            hidden_size: 256,
            head_dim: 32,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            num_hidden_layers: 4,
            widening_factor: 2.0,
            intermediate_size: ffn_width(256, 2.0),
            // Larger than 1/sqrt(head_dim) so the soft cap is exercised with random weights.
            attn_output_multiplier: 0.5,
            embedding_multiplier_scale: 16.0,
            max_seq_len: 2048,
            ..Self::grok1()
        }
    }

    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        match name {
            "grok-1" | "grok1" => Ok(Self::grok1()),
            "tiny" => Ok(Self::tiny()),
            other => Err(ConfigError::UnknownPreset(other.to_string())),
        }
    }

    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: ModelConfig =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        // Serialising a struct of plain numbers and strings cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the invariants the math relies on; `origin` names the source in the message.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("head_dim", self.head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, v) in positive {
            if v == 0 {
                p.push(format!("{name} must be > 0"));
            }
        }
        if self.num_key_value_heads > 0
            && !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            p.push(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            p.push(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        let g = Self::K_SHARDED_GROUPS;
        for (name, k) in [
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads * head_dim", self.q_dim()),
        ] {
            if !k.is_multiple_of(g) {
                p.push(format!("{name} ({k}) must be a multiple of {g}: the release stores {g} scale groups along it"));
            }
        }
        if self.num_experts_per_tok > self.num_local_experts {
            p.push(format!(
                "num_experts_per_tok ({}) exceeds num_local_experts ({})",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        if self.vocab_size > u32::MAX as usize {
            p.push("vocab_size does not fit in u32 token ids".into());
        }
        let floats = [
            ("attn_output_multiplier", self.attn_output_multiplier),
            (
                "embedding_multiplier_scale",
                self.embedding_multiplier_scale,
            ),
            ("output_multiplier_scale", self.output_multiplier_scale),
            ("rope_theta", self.rope_theta),
        ];
        for (name, v) in floats {
            if !v.is_finite() {
                p.push(format!("{name} must be finite"));
            }
        }
        if !(self.max_attn_value.is_finite() && self.max_attn_value > 0.0) {
            p.push("max_attn_value must be a positive number".into());
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            p.push("rms_norm_eps must be a positive number".into());
        }
        for (name, id) in [
            ("pad_token_id", self.pad_token_id),
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if id as usize >= self.vocab_size.max(1) {
                p.push(format!("{name} ({id}) is outside the vocabulary"));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                origin: origin.to_string(),
                problems: p.join("; "),
            })
        }
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Number of scale groups along K the release uses for a matrix: 8 for the K-sharded
    /// ones (attention output and expert down projection), 1 otherwise.
    pub const K_SHARDED_GROUPS: usize = 8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grok1_preset_matches_release() {
        let c = ModelConfig::grok1();
        assert_eq!(c.intermediate_size, 32768);
        assert_eq!(c.q_dim(), 6144);
        c.validate("grok-1").unwrap();
        ModelConfig::tiny().validate("tiny").unwrap();
    }

    #[test]
    fn reads_fixture_config() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/grok1-tiny-a/config.json");
        let c = ModelConfig::from_json_file(&p).unwrap();
        assert_eq!(c.intermediate_size, 344);
        assert_eq!(ffn_width(256, 2.0), 344);
        assert_eq!(c.num_attention_heads, 16);
    }

    #[test]
    fn invalid_config_lists_every_problem() {
        let mut c = ModelConfig::tiny();
        c.num_attention_heads = 7;
        c.num_experts_per_tok = 9;
        let e = c.validate("x").unwrap_err().to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        assert!(e.contains("num_experts_per_tok"), "{e}");
    }
}

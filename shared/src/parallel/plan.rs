//! The parallel plan: `world` ranks, attention tensor-parallel over `tp` ranks (heads split) in
//! `dp = world / tp` data-parallel groups, experts spread over `ep` groups of
//! `etp = world / ep` ranks that each hold a slice of every one of their experts' FFN width.
//!
//! Rank layout: TP group `r / tp` (consecutive ranks), expert group `r / etp` holding experts
//! `[g·E/ep, (g+1)·E/ep)`, FFN slice `r % etp`.

use crate::config::ModelConfig;
use std::ops::Range;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("plan world={world} tp={tp} ep={ep} does not fit the model: {reason}. Valid (tp, ep) for {world} rank(s): {valid}")]
pub struct PlanError {
    pub world: usize,
    pub tp: usize,
    pub ep: usize,
    pub reason: String,
    pub valid: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub world: usize,
    pub tp: usize,
    pub ep: usize,
}

/// Rows `[start, start + len)` of `total` split into `parts` near-equal parts (the first
/// `total % parts` one larger): part `i`.
pub fn split_range(total: usize, parts: usize, i: usize) -> Range<usize> {
    let base = total / parts;
    let extra = total % parts;
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// Whether rows `[start, start+len)` of a K axis with `groups` scale groups can be taken as a
/// slice with uniform scale groups (whole groups, or inside one group).
fn slice_fits_groups(k: usize, groups: usize, parts: usize) -> bool {
    let (gr, len) = (k / groups, k / parts);
    len.is_multiple_of(gr) || gr.is_multiple_of(len)
}

impl Plan {
    pub fn dp(&self) -> usize {
        self.world / self.tp
    }

    pub fn etp(&self) -> usize {
        self.world / self.ep
    }

    /// Why this plan cannot run `cfg`, if it cannot.
    fn problem(&self, cfg: &ModelConfig) -> Option<String> {
        let (w, tp, ep) = (self.world, self.tp, self.ep);
        let g = ModelConfig::K_SHARDED_GROUPS;
        let (qh, kvh) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        if w == 0 || tp == 0 || ep == 0 {
            return Some("world, tp and ep must be at least 1".into());
        }
        if !w.is_multiple_of(tp) {
            return Some(format!("tp ({tp}) must divide the number of workers ({w})"));
        }
        if !w.is_multiple_of(ep) {
            return Some(format!("ep ({ep}) must divide the number of workers ({w})"));
        }
        if !qh.is_multiple_of(tp) {
            return Some(format!("tp ({tp}) must divide the {qh} query heads"));
        }
        if !(kvh.is_multiple_of(tp) || tp.is_multiple_of(kvh)) {
            return Some(format!(
                "tp ({tp}) must divide, or be a multiple of, the {kvh} kv heads"
            ));
        }
        if !cfg.num_local_experts.is_multiple_of(ep) {
            return Some(format!(
                "ep ({ep}) must divide the {} experts",
                cfg.num_local_experts
            ));
        }
        let etp = self.etp();
        if !cfg.intermediate_size.is_multiple_of(etp) {
            return Some(format!(
                "workers / ep = {etp} slices must divide the expert width {}",
                cfg.intermediate_size
            ));
        }
        if !slice_fits_groups(cfg.intermediate_size, g, etp)
            || !slice_fits_groups(cfg.q_dim(), g, tp)
        {
            return Some(format!(
                "slices must hold whole scale groups (the release stores {g} along K)"
            ));
        }
        None
    }

    /// Every `(tp, ep)` that runs `cfg` on `world` ranks.
    pub fn valid_plans(cfg: &ModelConfig, world: usize) -> Vec<Plan> {
        let mut out = Vec::new();
        for tp in 1..=world {
            for ep in 1..=world {
                let p = Plan { world, tp, ep };
                if p.problem(cfg).is_none() {
                    out.push(p);
                }
            }
        }
        out
    }

    pub fn new(cfg: &ModelConfig, world: usize, tp: usize, ep: usize) -> Result<Plan, PlanError> {
        let p = Plan { world, tp, ep };
        match p.problem(cfg) {
            None => Ok(p),
            Some(reason) => {
                let valid: Vec<String> = Self::valid_plans(cfg, world)
                    .iter()
                    .map(|v| format!("(tp={}, ep={})", v.tp, v.ep))
                    .collect();
                Err(PlanError {
                    world,
                    tp,
                    ep,
                    reason,
                    valid: if valid.is_empty() {
                        "none".into()
                    } else {
                        valid.join(", ")
                    },
                })
            }
        }
    }

    /// The ranks of `rank`'s attention (TP) group, in order.
    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        let g = rank / self.tp;
        (g * self.tp..(g + 1) * self.tp).collect()
    }

    /// The data-parallel group `rank` serves.
    pub fn dp_index(&self, rank: usize) -> usize {
        rank / self.tp
    }

    /// Query heads of `rank`.
    pub fn q_heads(&self, cfg: &ModelConfig, rank: usize) -> Range<usize> {
        split_range(cfg.num_attention_heads, self.tp, rank % self.tp)
    }

    /// Kv heads `rank` needs for its query heads (replicated when tp exceeds the kv heads).
    pub fn kv_heads(&self, cfg: &ModelConfig, rank: usize) -> Range<usize> {
        let q = self.q_heads(cfg, rank);
        let group = cfg.num_attention_heads / cfg.num_key_value_heads;
        q.start / group..q.end.div_ceil(group)
    }

    /// Experts held by `rank`.
    pub fn experts(&self, cfg: &ModelConfig, rank: usize) -> Range<usize> {
        split_range(cfg.num_local_experts, self.ep, rank / self.etp())
    }

    /// The ranks holding (a slice of) expert `e`.
    pub fn expert_ranks(&self, cfg: &ModelConfig, e: usize) -> Range<usize> {
        let per = cfg.num_local_experts / self.ep;
        let g = e / per;
        g * self.etp()..(g + 1) * self.etp()
    }

    /// A step's `n` tokens split over `rank`'s tensor-parallel group (the reduce-scatter
    /// after attention): the rows `rank` keeps, and each member's share in values, `width`
    /// per row, in group order.
    pub fn token_shard(&self, n: usize, rank: usize, width: usize) -> (Range<usize>, Vec<usize>) {
        let counts = (0..self.tp)
            .map(|i| split_range(n, self.tp, i).len() * width)
            .collect();
        (split_range(n, self.tp, rank % self.tp), counts)
    }

    /// The FFN-width slice of `rank`'s experts.
    pub fn ffn_slice(&self, cfg: &ModelConfig, rank: usize) -> Range<usize> {
        split_range(cfg.intermediate_size, self.etp(), rank % self.etp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_cfg() -> ModelConfig {
        ModelConfig::from_json_file(&crate::test_support::tiny_a_dir().join("config.json")).unwrap()
    }

    #[test]
    fn issue_plans_are_valid_for_the_fixture() {
        let c = fixture_cfg();
        for (w, tp, ep) in crate::test_support::TINY_A_PLANS {
            Plan::new(&c, w, tp, ep).unwrap();
        }
    }

    #[test]
    fn invalid_plans_say_why_and_list_valid_ones() {
        let c = fixture_cfg();
        let e = Plan::new(&c, 4, 3, 1).unwrap_err().to_string();
        assert!(e.contains("tp (3) must divide"), "{e}");
        assert!(e.contains("(tp=4, ep=4)"), "{e}");
        let e = Plan::new(&c, 3, 1, 3).unwrap_err().to_string();
        assert!(e.contains("experts"), "{e}");
    }

    #[test]
    fn ranks_cover_heads_experts_and_slices_exactly_once() {
        let c = ModelConfig::grok1();
        let p = Plan::new(&c, 8, 8, 4).unwrap();
        assert_eq!(p.q_heads(&c, 3), 18..24);
        assert_eq!(p.kv_heads(&c, 3), 3..4);
        assert_eq!(p.experts(&c, 5), 4..6);
        assert_eq!(p.expert_ranks(&c, 5), 4..6);
        assert_eq!(p.ffn_slice(&c, 5), 16384..32768);
        assert_eq!(split_range(10, 3, 0), 0..4);
        assert_eq!(split_range(10, 3, 2), 7..10);
        // tp beyond the kv heads replicates them
        let mut c16 = ModelConfig::tiny();
        c16.num_key_value_heads = 2;
        let p = Plan::new(&c16, 4, 4, 1).unwrap();
        assert_eq!(p.kv_heads(&c16, 1), 0..1);
        assert_eq!(p.kv_heads(&c16, 2), 1..2);
    }
}

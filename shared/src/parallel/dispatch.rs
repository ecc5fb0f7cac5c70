//! The host-side bookkeeping of one MoE layer's all-to-all on one rank, shared by the CPU and
//! CUDA backends: which rows go to which rank for which expert, which arrived rows each local
//! expert runs, and in which order the replies are combined. What peers send is checked here,
//! so a misbehaving peer is the same error naming it whichever backend runs.
//!
//! Order matters for exact results: rows go out per destination in token order (and a token's
//! picks in router order), and each token's replies are summed in destination order, then
//! send order, on every backend and every plan.

use crate::config::ModelConfig;
use crate::model::ModelError;
use crate::parallel::Plan;
use std::ops::Range;

/// What this rank sends in one layer's dispatch.
pub struct Dispatch {
    /// Per destination rank: the expert of each row sent (f32, the collectives' element type).
    pub experts: Vec<Vec<f32>>,
    /// Per destination rank: the (local token, gate) of each row sent, to combine the replies.
    pub sent: Vec<Vec<(usize, f32)>>,
}

impl Dispatch {
    /// Every token's `(expert, gate)` picks sent to each rank holding a slice of that expert;
    /// counts the tokens each expert was picked for into `routed`.
    pub fn new(
        plan: &Plan,
        c: &ModelConfig,
        routes: &[Vec<(usize, f32)>],
        routed: &mut [u64],
    ) -> Dispatch {
        let mut d = Dispatch {
            experts: vec![Vec::new(); plan.world],
            sent: vec![Vec::new(); plan.world],
        };
        for (t, picks) in routes.iter().enumerate() {
            for &(e, gate) in picks {
                routed[e] += 1;
                for dst in plan.expert_ranks(c, e) {
                    d.experts[dst].push(e as f32);
                    d.sent[dst].push((t, gate));
                }
            }
        }
        d
    }

    /// One message per destination: the expert ids of the rows it gets, then those rows of
    /// `x` (`width` wide), in send order. One message, not two, per peer and layer: decode
    /// steps are bound by the number of exchanges, not their size.
    pub fn messages(&self, x: &[f32], width: usize) -> Vec<Vec<f32>> {
        self.sent
            .iter()
            .zip(&self.experts)
            .map(|(list, ids)| {
                let mut m = Vec::with_capacity(list.len() * (width + 1));
                m.extend_from_slice(ids);
                for &(t, _) in list {
                    m.extend_from_slice(&x[t * width..(t + 1) * width]);
                }
                m
            })
            .collect()
    }

    /// Checks that each destination answered one row per row it was sent.
    pub fn check_replies(
        &self,
        layer: usize,
        replies: &[Vec<f32>],
        width: usize,
    ) -> Result<(), ModelError> {
        for (dst, (list, reply)) in self.sent.iter().zip(replies).enumerate() {
            if reply.len() != list.len() * width {
                return Err(ModelError::Peer {
                    rank: dst,
                    msg: format!(
                        "layer {layer}: returned {} values for {} tokens",
                        reply.len(),
                        list.len()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Per local token, `(row, gate)` of each of its replies, rows numbered through the
    /// destinations' replies concatenated; in combine order.
    pub fn combine_order(&self, tokens: usize) -> Vec<Vec<(usize, f32)>> {
        let mut per_token = vec![Vec::new(); tokens];
        let mut row = 0;
        for list in &self.sent {
            for &(t, gate) in list {
                per_token[t].push((row, gate));
                row += 1;
            }
        }
        per_token
    }
}

/// A source's dispatch message split: its rows' expert ids, then the rows.
pub type Received<'a> = (&'a [f32], &'a [f32]);

/// Splits each source's dispatch message (see [`Dispatch::messages`]) into its expert ids and
/// its rows (`width` wide).
pub fn split_messages(
    layer: usize,
    messages: &[Vec<f32>],
    width: usize,
) -> Result<Vec<Received<'_>>, ModelError> {
    messages
        .iter()
        .enumerate()
        .map(|(src, m)| {
            if !m.len().is_multiple_of(width + 1) {
                return Err(ModelError::Peer {
                    rank: src,
                    msg: format!(
                        "layer {layer}: sent {} values, not whole rows of {width} plus an expert id",
                        m.len()
                    ),
                });
            }
            Ok(m.split_at(m.len() / (width + 1)))
        })
        .collect()
}

/// The rows that arrived in one layer's dispatch, grouped by the local expert that runs them.
pub struct Arrivals {
    /// Per local expert (from the first one this rank holds): `(source rank, row within what
    /// that source sent)` of each of its rows, in arrival order.
    pub per_expert: Vec<Vec<(usize, usize)>>,
    /// Each source's rows, as a range of the sources' rows concatenated.
    pub from: Vec<Range<usize>>,
}

impl Arrivals {
    /// Groups the rows announced by `experts[src]` (each source's expert ids) by local
    /// expert. A row for an expert outside `mine` (the experts this rank holds) is the
    /// sender's error.
    pub fn new(
        layer: usize,
        rank: usize,
        mine: Range<usize>,
        experts: &[&[f32]],
    ) -> Result<Arrivals, ModelError> {
        let mut per_expert = vec![Vec::new(); mine.len()];
        let mut from = Vec::with_capacity(experts.len());
        let mut total = 0;
        for (src, ids) in experts.iter().enumerate() {
            from.push(total..total + ids.len());
            total += ids.len();
            for (i, &e) in ids.iter().enumerate() {
                // Ids travel as f32; anything that is not one of ours (fractions, NaN,
                // negatives included) is refused.
                let held = mine.clone().find(|&m| m as f32 == e);
                let Some(e) = held else {
                    return Err(ModelError::Peer {
                        rank: src,
                        msg: format!(
                            "layer {layer}: sent a token for expert {e}, which rank {rank} does \
                             not hold"
                        ),
                    });
                };
                per_expert[e - mine.start].push((src, i));
            }
        }
        Ok(Arrivals { per_expert, from })
    }

    /// Every row, numbered through the sources' rows concatenated, grouped by local expert.
    pub fn expert_order(&self) -> Vec<u32> {
        self.per_expert
            .iter()
            .flatten()
            .map(|&(src, i)| (self.from[src].start + i) as u32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        let mut c = ModelConfig::tiny();
        c.num_local_experts = 8;
        c
    }

    #[test]
    fn rows_go_to_every_slice_of_their_expert_and_come_back_in_one_order() {
        let c = config();
        // 4 ranks, experts over 2 groups: experts 0..4 on ranks 0-1, 4..8 on ranks 2-3.
        let plan = Plan::new(&c, 4, 1, 2).unwrap();
        let routes = vec![vec![(1, 0.5), (6, 0.25)], vec![(5, 0.75), (0, 0.125)]];
        let mut routed = vec![0u64; 8];
        let d = Dispatch::new(&plan, &c, &routes, &mut routed);
        assert_eq!(routed, [1, 1, 0, 0, 0, 1, 1, 0]);
        assert_eq!(d.experts[0], [1.0, 0.0]);
        assert_eq!(d.experts[1], [1.0, 0.0]);
        assert_eq!(d.experts[2], [6.0, 5.0]);
        assert_eq!(d.sent[3], [(0, 0.25), (1, 0.75)]);
        let x = [10.0, 11.0, 20.0, 21.0];
        let messages = d.messages(&x, 2);
        assert_eq!(messages[0], [1.0, 0.0, 10.0, 11.0, 20.0, 21.0]);
        let parts = split_messages(0, &messages, 2).unwrap();
        assert_eq!(parts[2], (&[6.0, 5.0][..], &[10.0, 11.0, 20.0, 21.0][..]));
        let ragged = vec![vec![1.0, 2.0], vec![4.0, 0.0, 0.0]];
        let err = split_messages(3, &ragged, 2).err().unwrap();
        assert!(
            matches!(&err, ModelError::Peer { rank: 0, msg } if msg.contains("not whole rows")),
            "{err}"
        );
        let order = d.combine_order(2);
        // Token 0: its rows to ranks 0, 1 (expert 1), then 2, 3 (expert 6).
        assert_eq!(order[0], [(0, 0.5), (2, 0.5), (4, 0.25), (6, 0.25)]);
        assert_eq!(order[1], [(1, 0.125), (3, 0.125), (5, 0.75), (7, 0.75)]);

        let short = vec![vec![0.0; 4], vec![0.0; 4], vec![0.0; 4], vec![0.0; 3]];
        let err = d.check_replies(7, &short, 2).unwrap_err().to_string();
        assert!(err.contains("rank 3") && err.contains("layer 7"), "{err}");
    }

    #[test]
    fn arrivals_group_by_local_expert_and_refuse_what_is_not_ours() {
        let ids: [&[f32]; 3] = [&[5.0, 4.0], &[], &[4.0]];
        let a = Arrivals::new(0, 2, 4..8, &ids).unwrap();
        assert_eq!(a.per_expert[0], [(0, 1), (2, 0)]);
        assert_eq!(a.per_expert[1], [(0, 0)]);
        assert_eq!(a.from, [0..2, 2..2, 2..3]);
        assert_eq!(a.expert_order(), [1, 2, 0]);

        for bad in [3.0, 8.0, 4.5, -1.0, f32::NAN] {
            let ids: [&[f32]; 2] = [&[4.0], &[bad]];
            let err = Arrivals::new(1, 2, 4..8, &ids).err().unwrap();
            assert!(
                matches!(&err, ModelError::Peer { rank: 1, msg } if msg.contains("does not hold")),
                "{bad}: {err}"
            );
        }
    }
}

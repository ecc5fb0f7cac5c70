//! Every parallel plan of the issue, run as threads joined by the in-process communicator,
//! computes what the one-process engine computes (prefill and a decode step), on the
//! `grok1-tiny-a` fixture loaded from its `ckpt-0/`.

use grok_shared::checkpoint::open_model;
use grok_shared::comm::local::LocalComm;
use grok_shared::comm::Communicator;
use grok_shared::cpu::{CpuModel, CpuShard};
use grok_shared::model::{
    blocks_for, BlockAllocator, LogitsMode, ModelWeights, SeqKv, SeqStep, Slices,
};
use grok_shared::parallel::Plan;
use grok_shared::test_support::{max_abs_diff, tiny_a_dir};
use std::time::Duration;

/// Prompts of unequal lengths, and one next token for each.
fn sequences() -> (Vec<Vec<u32>>, Vec<u32>) {
    let seqs = vec![
        (0..18).map(|i| (i * 37 + 5) % 1024).collect(),
        vec![7, 300, 12],
        (0..11).map(|i| (i * 101 + 9) % 1024).collect(),
        vec![1000],
        (0..6).map(|i| (i * 13 + 2) % 1024).collect(),
    ];
    (seqs, vec![11, 22, 33, 44, 55])
}

/// Prefill (all logits) then one decode step (last logits), per sequence.
type Outputs = Vec<(Vec<f32>, Vec<f32>)>;
/// What one rank answers: (sequence index, prefill logits, decode logits).
type Answer = (usize, Vec<f32>, Vec<f32>);

const BLOCK: usize = 4;

fn one_process() -> Outputs {
    let dir = open_model(&tiny_a_dir()).unwrap();
    let model =
        CpuModel::new(ModelWeights::load(dir.source.as_ref(), &dir.config).unwrap()).unwrap();
    let (seqs, next) = sequences();
    seqs.iter()
        .zip(&next)
        .map(|(s, &n)| {
            let mut cache = SeqKv::new(&model);
            let a = cache.step(&model, s, LogitsMode::All).unwrap();
            let b = cache.step(&model, &[n], LogitsMode::Last).unwrap();
            (a, b)
        })
        .collect()
}

/// Every plan's outputs, and the tokens each expert of each layer got summed over ranks
/// (prefill and decode steps).
fn cluster(world: usize, tp: usize, ep: usize) -> (Outputs, Vec<u64>) {
    let dir = open_model(&tiny_a_dir()).unwrap();
    let cfg = dir.config.clone();
    let plan = Plan::new(&cfg, world, tp, ep).unwrap();
    let shards: Vec<CpuShard> = (0..world)
        .map(|r| {
            let w = ModelWeights::load_slices(
                dir.source.as_ref(),
                &cfg,
                &Slices::for_rank(&plan, &cfg, r),
            )
            .unwrap();
            CpuShard::new(w, plan, r).unwrap()
        })
        .collect();
    let comms = LocalComm::group(world, Duration::from_secs(30));
    let (seqs, next) = sequences();
    let results: Vec<(Vec<Answer>, Vec<u64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = shards
            .iter()
            .zip(&comms)
            .enumerate()
            .map(|(rank, (shard, comm))| {
                let (seqs, next) = (&seqs, &next);
                s.spawn(move || {
                    // sequence i is served by data-parallel group i % dp
                    let mine: Vec<usize> = (0..seqs.len())
                        .filter(|i| i % plan.dp() == plan.dp_index(rank))
                        .collect();
                    // Every rank of a group allocates the same way: the same block ids.
                    let mut alloc = BlockAllocator::new(64);
                    let mut kv = shard.new_kv(alloc.total(), BLOCK);
                    let tables: Vec<Vec<u32>> = mine
                        .iter()
                        .map(|&i| alloc.alloc(blocks_for(seqs[i].len() + 1, BLOCK)).unwrap())
                        .collect();
                    let batch: Vec<SeqStep> = mine
                        .iter()
                        .zip(&tables)
                        .map(|(&i, blocks)| SeqStep {
                            tokens: &seqs[i],
                            start: 0,
                            blocks,
                            logits: LogitsMode::All,
                        })
                        .collect();
                    let a = shard
                        .forward(comm as &dyn Communicator, &mut kv, &batch)
                        .unwrap();
                    let batch: Vec<SeqStep> = mine
                        .iter()
                        .zip(&tables)
                        .map(|(&i, blocks)| SeqStep {
                            tokens: std::slice::from_ref(&next[i]),
                            start: seqs[i].len(),
                            blocks,
                            logits: LogitsMode::Last,
                        })
                        .collect();
                    let b = shard
                        .forward(comm as &dyn Communicator, &mut kv, &batch)
                        .unwrap();
                    let routed: Vec<u64> = a
                        .expert_tokens
                        .iter()
                        .zip(&b.expert_tokens)
                        .map(|(x, y)| x + y)
                        .collect();
                    let answers = match (a.logits, b.logits) {
                        (Some(a), Some(b)) => mine
                            .into_iter()
                            .zip(a.into_iter().zip(b))
                            .map(|(i, (a, b))| (i, a, b))
                            .collect(),
                        (None, None) => Vec::new(),
                        _ => panic!("rank {rank}: logits on one step but not the other"),
                    };
                    (answers, routed)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut out: Vec<Option<(Vec<f32>, Vec<f32>)>> = vec![None; seqs.len()];
    let mut routed = vec![0u64; cfg.num_hidden_layers * cfg.num_local_experts];
    for (answers, r) in results {
        for (sum, x) in routed.iter_mut().zip(r) {
            *sum += x;
        }
        for (i, a, b) in answers {
            assert!(out[i].is_none(), "sequence {i} answered twice");
            out[i] = Some((a, b));
        }
    }
    let out = out
        .into_iter()
        .map(|o| o.expect("every sequence answered"))
        .collect();
    (out, routed)
}

fn argmax_rows(v: &[f32], vocab: usize) -> Vec<usize> {
    v.chunks_exact(vocab)
        .map(|r| grok_shared::sampling::argmax(r).unwrap())
        .collect()
}

#[test]
fn every_issue_plan_equals_one_process() {
    let want = one_process();
    let (seqs, next) = sequences();
    let tokens = seqs.iter().map(Vec::len).sum::<usize>() + next.len();
    let cfg = open_model(&tiny_a_dir()).unwrap().config;
    for (w, tp, ep) in grok_shared::test_support::TINY_A_PLANS {
        let (got, routed) = cluster(w, tp, ep);
        // Every token is routed once per chosen expert, by exactly one rank.
        assert_eq!(routed.len(), cfg.num_hidden_layers * cfg.num_local_experts);
        for (l, layer) in routed.chunks(cfg.num_local_experts).enumerate() {
            assert_eq!(
                layer.iter().sum::<u64>(),
                (cfg.num_experts_per_tok * tokens) as u64,
                "W={w} tp={tp} ep={ep} layer {l}: tokens x top-k"
            );
        }
        assert_eq!(got.len(), want.len(), "W={w} tp={tp} ep={ep}: sequences");
        for (i, ((ga, gb), (wa, wb))) in got.iter().zip(&want).enumerate() {
            let (da, db) = (max_abs_diff(ga, wa), max_abs_diff(gb, wb));
            assert!(
                da <= 1e-4 && db <= 1e-4,
                "W={w} tp={tp} ep={ep} seq {i}: prefill {da}, decode {db}"
            );
            assert_eq!(
                argmax_rows(ga, 1024),
                argmax_rows(wa, 1024),
                "W={w} tp={tp} ep={ep} seq {i}: greedy tokens"
            );
            assert_eq!(
                argmax_rows(gb, 1024),
                argmax_rows(wb, 1024),
                "W={w} tp={tp} ep={ep} seq {i}: greedy tokens"
            );
        }
    }
}

#[test]
fn each_rank_holds_only_its_share_of_the_weights() {
    let dir = open_model(&tiny_a_dir()).unwrap();
    let cfg = dir.config.clone();
    let full = ModelWeights::load(dir.source.as_ref(), &cfg).unwrap();
    let replicated = full.embeddings.len() * 4
        + full.final_norm.len() * 4
        + full
            .layers
            .iter()
            .map(|l| (l.router.len() + 4 * cfg.hidden_size) * 4)
            .sum::<usize>();
    let sharded_total = full.stored_bytes() - replicated;
    for (w, tp, ep) in [(2, 2, 2), (4, 4, 4), (4, 1, 4), (4, 4, 2)] {
        let plan = Plan::new(&cfg, w, tp, ep).unwrap();
        let mut sum = 0;
        for r in 0..w {
            let part = ModelWeights::load_slices(
                dir.source.as_ref(),
                &cfg,
                &Slices::for_rank(&plan, &cfg, r),
            )
            .unwrap();
            sum += part.stored_bytes() - replicated;
        }
        // attention is split over tp (replicated over dp groups); experts are split over all ranks
        let attn: usize = full
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo]
                    .iter()
                    .map(|m| m.stored_bytes())
                    .sum::<usize>()
            })
            .sum();
        let want = (sharded_total - attn) + attn * plan.dp();
        assert_eq!(sum, want, "W={w} tp={tp} ep={ep}");
    }
}

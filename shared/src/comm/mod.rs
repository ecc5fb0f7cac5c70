//! Collectives between the ranks of a cluster behind one small trait. Implementations supply
//! point-to-point `send`/`recv` (in-process channels here, gRPC streams between worker
//! processes, NCCL between GPUs) and may override any collective with a native one; the defaults
//! build every collective from point-to-point messages.
//!
//! Every rank of a group must call the same collectives in the same order (SPMD); messages
//! between a pair of ranks are delivered in order. Every wait has a deadline, and a failed
//! peer becomes an error naming it, never a hang.

pub mod grpc;
pub mod local;
pub mod nccl;

use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum CommError {
    #[error("rank {rank}: no message from rank {peer} within {timeout:?}")]
    Timeout {
        rank: usize,
        peer: usize,
        timeout: Duration,
    },
    #[error("rank {rank}: rank {peer} is gone ({reason})")]
    PeerFailed {
        rank: usize,
        peer: usize,
        reason: String,
    },
    #[error("rank {rank}: {msg}")]
    Protocol { rank: usize, msg: String },
}

pub type Result<T> = std::result::Result<T, CommError>;

pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Queues `data` for `peer`; never waits for the peer to receive it.
    fn send(&self, peer: usize, data: Vec<f32>) -> Result<()>;
    /// The next message from `peer`, waiting at most the communicator's deadline.
    fn recv(&self, peer: usize) -> Result<Vec<f32>>;

    /// This rank's position in `group` (an error if it is not a member).
    fn index_in(&self, group: &[usize]) -> Result<usize> {
        group
            .iter()
            .position(|&r| r == self.rank())
            .ok_or_else(|| CommError::Protocol {
                rank: self.rank(),
                msg: format!("not a member of group {group:?}"),
            })
    }

    /// Sends `send[i]` to `group[i]` and returns what each member sent to this rank.
    fn all_to_all_v(&self, group: &[usize], send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        let me = self.index_in(group)?;
        if send.len() != group.len() {
            return Err(CommError::Protocol {
                rank: self.rank(),
                msg: format!(
                    "all_to_all_v: {} buffers for a group of {}",
                    send.len(),
                    group.len()
                ),
            });
        }
        let mut mine = Vec::new();
        for (i, buf) in send.into_iter().enumerate() {
            if i == me {
                mine = buf;
            } else {
                self.send(group[i], buf)?;
            }
        }
        let mut out = Vec::with_capacity(group.len());
        for (i, &peer) in group.iter().enumerate() {
            out.push(if i == me {
                std::mem::take(&mut mine)
            } else {
                self.recv(peer)?
            });
        }
        Ok(out)
    }

    /// Every member's `input` (lengths may differ), in group order.
    fn all_gather_v(&self, group: &[usize], input: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.all_to_all_v(group, vec![input.to_vec(); group.len()])
    }

    /// Sums `input` (the same length on every member) across the group; member `i` receives
    /// the elements of segment `i`, where `counts[i]` are the segment lengths.
    fn reduce_scatter(&self, group: &[usize], input: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let me = self.index_in(group)?;
        if counts.len() != group.len() || counts.iter().sum::<usize>() != input.len() {
            return Err(CommError::Protocol {
                rank: self.rank(),
                msg: format!(
                    "reduce_scatter: counts {counts:?} do not split {} elements",
                    input.len()
                ),
            });
        }
        let mut segments = Vec::with_capacity(group.len());
        let mut start = 0;
        for &c in counts {
            segments.push(input[start..start + c].to_vec());
            start += c;
        }
        let parts = self.all_to_all_v(group, segments)?;
        let mut out = vec![0f32; counts[me]];
        sum_into(self.rank(), "reduce_scatter", &mut out, parts)?;
        Ok(out)
    }

    /// Sums `buf` across the group, in place, on every member.
    fn all_reduce(&self, group: &[usize], buf: &mut [f32]) -> Result<()> {
        let parts = self.all_gather_v(group, buf)?;
        sum_into(self.rank(), "all_reduce", buf, parts)
    }
}

/// A communicator, adding up the time spent inside its calls (what a step reports as time in
/// collectives).
pub(crate) struct Timed<'a> {
    pub comm: &'a dyn Communicator,
    pub spent: Duration,
}

impl Timed<'_> {
    pub fn run<T>(&mut self, f: impl FnOnce(&dyn Communicator) -> T) -> T {
        let t = std::time::Instant::now();
        let r = f(self.comm);
        self.spent += t.elapsed();
        r
    }
}

/// `out = Σ parts`, adding in group order so every rank gets bit-identical sums.
fn sum_into(rank: usize, what: &str, out: &mut [f32], parts: Vec<Vec<f32>>) -> Result<()> {
    out.fill(0.0);
    for p in parts {
        if p.len() != out.len() {
            return Err(CommError::Protocol {
                rank,
                msg: format!("{what}: got {} elements, expected {}", p.len(), out.len()),
            });
        }
        for (o, v) in out.iter_mut().zip(&p) {
            *o += v;
        }
    }
    Ok(())
}

/// Runs `f` on every rank's communicator at once, one thread each (tests).
#[cfg(test)]
pub(crate) fn on_each_rank<C: Sync, T: Send>(comms: &[C], f: impl Fn(&C) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

/// Checks every collective of one rank of a world of `world` against its definition; each
/// implementation's tests run it on every rank at once.
#[cfg(test)]
pub(crate) fn check_collectives(c: &dyn Communicator, world: usize) {
    let group: Vec<usize> = (0..world).collect();
    let rank = c.rank();
    let r = rank as f32;
    let n = world as f32;
    let mut buf = vec![r, 2.0 * r, 1.0];
    c.all_reduce(&group, &mut buf).unwrap();
    let total = n * (n - 1.0) / 2.0;
    assert_eq!(buf, vec![total, 2.0 * total, n]);
    let counts: Vec<usize> = (1..=world).collect();
    let rs = c
        .reduce_scatter(&group, &vec![r; counts.iter().sum()], &counts)
        .unwrap();
    assert_eq!(rs, vec![total; rank + 1]);
    let ag = c.all_gather_v(&group, &vec![r; rank]).unwrap();
    assert_eq!(
        ag,
        (0..world).map(|s| vec![s as f32; s]).collect::<Vec<_>>()
    );
    let a2a = c
        .all_to_all_v(
            &group,
            (0..world).map(|d| vec![(10 * rank + d) as f32]).collect(),
        )
        .unwrap();
    assert_eq!(
        a2a,
        (0..world)
            .map(|s| vec![(10 * s + rank) as f32])
            .collect::<Vec<_>>()
    );
}

//! In-process communicator: ranks are threads joined by channels (unit tests, and the
//! single-process cluster).

use super::{CommError, Communicator, Result};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::Duration;

pub struct LocalComm {
    rank: usize,
    /// `to[p]` sends to rank p.
    to: Vec<Sender<Vec<f32>>>,
    /// `from[p]` receives from rank p.
    from: Vec<Mutex<Receiver<Vec<f32>>>>,
    timeout: Duration,
}

impl LocalComm {
    /// One communicator per rank of a world of `world`, each waiting at most `timeout`.
    pub fn group(world: usize, timeout: Duration) -> Vec<LocalComm> {
        // channel (src, dst)
        let mut senders: Vec<Vec<Option<Sender<Vec<f32>>>>> = (0..world)
            .map(|_| (0..world).map(|_| None).collect())
            .collect();
        let mut receivers: Vec<Vec<Option<Receiver<Vec<f32>>>>> = (0..world)
            .map(|_| (0..world).map(|_| None).collect())
            .collect();
        for src in 0..world {
            for dst in 0..world {
                let (tx, rx) = channel();
                senders[src][dst] = Some(tx);
                receivers[dst][src] = Some(rx);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| LocalComm {
                rank,
                to: to.into_iter().flatten().collect(),
                from: from.into_iter().flatten().map(Mutex::new).collect(),
                timeout,
            })
            .collect()
    }

    fn peer_check(&self, peer: usize) -> Result<()> {
        if peer >= self.to.len() {
            return Err(CommError::Protocol {
                rank: self.rank,
                msg: format!("no rank {peer} in a world of {}", self.to.len()),
            });
        }
        Ok(())
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.to.len()
    }

    fn send(&self, peer: usize, data: Vec<f32>) -> Result<()> {
        self.peer_check(peer)?;
        self.to[peer].send(data).map_err(|_| CommError::PeerFailed {
            rank: self.rank,
            peer,
            reason: "its end of the channel is closed".into(),
        })
    }

    fn recv(&self, peer: usize) -> Result<Vec<f32>> {
        self.peer_check(peer)?;
        let rx = self.from[peer].lock().map_err(|_| CommError::Protocol {
            rank: self.rank,
            msg: "receiver lock poisoned".into(),
        })?;
        rx.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => CommError::Timeout {
                rank: self.rank,
                peer,
                timeout: self.timeout,
            },
            RecvTimeoutError::Disconnected => CommError::PeerFailed {
                rank: self.rank,
                peer,
                reason: "it dropped its communicator".into(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send>(world: usize, f: impl Fn(&LocalComm) -> T + Sync) -> Vec<T> {
        crate::comm::on_each_rank(&LocalComm::group(world, Duration::from_secs(5)), f)
    }

    #[test]
    fn collectives_agree_with_their_definitions() {
        run(4, |c| crate::comm::check_collectives(c, 4));
    }

    #[test]
    fn subgroups_and_a_silent_peer_times_out_naming_it() {
        let comms = LocalComm::group(3, Duration::from_millis(100));
        // ranks 0 and 2 form a group; rank 1 never speaks
        std::thread::scope(|s| {
            let a = s.spawn(|| comms[0].all_gather_v(&[0, 2], &[1.0]));
            let b = s.spawn(|| comms[2].all_gather_v(&[0, 2], &[2.0]));
            assert_eq!(a.join().unwrap().unwrap(), vec![vec![1.0], vec![2.0]]);
            assert_eq!(b.join().unwrap().unwrap(), vec![vec![1.0], vec![2.0]]);
        });
        let err = comms[0].recv(1).unwrap_err();
        assert!(matches!(err, CommError::Timeout { peer: 1, .. }), "{err}");
        assert!(
            comms[0].all_reduce(&[1, 2], &mut [0.0]).is_err(),
            "not a member"
        );
    }

    #[test]
    fn a_dropped_peer_is_an_error_not_a_hang() {
        let mut comms = LocalComm::group(2, Duration::from_secs(30));
        let gone = comms.pop();
        drop(gone);
        let err = comms[0].recv(1).unwrap_err();
        assert!(
            matches!(err, CommError::PeerFailed { peer: 1, .. }),
            "{err}"
        );
    }
}

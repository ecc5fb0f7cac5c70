//! Collectives over NCCL between GPU ranks: all-reduce and all-gather natively, reduce-scatter
//! (our segments may differ in length) as an all-reduce keeping one segment, and all-to-all-v
//! as grouped send/recv after the ranks swap their lengths.
//!
//! The trait moves host vectors, so each call stages through the rank's GPU; the NCCL unique
//! id travels over an existing communicator (the workers' gRPC mesh). Every wait polls an
//! event against the deadline: a peer that never joins a collective aborts the communicator
//! and becomes an error, never a hang.

use super::{CommError, Communicator, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{group_end, group_start, Comm, Id, ReduceOp};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An NCCL communicator that may move between threads.
struct OwnedComm(Comm);

// SAFETY: NCCL allows a communicator to be used from any thread as long as calls on it are
// serialised; the Mutex in NcclComm serialises them.
unsafe impl Send for OwnedComm {}

pub struct NcclComm {
    /// `None` once aborted after a failure: every later call fails at once.
    comm: Mutex<Option<OwnedComm>>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

/// Whether libnccl loads here.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nccl::sys::is_culib_present() && crate::cuda::cuda_available() }
}

impl NcclComm {
    /// Joins the NCCL world of `bootstrap`'s ranks on GPU `ordinal`: rank 0 makes the unique
    /// id and hands it to the others through `bootstrap`.
    pub fn start(
        bootstrap: &dyn Communicator,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<NcclComm> {
        let (rank, world) = (bootstrap.rank(), bootstrap.world());
        let fail = |msg: String| CommError::Protocol { rank, msg };
        if !nccl_available() {
            return Err(fail(
                "NCCL (libnccl.so.2) or CUDA does not load here: install NCCL or use the gRPC \
                 collectives"
                    .into(),
            ));
        }
        let everyone: Vec<usize> = (0..world).collect();
        let mine: Vec<f32> = if rank == 0 {
            let id = Id::new().map_err(|e| fail(format!("ncclGetUniqueId: {e:?}")))?;
            id.internal()
                .chunks_exact(4)
                .map(|c| {
                    f32::from_bits(u32::from_le_bytes([
                        c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8,
                    ]))
                })
                .collect()
        } else {
            Vec::new()
        };
        let got = bootstrap.all_gather_v(&everyone, &mine)?;
        let words = &got[0];
        if words.len() != 32 {
            return Err(fail(format!(
                "rank 0 sent an NCCL id of {} words, not 32",
                words.len()
            )));
        }
        let mut raw = [0 as std::ffi::c_char; 128];
        for (i, w) in words.iter().enumerate() {
            for (j, b) in w.to_bits().to_le_bytes().into_iter().enumerate() {
                raw[4 * i + j] = b as std::ffi::c_char;
            }
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| fail(format!("GPU {ordinal}: {e}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| fail(format!("creating a stream: {e}")))?;
        // ncclCommInitRank blocks until every rank joins; a rank that never does is a peer
        // failure the coordinator's step deadline reports.
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(raw))
            .map_err(|e| fail(format!("ncclCommInitRank: {e:?}")))?;
        Ok(NcclComm {
            comm: Mutex::new(Some(OwnedComm(comm))),
            stream,
            rank,
            world,
            timeout,
        })
    }

    fn err(&self, msg: String) -> CommError {
        CommError::Protocol {
            rank: self.rank,
            msg,
        }
    }

    fn upload(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        // A zero-length allocation is not allowed; NCCL is given the true count.
        let mut buf = self
            .stream
            .alloc_zeros::<f32>(v.len().max(1))
            .map_err(|e| self.err(format!("allocating {} floats: {e}", v.len())))?;
        if !v.is_empty() {
            self.stream
                .memcpy_htod(v, &mut buf.slice_mut(..v.len()))
                .map_err(|e| self.err(format!("copying to the GPU: {e}")))?;
        }
        Ok(buf)
    }

    fn download(&self, b: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.stream
            .clone_dtoh(&b.slice(..len))
            .map_err(|e| self.err(format!("copying from the GPU: {e}")))
    }

    /// Runs `f` (which enqueues NCCL work) and waits for it within the deadline; on a timeout
    /// the communicator is aborted (NCCL cannot cancel one operation) and stays failed.
    fn run(
        &self,
        what: &str,
        f: impl FnOnce(&Comm) -> std::result::Result<(), String>,
    ) -> Result<()> {
        let mut guard = self
            .comm
            .lock()
            .map_err(|_| self.err("the NCCL communicator's lock is poisoned".into()))?;
        let comm = &guard
            .as_ref()
            .ok_or_else(|| self.err("the NCCL communicator was aborted after a failure".into()))?;
        f(&comm.0).map_err(|e| self.err(format!("{what}: {e}")))?;
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| self.err(format!("{what}: recording an event: {e}")))?;
        let start = Instant::now();
        loop {
            match done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.err(format!("{what}: {e}"))),
            }
            if start.elapsed() > self.timeout {
                // Dropping the Comm aborts it, which frees the stuck kernel.
                *guard = None;
                return Err(CommError::Timeout {
                    rank: self.rank,
                    // NCCL does not say which peer is missing.
                    peer: usize::MAX,
                    timeout: self.timeout,
                });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    fn check_world(&self, group: &[usize]) -> Result<()> {
        // NCCL collectives here span the whole communicator.
        if group.len() != self.world || group.iter().enumerate().any(|(i, &r)| i != r) {
            return Err(self.err(format!(
                "NCCL collectives run over the whole world (0..{}), not group {group:?}",
                self.world
            )));
        }
        Ok(())
    }
}

fn nccl<T>(
    r: std::result::Result<T, cudarc::nccl::result::NcclError>,
) -> std::result::Result<(), String> {
    r.map(|_| ()).map_err(|e| format!("{e:?}"))
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    /// Point to point: the length first, then the data (the receiver must size its buffer).
    fn send(&self, peer: usize, data: Vec<f32>) -> Result<()> {
        let len = self.upload(&[data.len() as f32])?;
        let buf = self.upload(&data)?;
        let n = data.len();
        self.run("send", |c| {
            nccl(c.send(&len, peer as i32))?;
            if n > 0 {
                nccl(c.send(&buf.slice(..n), peer as i32))?;
            }
            Ok(())
        })
    }

    fn recv(&self, peer: usize) -> Result<Vec<f32>> {
        let mut len = self.upload(&[0.0])?;
        self.run("recv length", |c| nccl(c.recv(&mut len, peer as i32)))?;
        let n = self.download(&len, 1)?[0] as usize;
        let mut buf = self.upload(&vec![0.0; n])?;
        if n > 0 {
            self.run("recv", |c| {
                nccl(c.recv(&mut buf.slice_mut(..n), peer as i32))
            })?;
        }
        self.download(&buf, n)
    }

    fn all_reduce(&self, group: &[usize], buf: &mut [f32]) -> Result<()> {
        self.check_world(group)?;
        if buf.is_empty() {
            return Ok(());
        }
        let send = self.upload(buf)?;
        let mut recv = self.upload(buf)?;
        self.run("all_reduce", |c| {
            nccl(c.all_reduce(&send, &mut recv, &ReduceOp::Sum))
        })?;
        buf.copy_from_slice(&self.download(&recv, buf.len())?);
        Ok(())
    }

    fn reduce_scatter(&self, group: &[usize], input: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let me = self.index_in(group)?;
        if counts.len() != group.len() || counts.iter().sum::<usize>() != input.len() {
            return Err(self.err(format!(
                "reduce_scatter: counts {counts:?} do not split {} elements",
                input.len()
            )));
        }
        let mut all = input.to_vec();
        self.all_reduce(group, &mut all)?;
        let start: usize = counts[..me].iter().sum();
        Ok(all[start..start + counts[me]].to_vec())
    }

    fn all_to_all_v(&self, group: &[usize], send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        self.check_world(group)?;
        if send.len() != self.world {
            return Err(self.err(format!(
                "all_to_all_v: {} buffers for a group of {}",
                send.len(),
                self.world
            )));
        }
        // Lengths first: every rank learns what it will receive from each peer.
        let lens: Vec<f32> = send.iter().map(|b| b.len() as f32).collect();
        let len_dev = self.upload(&lens)?;
        let mut got_lens = self.upload(&vec![0.0; self.world])?;
        self.run("all_to_all_v lengths", |c| {
            nccl(group_start())?;
            for p in 0..self.world {
                nccl(c.send(&len_dev.slice(p..p + 1), p as i32))?;
                nccl(c.recv(&mut got_lens.slice_mut(p..p + 1), p as i32))?;
            }
            nccl(group_end())
        })?;
        let got_lens: Vec<usize> = self
            .download(&got_lens, self.world)?
            .into_iter()
            .map(|v| v as usize)
            .collect();
        let out_total: usize = got_lens.iter().sum();
        let flat: Vec<f32> = send.concat();
        let send_dev = self.upload(&flat)?;
        let mut recv_dev = self.upload(&vec![0.0; out_total])?;
        self.run("all_to_all_v", |c| {
            nccl(group_start())?;
            let (mut s0, mut r0) = (0, 0);
            for p in 0..self.world {
                let (sl, rl) = (send[p].len(), got_lens[p]);
                if sl > 0 {
                    nccl(c.send(&send_dev.slice(s0..s0 + sl), p as i32))?;
                }
                if rl > 0 {
                    nccl(c.recv(&mut recv_dev.slice_mut(r0..r0 + rl), p as i32))?;
                }
                s0 += sl;
                r0 += rl;
            }
            nccl(group_end())
        })?;
        let all = self.download(&recv_dev, out_total)?;
        let mut out = Vec::with_capacity(self.world);
        let mut at = 0;
        for &n in &got_lens {
            out.push(all[at..at + n].to_vec());
            at += n;
        }
        Ok(out)
    }

    fn all_gather_v(&self, group: &[usize], input: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.all_to_all_v(group, vec![input.to_vec(); group.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::LocalComm;

    /// NCCL with a world of one on GPU 0 (one GPU cannot host two NCCL ranks): every
    /// collective against its definition. Needs a GPU: `cargo test -- --ignored nccl`.
    #[test]
    #[ignore = "needs a GPU with NCCL"]
    fn nccl_world_of_one_passes_the_collective_checks() {
        let boot = LocalComm::group(1, Duration::from_secs(5)).remove(0);
        let c = NcclComm::start(&boot, 0, Duration::from_secs(10)).unwrap();
        crate::comm::check_collectives(&c, 1);
    }

    #[test]
    fn without_nccl_start_is_an_error() {
        if nccl_available() {
            return;
        }
        let boot = LocalComm::group(1, Duration::from_secs(1)).remove(0);
        let e = NcclComm::start(&boot, 0, Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(e.to_string().contains("gRPC collectives"), "{e}");
    }
}

//! Paged key/value cache. A [`PagedKv`] is one rank's pool of fixed-size blocks (pages) of
//! key/value positions for every layer; which blocks a sequence uses (its block table) and how
//! many positions it holds are the caller's business ([`BlockAllocator`] hands out block ids),
//! so the pool itself keeps no per-sequence state. Position `j` of a sequence lives in block
//! `blocks[j / block_size]`, row `j % block_size`.
//!
//! [`SeqKv`] is the one-sequence convenience for callers in one process: a pool sized for the
//! model's whole context, its block table `0..n`, and the sequence's length.

use super::{Forward, LogitsMode, ModelError, SeqStep};

/// Positions per block when the caller does not choose (the usual vLLM-style page size).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Blocks needed to hold `positions` positions in blocks of `block_size` (rounded up).
/// A `block_size` of 0 is taken as 1, so this never divides by zero.
pub fn blocks_for(positions: usize, block_size: usize) -> usize {
    positions.div_ceil(block_size.max(1))
}

/// One rank's KV pool: for each layer, keys and values of `num_blocks * block_size`
/// positions, each `[kv_dim]` f32 (this rank's kv heads × head_dim).
#[derive(Debug, Clone)]
pub struct PagedKv {
    pub(crate) keys: Vec<Vec<f32>>,
    pub(crate) values: Vec<Vec<f32>>,
    kv_dim: usize,
    block_size: usize,
    num_blocks: usize,
}

impl PagedKv {
    /// A zeroed pool. The buffers come from `vec![0f32; n]` (a zeroed allocation), so pages
    /// never written cost address space but no memory. A `block_size` of 0 is taken as 1.
    ///
    /// Panics only if the pool's size overflows `usize`; callers sizing a pool from input
    /// check [`PagedKv::bytes_for`] first.
    pub fn new(layers: usize, kv_dim: usize, block_size: usize, num_blocks: usize) -> Self {
        let block_size = block_size.max(1);
        let n = num_blocks
            .checked_mul(block_size)
            .and_then(|p| p.checked_mul(kv_dim))
            .unwrap_or_else(|| {
                panic!(
                    "KV pool of {num_blocks} blocks × {block_size} positions × {kv_dim} overflows"
                )
            });
        PagedKv {
            keys: (0..layers).map(|_| vec![0f32; n]).collect(),
            values: (0..layers).map(|_| vec![0f32; n]).collect(),
            kv_dim,
            block_size,
            num_blocks,
        }
    }

    /// Bytes of keys and values one block holds over `layers` layers.
    pub fn block_bytes(layers: usize, kv_dim: usize, block_size: usize) -> usize {
        2 * layers * block_size * kv_dim * std::mem::size_of::<f32>()
    }

    /// Bytes a pool of `num_blocks` would take, `None` if that overflows `usize`.
    pub fn bytes_for(
        layers: usize,
        kv_dim: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Option<usize> {
        2usize
            .checked_mul(layers)?
            .checked_mul(block_size)?
            .checked_mul(kv_dim)?
            .checked_mul(std::mem::size_of::<f32>())?
            .checked_mul(num_blocks)
    }

    pub fn layers(&self) -> usize {
        self.keys.len()
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes of keys and values in one block (all layers).
    pub fn bytes_per_block(&self) -> usize {
        Self::block_bytes(self.layers(), self.kv_dim, self.block_size)
    }

    /// Bytes of the whole pool (address space; only written pages are resident).
    pub fn nbytes(&self) -> usize {
        self.bytes_per_block() * self.num_blocks
    }

    /// Keys of layer `layer`, `[num_blocks * block_size, kv_dim]` (empty past the last layer).
    pub fn keys(&self, layer: usize) -> &[f32] {
        self.keys.get(layer).map_or(&[], Vec::as_slice)
    }

    /// Values of layer `layer`, laid out as [`PagedKv::keys`].
    pub fn values(&self, layer: usize) -> &[f32] {
        self.values.get(layer).map_or(&[], Vec::as_slice)
    }

    /// The pool row holding position `pos` of a sequence with block table `blocks` (the
    /// caller has checked the table covers `pos` and its ids are in range).
    #[inline]
    pub(crate) fn slot(&self, blocks: &[u32], pos: usize) -> usize {
        blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }
}

/// Free list of a pool's block ids. All-or-nothing allocation, so a caller never holds half
/// of what a sequence needs; releasing an id that is not allocated is ignored, so a double
/// release can never hand one block to two sequences.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    /// Free ids, the next to hand out last (so the lowest ids go first).
    free: Vec<u32>,
    in_use: Vec<bool>,
}

impl BlockAllocator {
    /// All of `total` blocks free. Ids are `u32`, so a pool beyond `u32::MAX` blocks is
    /// capped there (far beyond any memory).
    pub fn new(total: usize) -> Self {
        let total = total.min(u32::MAX as usize) as u32;
        BlockAllocator {
            free: (0..total).rev().collect(),
            in_use: vec![false; total as usize],
        }
    }

    /// `n` blocks, or `None` (and nothing taken) if fewer than `n` are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let mut ids = self.free.split_off(self.free.len() - n);
        ids.reverse();
        for &id in &ids {
            self.in_use[id as usize] = true;
        }
        Some(ids)
    }

    /// Returns blocks to the free list; ids not currently allocated are ignored.
    pub fn release(&mut self, ids: &[u32]) {
        for &id in ids {
            if let Some(used) = self.in_use.get_mut(id as usize) {
                if *used {
                    *used = false;
                    self.free.push(id);
                }
            }
        }
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    pub fn used(&self) -> usize {
        self.total() - self.free()
    }

    pub fn total(&self) -> usize {
        self.in_use.len()
    }
}

/// One sequence's cache in this process: a pool with room for the model's whole context, its
/// block table (every block, in order) and how many positions are filled.
#[derive(Debug, Clone)]
pub struct SeqKv {
    kv: PagedKv,
    blocks: Vec<u32>,
    len: usize,
}

impl SeqKv {
    /// A pool of `blocks_for(max_seq_len)` blocks of [`DEFAULT_BLOCK_SIZE`] for `model`.
    pub fn new(model: &dyn Forward) -> Self {
        let bs = DEFAULT_BLOCK_SIZE;
        let n = blocks_for(model.config().max_seq_len, bs);
        SeqKv {
            kv: model.new_kv(n, bs),
            blocks: (0..n.min(u32::MAX as usize) as u32).collect(),
            len: 0,
        }
    }

    /// Positions held (the position the next token gets).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn kv(&self) -> &PagedKv {
        &self.kv
    }

    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Forgets everything after the first `len` positions (e.g. to reuse a prompt prefix):
    /// later steps overwrite them.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes of keys and values of the positions held (what is resident for this sequence).
    pub fn used_bytes(&self) -> usize {
        2 * self.kv.layers() * self.len * self.kv.kv_dim() * std::mem::size_of::<f32>()
    }

    /// Appends `tokens` to the sequence on `model` (the model this cache was made for);
    /// returns their logits as `logits` asks (empty for [`LogitsMode::None`]). On an error
    /// the sequence's length is unchanged.
    pub fn step(
        &mut self,
        model: &dyn Forward,
        tokens: &[u32],
        logits: LogitsMode,
    ) -> Result<Vec<f32>, ModelError> {
        let batch = [SeqStep {
            tokens,
            start: self.len,
            blocks: &self.blocks,
            logits,
        }];
        let mut out = model.forward(&mut self.kv, &batch)?;
        self.len += tokens.len();
        Ok(out.pop().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_for_rounds_up() {
        assert_eq!(blocks_for(0, 16), 0);
        assert_eq!(blocks_for(1, 16), 1);
        assert_eq!(blocks_for(16, 16), 1);
        assert_eq!(blocks_for(17, 16), 2);
        assert_eq!(blocks_for(5, 0), 5);
    }

    #[test]
    fn allocator_is_all_or_nothing_and_never_hands_out_a_block_twice() {
        let mut a = BlockAllocator::new(10);
        assert_eq!((a.total(), a.free(), a.used()), (10, 10, 0));
        let x = a.alloc(4).unwrap();
        assert_eq!(x, vec![0, 1, 2, 3]);
        let y = a.alloc(5).unwrap();
        assert_eq!((a.free(), a.used()), (1, 9));
        // Not enough: nothing is taken.
        assert!(a.alloc(2).is_none());
        assert_eq!(a.free(), 1);
        a.release(&x);
        // A double release and a foreign id change nothing.
        a.release(&x);
        a.release(&[99]);
        assert_eq!((a.free(), a.used()), (5, 5));
        let z = a.alloc(5).unwrap();
        let mut all: Vec<u32> = y.iter().chain(&z).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 10, "every block held exactly once");
        assert_eq!(a.alloc(0), Some(Vec::new()));
        assert!(a.alloc(1).is_none());
    }

    #[test]
    fn allocator_property_random_alloc_release_keeps_the_books() {
        // xorshift: deterministic, dependency-free.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let total = 37;
        let mut a = BlockAllocator::new(total);
        let mut held: Vec<Vec<u32>> = Vec::new();
        for _ in 0..2000 {
            if next() % 2 == 0 || held.is_empty() {
                let n = (next() % 9) as usize;
                let before = a.free();
                match a.alloc(n) {
                    Some(ids) => {
                        assert_eq!(ids.len(), n);
                        held.push(ids);
                    }
                    None => assert!(n > before && a.free() == before),
                }
            } else {
                let i = (next() as usize) % held.len();
                a.release(&held.swap_remove(i));
            }
            let mut ids: Vec<u32> = held.iter().flatten().copied().collect();
            assert_eq!(ids.len(), a.used());
            assert_eq!(a.used() + a.free(), total);
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), a.used(), "a block handed out twice");
            assert!(ids.iter().all(|&b| (b as usize) < total));
        }
    }

    #[test]
    fn pool_sizes() {
        let kv = PagedKv::new(3, 8, 4, 5);
        assert_eq!(kv.bytes_per_block(), 2 * 3 * 4 * 8 * 4);
        assert_eq!(kv.nbytes(), kv.bytes_per_block() * 5);
        assert_eq!(PagedKv::bytes_for(3, 8, 4, 5), Some(kv.nbytes()));
        assert_eq!(PagedKv::bytes_for(3, 8, 4, usize::MAX), None);
        assert_eq!(kv.keys(0).len(), 5 * 4 * 8);
        assert!(kv.keys(3).is_empty());
        assert_eq!(kv.slot(&[4, 2], 5), 2 * 4 + 1);
    }
}

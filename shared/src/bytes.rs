//! Immutable byte regions shared between tensors: a memory-mapped file or an owned buffer.
//! Tensors hold views into these, so a checkpoint's payloads are mapped, never copied.

use std::ops::Range;
use std::sync::Arc;

/// A cheaply clonable view of immutable bytes.
#[derive(Clone)]
pub struct ByteView {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for ByteView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ByteView({} bytes at {})", self.len, self.start)
    }
}

impl ByteView {
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        ByteView {
            owner: Arc::new(v),
            start: 0,
            len,
        }
    }

    pub fn from_mmap(m: memmap2::Mmap) -> Self {
        let len = m.len();
        ByteView {
            owner: Arc::new(m),
            start: 0,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A sub-view sharing the same owner; `None` if the range is out of bounds.
    pub fn slice(&self, range: Range<usize>) -> Option<ByteView> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        Some(ByteView {
            owner: self.owner.clone(),
            start: self.start + range.start,
            len: range.end - range.start,
        })
    }
}

impl AsRef<[u8]> for ByteView {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_share_and_bound_check() {
        let v = ByteView::from_vec((0u8..10).collect());
        let s = v.slice(2..6).unwrap();
        assert_eq!(s.as_slice(), &[2, 3, 4, 5]);
        assert_eq!(s.slice(1..3).unwrap().as_slice(), &[3, 4]);
        assert!(s.slice(3..5).is_none());
        #[allow(clippy::reversed_empty_ranges)]
        let bad = v.slice(5..4);
        assert!(bad.is_none());
    }
}

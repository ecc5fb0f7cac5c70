//! ckpt-0 → native conversion (to be written).

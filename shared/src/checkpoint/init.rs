//! Deterministic random weights (to be written).

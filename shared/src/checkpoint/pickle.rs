//! The pickle interpreter (to be written).

//! Model (to be written).

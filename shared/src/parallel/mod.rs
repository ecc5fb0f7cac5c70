//! Running one model over many ranks: the parallel plan (which rank holds which heads,
//! experts and FFN slices) and in-process clusters built on it.

pub mod dispatch;
pub mod plan;

pub use dispatch::{Arrivals, Dispatch};
pub use plan::{Plan, PlanError};

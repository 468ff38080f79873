//! Placement on the meta leader: what the nodes report in their heartbeats
//! (`reports`), what should happen next (`plan`, a pure function), and the
//! driver that marks nodes down and out and asks group leaders to move
//! replicas (`driver`).

pub mod driver;
pub mod plan;
pub mod reports;

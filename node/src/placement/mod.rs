//! Placement on the meta leader: what the nodes report in their heartbeats
//! (`reports`), what should happen next (`plan`, a pure function), and the
//! driver that marks nodes down and out and asks group leaders to move
//! replicas (`driver`), with catch-up deadlines for learners
//! (`learner_watch`).

pub mod driver;
pub mod learner_watch;
pub mod plan;
pub mod reports;

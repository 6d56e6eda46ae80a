//! The servers backend: the seams on Redis (queue, cache, fan-out, leases) and PostgreSQL
//! (store, alerts, fences), the production stack, which scales to many processes.

pub mod alerts;
pub mod cache;
pub mod lease;
pub mod queue;
pub mod schema;
pub mod seams;
pub mod store;

//! hearth: the event backbone of a connected home.
//!
//! One flow, written once, over seams that two backends implement:
//!
//! ```text
//!  MQTT ingest ─┐                                     ┌─▶ EventStore   (readings, sensors, tokens)
//!  broker ──────┼─▶ intake ─▶ EventQueue ─▶ worker ───┼─▶ AlertStore   (rules' state, alerts)
//!  POST /events ┘   (decode,  (lanes,       (one      ├─▶ LatestCache  (latest value per sensor)
//!                   gate)     critical 1st)  loop)    └─▶ FanOut       (WebSocket, webhooks)
//! ```
//!
//! The neutral core, which knows no server:
//! - [`event`] (a reading, its validation, its order), [`lane`] (which lane an event takes),
//!   [`dead_letter`] (a refused message and its retention), [`caps`], [`sensors`] (which sensors
//!   a batch records), [`alerts`] (the pure rules engine, alert types, webhook notification),
//!   [`codec`] (topic and payload → events or reasoned rejections), [`status`] (the accounting).
//! - [`seam`] names the seams as traits (queue and its per-consumer reader, lane ownership,
//!   store, alert store, cache, fan-out) and [`seam::Backend`], what a backend gives a worker.
//! - [`intake`] is the one way in: decode → dead letters → metrics → the backpressure gate →
//!   append, used by [`ingest`] (MQTT client), the embedded broker and `POST /events`.
//! - [`worker`] is the one loop: read (critical first) → store → rules → cache → push → ack, for
//!   both backends; a batch is acknowledged only after it is stored.
//!
//! The backends, twin folders behind the seams:
//! - [`servers`]: Redis Streams queue, leases, Redis cache and fan-out, PostgreSQL store and
//!   alerts, fencing tokens.
//! - [`embedded`]: its own MQTT broker, one SQLite file as queue and store, in-process cache and
//!   channels: `hearth up` with nothing configured.
//!
//! Around them: [`api`] (REST, WebSocket, dashboard, metrics), [`roles`] (the processes), [`config`],
//! [`metrics`], [`breaker`] (circuits), [`dlq`] (dead-letter tools), [`mqtt`] (the MQTT session
//! shared by the ingest and [`sim`], the load generator), [`tls`] (rustls for every link). The
//! bench is a crate of its own (`hearth-bench`); nothing here imports it.
//!
//! Why this shape: every hop acknowledges upstream only after its own durable write (PUBACK
//! after the append, the queue's acknowledgement after the store's commit), so a crash anywhere
//! leaves work to redo, never work lost; and redoing is harmless because storing is idempotent on
//! the dedup key. Per-sensor order comes from routing a sensor to one lane and letting one
//! consumer at a time own a lane (a lease and a fencing token on the servers).

// Public: what the binaries, the bench and the tests work with: the roles, the seams and their
// two backends, the event and alert vocabulary, the tools' views (status, dead letters,
// metrics), the MQTT session the simulator and the bench share.
pub mod alerts;
pub mod api;
pub mod config;
pub mod dlq;
pub mod embedded;
pub mod event;
pub mod metrics;
pub mod mqtt;
pub mod pushes;
pub mod roles;
pub mod seam;
pub mod series;
pub mod servers;
pub mod shutdown;
pub mod sim;
pub mod status;
pub mod tls;

// Private: the flow's machinery, whose door is `roles`, and the vocabulary modules, of which
// the few names the tools and tests need are re-exported here.
mod auth;
mod backoff;
mod breaker;
mod caps;
mod codec;
mod dead_letter;
mod fault;
mod ingest;
mod intake;
mod keep;
mod kinds;
mod lane;
mod rate;
mod sensors;
mod sweeps;
mod worker;

pub use caps::Caps;
pub use codec::{Codecs, Limits};
pub use dead_letter::{DeadLetter, Retention};
pub use fault::arm as arm_fault;
pub use keep::Keep;
pub use kinds::unit_or_canonical;
pub use lane::Lane;

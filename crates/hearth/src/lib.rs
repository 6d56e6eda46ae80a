//! hearth: the event backbone of a connected home.
//!
//! Follow one event through the modules, in the order it travels:
//!
//! ```text
//!  MQTT ─▶ ingest ─▶ codec ─▶ queue (Redis Streams, one lane per shard + critical) ─▶ worker
//!                      │                                                             │
//!                      └─▶ dead letters                          store (PostgreSQL) ◀┤
//!                                                                 cache (Redis)     ◀┘
//! ```
//!
//! - [`ingest`] holds the MQTT session and PUBACKs a message only after the XADD holding it;
//!   [`mqtt`] is its connection, on rumqttc's codec, writing PUBACKs a batch at a time.
//! - [`codec`] turns a topic and payload into validated [`event::Event`]s or reasoned rejections.
//! - [`queue`] is the durable buffer: lanes, dead letters, leases, acknowledgement and trimming.
//! - [`worker`] owns lanes through leases, stores batches, updates the cache, then XACKs.
//! - [`store`] is PostgreSQL: schema, idempotent batch insert, fencing tokens.
//! - [`cache`] keeps the latest value of each sensor and kind.
//! - [`alerts`] evaluates rules on stored readings and pushes alert transitions.
//! - [`status`] reads it all back for `hearth status`.
//! - [`metrics`] names every metric once; [`api`] serves them, the REST API and the dashboard.
//! - [`bench`] measures it all end to end (`hearth bench`), against baselines; [`sim`]
//!   plays houses full of sensors (`hearth sim`).
//! - [`seam`] names the four places the flow meets a server (queue, store, cache, fan-out) as
//!   traits, with the servers' backend; [`embedded`] is the other backend (its own MQTT broker,
//!   SQLite, in-process cache and channels): `hearth up` with nothing configured.
//!
//! Why this shape: every hop acknowledges upstream only after its own durable write (PUBACK
//! after XADD, XACK after COMMIT), so a crash anywhere leaves work to redo, never work lost; and
//! redoing is harmless because storing is idempotent on the dedup key. Per-sensor order comes
//! from routing a sensor to one lane and letting one consumer at a time own a lane.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod backoff;
pub mod bench;
pub mod breaker;
pub mod caps;
pub mod codec;
pub mod config;
pub mod dead_letter;
pub mod dlq;
pub mod embedded;
pub mod event;
pub mod fault;
pub mod ingest;
pub mod intake;
pub mod lane;
pub mod metrics;
pub mod mqtt;
pub mod roles;
pub mod seam;
pub mod sensors;
pub mod servers;
pub mod shutdown;
pub mod sim;
pub mod status;
pub mod worker;

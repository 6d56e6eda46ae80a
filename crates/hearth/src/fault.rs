//! Deterministic fault points, for the tests that must crash or stall hearth at a chosen step of
//! the flow (config `test_fault`; empty, the default, arms none and costs one atomic load).
//!
//! A test names a point, and optionally which hit of it: `after_store` aborts the process (as a
//! SIGKILL would: no cleanup, no flush) the first time a worker has committed a batch and done
//! nothing else with it; `after_store@3` the third time; `pause_before_store=2000` makes a worker
//! wait 2 s with a batch in hand, right before its store write, every time, and
//! `pause_before_store=2000@1` only the first time. Points:
//!
//! | point | where |
//! |---|---|
//! | `before_append` | an intake has decoded messages, before appending them |
//! | `after_append` | an intake appended a message durably, before its acknowledgement (PUBACK, 202) |
//! | `before_store` | a worker holds a batch, right before writing it |
//! | `after_store` | a worker committed a batch, before rules, cache, pushes and acknowledgement |
//! | `after_rules` | a worker wrote the batch's alert transitions, before pushing and acknowledging |
//! | `after_ack` | a worker acknowledged a batch |
//! | `after_relay` | the embedded broker queued a client's messages for the persistent sessions they reach, before its PUBACKs |
//! | `pause_before_store=MS` | a worker holds a batch MS milliseconds before writing it |
//! | `pause_before_replay=MS` | a reconnecting WebSocket client is registered for live pushes MS milliseconds before its missed alerts are read (so that pushes land in both) |
//!
//! With these a kill lands on work in flight by construction, not by timing.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct Armed {
    point: String,
    /// Abort at this hit (1: the first); or, with `pause`, pause at the hits up to this one.
    at: u64,
    /// Pause this long instead of aborting.
    pause: Option<Duration>,
    hits: AtomicU64,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

/// Arm the point the configuration names (once per process; a second call changes nothing).
pub fn arm(spec: &str) -> Result<(), String> {
    let armed = parse(spec)?;
    if let Some(a) = &armed {
        tracing::warn!(point = %a.point, at = a.at, "test fault armed");
    }
    let _ = ARMED.set(armed);
    Ok(())
}

fn parse(spec: &str) -> Result<Option<Armed>, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(None);
    }
    let bad = || {
        format!(
            "test_fault {spec:?} is not POINT, POINT@N, PAUSE=MS or PAUSE=MS@N (PAUSE: pause_before_store, pause_before_replay)"
        )
    };
    let (head, at) = match spec.split_once('@') {
        Some((head, n)) => (
            head,
            Some(n.parse::<u64>().ok().filter(|n| *n >= 1).ok_or_else(bad)?),
        ),
        None => (spec, None),
    };
    let (point, at, pause) = match head.split_once('=') {
        Some((p, ms)) => (
            p,
            at.unwrap_or(u64::MAX),
            Some(Duration::from_millis(ms.parse().map_err(|_| bad())?)),
        ),
        None => (head, at.unwrap_or(1), None),
    };
    const POINTS: &[&str] = &[
        "before_append",
        "after_append",
        "before_store",
        "after_store",
        "after_rules",
        "after_ack",
        "after_relay",
    ];
    let known = match pause {
        Some(_) => ["pause_before_store", "pause_before_replay"].contains(&point),
        None => POINTS.contains(&point),
    };
    if !known {
        return Err(bad());
    }
    Ok(Some(Armed {
        point: point.to_string(),
        at,
        pause,
        hits: AtomicU64::new(0),
    }))
}

fn armed(point: &str) -> Option<&'static Armed> {
    ARMED
        .get()
        .and_then(Option::as_ref)
        .filter(|a| a.point == point)
}

/// The flow reached `point`: abort here if a test asked for it.
pub fn hit(point: &str) {
    if let Some(a) = armed(point)
        && a.pause.is_none()
        && a.hits.fetch_add(1, Ordering::SeqCst) + 1 == a.at
    {
        eprintln!("test fault: aborting at {point}");
        std::process::abort();
    }
}

/// The flow reached `point`: wait here if a test asked for it.
pub async fn pause(point: &str) {
    if let Some(a) = armed(point)
        && let Some(pause) = a.pause
        && a.hits.fetch_add(1, Ordering::SeqCst) < a.at
    {
        tracing::warn!(point, ms = pause.as_millis() as u64, "test fault: pausing");
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert!(parse("").unwrap().is_none());
        let a = parse("after_store@3").unwrap().unwrap();
        assert_eq!((a.point.as_str(), a.at, a.pause), ("after_store", 3, None));
        let a = parse("pause_before_store=1500").unwrap().unwrap();
        assert_eq!(
            (a.pause, a.at),
            (Some(Duration::from_millis(1500)), u64::MAX)
        );
        let a = parse("pause_before_store=1500@1").unwrap().unwrap();
        assert_eq!(a.at, 1);
        for bad in [
            "after_nothing",
            "after_store@0",
            "after_store@x",
            "pause_before_store=x",
            "after_store=5",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}

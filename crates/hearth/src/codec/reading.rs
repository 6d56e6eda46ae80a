//! The checks shared by every codec: a reading's value, `seq`, `ts` and unit, and the event built
//! from them.

use serde_json::Value;
use uuid::Uuid;

use super::{Limits, truncate};
use crate::event::{Event, Reason, Rejection, is_valid_id};
use crate::kinds::{self, ValueRule, value_rule};

/// Readings before this instant (2000-01-01) are a clock that was never set, or seconds sent
/// where milliseconds belong.
const EARLIEST_TS_MS: i64 = 946_684_800_000;
const MAX_UNIT_BYTES: usize = 16;

/// Where a message came from and when.
pub struct Context<'a> {
    pub house_id: String,
    pub sensor_id: String,
    pub received_us: i64,
    pub limits: &'a Limits,
}

/// The raw fields of one reading, as JSON values still to be checked.
#[derive(Default)]
pub struct Fields<'a> {
    pub kind: &'a str,
    pub value: Option<&'a Value>,
    pub unit: Option<&'a Value>,
    pub seq: Option<&'a Value>,
    pub ts: Option<&'a Value>,
}

/// Build a validated event, or say why not: the kind under its canonical name, the value in the
/// kind's canonical unit ([`crate::kinds`]).
pub fn build(ctx: &Context<'_>, f: Fields<'_>) -> Result<Event, Rejection> {
    if !is_valid_id(f.kind) {
        return Err(Rejection::new(
            Reason::BadId,
            format!(
                "kind {:?} is not [A-Za-z0-9_.-]{{1,64}}",
                truncate(f.kind, 80)
            ),
        ));
    }
    let kind = kinds::canonical(f.kind);
    let unit = match f.unit {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) if u.len() <= MAX_UNIT_BYTES && !u.contains('\0') => {
            Some(u.as_str())
        }
        Some(Value::String(_)) => {
            return Err(Rejection::new(
                Reason::OutOfRange,
                format!("unit is longer than {MAX_UNIT_BYTES} bytes"),
            ));
        }
        Some(other) => return Err(wrong_type("unit", "a string", other)),
    };
    let raw = value(kind, f.value)?;
    let n = kinds::normalise(kind, raw, unit).map_err(|e| Rejection::new(Reason::BadUnit, e))?;
    check_range(kind, n.value)?;
    let seq = seq(f.seq)?;
    let received_ms = ctx.received_us / 1000;
    let ts_ms = match f.ts {
        None | Some(Value::Null) => received_ms,
        Some(v) => ts(v, received_ms, ctx.limits.max_future_skew_ms)?,
    };
    Ok(Event {
        house_id: ctx.house_id.clone(),
        sensor_id: ctx.sensor_id.clone(),
        kind: kind.to_string(),
        value: n.value,
        unit: n.unit,
        source_unit: n.source_unit,
        seq,
        ts_ms,
        received_us: ctx.received_us,
        ingest_id: seq.is_none().then(Uuid::new_v4),
    })
}

/// The raw value: a finite number, or a boolean (1 or 0) for a binary kind or one hearth does
/// not know; a measured kind takes no boolean.
fn value(kind: &str, raw: Option<&Value>) -> Result<f64, Rejection> {
    let v = match raw {
        None | Some(Value::Null) => {
            return Err(Rejection::new(Reason::MissingField, "value is missing"));
        }
        Some(Value::Bool(b)) => {
            return match value_rule(kind) {
                ValueRule::Boolean | ValueRule::Finite => Ok(if *b { 1.0 } else { 0.0 }),
                _ => Err(wrong_type(
                    "value",
                    &format!("a number for {kind}"),
                    &Value::Bool(*b),
                )),
            };
        }
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(other) => return Err(wrong_type("value", "a number or a boolean", other)),
    };
    if !v.is_finite() {
        return Err(Rejection::new(
            Reason::NotFinite,
            format!("value {v} is not finite"),
        ));
    }
    Ok(v)
}

/// The value, in the canonical unit, within what the kind accepts.
fn check_range(kind: &str, v: f64) -> Result<(), Rejection> {
    match value_rule(kind) {
        ValueRule::Boolean if v == 0.0 || v == 1.0 => Ok(()),
        ValueRule::Boolean => Err(Rejection::new(
            Reason::OutOfRange,
            format!("{kind} is true/false (or 1/0), got {v}"),
        )),
        ValueRule::Range(lo, hi) if v < lo || v > hi => Err(Rejection::new(
            Reason::OutOfRange,
            format!(
                "{kind} must be within [{lo}, {hi}] {}, got {v}",
                kinds::unit_of(kind).unwrap_or("")
            ),
        )),
        _ => Ok(()),
    }
}

fn seq(raw: Option<&Value>) -> Result<Option<i64>, Rejection> {
    match raw {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(s) if s <= i64::MAX as u64 => Ok(Some(s as i64)),
            _ => Err(Rejection::new(
                Reason::BadSeq,
                format!("seq must be an integer in [0, 2^63), got {n}"),
            )),
        },
        Some(other) => Err(Rejection::new(
            Reason::BadSeq,
            format!("seq must be an integer, got {}", type_name(other)),
        )),
    }
}

fn ts(raw: &Value, received_ms: i64, max_skew_ms: i64) -> Result<i64, Rejection> {
    let ms = match raw {
        Value::Number(n) => match n.as_i64() {
            Some(ms) => ms,
            None => {
                return Err(Rejection::new(
                    Reason::BadTimestamp,
                    format!("ts must be integer epoch milliseconds, got {n}"),
                ));
            }
        },
        Value::String(s) => {
            let parsed =
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| {
                        Rejection::new(
                            Reason::BadTimestamp,
                            format!("ts {:?} is not RFC 3339: {e}", truncate(s, 64)),
                        )
                    })?;
            (parsed.unix_timestamp_nanos() / 1_000_000) as i64
        }
        other => {
            return Err(Rejection::new(
                Reason::BadTimestamp,
                format!(
                    "ts must be epoch milliseconds or RFC 3339, got {}",
                    type_name(other)
                ),
            ));
        }
    };
    if ms < EARLIEST_TS_MS {
        let hint = if ms > 0 && ms < 10_000_000_000 {
            " (seconds? ts is in milliseconds)"
        } else {
            ""
        };
        return Err(Rejection::new(
            Reason::BadTimestamp,
            format!("ts {ms} is before 2000-01-01{hint}"),
        ));
    }
    if ms > received_ms.saturating_add(max_skew_ms) {
        return Err(Rejection::new(
            Reason::BadTimestamp,
            format!(
                "ts {ms} is more than {} s in the future",
                max_skew_ms / 1000
            ),
        ));
    }
    Ok(ms)
}

pub fn wrong_type(field: &str, expected: &str, got: &Value) -> Rejection {
    Rejection::new(
        Reason::WrongType,
        format!("{field} must be {expected}, got {}", type_name(got)),
    )
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

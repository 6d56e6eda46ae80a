//! What the device ecosystems' codecs share: a message's readings gathered for one or more
//! sensors of a device (channels), switch-like text (`ON`/`OFF`, `online`/`offline`), and the
//! same [`reading::build`] checks as the native format.

use serde_json::Value;

use super::Decoded;
use super::reading::{self, Context, Fields};
use crate::event::{Reason, Rejection};

/// A device's readings in one message, in one house.
pub struct Readings<'c> {
    ctx: &'c Context<'c>,
    /// The reading time the message gives (epoch milliseconds), if any.
    ts: Option<Value>,
    pub out: Decoded,
}

impl<'c> Readings<'c> {
    pub fn new(ctx: &'c Context<'c>) -> Self {
        Readings {
            ctx,
            ts: None,
            out: Decoded::default(),
        }
    }

    /// Stamp the message's readings (epoch milliseconds).
    pub fn at_ms(&mut self, ms: i64) {
        self.ts = Some(Value::from(ms));
    }

    /// One reading of `sensor` (already an id). The kind is mapped to hearth's name, the value
    /// checked and converted from `unit` (none: the kind's canonical unit).
    pub fn add(&mut self, sensor: &str, kind: &str, value: &Value, unit: Option<&str>) {
        if self.out.events.len() + self.out.rejections.len() >= self.ctx.limits.max_readings {
            if self.out.rejections.last().map(|r| r.reason) != Some(Reason::TooManyReadings) {
                let n = self.ctx.limits.max_readings + 1;
                self.out
                    .rejections
                    .push(self.ctx.limits.too_many(n).unwrap_or_else(|| {
                        Rejection::new(Reason::TooManyReadings, "too many readings")
                    }));
            }
            return;
        }
        let ctx = Context {
            house_id: self.ctx.house_id.clone(),
            sensor_id: sensor.to_string(),
            received_us: self.ctx.received_us,
            limits: self.ctx.limits,
        };
        let unit = unit.map(|u| Value::String(u.to_string()));
        let r = reading::build(
            &ctx,
            Fields {
                kind,
                value: Some(value),
                unit: unit.as_ref(),
                seq: None,
                ts: self.ts.as_ref(),
            },
        );
        self.out.push(r.map_err(|mut rej| {
            rej.detail = format!("{sensor} {kind}: {}", rej.detail);
            rej
        }));
    }

    /// A refusal of the whole message (or of one part of it).
    pub fn refuse(&mut self, why: Rejection) {
        self.out.rejections.push(why);
    }

    pub fn done(self) -> Decoded {
        self.out
    }
}

/// `ON`/`OFF`, `true`/`false`, `online`/`offline`, `open`/`closed` (any case), JSON booleans:
/// as a boolean.
pub fn on_off(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => text_on_off(s),
        _ => None,
    }
}

pub fn text_on_off(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "online" | "open" | "detected" | "1" => Some(true),
        "off" | "false" | "offline" | "closed" | "clear" | "0" => Some(false),
        _ => None,
    }
}

/// A payload that should be text (ESPHome's and Tasmota's plain states), trimmed.
pub fn text(payload: &[u8]) -> Result<&str, Rejection> {
    std::str::from_utf8(payload)
        .map(str::trim)
        .map_err(|_| Rejection::new(Reason::MalformedJson, "payload is not UTF-8 text"))
}

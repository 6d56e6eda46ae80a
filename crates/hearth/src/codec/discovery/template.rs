//! The value templates of discovery configs hearth evaluates: `{{ value }}`,
//! `{{ value_json.a.b }}`, `{{ value_json['a'] }}`, with the filters `float`, `int` (each with an
//! optional default), `round(n)` and `is_defined`
//! (<https://www.home-assistant.io/docs/configuration/templating/#processing-incoming-data>).
//! Anything else is refused when the config is read, never evaluated.

use serde_json::Value;

use crate::event::{Reason, Rejection, truncate};

/// Most bytes of a template hearth reads.
const MAX_TEMPLATE: usize = 256;

/// A template of the supported subset.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// Parsed from `value_json` (else the payload text), then these keys or indexes.
    json: bool,
    path: Vec<Step>,
    filters: Vec<Filter>,
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq)]
enum Filter {
    Float(Option<f64>),
    Int(Option<f64>),
    Round(u32),
    /// `is_defined`: the value as it is (a missing one is no reading already).
    Defined,
}

impl Template {
    pub fn parse(t: &str) -> Result<Template, String> {
        let unsupported = || {
            format!(
                "template {:?} is outside the supported subset",
                truncate(t, 96)
            )
        };
        if t.len() > MAX_TEMPLATE {
            return Err(format!("template longer than {MAX_TEMPLATE} bytes"));
        }
        let inner = t
            .trim()
            .strip_prefix("{{")
            .and_then(|s| s.strip_suffix("}}"))
            .ok_or_else(unsupported)?;
        let mut s = inner.trim();
        // `(value_json.x | float)`: parentheses around the whole.
        while let Some(i) = s.strip_prefix('(').and_then(|x| x.strip_suffix(')')) {
            s = i.trim();
        }
        let mut parts = s.split('|');
        let head = parts.next().unwrap_or("").trim();
        let (json, rest) = if let Some(r) = head.strip_prefix("value_json") {
            (true, r)
        } else if let Some(r) = head.strip_prefix("value") {
            (false, r)
        } else {
            return Err(unsupported());
        };
        let mut path = Vec::new();
        let mut r = rest.trim();
        while !r.is_empty() {
            if let Some(x) = r.strip_prefix('.') {
                let end = x
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(x.len());
                if end == 0 {
                    return Err(unsupported());
                }
                path.push(Step::Key(x[..end].to_string()));
                r = &x[end..];
            } else if let Some(x) = r.strip_prefix('[') {
                let end = x.find(']').ok_or_else(unsupported)?;
                let key = x[..end].trim();
                let quoted = key
                    .strip_prefix('\'')
                    .and_then(|k| k.strip_suffix('\''))
                    .or_else(|| key.strip_prefix('"').and_then(|k| k.strip_suffix('"')));
                match (quoted, key.parse::<usize>()) {
                    (Some(k), _) => path.push(Step::Key(k.to_string())),
                    (None, Ok(i)) => path.push(Step::Index(i)),
                    _ => return Err(unsupported()),
                }
                r = &x[end + 1..];
            } else {
                return Err(unsupported());
            }
            r = r.trim_start();
        }
        if !json && !path.is_empty() {
            return Err(unsupported());
        }
        let mut filters = Vec::new();
        for f in parts {
            let f = f.trim();
            let (name, arg) = match f.split_once('(') {
                Some((n, a)) => (
                    n.trim(),
                    Some(a.strip_suffix(')').ok_or_else(unsupported)?.trim()),
                ),
                None => (f, None),
            };
            let number = |a: Option<&str>| -> Result<Option<f64>, String> {
                match a {
                    None | Some("") => Ok(None),
                    Some(a) => a.parse::<f64>().map(Some).map_err(|_| unsupported()),
                }
            };
            filters.push(match name {
                "float" => Filter::Float(number(arg)?),
                "is_defined" if arg.is_none() => Filter::Defined,
                "int" => Filter::Int(number(arg)?),
                "round" => Filter::Round(number(arg)?.map_or(Ok(0), |n| {
                    ((0.0..=10.0).contains(&n) && n.fract() == 0.0)
                        .then_some(n as u32)
                        .ok_or_else(unsupported)
                })?),
                _ => return Err(unsupported()),
            });
        }
        Ok(Template {
            json,
            path,
            filters,
        })
    }

    /// Evaluate on a payload; `None` when the value is missing (a key the payload lacks).
    pub fn eval(&self, payload: &str) -> Result<Option<Value>, Rejection> {
        let mut v = if self.json {
            serde_json::from_str::<Value>(payload)
                .map_err(|e| Rejection::new(Reason::MalformedJson, e.to_string()))?
        } else {
            Value::String(payload.to_string())
        };
        for step in &self.path {
            let next = match (step, &v) {
                (Step::Key(k), Value::Object(o)) => o.get(k).cloned(),
                (Step::Index(i), Value::Array(a)) => a.get(*i).cloned(),
                _ => None,
            };
            match next {
                Some(n) => v = n,
                None => return Ok(None),
            }
        }
        for f in &self.filters {
            if *f == Filter::Defined {
                continue;
            }
            let n = match &v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                Value::Bool(b) => Some(f64::from(u8::from(*b))),
                _ => None,
            }
            .filter(|n| n.is_finite());
            let out = match f {
                Filter::Float(default) => n.or(*default).or(Some(0.0)),
                Filter::Int(default) => n.map(f64::trunc).or(*default).or(Some(0.0)),
                Filter::Round(digits) => n.map(|n| {
                    let p = 10f64.powi(*digits as i32);
                    (n * p).round() / p
                }),
                Filter::Defined => n,
            };
            v = match out.and_then(serde_json::Number::from_f64) {
                Some(n) => Value::Number(n),
                None => return Ok(None),
            };
        }
        Ok(Some(v))
    }
}

//! The API's parameters: query strings percent-decoded, ids and instants checked; a bad one is
//! a 400 with the JSON error, before it reaches a Redis key or a SQL statement (which are all
//! parameterised anyway).

use std::collections::HashMap;

use super::error::ApiError;
use crate::event::is_valid_id;

/// The query string as pairs, percent-decoded; a malformed one is a 400.
pub fn query_pairs(raw: Option<String>) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k)?, decode(v)?);
        if out.insert(k.clone(), v).is_some() {
            return Err(ApiError::BadRequest(format!(
                "parameter {k:?} is given twice"
            )));
        }
    }
    Ok(out)
}

pub fn decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest("malformed percent-encoding in the query".into())
                    })?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::BadRequest("the query is not UTF-8".into()))
}

pub fn valid_id(what: &str, id: &str) -> Result<(), ApiError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what} must match [A-Za-z0-9_.-]{{1,64}}"
        )))
    }
}

/// Refuse parameters a route does not know (a typo would otherwise be silently ignored).
pub fn only(params: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match params
        .keys()
        .find(|k| !known.contains(&k.as_str()) && *k != "token")
    {
        Some(k) => Err(ApiError::BadRequest(format!(
            "unknown parameter {k:?}; this route takes {}",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Epoch milliseconds or RFC 3339.
pub fn instant(name: &str, raw: &str) -> Result<i64, ApiError> {
    let ms = match raw.parse::<i64>() {
        Ok(ms) => ms,
        Err(_) => time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|_| {
                ApiError::BadRequest(format!("{name} must be epoch milliseconds or RFC 3339"))
            })?,
    };
    in_range(name, ms)
}

/// Instants the stores can hold: from 1970 to the year 5000.
const LATEST_INSTANT_MS: i64 = 95_617_584_000_000;

pub fn in_range(name: &str, ms: i64) -> Result<i64, ApiError> {
    if (0..=LATEST_INSTANT_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(ApiError::BadRequest(format!(
            "{name} must be between 1970 and the year 5000"
        )))
    }
}

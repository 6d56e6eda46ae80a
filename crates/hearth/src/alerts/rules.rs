//! Alert rules: the documented file `deploy/rules.toml` (built in as the defaults) or the one
//! `rules_file` names, parsed and checked once at start.

use std::time::Duration;

use serde::Deserialize;

use super::Severity;
use crate::config::parse_duration;

/// The defaults, from the repository's `deploy/rules.toml`.
pub const DEFAULT_RULES: &str = include_str!("../../../../deploy/rules.toml");

/// What a rule watches for.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Raise on true (1), clear on false (0).
    Boolean,
    /// Raise above `raise`, clear below `clear`.
    Above { raise: f64, clear: f64 },
    /// Raise below `raise`, clear above `clear`.
    Below { raise: f64, clear: f64 },
    /// Raise after `multiple` × the usual interval of silence (at least `min_silence`), or on
    /// `availability: false` (or `online: false`); clear on any reading.
    Offline {
        multiple: f64,
        min_silence: Duration,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub kinds: Vec<String>,
    pub condition: Condition,
    /// The raise condition must hold this long (by reading timestamps).
    pub hold: Duration,
    pub severity: Severity,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub url: String,
    pub severities: Vec<Severity>,
}

#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub webhooks: Vec<Webhook>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<RawRule>,
    #[serde(default)]
    webhook: Vec<RawWebhook>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    kinds: Vec<String>,
    raise: Option<f64>,
    clear: Option<f64>,
    #[serde(rename = "for")]
    hold: Option<String>,
    multiple: Option<f64>,
    min_silence: Option<String>,
    severity: Severity,
    message: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    #[serde(default = "all_severities")]
    severities: Vec<Severity>,
}

fn all_severities() -> Vec<Severity> {
    vec![Severity::Info, Severity::Warning, Severity::Critical]
}

impl RuleSet {
    /// The rules of `path`, or the built-in defaults when `path` is empty.
    pub fn load(path: &str) -> Result<RuleSet, String> {
        if path.is_empty() {
            return RuleSet::parse(DEFAULT_RULES).map_err(|e| format!("built-in rules: {e}"));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("rules_file {path}: {e}"))?;
        RuleSet::parse(&text).map_err(|e| format!("rules_file {path}: {e}"))
    }

    pub fn parse(text: &str) -> Result<RuleSet, String> {
        let file: File = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
        let mut rules = Vec::new();
        for raw in file.rule {
            let name = raw.name.clone();
            let bad = |what: String| format!("rule {name:?}: {what}");
            if !crate::event::is_valid_id(&raw.name) {
                return Err(bad("name must match [A-Za-z0-9_.-]{1,64}".into()));
            }
            if rules.iter().any(|r: &Rule| r.name == raw.name) {
                return Err(bad("defined twice".into()));
            }
            let hold = match &raw.hold {
                Some(d) => parse_duration(d).map_err(&bad)?,
                None => Duration::ZERO,
            };
            let needs =
                |v: Option<f64>, what: &str| v.ok_or_else(|| bad(format!("`{what}` is required")));
            let condition = match raw.kind.as_str() {
                "boolean" => Condition::Boolean,
                "above" => {
                    let (raise, clear) = (needs(raw.raise, "raise")?, needs(raw.clear, "clear")?);
                    if clear > raise {
                        return Err(bad("`clear` must not be above `raise`".into()));
                    }
                    Condition::Above { raise, clear }
                }
                "below" => {
                    let (raise, clear) = (needs(raw.raise, "raise")?, needs(raw.clear, "clear")?);
                    if clear < raise {
                        return Err(bad("`clear` must not be below `raise`".into()));
                    }
                    Condition::Below { raise, clear }
                }
                "offline" => Condition::Offline {
                    multiple: raw.multiple.unwrap_or(5.0).max(1.0),
                    min_silence: match &raw.min_silence {
                        Some(d) => parse_duration(d).map_err(&bad)?,
                        None => Duration::from_secs(600),
                    },
                },
                other => {
                    return Err(bad(format!(
                        "type {other:?} is not boolean, above, below or offline"
                    )));
                }
            };
            let kinds = match condition {
                Condition::Offline { .. } => vec!["availability".to_string(), "online".to_string()],
                _ if raw.kinds.is_empty() => return Err(bad("`kinds` is required".into())),
                _ => raw.kinds,
            };
            rules.push(Rule {
                message: raw.message.unwrap_or_else(|| raw.name.replace('_', " ")),
                name: raw.name,
                kinds,
                condition,
                hold,
                severity: raw.severity,
            });
        }
        let mut webhooks = Vec::new();
        for w in file.webhook {
            if !w.url.starts_with("http://") {
                return Err(format!(
                    "webhook {:?}: only http:// URLs are supported",
                    w.url
                ));
            }
            webhooks.push(Webhook {
                url: w.url,
                severities: w.severities,
            });
        }
        Ok(RuleSet { rules, webhooks })
    }

    /// The offline rule, if any.
    pub fn offline(&self) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| matches!(r.condition, Condition::Offline { .. }))
    }

    /// The offline rule with its `multiple` and `min_silence`, if there is one.
    pub fn offline_silence(&self) -> Option<(&Rule, f64, Duration)> {
        self.offline().and_then(|r| match r.condition {
            Condition::Offline {
                multiple,
                min_silence,
            } => Some((r, multiple, min_silence)),
            _ => None,
        })
    }

    /// How often to look for silent sensors: a quarter of the shortest silence the offline rule
    /// waits for, within [200 ms, 30 s].
    pub fn sweep_period(&self) -> Duration {
        let min_silence = self.offline_silence().map(|(_, _, s)| s);
        (min_silence.unwrap_or(Duration::from_secs(600)) / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(30))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_rules_parse() {
        let set = RuleSet::load("").unwrap();
        let smoke = set.rules.iter().find(|r| r.name == "smoke").unwrap();
        assert_eq!(
            (smoke.condition.clone(), smoke.severity),
            (Condition::Boolean, Severity::Critical)
        );
        let hot = set
            .rules
            .iter()
            .find(|r| r.name == "temperature_high")
            .unwrap();
        assert_eq!(
            hot.condition,
            Condition::Above {
                raise: 40.0,
                clear: 35.0
            }
        );
        assert_eq!(hot.hold, Duration::from_secs(60));
        assert!(set.offline().is_some());
        assert!(set.webhooks.is_empty());
    }

    #[test]
    fn mistakes_are_named() {
        let err = RuleSet::parse(
            "[[rule]]\nname='x'\ntype='above'\nkinds=['t']\nraise=1\nclear=2\nseverity='info'",
        )
        .unwrap_err();
        assert!(err.contains("\"x\"") && err.contains("clear"), "{err}");
        let err =
            RuleSet::parse("[[rule]]\nname='x'\ntype='sideways'\nseverity='info'").unwrap_err();
        assert!(err.contains("sideways"), "{err}");
        let err =
            RuleSet::parse("[[rule]]\nname='x'\ntype='boolean'\nkinds=['t']\nseverity='dire'")
                .unwrap_err();
        assert!(err.contains("dire"), "{err}");
        assert!(RuleSet::parse("[[webhook]]\nurl='https://x'").is_err());
    }
}

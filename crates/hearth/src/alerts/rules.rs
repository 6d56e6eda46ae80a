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

/// Where alert transitions are POSTed. Known by its name everywhere hearth speaks of it (logs,
/// metrics, dead letters, breaker keys): its URL often holds a secret.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub name: String,
    pub url: String,
    pub format: Format,
    /// Sent with every request (an `Authorization`, say).
    pub headers: Vec<(String, String)>,
    /// A PEM CA the receiver's certificate must chain to (the system's roots otherwise).
    pub ca: Option<std::path::PathBuf>,
    pub severities: Vec<Severity>,
}

/// The body a webhook is sent ([`super::notify`] writes each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `{"type": "alert", "alert": {…}}`, the alert as the API shows it.
    Generic,
    /// ntfy: the text as the body, `Title`, `Priority` and `Tags` headers.
    Ntfy,
    /// Slack's incoming webhooks and Discord's (`text` and `content`).
    #[serde(alias = "discord")]
    Slack,
    /// Alertmanager's `/api/v2/alerts`: a list of one alert, its labels and annotations.
    Alertmanager,
}

/// Headers a webhook may set, at most.
const MAX_HEADERS: usize = 32;

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
    name: Option<String>,
    url: String,
    #[serde(default = "generic")]
    format: Format,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    ca: Option<std::path::PathBuf>,
    #[serde(default = "all_severities")]
    severities: Vec<Severity>,
}

fn generic() -> Format {
    Format::Generic
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
        let mut webhooks: Vec<Webhook> = Vec::new();
        for (i, w) in file.webhook.into_iter().enumerate() {
            let name = w.name.unwrap_or_else(|| format!("webhook-{}", i + 1));
            if !crate::event::is_valid_id(&name) {
                return Err(format!(
                    "webhook {name:?}: a name must be [A-Za-z0-9_.-]{{1,64}}"
                ));
            }
            if webhooks.iter().any(|h| h.name == name) {
                return Err(format!("webhook {name:?} is named twice"));
            }
            // The URL is not repeated in the message: it may hold a secret.
            if !(w.url.starts_with("http://") || w.url.starts_with("https://"))
                || reqwest::Url::parse(&w.url).is_err()
            {
                return Err(format!(
                    "webhook {name:?}: url must be an http:// or https:// URL"
                ));
            }
            if w.headers.len() > MAX_HEADERS {
                return Err(format!("webhook {name:?}: at most {MAX_HEADERS} headers"));
            }
            for (header, value) in &w.headers {
                if reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err()
                    || reqwest::header::HeaderValue::from_str(value).is_err()
                {
                    return Err(format!("webhook {name:?}: bad header {header:?}"));
                }
            }
            webhooks.push(Webhook {
                name,
                url: w.url,
                format: w.format,
                headers: w.headers.into_iter().collect(),
                ca: w.ca,
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
        assert!(RuleSet::parse("[[webhook]]\nurl='ftp://x'").is_err());
        let two = "[[webhook]]\nname='a'\nurl='https://x'\n[[webhook]]\nname='a'\nurl='http://y'";
        assert!(RuleSet::parse(two).unwrap_err().contains("twice"));
        let secret =
            RuleSet::parse("[[webhook]]\nurl='https://h/s3cret path'\nformat='carrier-pigeon'");
        assert!(secret.is_err_and(|e| !e.contains("s3cret")));
        let set = RuleSet::parse(
            "[[webhook]]\nurl='https://ntfy.sh/t'\nformat='ntfy'\nheaders={Authorization='Bearer x'}\n[[webhook]]\nurl='http://x'\nformat='discord'",
        )
        .unwrap();
        assert_eq!(set.webhooks[0].name, "webhook-1");
        assert_eq!(set.webhooks[0].format, Format::Ntfy);
        assert_eq!(
            set.webhooks[0].headers,
            vec![("Authorization".into(), "Bearer x".into())]
        );
        assert_eq!(set.webhooks[1].format, Format::Slack);
        assert!(RuleSet::parse("[[webhook]]\nurl='http://x'\nheaders={'bad header'='v'}").is_err());
    }
}

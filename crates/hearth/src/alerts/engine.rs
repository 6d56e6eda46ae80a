//! The rule engine: a sensor's readings in stored order → alert transitions.
//!
//! A sensor is (house, sensor): two houses' `smoke1` are two alarms. State per (house, sensor,
//! rule): when the raise condition started to hold (debounce), the order key of the reading that
//! made the last transition ([`Event::order_key`], whose time is never later than the reading's
//! receipt, so a reading stamped in the future cannot make the rules skip the readings after
//! it), and the open alert. [`Engine::evaluate`] is pure:
//! it returns the transitions and the changed states of a batch, which the worker writes to
//! PostgreSQL (fenced) before [`Engine::commit`] makes them the engine's own. A reading at or
//! before the last transition is skipped, so evaluating a redelivered batch again changes
//! nothing; the state survives restarts in `rule_state` and `alerts`, loaded the first time a
//! consumer sees a sensor.

use std::collections::HashMap;
use std::sync::Arc;

use super::rules::{Condition, RuleSet};
use super::{AlertState, event_key};
use crate::event::{Event, PerSensor};

/// The state of one (sensor, rule).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// Reading time (ms) since which the raise condition holds, while waiting for `for`.
    pub pending_since: Option<i64>,
    /// Order key of the reading that made the last transition.
    pub transition_key: Option<String>,
    /// The open alert's state, if one is open.
    pub open: Option<AlertState>,
}

/// A change an evaluation decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Raise {
        rule: usize,
        house_id: String,
        sensor_id: String,
        kind: String,
        value: f64,
        ts_ms: i64,
        event_key: String,
    },
    Clear {
        rule: usize,
        house_id: String,
        sensor_id: String,
        ts_ms: i64,
        event_key: String,
    },
}

/// A sensor: (house, sensor).
pub type SensorKey = (String, String);

/// What one batch changed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub transitions: Vec<Transition>,
    /// (sensor, rule index, new state), for every state that changed.
    pub states: Vec<(SensorKey, usize, State)>,
}

impl Outcome {
    pub fn is_empty(&self) -> bool {
        self.transitions.is_empty() && self.states.is_empty()
    }
}

pub struct Engine {
    pub rules: Arc<RuleSet>,
    by_kind: HashMap<String, Vec<usize>>,
    offline: Option<usize>,
    /// Sensor → rule index → state (only states that differ from the default).
    states: PerSensor<HashMap<usize, State>>,
    /// Sensors whose state was loaded from the store.
    loaded: PerSensor<()>,
    /// When each sensor was last seen (receive time, µs), to notice one back from silence.
    last_seen: PerSensor<i64>,
}

/// Sensors remembered before the engine starts over and reloads state as needed.
const MAX_SENSORS: usize = 200_000;

impl Engine {
    pub fn new(rules: Arc<RuleSet>) -> Engine {
        let mut by_kind: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, r) in rules.rules.iter().enumerate() {
            for k in &r.kinds {
                by_kind.entry(k.clone()).or_default().push(i);
            }
        }
        let offline = rules
            .rules
            .iter()
            .position(|r| matches!(r.condition, Condition::Offline { .. }));
        Engine {
            rules,
            by_kind,
            offline,
            states: PerSensor::default(),
            loaded: PerSensor::default(),
            last_seen: PerSensor::default(),
        }
    }

    fn state(&self, house: &str, sensor: &str, rule: usize) -> Option<&State> {
        self.states.get(house, sensor)?.get(&rule)
    }

    pub fn rule_index(&self, name: &str) -> Option<usize> {
        self.rules.rules.iter().position(|r| r.name == name)
    }

    /// Sensors of `events` whose state must be read from the store before evaluating: those not
    /// seen yet, and those back from a silence long enough that another consumer may have
    /// declared them offline.
    pub fn to_load(&self, events: &[&Event]) -> Vec<SensorKey> {
        let back_after = self
            .offline
            .and_then(|i| match self.rules.rules[i].condition {
                Condition::Offline { min_silence, .. } => Some(min_silence.as_micros() as i64 / 2),
                _ => None,
            });
        let mut out: Vec<SensorKey> = Vec::new();
        for e in events {
            let stale = match (back_after, self.last_seen.get(&e.house_id, &e.sensor_id)) {
                (Some(limit), Some(seen)) => e.received_us - seen > limit,
                _ => false,
            };
            let loaded = self.loaded.get(&e.house_id, &e.sensor_id).is_some();
            if (!loaded || stale)
                && !out
                    .iter()
                    .any(|(h, s)| *h == e.house_id && *s == e.sensor_id)
            {
                out.push((e.house_id.clone(), e.sensor_id.clone()));
            }
        }
        out
    }

    /// Take the stored state of `sensors` (states missing from `stored` are the default).
    pub fn load(&mut self, sensors: &[SensorKey], stored: Vec<(SensorKey, String, State)>) {
        if self.loaded.len() > MAX_SENSORS {
            self.forget();
        }
        for (house, sensor) in sensors {
            self.loaded.get_or_insert_with(house, sensor, || ());
            self.states.remove(house, sensor);
        }
        for ((house, sensor), rule, state) in stored {
            if let Some(i) = self.rule_index(&rule) {
                self.states
                    .get_or_insert_with(&house, &sensor, HashMap::new)
                    .insert(i, state);
            }
        }
    }

    /// Forget everything (the lanes changed hands; state is reloaded from the store).
    pub fn forget(&mut self) {
        self.states.clear();
        self.loaded.clear();
        self.last_seen.clear();
    }

    /// Evaluate `events` (in stored order) without changing the engine.
    pub fn evaluate(&self, events: &[&Event]) -> Outcome {
        let mut changed: HashMap<(&str, &str, usize), State> = HashMap::new();
        let mut order: Vec<(&str, &str, usize)> = Vec::new();
        let mut transitions = Vec::new();
        for e in events {
            let key = e.order_key();
            // The reading's time as the rules see it: never later than its receipt.
            let at = e.at_ms();
            let rules = self.by_kind.get(&e.kind).into_iter().flatten().copied();
            // Any reading means the sensor is back; an availability reading says which.
            let offline = self.offline.filter(|_| !is_availability(&e.kind));
            for i in rules.chain(offline) {
                let id = (e.house_id.as_str(), e.sensor_id.as_str(), i);
                let before = changed
                    .get(&id)
                    .or_else(|| self.state(id.0, id.1, i))
                    .cloned()
                    .unwrap_or_default();
                if before
                    .transition_key
                    .as_deref()
                    .is_some_and(|t| t >= key.as_str())
                {
                    continue;
                }
                let mut st = before.clone();
                let rule = &self.rules.rules[i];
                let raise_now = match rule.condition {
                    Condition::Boolean => Some(e.value >= 0.5),
                    Condition::Above { raise, clear } => match st.open {
                        None => Some(e.value > raise),
                        Some(_) => (e.value < clear).then_some(false),
                    },
                    Condition::Below { raise, clear } => match st.open {
                        None => Some(e.value < raise),
                        Some(_) => (e.value > clear).then_some(false),
                    },
                    Condition::Offline { .. } => Some(is_availability(&e.kind) && e.value < 0.5),
                };
                match (raise_now, st.open) {
                    (Some(true), None) => {
                        let since = *st.pending_since.get_or_insert(at);
                        if at - since >= rule.hold.as_millis() as i64 {
                            st.pending_since = None;
                            st.open = Some(AlertState::Active);
                            st.transition_key = Some(key.clone());
                            transitions.push(Transition::Raise {
                                rule: i,
                                house_id: e.house_id.clone(),
                                sensor_id: e.sensor_id.clone(),
                                kind: e.kind.clone(),
                                value: e.value,
                                ts_ms: at,
                                event_key: event_key(e),
                            });
                        }
                    }
                    (Some(false), Some(_)) => {
                        st.open = None;
                        st.pending_since = None;
                        st.transition_key = Some(key.clone());
                        transitions.push(Transition::Clear {
                            rule: i,
                            house_id: e.house_id.clone(),
                            sensor_id: e.sensor_id.clone(),
                            ts_ms: at,
                            event_key: event_key(e),
                        });
                    }
                    (Some(false), None) => st.pending_since = None,
                    _ => {}
                }
                if st != before {
                    if !changed.contains_key(&id) {
                        order.push(id);
                    }
                    changed.insert(id, st);
                }
            }
        }
        let states = order
            .into_iter()
            .filter_map(|id| changed.remove_entry(&id))
            .map(|((house, sensor, rule), st)| ((house.to_string(), sensor.to_string()), rule, st))
            .collect();
        Outcome {
            transitions,
            states,
        }
    }

    /// Make a written outcome the engine's own, and note when sensors were seen.
    pub fn commit(&mut self, outcome: Outcome, events: &[&Event]) {
        for ((house, sensor), rule, st) in outcome.states {
            self.states
                .get_or_insert_with(&house, &sensor, HashMap::new)
                .insert(rule, st);
        }
        if self.last_seen.len() > MAX_SENSORS {
            self.last_seen.clear();
        }
        for e in events {
            let seen = self
                .last_seen
                .get_or_insert_with(&e.house_id, &e.sensor_id, || e.received_us);
            *seen = (*seen).max(e.received_us);
        }
    }

    /// An alert changed outside the engine (acknowledged, or raised by the offline sweep).
    pub fn note(&mut self, house: &str, sensor: &str, rule: &str, open: Option<AlertState>) {
        if let Some(i) = self.rule_index(rule) {
            let st = self
                .states
                .get_or_insert_with(house, sensor, HashMap::new)
                .entry(i)
                .or_default();
            st.open = open;
        }
    }
}

/// A device's own online/offline signal: `availability` (what every codec makes of an
/// ecosystem's last will or availability topic), or `online`, its older name.
pub fn is_availability(kind: &str) -> bool {
    matches!(kind, "availability" | "online")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::rules::RuleSet;

    const RULES: &str = r#"
[[rule]]
name = "smoke"
type = "boolean"
kinds = ["smoke"]
severity = "critical"

[[rule]]
name = "hot"
type = "above"
kinds = ["temperature"]
raise = 40.0
clear = 35.0
severity = "warning"

[[rule]]
name = "hot_for_a_minute"
type = "above"
kinds = ["temperature"]
raise = 40.0
clear = 35.0
for = "60s"
severity = "warning"

[[rule]]
name = "battery_low"
type = "below"
kinds = ["battery"]
raise = 15.0
clear = 20.0
severity = "warning"

[[rule]]
name = "offline"
type = "offline"
min_silence = "10m"
severity = "warning"
"#;

    fn engine() -> Engine {
        Engine::new(Arc::new(RuleSet::parse(RULES).unwrap()))
    }

    fn key() -> SensorKey {
        ("h".to_string(), "s".to_string())
    }

    fn ev(kind: &str, value: f64, seq: i64, ts_s: i64) -> Event {
        Event {
            house_id: "h".into(),
            sensor_id: "s".into(),
            kind: kind.into(),
            value,
            unit: None,
            source_unit: None,
            seq: Some(seq),
            ts_ms: ts_s * 1000,
            received_us: ts_s * 1_000_000,
            ingest_id: None,
        }
    }

    /// Feed readings one batch at a time; the names of the rules raised (+) and cleared (-).
    fn run(engine: &mut Engine, batches: &[&[Event]]) -> Vec<String> {
        let mut out = Vec::new();
        for batch in batches {
            let events: Vec<&Event> = batch.iter().collect();
            let outcome = engine.evaluate(&events);
            for t in &outcome.transitions {
                out.push(match t {
                    Transition::Raise { rule, .. } => {
                        format!("+{}", engine.rules.rules[*rule].name)
                    }
                    Transition::Clear { rule, .. } => {
                        format!("-{}", engine.rules.rules[*rule].name)
                    }
                });
            }
            engine.commit(outcome, &events);
        }
        out
    }

    #[test]
    fn boolean_raises_once_and_clears() {
        let mut e = engine();
        let got = run(
            &mut e,
            &[
                &[ev("smoke", 1.0, 1, 10), ev("smoke", 1.0, 2, 11)],
                &[ev("smoke", 0.0, 3, 12)],
            ],
        );
        assert_eq!(got, ["+smoke", "-smoke"]);
    }

    #[test]
    fn hysteresis_does_not_flap_around_the_threshold() {
        let mut e = engine();
        // 41 raises; 38 and 39 are below the raise threshold but above the clear one: no clear,
        // no second raise at 41 again; 34 clears.
        let temps = [41.0, 38.0, 41.0, 39.0, 41.0, 34.0, 38.0];
        let batch: Vec<Event> = temps
            .iter()
            .enumerate()
            .map(|(i, t)| ev("temperature", *t, i as i64 + 1, i as i64))
            .collect();
        let got: Vec<String> = run(&mut e, &[&batch])
            .into_iter()
            .filter(|r| r.ends_with("hot"))
            .collect();
        assert_eq!(
            got,
            ["+hot", "-hot"],
            "without hysteresis this would flap 3 times"
        );
    }

    #[test]
    fn debounce_waits_for_the_condition_to_hold() {
        let e = engine();
        // Above 40 at t=0 and t=30 s, dips at t=45, above again at 50, 80 and 110 s: raised at
        // 110 s, a minute after 50 s; the first minute was broken by the dip.
        let at = [
            (41.0, 0),
            (42.0, 30),
            (30.0, 45),
            (41.0, 50),
            (41.0, 80),
            (41.0, 110),
        ];
        let batch: Vec<Event> = at
            .iter()
            .enumerate()
            .map(|(i, (t, s))| ev("temperature", *t, i as i64 + 1, *s))
            .collect();
        let events: Vec<&Event> = batch.iter().collect();
        let outcome = e.evaluate(&events);
        let raised: Vec<i64> = outcome
            .transitions
            .iter()
            .filter_map(|t| match t {
                Transition::Raise { rule, ts_ms, .. }
                    if e.rules.rules[*rule].name == "hot_for_a_minute" =>
                {
                    Some(*ts_ms)
                }
                _ => None,
            })
            .collect();
        assert_eq!(raised, [110_000]);
    }

    #[test]
    fn debounce_state_survives_a_restart() {
        let first = engine();
        let b1 = [
            ev("temperature", 41.0, 1, 0),
            ev("temperature", 41.0, 2, 30),
        ];
        let events: Vec<&Event> = b1.iter().collect();
        let outcome = first.evaluate(&events);
        let stored: Vec<(SensorKey, String, State)> = outcome
            .states
            .iter()
            .map(|(s, r, st)| (s.clone(), first.rules.rules[*r].name.clone(), st.clone()))
            .collect();
        // A new engine (a restart, or another worker) loads the stored state.
        let mut second = engine();
        second.load(&[key()], stored);
        let got = run(&mut second, &[&[ev("temperature", 41.0, 3, 61)]]);
        assert!(got.contains(&"+hot_for_a_minute".to_string()), "{got:?}");
    }

    #[test]
    fn a_redelivered_batch_changes_nothing() {
        let mut e = engine();
        let batch = [ev("smoke", 1.0, 1, 10), ev("smoke", 0.0, 2, 11)];
        assert_eq!(run(&mut e, &[&batch]), ["+smoke", "-smoke"]);
        assert!(
            run(&mut e, &[&batch]).is_empty(),
            "no second alert from the same events"
        );
    }

    #[test]
    fn offline_clears_on_any_reading_and_follows_availability() {
        let mut e = engine();
        // An availability topic says offline, then online.
        let got = run(
            &mut e,
            &[&[ev("online", 0.0, 1, 1)], &[ev("online", 1.0, 2, 2)]],
        );
        assert_eq!(got, ["+offline", "-offline"]);
        // The devices' own signal (a last will, a bridge's availability topic) likewise.
        let got = run(
            &mut e,
            &[
                &[ev("availability", 0.0, 10, 10)],
                &[ev("availability", 1.0, 11, 11)],
            ],
        );
        assert_eq!(got, ["+offline", "-offline"]);
        // Declared offline by the sweep (another consumer), then a reading arrives.
        e.note("h", "s", "offline", Some(AlertState::Active));
        let got = run(&mut e, &[&[ev("battery", 90.0, 12, 12)]]);
        assert_eq!(got, ["-offline"]);
    }

    #[test]
    fn a_sensor_back_from_silence_is_reloaded() {
        let mut e = engine();
        let first = [ev("battery", 90.0, 1, 0)];
        let events: Vec<&Event> = first.iter().collect();
        assert_eq!(e.to_load(&events), [key()]);
        e.load(&[key()], Vec::new());
        e.commit(Outcome::default(), &events);
        assert!(e.to_load(&events).is_empty());
        let later = [ev("battery", 90.0, 2, 400)];
        assert_eq!(
            e.to_load(&later.iter().collect::<Vec<_>>()),
            [key()],
            "silent for more than min_silence / 2"
        );
    }

    #[test]
    fn two_houses_sensors_of_one_name_are_two_sensors() {
        let mut e = engine();
        let h2_smoke = Event {
            house_id: "h2".into(),
            ..ev("smoke", 1.0, 1, 10)
        };
        // h1 says its own `s` is clear: h2's alarm stays raised, and h1 raises its own.
        let h1_clear = Event {
            house_id: "h1".into(),
            ..ev("smoke", 0.0, 2, 11)
        };
        let h1_smoke = Event {
            house_id: "h1".into(),
            ..ev("smoke", 1.0, 3, 12)
        };
        assert_eq!(
            run(&mut e, &[&[h2_smoke], &[h1_clear], &[h1_smoke]]),
            ["+smoke", "+smoke"]
        );
    }

    #[test]
    fn a_reading_stamped_in_the_future_cannot_silence_the_rules() {
        let mut e = engine();
        let now = 1_764_139_200;
        let ahead = |kind: &str, v: f64, seq: i64, received_s: i64| Event {
            ts_ms: (now + 23 * 3600) * 1000,
            ..ev(kind, v, seq, received_s)
        };
        let honest = |v: f64, seq: i64, s: i64| ev("smoke", v, seq, s);
        // Smoke true then false stamped 23 h ahead, then real smoke: raised again.
        let got = run(
            &mut e,
            &[
                &[ahead("smoke", 1.0, 1, now), ahead("smoke", 0.0, 2, now + 1)],
                &[honest(1.0, 3, now + 2), honest(1.0, 4, now + 3)],
            ],
        );
        assert_eq!(got, ["+smoke", "-smoke", "+smoke"]);
        // And a debounce cannot be cut short by a stamp ahead either.
        let mut e = engine();
        let got = run(
            &mut e,
            &[&[
                ev("temperature", 41.0, 1, now),
                ahead("temperature", 41.0, 2, now + 1),
            ]],
        );
        assert!(!got.contains(&"+hot_for_a_minute".to_string()), "{got:?}");
    }
}

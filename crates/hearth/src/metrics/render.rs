//! The Prometheus text rendering of hearth's metrics: the process's own, its process stats
//! from /proc, and the queue's state read at scrape time.

use std::fmt::Write;

use super::*;

/// The process's own metrics, then the queue's (its status, when it answered), in the
/// Prometheus text format.
pub fn render(role: &str, queue: Option<&crate::status::Status>) -> String {
    let m = metrics();
    let mut out = String::with_capacity(8 * 1024);
    family_counter(
        &mut out,
        "hearth_events_received_total",
        "Events appended to the lanes by this process, by source.",
        &m.received,
    );
    scalar(
        &mut out,
        "hearth_events_stored_total",
        "counter",
        "Rows inserted into events by this process.",
        m.stored.get() as f64,
    );
    scalar(
        &mut out,
        "hearth_events_duplicate_total",
        "counter",
        "Events this process found already stored (redeliveries, duplicate publishes).",
        m.duplicates.get() as f64,
    );
    family_counter(
        &mut out,
        "hearth_events_rejected_total",
        "Messages or events refused into the dead-letter stream, by reason.",
        &m.rejected,
    );
    family_counter(
        &mut out,
        "hearth_messages_ignored_total",
        "Messages holding no reading and nothing wrong (bridge logs, device housekeeping), by ecosystem.",
        &m.ignored,
    );
    family_histogram(
        &mut out,
        "hearth_event_latency_seconds",
        "Receive to stored latency of events, by lane.",
        &m.latency,
    );
    histogram(
        &mut out,
        "hearth_batch_events",
        "Events per batch written by a worker.",
        "",
        &m.batch_events,
    );
    histogram(
        &mut out,
        "hearth_store_seconds",
        "Duration of one batch write to PostgreSQL.",
        "",
        &m.store_seconds,
    );
    family_counter(
        &mut out,
        "hearth_dependency_errors_total",
        "Errors talking to a dependency, each retried with backoff.",
        &m.dependency_errors,
    );
    scalar(
        &mut out,
        "hearth_sequence_gaps_total",
        "counter",
        "Readings missing from sensors' seq counters: lost before reaching hearth.",
        m.sequence_gaps.get() as f64,
    );
    scalar(
        &mut out,
        "hearth_broker_dropped_messages_total",
        "counter",
        "The broker's count of dropped messages ($SYS/broker/publish/messages/dropped).",
        m.broker_dropped.get(),
    );
    scalar(
        &mut out,
        "hearth_ingest_paused",
        "gauge",
        "1 while the ingest holds routine messages at the broker.",
        m.ingest_paused.get(),
    );
    scalar(
        &mut out,
        "hearth_ingest_slots",
        "gauge",
        "Broker sessions (ingest slots) this process holds.",
        m.ingest_slots.get(),
    );
    scalar(
        &mut out,
        "hearth_ingest_order_waits_total",
        "counter",
        "Messages held back at the ingest until the readings before them (seq) were appended.",
        m.order_waits.get() as f64,
    );
    scalar(
        &mut out,
        "hearth_ingest_order_gave_up_total",
        "counter",
        "Messages appended after ingest_order_wait_ms without the readings before them.",
        m.order_gave_up.get() as f64,
    );
    family_counter(
        &mut out,
        "hearth_expired_total",
        "What retention removed: partitions of readings dropped, readings deleted, cleared alerts.",
        &m.expired,
    );
    family_counter(
        &mut out,
        "hearth_alerts_total",
        "Alerts raised, by severity.",
        &m.alerts,
    );
    family_counter(
        &mut out,
        "hearth_mqtt_refused_total",
        "Connections, logins, publishes and subscriptions the embedded broker refused, by reason.",
        &m.mqtt_refused,
    );
    scalar(
        &mut out,
        "hearth_mqtt_throttled_total",
        "counter",
        "Pauses the embedded broker made in the publishes of a client whose house published past its rate.",
        m.mqtt_throttled.get() as f64,
    );
    family_counter(
        &mut out,
        "hearth_ws_closed_total",
        "WebSocket clients the API disconnected, by reason.",
        &m.ws_closed,
    );
    family_counter(
        &mut out,
        "hearth_api_refused_total",
        "API requests refused past a rate (429), by rate: a house token's requests, or the lookups of tokens never seen or seen unknown.",
        &m.api_refused,
    );
    header(
        &mut out,
        "hearth_circuit_open",
        "gauge",
        "1 while the circuit to a dependency is open.",
    );
    for (dep, g) in m.circuit_open.snapshot() {
        let _ = writeln!(
            out,
            "hearth_circuit_open{{dependency=\"{dep}\"}} {}",
            g.get()
        );
    }
    header(
        &mut out,
        "hearth_process_role",
        "gauge",
        "The role of this process (join on instance).",
    );
    let _ = writeln!(out, "hearth_process_role{{role=\"{role}\"}} 1");
    header(
        &mut out,
        "hearth_build_info",
        "gauge",
        "The build of this process: its version and role, as labels (the value is 1).",
    );
    let _ = writeln!(
        out,
        "hearth_build_info{{version=\"{}\",role=\"{role}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    process(&mut out);
    if let Some(status) = queue {
        queue_metrics(&mut out, status);
    }
    out
}

fn queue_metrics(out: &mut String, s: &crate::status::Status) {
    header(
        out,
        "hearth_queue_depth",
        "gauge",
        "Events queued in a lane (appended, not yet stored or dead-lettered).",
    );
    for l in &s.lanes {
        let _ = writeln!(out, "hearth_queue_depth{{lane=\"{}\"}} {}", l.lane, l.depth);
    }
    header(
        out,
        "hearth_queue_pending",
        "gauge",
        "Entries of a lane delivered to a worker and not yet acknowledged.",
    );
    for l in &s.lanes {
        let _ = writeln!(
            out,
            "hearth_queue_pending{{lane=\"{}\"}} {}",
            l.lane, l.pending
        );
    }
    scalar(
        out,
        "hearth_dead_letters",
        "gauge",
        "Entries in the dead-letter stream.",
        s.dead_letters as f64,
    );
    scalar(
        out,
        "hearth_dead_letters_expired_total",
        "counter",
        "Dead letters removed by their retention (dead_letter_max_age_secs, dead_letter_max_count).",
        s.dead_letters_expired as f64,
    );
    // The installation's loss accounting (every process's, from the shared counters): totals
    // apart from the one gauge, received = stored + duplicates + dead_lettered + in_flight.
    header(
        out,
        "hearth_accounting_events_total",
        "counter",
        "Events of all processes by outcome: received = stored + duplicates + dead_lettered + hearth_accounting_in_flight_events.",
    );
    let e = &s.events;
    for (outcome, v) in [
        ("received", e.received),
        ("stored", e.stored),
        ("duplicates", e.duplicates),
        ("dead_lettered", e.dead_lettered),
        ("rejected_at_ingest", e.rejected_at_ingest),
    ] {
        let _ = writeln!(
            out,
            "hearth_accounting_events_total{{outcome=\"{outcome}\"}} {v}"
        );
    }
    scalar(
        out,
        "hearth_accounting_in_flight_events",
        "gauge",
        "Events of all processes received and not yet stored, duplicate or dead-lettered.",
        e.in_flight as f64,
    );
    header(
        out,
        "hearth_consumers",
        "gauge",
        "Worker consumers alive, by pool.",
    );
    let mut pools: Vec<_> = s.consumers_alive.iter().collect();
    pools.sort();
    for (pool, n) in pools {
        let _ = writeln!(out, "hearth_consumers{{pool=\"{pool}\"}} {n}");
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn scalar(out: &mut String, name: &str, kind: &str, help: &str, v: f64) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

fn family_counter(out: &mut String, name: &str, help: &str, f: &Family<Counter>) {
    header(out, name, "counter", help);
    for (value, c) in f.snapshot() {
        let _ = writeln!(out, "{name}{{{}=\"{value}\"}} {}", f.label, c.get());
    }
}

fn family_histogram(out: &mut String, name: &str, help: &str, f: &Family<Histogram>) {
    header(out, name, "histogram", help);
    for (value, h) in f.snapshot() {
        histogram_lines(out, name, &format!("{}=\"{value}\"", f.label), &h);
    }
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    header(out, name, "histogram", help);
    histogram_lines(out, name, labels, h);
}

fn histogram_lines(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (bound, bucket) in h.bounds.iter().zip(&h.buckets) {
        cumulative += bucket.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
        );
    }
    let count = h.count.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
    let sum = h.sum_micro.load(Ordering::Relaxed) as f64 / 1e6;
    if labels.is_empty() {
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    } else {
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// The standard process metrics, from /proc/self.
fn process(out: &mut String) {
    let pid = std::process::id();
    if let Some(kb) = rss_kb(pid) {
        scalar(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            (kb * 1024) as f64,
        );
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some((_, rest)) = stat.rsplit_once(')')
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        scalar(
            out,
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent in seconds.",
            (ticks(11) + ticks(12)) / 100.0,
        );
        scalar(
            out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            ticks(20),
        );
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("btime"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        });
        if let Some(boot) = boot {
            scalar(
                out,
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                boot + ticks(19) / 100.0,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        scalar(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.7, 9.0] {
            h.observe(v);
        }
        let mut out = String::new();
        histogram_lines(&mut out, "x", "lane=\"a\"", &h);
        assert!(out.contains("x_bucket{lane=\"a\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{lane=\"a\",le=\"2\"} 3\n"), "{out}");
        assert!(
            out.contains("x_bucket{lane=\"a\",le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("x_sum{lane=\"a\"} 12.7\n"), "{out}");
    }
}

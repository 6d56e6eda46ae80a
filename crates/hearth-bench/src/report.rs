//! The bench's report as a table, and the machine it ran on.

use super::{Machine, Report};

pub(crate) fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let memory_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu,
        memory_gib: (memory_kb as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
    }
}

impl Report {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let h = &self.hearth;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "hearth bench: {} events from {} sensors, QoS {}, {}, {} broker(s), {} ingest process(es), {} worker process(es) x {} consumer(s)",
            self.events,
            self.sensors,
            self.qos,
            if self.target_rate == 0 {
                "as fast as possible".to_string()
            } else {
                format!("{} events/s", self.target_rate)
            },
            self.brokers,
            self.ingest_processes,
            self.worker_processes,
            self.consumers_per_process
        );
        let _ = writeln!(
            out,
            "machine: {} cores, {}, {} GiB\n",
            self.machine.cores, self.machine.cpu, self.machine.memory_gib
        );
        let _ = writeln!(
            out,
            "{:<34} {:>12} {:>9} {:>9}",
            "", "events/s", "vs raw", "vs sync"
        );
        if let Some(r) = self.baselines.raw_events_per_s {
            let _ = writeln!(out, "{:<34} {:>12.0}", "raw (broker → QoS 1 subscriber)", r);
        }
        if let Some(s) = self.baselines.sync_events_per_s {
            let _ = writeln!(
                out,
                "{:<34} {:>12.0}",
                format!(
                    "sync (INSERT per message, {} ev)",
                    self.baselines.sync_events
                ),
                s
            );
        }
        let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<34} {:>12.0} {:>9} {:>9}\n",
            "hearth (MQTT in → rows stored)",
            h.events_per_s,
            ratio(self.ratios.vs_raw),
            ratio(self.ratios.vs_sync)
        );
        let _ = writeln!(
            out,
            "stored {} in {:.2} s (published in {:.2} s): lost {}, duplicated {}, out of order {}",
            h.stored, h.seconds, h.publish_seconds, h.lost, h.duplicated, h.out_of_order
        );
        for (name, p) in [
            ("receive → stored", &h.receive_to_stored_ms),
            ("publish → stored", &h.publish_to_stored_ms),
        ] {
            let _ = writeln!(
                out,
                "latency {name:<17} p50 {:>8.1} ms  p90 {:>8.1} ms  p99 {:>8.1} ms  p99.9 {:>8.1} ms  max {:>8.1} ms",
                p.p50, p.p90, p.p99, p.p999, p.max
            );
        }
        if let Some(cpu) = h.cpu_us_per_event {
            let _ = writeln!(
                out,
                "cpu     {cpu:.1} µs per event across hearth's processes"
            );
        }
        for p in &h.processes {
            let _ = writeln!(
                out,
                "        {:<10} cpu {:>7.2} s   peak rss {:>7.1} MB",
                p.role, p.cpu_seconds, p.peak_rss_mb
            );
        }
        out
    }
}

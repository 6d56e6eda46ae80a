#!/usr/bin/env python3
"""Mutations of hearth's guarantees, each expected to be caught by the test named beside it:
the safety net of docs/RELIABILITY.md. For each: break the code on purpose, build, run the
test, report CAUGHT (the test failed) or NOT CAUGHT, and put the code back (git checkout).

Usage: python3 scripts/mutate.py [substring of a mutation's name ...]
Refuses to run with uncommitted changes under crates/ (it checks them out after each one).
"""
import os
import subprocess
import sys

os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
if subprocess.run(['git', 'diff', '--quiet', '--', 'crates/']).returncode != 0:
    sys.exit('mutate.py: commit or stash your changes under crates/ first')
S='crates/hearth/src/'
muts = {
 # The one worker (both backends): acknowledge the batch before storing it.
 'M1 ack before the store (servers)': ([(S+'worker/batch.rs', '''            crate::fault::pause("pause_before_store").await;''', '''            let _ = self.parts.reader.ack(entries, &crate::seam::Written::default(), &[]).await;
            crate::fault::pause("pause_before_store").await;''')], ['--test', 'safety', 'abort_before_store_on_the_servers']),
 'M1e ack before the store (embedded)': ([(S+'worker/batch.rs', '''            crate::fault::pause("pause_before_store").await;''', '''            let _ = self.parts.reader.ack(entries, &crate::seam::Written::default(), &[]).await;
            crate::fault::pause("pause_before_store").await;''')], ['--test', 'safety', 'abort_before_store_embedded']),
 'M4 a webhook not retried': ([(S+'alerts/notify.rs', '        for _ in 0..ATTEMPTS {', '        for _ in 0..1 {')], ['--test', 'safety', 'a_webhook_that_recovers']),
 'M7 WebSocket pushes dropped': ([(S+'api/ws.rs', '    pub fn dispatch(&self, message: &str) {', '    pub fn dispatch(&self, message: &str) {\n        if !message.is_empty() {\n            return;\n        }')], ['--test', 'browser']),
 'M2 critical events on a routine lane': ([(S+'lane.rs', '''        if crate::event::is_critical_kind(kind) {''', '''        if crate::event::is_critical_kind(kind) && false {''')], ['--test', 'safety', 'smoke_overtakes']),
 'M3 dead-lettered at the first failure': ([(S+'worker/batch.rs', '''                if deliveries < self.settings.max_deliveries {''', '''                if deliveries < 1 {''')], ['--test', 'safety', 'a_poison_entry']),
 'M5 SIGTERM drops the batch in hand': ([(S+'worker/batch.rs', '''        crate::fault::hit("after_store");''', '''        crate::fault::hit("after_store");
        if self.shutdown.is_set() {
            return;
        }''')], ['--test', 'safety', 'sigterm']),
 'M6 the fence not checked': ([(S+'servers/store.rs', '''    SELECT count(*) = cardinality($11::text[]) AS ok FROM held''', '''    SELECT count(*) >= 0 AS ok FROM held''')], ['--test', 'safety', 'the_fence']),
 'M8 backpressure never closes': ([(S+'intake.rs', '''        if !self.is_closed() && depth >= self.high {''', '''        if !self.is_closed() && depth >= u64::MAX {''')], ['--test', 'pipeline', 'backpressure']),
 'M8e embedded backpressure never closes': ([(S+'intake.rs', '''        if !self.is_closed() && depth >= self.high {''', '''        if !self.is_closed() && depth >= u64::MAX {''')], ['--test', 'embedded', 'past_the_high']),
 'M9 a migration drops data (interval_ms)': ([(S+'servers/schema.rs', '''       (SELECT s.interval_ms FROM sensors s
        WHERE s.sensor_id = e.sensor_id AND s.house_id = e.house_id)''', '''       NULL::float8''')], ['--test', 'migrate', 'postgres_from_schema_2']),
 'M9e a SQLite migration drops data (webhook jobs)': ([(S+'embedded/db.rs', '''const SCHEMA_4: &str = r#"''', '''const SCHEMA_4: &str = r#"
DELETE FROM notify;''')], ['--test', 'migrate', 'sqlite_from_schema_3']),
 'M10 events without seq not deduplicated (embedded)': ([(S+'embedded/db.rs', '''CREATE UNIQUE INDEX events_dedup_ingest ON events (ingest_id) WHERE ingest_id IS NOT NULL;''', '''CREATE INDEX events_dedup_ingest ON events (ingest_id) WHERE ingest_id IS NOT NULL;''')], ['--test', 'safety', 'abort_after_store_embedded']),
 'M11 PUBACK before the append': ([(S+'ingest/mod.rs', '''            if !intake.append_until_done(&inputs, &shutdown).await {''', '''            {
                let early: Acks = chunk.iter().filter(|m| m.qos != QoS::AtMostOnce).map(|m| (m.generation, m.pkid)).collect();
                let _ = acks.send(early);
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            if !intake.append_until_done(&inputs, &shutdown).await {''')], ['--test', 'safety', 'abort_before_append']),
 # New with the one worker: an alert transition pushed but never marked pushed is pushed again
 # by the lane's next owner; never marking is caught by the conformance suite.
 'M12 alerts never marked pushed': ([(S+'servers/alerts.rs', '''pub async fn mark_pushed(client: &impl GenericClient, alerts: &[Alert]) -> Result<(), StoreError> {''', '''pub async fn mark_pushed(client: &impl GenericClient, alerts: &[Alert]) -> Result<(), StoreError> {
    if !alerts.is_empty() {
        return Ok(());
    }''')], ['--test', 'conformance', 'alerts_on_postgres']),
}
only = sys.argv[1:]
for name,(edits,test) in muts.items():
    if only and not any(o in name for o in only): continue
    ok=True
    for path,old,new in edits:
        s=open(path).read()
        if old not in s:
            print(f'{name}: PATTERN NOT FOUND in {path}', flush=True); ok=False; break
        open(path,'w').write(s.replace(old,new,1))
    if ok:
        b=subprocess.run(['cargo','build','--all-targets'],capture_output=True,text=True)
        if b.returncode!=0:
            print(f'{name}: BUILD FAILED', b.stderr[-2000:], flush=True)
        else:
            r=subprocess.run(['timeout','600','cargo','test']+test,capture_output=True,text=True)
            failed = ' FAILED' in r.stdout or r.returncode!=0
            line=[l for l in r.stdout.splitlines() if l.startswith('test result')]
            why=[l for l in (r.stdout+r.stderr).splitlines() if 'panicked at' in l or 'assertion' in l or l.strip().startswith('left') or l.strip().startswith('right') or 'timed out' in l or 'every event' in l]
            print(f'{name}: {"CAUGHT" if failed else "NOT CAUGHT"} by {" ".join(test[1:])} {line[-1] if line else ""}', flush=True)
            for w in why[:6]: print('    ', w[:300], flush=True)
    subprocess.run(['git','checkout','--','crates/'])

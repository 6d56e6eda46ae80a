//! `hearth up` embedded: the broker (or the home's, through the MQTT client ingest), the SQLite
//! queue and store, the workers and the API in one process, on one data folder; `--demo` runs the
//! simulator beside them.

use std::sync::Arc;

use tracing::warn;

use super::*;

/// `hearth up` with no server configured: the embedded broker, store, workers and the API, on
/// one data folder.
pub(super) async fn up_embedded(
    config: Arc<Config>,
    shutdown: Shutdown,
    demo: bool,
) -> Result<(), RoleError> {
    let rules = rules(&config)?;
    // Its own broker, or the home's (`mqtt_url` set): the same intake either way.
    let listener = if config.external_broker {
        None
    } else {
        Some(
            crate::embedded::broker::Listeners::bind(&config)
                .await
                .map_err(|e| RoleError::Config(e.to_string()))?,
        )
    };
    let data_dir = std::path::Path::new(&config.data_dir);
    let _lock = crate::embedded::lock(data_dir).map_err(RoleError::Config)?;
    let embedded = crate::embedded::Embedded::open(
        data_dir,
        config.shards,
        config.sensor_touch_interval_ms,
        rules.clone(),
        crate::caps::Caps::from_config(&config),
        crate::dead_letter::Retention::from_config(&config),
        crate::keep::Keep::from_config(&config),
    )
    .await
    .map_err(|e| anyhow::anyhow!("embedded store: {e}"))?;
    let embedded = Arc::new(embedded);
    let seams = embedded.seams.clone();
    let gate = Gate::start(&config, seams.queue.clone(), &shutdown);
    let auth = authenticator(&config, Http::Api, &seams)?;
    let server = http(
        &config,
        &config.api_listen,
        "up",
        Http::Api,
        &shutdown,
        &seams,
        auth.clone(),
        gate.clone(),
    )
    .await?;
    let workers = tokio::spawn(worker::run(
        embedded.clone(),
        worker::Settings {
            batch_size: config.embedded_batch_size,
            ..worker::Settings::from_config(&config)
        },
        rules,
        shutdown.clone(),
    ));
    let intake = mqtt_intake(&config, &seams, gate).await?;
    let mqtt_url = match &listener {
        Some(_) if config.mqtt_listen.is_empty() => format!("mqtts://{}", config.mqtt_tls_listen),
        Some(_) => format!("mqtt://{}", config.mqtt_listen),
        None => config.first_mqtt_url(),
    };
    let mqtt = match listener {
        Some(listener) => {
            tracing::info!(
                mqtt = %config.mqtt_listen,
                mqtt_tls = %config.mqtt_tls_listen,
                api = %config.api_listen,
                data_dir = %data_dir.display(),
                "embedded: broker, store and workers in this process; subscribed"
            );
            let settings = crate::embedded::broker::Settings::from_config(&config);
            let kept = embedded
                .kept(config.mqtt_max_retained, config.mqtt_max_retained_bytes)
                .await
                .map_err(|e| anyhow::anyhow!("embedded store: {e}"))?;
            let stop = shutdown.clone();
            let alerts = alert_pushes(&seams).await;
            tokio::spawn(async move {
                crate::embedded::broker::serve(
                    listener, intake, auth, settings, kept, alerts, stop,
                )
                .await;
                Ok(())
            })
        }
        None => {
            tracing::info!(
                mqtt = %config.mqtt_url,
                api = %config.api_listen,
                data_dir = %data_dir.display(),
                "embedded: store and workers in this process, events from the home's broker"
            );
            // One process holds every session: the data folder is its alone.
            let count = config.mqtt_urls().len() as u32 * u32::from(config.ingest_slots);
            tokio::spawn(ingest::run(
                config.clone(),
                intake,
                alert_feeds(&config, &seams).await,
                Box::new(ingest::AllSlots(count)),
                shutdown.clone(),
            ))
        }
    };
    if demo {
        tokio::spawn(demo_sim(mqtt_url, shutdown.clone()));
    }
    let m = mqtt.await;
    let _ = workers.await;
    m.map_err(anyhow::Error::from)??;
    finish(server).await
}

/// `hearth up --demo`: the simulator alongside, so that data and alerts flow at once (10 houses
/// of 10 sensors, 20 events/s, for at most an hour).
pub(super) async fn demo_sim(url: String, mut shutdown: Shutdown) {
    let opts = crate::sim::Options {
        houses: 10,
        sensors_per_house: 10,
        rate: 20.0,
        duration: std::time::Duration::from_secs(3600),
        profile: crate::sim::Profile::Steady,
        qos: 1,
        connections: 1,
        seed: crate::event::now_us() as u64,
    };
    tokio::select! {
        r = crate::sim::run(&url, &opts) => match r {
            Ok(s) => tracing::info!(published = s.published, "demo simulator finished"),
            Err(e) => warn!(error = %e, "demo simulator stopped"),
        },
        _ = shutdown.wait() => {}
    }
}

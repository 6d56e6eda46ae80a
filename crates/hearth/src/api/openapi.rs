//! `/openapi.json`, generated from the handlers' and types' annotations, so that it cannot
//! drift from the code.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{alerts, dlq, error, events, health, sensors, series, ws};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hearth",
        description = "The event backbone of a connected home: ingestion, sensors, history, alerts, pipeline state, and a WebSocket push. Every /api/v1 route needs a bearer token: the admin token, or a house token from `hearth token create --house H`."
    ),
    paths(
        events::post_events,
        sensors::houses,
        sensors::house_sensors,
        sensors::sensor_latest,
        sensors::sensor_events,
        series::sensor_series,
        alerts::list_alerts,
        alerts::ack_alert,
        health::pipeline,
        dlq::list,
        dlq::replay,
        dlq::purge,
        ws::upgrade,
        health::healthz,
        health::readyz,
    ),
    components(schemas(
        error::ErrorBody,
        events::Accepted,
        events::RejectedReading,
        sensors::SensorView,
        crate::seam::DeviceInfo,
        sensors::HouseView,
        sensors::LatestView,
        sensors::History,
        sensors::HistoryEvent,
        series::Series,
        crate::series::Point,
        crate::series::Step,
        health::Pipeline,
        health::Readiness,
        crate::dlq::Letter,
        crate::dlq::Replayed,
        dlq::Purged,
        crate::alerts::Alert,
        crate::alerts::Severity,
        crate::alerts::AlertState,
        crate::alerts::Push,
        crate::alerts::PushedEvent,
    )),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    Json(doc)
}

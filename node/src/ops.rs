//! The plain-HTTP ops listener: `/healthz`, `/readyz` and Prometheus `/metrics`.
//! Kept apart from the client listener so probes need no client certificate.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::ctx::Ctx;

#[derive(Clone)]
struct OpsState {
    ctx: Arc<Ctx>,
    prometheus: PrometheusHandle,
}

/// The ops router.
pub fn router(ctx: Arc<Ctx>, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(OpsState { ctx, prometheus })
}

/// Ready when a leader is known and this node is a member that has applied
/// everything it knows to be committed... approximately: a leader exists and
/// this node's applied index is within a small distance of its last log.
async fn readyz(State(s): State<OpsState>) -> (StatusCode, String) {
    let m = s.ctx.raft.metrics().borrow().clone();
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    let last = m.last_log_index.unwrap_or(0);
    if let Err(fatal) = &m.running_state {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("raft stopped: {fatal}\n"),
        );
    }
    match m.current_leader {
        None => (StatusCode::SERVICE_UNAVAILABLE, "no leader\n".into()),
        Some(_) if last.saturating_sub(applied) > 1000 => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("catching up: applied {applied} of {last}\n"),
        ),
        Some(l) => (StatusCode::OK, format!("ready; leader {l}\n")),
    }
}

async fn metrics(State(s): State<OpsState>) -> String {
    s.ctx.workers.publish_metrics();
    s.prometheus.render()
}

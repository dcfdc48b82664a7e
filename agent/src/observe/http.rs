//! The agent's HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use super::{
    Health, Metrics,
    flows::{FlowQuery, FlowRecord},
};

#[derive(Clone)]
pub struct Observed {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// Serves until `shutdown` resolves.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    observed: Observed,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(observed);
    serve_router(addr, app, shutdown).await
}

async fn serve_router(
    addr: SocketAddr,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(observed): State<Observed>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        observed.metrics.encode(),
    )
}

async fn healthz(State(observed): State<Observed>) -> impl IntoResponse {
    if let Some(problem) = observed.health.stalled() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n"));
    }
    // A stale source is reported, not failed: enforcement goes on from its last good
    // snapshot, and restarting the agent would not make the source readable.
    let mut body = "ok\n".to_owned();
    for stale in observed.health.stale_sources() {
        let _ = writeln!(body, "{stale}");
    }
    (StatusCode::OK, body)
}

async fn readyz(State(observed): State<Observed>) -> impl IntoResponse {
    if observed.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "first sync not yet programmed\n",
        )
    }
}

/// Admin endpoints for `egret status`, `explain` and `flows`: local only by default.
#[derive(Clone)]
pub struct Admin {
    pub live: Arc<super::Live>,
    pub health: Arc<Health>,
    pub flows: super::flows::FlowHistory,
    pub attach_mode: &'static str,
}

/// Serves the admin API until `shutdown` resolves.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve_admin(
    addr: SocketAddr,
    admin: Admin,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/explain", get(explain))
        .route("/v1/flows", get(flows))
        .with_state(admin);
    serve_router(addr, app, shutdown).await
}

fn json(value: &serde_json::Value) -> axum::response::Response {
    ([("content-type", "application/json")], value.to_string()).into_response()
}

async fn status(State(admin): State<Admin>) -> axum::response::Response {
    let live = admin
        .live
        .tables
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let Some(live) = live else {
        return json(&serde_json::json!({
            "ready": false,
            "attach_mode": admin.attach_mode,
            "endpoints": [],
            "stale_sources": admin.health.stale_sources(),
        }));
    };
    // Absent maps (no agent has pinned them yet) list nothing learnt.
    let learnt = crate::datapath::dns::LearntReader::open(&admin.live.pin_dir)
        .and_then(|reader| {
            super::dns::learnt_names(
                &reader,
                &live.tables,
                crate::datapath::monotonic_coarse_ns(),
            )
        })
        .unwrap_or_default();
    let endpoints: Vec<serde_json::Value> = live
        .tables
        .endpoints
        .iter()
        .map(|(pod, entry)| {
            let attachment = live.attachments.get(pod);
            serde_json::json!({
                "learnt": learnt.get(pod).cloned().unwrap_or_default(),
                "namespace": pod.namespace,
                "pod": pod.name,
                "ips": live.pod_ips.get(pod).cloned().unwrap_or_default(),
                "attachment": attachment,
                "state": if attachment.is_some() { "enforced" } else { "not_attached" },
                "isolated_by": entry.isolated_by.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "cluster_policies": entry.cluster_policies,
            })
        })
        .collect();
    let maps: Vec<serde_json::Value> = live
        .maps
        .iter()
        .map(|(map, entries, capacity)| serde_json::json!({"map": map, "entries": entries, "capacity": capacity}))
        .collect();
    json(&serde_json::json!({
        "node": live.node,
        "ready": admin.health.is_ready(),
        "healthy": admin.health.stalled().is_none(),
        "stale_sources": admin.health.stale_sources(),
        "attach_mode": admin.attach_mode,
        "policies": live.policies,
        "endpoints": endpoints,
        "maps": maps,
        "last_reconcile": humantime::format_rfc3339_millis(live.reconciled_at).to_string(),
        "last_reconcile_ms": live.reconcile_duration.as_secs_f64() * 1000.0,
    }))
}

#[derive(serde::Deserialize)]
struct ExplainQuery {
    from: String,
    to: std::net::IpAddr,
    #[serde(default)]
    port: u16,
    protocol: String,
}

async fn explain(
    State(admin): State<Admin>,
    axum::extract::Query(query): axum::extract::Query<ExplainQuery>,
) -> axum::response::Response {
    use egret_common::proto;
    let live = admin
        .live
        .tables
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let Some(live) = live else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no tables programmed yet\n",
        )
            .into_response();
    };
    let Some(pod) = crate::state::ObjectKey::parse(&query.from) else {
        return (StatusCode::BAD_REQUEST, "from: expected namespace/name\n").into_response();
    };
    let Some(endpoint) = live.tables.endpoints.get(&pod) else {
        return (
            StatusCode::NOT_FOUND,
            format!("from: {pod} is not a pod this node enforces\n"),
        )
            .into_response();
    };
    let protocol = match (query.protocol.as_str(), query.to) {
        ("ICMP", std::net::IpAddr::V4(_)) => proto::ICMP,
        ("ICMP", std::net::IpAddr::V6(_)) => proto::ICMPV6,
        (name, _) => match crate::policy::Protocol::from_name(name) {
            Some(protocol) => protocol.number(),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("protocol: {name:?} is not TCP, UDP, SCTP or ICMP\n"),
                )
                    .into_response();
            }
        },
    };
    // What the kernel learnt from DNS about the address, joined as the kernel joins it.
    let domain = crate::datapath::dns::LearntReader::open(&admin.live.pin_dir)
        .ok()
        .and_then(|reader| {
            let now = crate::datapath::monotonic_coarse_ns();
            super::dns::note(&reader, &live.tables, endpoint, query.to, now)
                .ok()
                .flatten()
                .map(|(note, learnt)| (note, learnt.map(|l| (l.pattern, l.seconds_left(now)))))
        });
    let resolved = domain
        .as_ref()
        .and_then(|(_, learnt)| *learnt)
        .map(|(pattern, _)| crate::compile::lookup::Resolved::Pattern(pattern));
    let decision = crate::compile::lookup::decide_resolved(
        &live.tables,
        endpoint,
        query.to,
        protocol,
        query.port,
        resolved,
    );
    let owner = admin
        .live
        .addresses
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&query.to)
        .cloned();
    json(&serde_json::json!({
        "from": query.from,
        "to": query.to,
        "to_owner": owner,
        "port": query.port,
        "protocol": query.protocol,
        "verdict": super::kernel::verdict_name(decision.verdict),
        "reason": decision.reason.name(),
        "allowed_by": decision.allowing_policies().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "allowed_by_rules": decision.allowed_by.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "isolated_by": endpoint.isolated_by.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "tier": super::flows::tier_of(decision.reason),
        "decided_by_rule": decision.decided_by.as_ref().map(|rule| format!(
            "ClusterNetworkPolicy {rule} ({}, {:?})", rule.tier.name(), rule.action
        )),
        "domain": domain.as_ref().map(|(note, _)| note),
        "domain_expires_in_s": domain.as_ref().and_then(|(_, learnt)| learnt.map(|(_, left)| left)),
        "passed_over_rules": decision.passed_over.iter().map(|rule| format!(
            "ClusterNetworkPolicy {rule} ({}, {:?})", rule.tier.name(), rule.action
        )).collect::<Vec<_>>(),
    }))
}

/// `GET /v1/flows`: the kept flow records a [`FlowQuery`] asks for, one JSON line each,
/// then, with `follow`, each new one as it comes.
async fn flows(
    State(admin): State<Admin>,
    query: Result<axum::extract::Query<FlowQuery>, axum::extract::rejection::QueryRejection>,
) -> axum::response::Response {
    let query = match query {
        Ok(axum::extract::Query(query)) => query,
        Err(rejection) => {
            return (StatusCode::BAD_REQUEST, format!("{rejection}\n")).into_response();
        }
    };
    let (kept, mut receiver) = admin.flows.read(&query);
    let line = |record: &FlowRecord| {
        let mut line = serde_json::to_string(record).unwrap_or_default();
        line.push('\n');
        Ok::<_, std::convert::Infallible>(line)
    };
    let stream = async_stream::stream! {
        for record in &kept {
            yield line(record);
        }
        if !query.follow {
            return;
        }
        loop {
            match receiver.recv().await {
                Ok(record) if query.matches(&record) => yield line(&record),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    };
    axum::response::Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_default()
}

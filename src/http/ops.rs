//! Operations routes, the routing feed and Server-Sent Events.

use super::auth::Caller;
use super::problem::{ApiError, ApiResult};
use super::{State, ROUTES};
use crate::domain::{Actor, Event};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::stream;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/openapi.json", web::get().to(openapi));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn readyz(state: web::Data<State>) -> ApiResult<HttpResponse> {
    let g = &state.gateway;
    g.store.ping().await?;
    let mut channels = serde_json::Map::new();
    for c in &g.settings.channels {
        channels.insert(c.id.clone(), json!(g.channel_health(&c.id).await));
    }
    Ok(HttpResponse::Ok().json(json!({"status": "ready", "store": "ok", "channels": channels})))
}

async fn metrics(state: web::Data<State>) -> HttpResponse {
    let g = &state.gateway;
    if let Ok(depth) = g.store.outbox_depth().await {
        g.metrics.outbox_depth.set(depth as i64);
    }
    // Channel health lives in the store (shared by every process): count it now.
    let mut reauth: std::collections::BTreeMap<crate::domain::ChannelKind, i64> =
        Default::default();
    for c in &g.settings.channels {
        let n = reauth.entry(c.kind).or_default();
        if g.channel_health(&c.id).await == "needs_reauth" {
            *n += 1;
        }
    }
    for (kind, n) in reauth {
        g.metrics.set_unhealthy(kind, "needs_reauth", n);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(g.metrics.render())
}

/// The OpenAPI description, generated from the route table the router uses.
pub fn openapi_document() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    for r in ROUTES {
        let entry = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        let params: Vec<serde_json::Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": r.summary,
            "parameters": params,
            "responses": {"default": {"description": "application/problem+json on error",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}},
        });
        if r.auth == "agent" || r.auth == "service" {
            op["security"] = json!([{"bearer": []}, {"session": []}]);
        }
        entry[r.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Switchboard", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": super::auth::SESSION_COOKIE},
            },
            "schemas": {"Problem": {"type": "object", "required": ["type", "title", "status", "detail", "code"],
                "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                    "detail": {"type": "string"}, "code": {"type": "string"}, "field": {"type": "string"}}}},
        },
    })
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(openapi_document())
}

fn sse_frame(e: &Event) -> web::Bytes {
    let data = serde_json::to_string(e).expect("events serialize");
    web::Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        e.id, e.kind, data
    ))
}

/// `GET /api/v1/events`: what changes in the caller's queues, as it happens.
pub async fn agent_events(
    state: web::Data<State>,
    Caller(actor): Caller,
    req: HttpRequest,
) -> ApiResult<HttpResponse> {
    let g = state.gateway.clone();
    let queues = g.visible_queues(&actor);
    let rx = g.store.subscribe();
    // Resume after a reconnect from the browser's Last-Event-ID.
    let mut backlog = vec![];
    if let Some(last) = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
    {
        for e in g.store.events_after(Some(last), 1000).await? {
            if g.event_visible(&actor, &queues, &e).await {
                backlog.push(e);
            }
        }
    }
    let shutdown = state.shutdown.clone();
    struct S {
        rx: tokio::sync::broadcast::Receiver<Event>,
        backlog: std::collections::VecDeque<Event>,
        g: std::sync::Arc<crate::gateway::Gateway>,
        actor: Actor,
        queues: Vec<String>,
        shutdown: tokio_util::sync::CancellationToken,
        opened: bool,
        /// The last event sent: later ones only, never one twice.
        last: Option<(u64, u64)>,
    }
    let s = S {
        rx,
        backlog: backlog.into(),
        g,
        actor,
        queues,
        shutdown,
        opened: false,
        last: None,
    };
    let body = stream::unfold(s, |mut s| async move {
        if !s.opened {
            s.opened = true;
            return Some((
                Ok::<_, actix_web::Error>(web::Bytes::from_static(b": connected\n\n")),
                s,
            ));
        }
        if let Some(e) = s.backlog.pop_front() {
            s.last = crate::domain::parse_event_id(&e.id);
            return Some((Ok(sse_frame(&e)), s));
        }
        loop {
            tokio::select! {
                _ = s.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_secs(15)) => {
                    return Some((Ok(web::Bytes::from_static(b": keep-alive\n\n")), s));
                }
                r = s.rx.recv() => match r {
                    Ok(e) => {
                        let id = crate::domain::parse_event_id(&e.id);
                        if s.last.is_some() && id <= s.last {
                            continue; // already sent from the backlog
                        }
                        if s.g.event_visible(&s.actor, &s.queues, &e).await {
                            s.last = id;
                            return Some((Ok(sse_frame(&e)), s));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow to keep up: refill from the store, in order.
                        if let Some((ms, seq)) = s.last {
                            let after = format!("{ms}-{seq}");
                            if let Ok(events) = s.g.store.events_after(Some(&after), 1000).await {
                                for e in events {
                                    if s.g.event_visible(&s.actor, &s.queues, &e).await {
                                        s.backlog.push_back(e);
                                    }
                                }
                            }
                            if let Some(e) = s.backlog.pop_front() {
                                s.last = crate::domain::parse_event_id(&e.id);
                                return Some((Ok(sse_frame(&e)), s));
                            }
                        }
                        continue;
                    }
                    Err(_) => return None,
                }
            }
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// `GET /api/v1/routing/events?after=ID&wait=SECONDS`: the normalized feed for routing engines.
pub async fn routing_events(
    state: web::Data<State>,
    Caller(actor): Caller,
    q: web::Query<HashMap<String, String>>,
) -> ApiResult<HttpResponse> {
    if !matches!(actor, Actor::Service(_)) {
        return Err(ApiError::forbidden(
            "the routing feed is for service tokens",
        ));
    }
    let g = &state.gateway;
    let after = q.get("after").cloned();
    if let Some(a) = &after {
        if crate::domain::parse_event_id(a).is_none() {
            return Err(ApiError::validation("after", "after is an event id"));
        }
    }
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::validation("limit", "limit is a number from 1 to 1000"))?,
    };
    let wait = super::agents::wait_duration(&q)?;
    let mut rx = g.store.subscribe();
    let mut events = g.store.events_after(after.as_deref(), limit).await?;
    if events.is_empty() && !wait.is_zero() {
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        tokio::select! {
            _ = &mut deadline => {}
            _ = state.shutdown.cancelled() => {}
            _ = rx.recv() => {}
        }
        events = g.store.events_after(after.as_deref(), limit).await?;
    }
    let next = events.last().map(|e| e.id.clone()).or(after);
    Ok(HttpResponse::Ok().json(json!({"events": events, "next": next})))
}

/// The records of the mail an email channel's IMAP poller quarantined
/// (`adapters::email::imap`), oldest first; none for other kinds.
async fn quarantined(
    state: &State,
    actor: &Actor,
    channel: &str,
) -> ApiResult<Vec<serde_json::Value>> {
    if !matches!(actor, Actor::Service(_)) {
        return Err(ApiError::forbidden(
            "quarantined mail is for service tokens",
        ));
    }
    let g = &state.gateway;
    g.channel(channel)?;
    Ok(crate::adapters::email::imap::quarantined(&g.store, channel).await?)
}

/// `GET /api/v1/channels/{channel_id}/quarantine`: what the channel's
/// poller gave up on (a message it could not parse or store three times),
/// newest first, each with `blob`, the ID its raw bytes are kept under.
pub async fn quarantine(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let mut items = quarantined(&state, &actor, &path).await?;
    items.reverse();
    Ok(HttpResponse::Ok().json(json!({ "items": items })))
}

/// `GET /api/v1/channels/{channel_id}/quarantine/{blob}`: one quarantined
/// message as the server gave it, to read or to send again once whatever
/// refused it is fixed (`POST /webhooks/{channel_id}`).
pub async fn quarantined_message(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<(String, String)>,
) -> ApiResult<HttpResponse> {
    let (channel, blob) = path.into_inner();
    let listed = quarantined(&state, &actor, &channel)
        .await?
        .iter()
        .any(|r| r["blob"].as_str() == Some(blob.as_str()));
    let missing = || {
        ApiError::not_found(format!(
            "no quarantined message {blob} on channel {channel}"
        ))
    };
    if !listed {
        return Err(missing());
    }
    let bytes = state.gateway.store.blob(&blob).await?.ok_or_else(missing)?;
    Ok(super::file_response(
        bytes,
        "message/rfc822",
        &format!("{blob}.eml"),
    ))
}

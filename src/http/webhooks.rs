//! Provider-side routes: handshakes and webhooks, verified before anything is read.

use super::problem::{ApiError, ApiResult};
use super::State;
use crate::adapters::RawRequest;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;

/// The webhook routes. Each configured channel gets a route of its own,
/// whose path the router compares as a string: the one route with a
/// parameter, which takes every other `/webhooks/...` (an unknown channel's
/// 404 included), is matched by a regex and its capture, a few per cent of
/// a webhook's CPU.
pub fn configure(cfg: &mut web::ServiceConfig, channel_ids: &[&str]) {
    for id in channel_ids {
        // Ids are checked when the configuration is read (the same check);
        // one the router would take for a pattern is left to the route with
        // a parameter.
        if crate::config::is_channel_id(id) {
            cfg.service(
                web::resource(format!("{PREFIX}{id}"))
                    .route(web::get().to(handshake))
                    .route(web::post().to(webhook)),
            );
        }
    }
    cfg.service(
        web::resource(format!("{PREFIX}{{channel_id}}"))
            .route(web::get().to(handshake))
            .route(web::post().to(webhook)),
    )
    .route(
        "/media/{token}",
        web::get().to(crate::http::agents::public_media),
    );
}

const PREFIX: &str = "/webhooks/";

/// The channel a webhook route was called for.
fn channel_id(req: &HttpRequest) -> &str {
    match req.match_info().get("channel_id") {
        Some(id) => id,
        // A channel's own route: its path is the prefix and the id.
        None => req.path().strip_prefix(PREFIX).unwrap_or_default(),
    }
}

async fn handshake(state: web::Data<State>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let ch = state.gateway.channel(channel_id(&req))?;
    match ch.intake.handshake(req.query_string()) {
        None => Err(ApiError::new(
            405,
            "not_permitted",
            format!("{} channels have no handshake", ch.config.kind),
        )),
        Some(Err(e)) => Err(crate::gateway::GatewayError::from(e).into()),
        Some(Ok(ack)) => Ok(HttpResponse::build(
            actix_web::http::StatusCode::from_u16(ack.status)
                .unwrap_or(actix_web::http::StatusCode::OK),
        )
        .content_type(ack.content_type)
        .body(ack.body)),
    }
}

/// Reads a body up to `limit` bytes, refusing it (413) as soon as it passes.
pub async fn read_limited(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> ApiResult<web::Bytes> {
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(format!(
            "the body is larger than {limit} bytes"
        )));
    }
    // A body that arrives in one chunk (a webhook mostly does) is kept as
    // it came; only a second chunk starts a copy.
    let mut first: Option<web::Bytes> = None;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::malformed(format!("the body could not be read: {e}")))?;
        let so_far = first.as_ref().map_or(body.len(), web::Bytes::len);
        if so_far + chunk.len() > limit {
            return Err(ApiError::too_large(format!(
                "the body is larger than {limit} bytes"
            )));
        }
        if body.is_empty() && first.is_none() {
            first = Some(chunk);
        } else {
            if let Some(f) = first.take() {
                body.extend_from_slice(&f);
            }
            body.extend_from_slice(&chunk);
        }
    }
    Ok(first.unwrap_or_else(|| body.freeze()))
}

async fn webhook(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    let gateway = &state.gateway;
    let id = channel_id(&req);
    let ch = gateway.channel(id)?;
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let limit = if content_type.starts_with("message/rfc822") {
        gateway.settings.server.max_email_bytes
    } else {
        gateway.settings.server.max_webhook_bytes
    };
    let body = match read_limited(&req, payload, limit).await {
        Ok(b) => b,
        Err(e) => {
            gateway
                .metrics
                .webhook_rejected(ch.config.kind, "too_large");
            return Err(e);
        }
    };
    // Borrowed from the server's map: nothing copied per header.
    let headers: Vec<(&str, &str)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
        .collect();
    let raw = RawRequest {
        path: req.path(),
        query: req.query_string(),
        headers: headers.as_slice().into(),
        content_type: &content_type,
        body: &body,
    };
    let outcome = gateway.ingest(id, &raw).await?;
    tracing::debug!(channel = %id, stored = outcome.stored, duplicates = outcome.duplicates, "webhook stored");
    Ok(HttpResponse::build(
        actix_web::http::StatusCode::from_u16(outcome.ack.status)
            .unwrap_or(actix_web::http::StatusCode::OK),
    )
    .content_type(outcome.ack.content_type)
    .body(outcome.ack.body))
}

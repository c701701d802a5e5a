//! Routes only: every handler parses the request, calls the gateway and
//! shapes the answer. No business rule lives here.
//!
//! [`ROUTES`] lists every route once; it drives both the router's
//! documentation (`/openapi.json`) and a test that checks each is served.

pub mod agents;
pub mod auth;
pub mod chat;
pub mod ops;
pub mod problem;
pub mod ui;
pub mod webhooks;

use crate::gateway::Gateway;
use actix_web::web;
use std::sync::Arc;

/// Shared state of every handler.
pub struct State {
    pub gateway: Arc<Gateway>,
    pub tokens: auth::Tokens,
    /// Stopped when the process shuts down (ends SSE streams and long polls).
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// One documented route: method, path, who may call it, what it does.
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub auth: &'static str,
    pub summary: &'static str,
}

macro_rules! routes {
    ($( $m:literal $p:literal $a:literal $s:literal ;)*) => {
        pub const ROUTES: &[RouteDoc] = &[ $( RouteDoc { method: $m, path: $p, auth: $a, summary: $s } ),* ];
    };
}

routes! {
    "get" "/webhooks/{channel_id}" "provider" "Provider handshakes (Meta hub challenge, X CRC)";
    "post" "/webhooks/{channel_id}" "provider" "Inbound messages and delivery statuses, verified by the provider's signature";
    "get" "/media/{token}" "link" "An outbound attachment under an unguessable, expiring link (providers fetch it)";
    "get" "/api/v1/me" "agent" "The caller, their queues, the unread count of their default view and their own unread cases";
    "get" "/api/v1/queues" "agent" "Every queue with its kind and whether the caller is a member";
    "get" "/api/v1/channels" "agent" "Channels with their capabilities and limits";
    "get" "/api/v1/tags" "agent" "Tags in use in the caller's queues";
    "get" "/api/v1/interactions" "agent" "The caller's interactions: view, status, tag, sort, limit, cursor (the next_cursor of the previous page: it marks where that page ended, so items that move meanwhile shift no page)";
    "get" "/api/v1/interactions/{case_number}" "agent" "One interaction with its messages";
    "patch" "/api/v1/interactions/{case_number}" "agent" "Change tags, priority, contact_name, related_name, related_case";
    "post" "/api/v1/interactions/{case_number}/assign" "agent" "Take it (agent) or give it (service, {agent})";
    "post" "/api/v1/interactions/{case_number}/replies" "agent" "Reply (JSON {text} or multipart with attachments); honours Idempotency-Key";
    "post" "/api/v1/interactions/{case_number}/resolve" "agent" "Set as resolved without sending";
    "post" "/api/v1/interactions/{case_number}/end" "agent" "End with a disposition";
    "post" "/api/v1/interactions/{case_number}/transfer" "agent" "Transfer to another digital queue";
    "get" "/api/v1/interactions/{case_number}/contact" "agent" "Contact details, the caller's notes, history";
    "post" "/api/v1/interactions/{case_number}/typing" "agent" "The assigned agent is typing ({state: on|off}); web chat visitors see it";
    "put" "/api/v1/contacts/{contact_id}/notes" "agent" "Save the caller's private notes on a contact";
    "post" "/api/v1/outbound/sms" "agent" "Start an outbound SMS (agents of an outbound_sms queue)";
    "post" "/api/v1/sms/preview" "agent" "Encoding and segment count of an SMS text";
    "get" "/api/v1/attachments/{id}" "agent" "Download an attachment";
    "post" "/api/v1/attachments/{id}/retry" "agent" "Download a failed inbound attachment again from the provider";
    "get" "/api/v1/events" "agent" "Server-Sent Events of changes in the caller's queues";
    "get" "/api/v1/routing/events" "service" "The routing feed: after, wait (long poll)";
    "get" "/api/v1/channels/{channel_id}/quarantine" "service" "An email channel's quarantined mail, newest first: what its poller gave up on, and why";
    "get" "/api/v1/channels/{channel_id}/quarantine/{blob}" "service" "One quarantined message's raw bytes (message/rfc822)";
    "post" "/agent/session" "none" "Sign in: {token} sets the session cookie";
    "delete" "/agent/session" "none" "Sign out";
    "get" "/agent" "none" "Redirects to the agent's inbox at /agent/";
    "get" "/agent/" "none" "The agent's digital inbox (HTML, embedded; signs in with POST /agent/session)";
    "get" "/agent/app.js" "none" "The inbox's script";
    "get" "/agent/app.css" "none" "The inbox's styles";
    "get" "/agent/i18n.js" "none" "The inbox's English and Spanish texts";
    "get" "/chat/widget.js" "none" "The web chat widget: one script tag, no build step";
    "get" "/chat/widget.css" "none" "The web chat widget's styles";
    "get" "/chat/{channel_id}" "none" "A page with the web chat widget";
    "post" "/chat/{channel_id}/sessions" "origin" "Open (or, with the session token, resume) a visitor session: {name?, email?, identifier?, identifier_hash?} -> {session_id, token}";
    "get" "/chat/{channel_id}/ws" "visitor" "The visitor's WebSocket (?token=): JSON frames message, typing, resume; ack, message, typing";
    "post" "/chat/{channel_id}/messages" "visitor" "HTTP fallback of a message frame ({client_message_id, text, attachments}); answers the ack";
    "get" "/chat/{channel_id}/messages" "visitor" "The visitor's messages after after_seq";
    "post" "/chat/{channel_id}/attachments" "visitor" "Upload a file (multipart part file, at most 10 MiB): {id}";
    "get" "/chat/{channel_id}/attachments/{id}" "visitor" "Download one of the visitor's files";
    "get" "/healthz" "none" "Liveness";
    "get" "/readyz" "none" "Readiness: the store answers; channel health in the body";
    "get" "/metrics" "none" "Prometheus metrics";
    "get" "/openapi.json" "none" "This API's description";
}

/// Every route; `channel_ids` are the configured channels' (see
/// [`webhooks::configure`]).
pub fn configure(cfg: &mut web::ServiceConfig, channel_ids: &[&str]) {
    webhooks::configure(cfg, channel_ids);
    agents::configure(cfg);
    ops::configure(cfg);
    chat::configure(cfg);
    ui::configure(cfg);
}

/// What an unknown route answers: a problem, like every other error.
pub async fn no_route(req: actix_web::HttpRequest) -> actix_web::HttpResponse {
    use actix_web::ResponseError;
    problem::ApiError::not_found(format!("no route for {} {}", req.method(), req.path()))
        .error_response()
}

/// A stored file as its download, for agents, operators and web chat
/// visitors alike: shown inline under a name made safe for the header, kept
/// by no shared cache, and never sniffed or run as a page.
fn file_response(bytes: Vec<u8>, content_type: &str, filename: &str) -> actix_web::HttpResponse {
    let safe: String = filename
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_ ".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    actix_web::HttpResponse::Ok()
        .content_type(content_type.to_string())
        .insert_header((
            "Content-Disposition",
            format!("inline; filename=\"{safe}\""),
        ))
        // A customer's file: never kept by a shared cache.
        .insert_header(("Cache-Control", "private, no-store"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Content-Security-Policy", "default-src 'none'; sandbox"))
        .body(bytes)
}

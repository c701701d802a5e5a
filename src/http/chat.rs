//! Web chat, the visitor's side (`/chat/...`): the widget and its page,
//! sessions, the WebSocket, the HTTP fallback and uploads. Routes only: the
//! rules live in [`crate::adapters::chat::visitor`].
//!
//! Every route checks the page's `Origin` against the channel's
//! `allowed_origins` (the gateway's own page is always allowed) and answers
//! cross-origin pages with CORS headers, errors included, so an embedded
//! widget can read them.

use super::problem::{ApiError, ApiResult};
use super::State;
use crate::adapters::chat::visitor::{
    self, ChatError, Follower, Relevance, SessionRequest, VisitorMessage,
};
use crate::adapters::chat::{
    origin_of, rate_limiter, verify_internal, ChatSession, ChatSettings,
    NEW_SESSIONS_PER_MINUTE_PER_IP,
};
use crate::domain::ChannelKind;
use crate::manifest::MAX_ATTACHMENT_BYTES;
use actix_multipart::Multipart;
use actix_web::http::{header, Method};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const WIDGET_JS: &str = include_str!("../../assets/chat/widget.js");
const WIDGET_CSS: &str = include_str!("../../assets/chat/widget.css");
const PAGE_HTML: &str = include_str!("../../assets/chat/chat.html");

/// Largest JSON body of a session or message request.
const MAX_JSON_BYTES: usize = 256 * 1024;
/// Largest WebSocket frame a visitor may send (a 10,000-character message fits).
const MAX_FRAME_BYTES: usize = 256 * 1024;
/// Frames per second a socket may send before it is closed.
const MAX_FRAMES_PER_SECOND: u32 = 20;
/// The gateway pings every socket this often, and closes one silent for three times as long.
const PING_EVERY: Duration = Duration::from_secs(20);
/// At most one `typing: on` per this long per socket (providers.md A8).
const TYPING_THROTTLE: Duration = Duration::from_secs(2);

pub fn configure(cfg: &mut web::ServiceConfig) {
    // The fixed names first: `/chat/{channel_id}` would match them too.
    cfg.route("/chat/widget.js", web::get().to(widget_js))
        .route("/chat/widget.css", web::get().to(widget_css))
        .route("/chat/{channel_id}", web::get().to(page))
        .service(
            web::resource("/chat/{channel_id}/sessions")
                .route(web::post().to(sessions))
                .route(web::method(Method::OPTIONS).to(preflight)),
        )
        .route("/chat/{channel_id}/ws", web::get().to(socket))
        .service(
            web::resource("/chat/{channel_id}/messages")
                .route(web::post().to(post_message))
                .route(web::get().to(get_messages))
                .route(web::method(Method::OPTIONS).to(preflight)),
        )
        .service(
            web::resource("/chat/{channel_id}/attachments")
                .route(web::post().to(upload))
                .route(web::method(Method::OPTIONS).to(preflight)),
        )
        .service(
            web::resource("/chat/{channel_id}/attachments/{id}")
                .route(web::get().to(download))
                .route(web::method(Method::OPTIONS).to(preflight)),
        );
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> ApiError {
        match e {
            ChatError::Gateway(g) => g.into(),
            ChatError::Problem {
                status,
                code,
                detail,
                field,
                retry_after,
            } => ApiError {
                field,
                retry_after,
                ..ApiError::new(status, code, detail)
            },
        }
    }
}

/// A chat channel a request is for, with its settings and the page's origin.
struct Cx {
    channel_id: String,
    settings: ChatSettings,
    /// The request's `Origin`, when it sent one and it is allowed.
    cors_origin: Option<String>,
}

fn request_origin(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The origins of the gateway's own pages: its public URL, and the host the
/// request itself was sent to (a page served by the gateway is same-origin).
fn own_origins(state: &State, req: &HttpRequest, origin: &str) -> Vec<String> {
    let mut own: Vec<String> = origin_of(&state.gateway.settings.server.public_url())
        .into_iter()
        .collect();
    // The Host header itself, not X-Forwarded-Host: a page cannot choose it.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if let Some(o) = origin_of(origin) {
        if url::Url::parse(&o).ok().is_some_and(|u| {
            let h = match u.port() {
                Some(p) => format!("{}:{p}", u.host_str().unwrap_or("")),
                None => u.host_str().unwrap_or("").to_string(),
            };
            h == host
        }) {
            own.push(o);
        }
    }
    own
}

impl Cx {
    fn load(state: &State, channel_id: &str, req: &HttpRequest) -> ApiResult<Cx> {
        let ch = state
            .gateway
            .channels
            .get(channel_id)
            .filter(|c| c.config.kind == ChannelKind::Chat)
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "unknown_channel",
                    format!("no web chat channel {channel_id}"),
                )
            })?;
        let settings = ChatSettings::from_config(&ch.config, ch.manifest);
        let mut cors_origin = None;
        if let Some(origin) = request_origin(req) {
            let own = own_origins(state, req, &origin);
            if !settings.origin_allowed(&origin, &own) {
                return Err(ApiError::new(
                    403,
                    "forbidden_origin",
                    format!("pages of {origin} may not use web chat channel {channel_id}"),
                ));
            }
            cors_origin = Some(origin);
        }
        Ok(Cx {
            channel_id: channel_id.to_string(),
            settings,
            cors_origin,
        })
    }
}

/// Adds the CORS headers an allowed cross-origin page needs to read the answer.
fn with_cors(mut resp: HttpResponse, origin: Option<&str>) -> HttpResponse {
    if let Some(o) = origin.and_then(|o| header::HeaderValue::from_str(o).ok()) {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.insert(header::VARY, header::HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            header::HeaderValue::from_static("Retry-After"),
        );
    }
    resp
}

/// Answers a handler's result, errors as problems, with CORS for allowed pages.
fn finish(cx: &Cx, r: ApiResult<HttpResponse>) -> HttpResponse {
    let resp = r.unwrap_or_else(|e| e.error_response());
    with_cors(resp, cx.cors_origin.as_deref())
}

/// The session token: `Authorization: Bearer <token>`.
fn bearer(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

fn json_object(body: &[u8]) -> ApiResult<Value> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::malformed(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::malformed("the body must be a JSON object"));
    }
    Ok(v)
}

fn opt_string(v: &Value, key: &str) -> ApiResult<Option<String>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::validation(key, format!("{key} must be a string"))),
    }
}

// ----- the widget and its page ------------------------------------------

async fn widget_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header(("Cache-Control", "public, max-age=300"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Access-Control-Allow-Origin", "*"))
        .body(WIDGET_JS)
}

async fn widget_css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header(("Cache-Control", "public, max-age=300"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Access-Control-Allow-Origin", "*"))
        .body(WIDGET_CSS)
}

fn html_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// `GET /chat/{channel_id}`: a plain page with the widget in it.
async fn page(state: web::Data<State>, path: web::Path<String>) -> ApiResult<HttpResponse> {
    let ch = state
        .gateway
        .channels
        .get(path.as_str())
        .filter(|c| c.config.kind == ChannelKind::Chat)
        .ok_or_else(|| {
            ApiError::new(
                404,
                "unknown_channel",
                format!("no web chat channel {path}"),
            )
        })?;
    let title = ch.config.name.clone().unwrap_or_else(|| "Chat".into());
    let html = PAGE_HTML
        .replace("{{title}}", &html_escape(&title))
        .replace("{{channel_id}}", &html_escape(&ch.config.id));
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' blob: data:; media-src 'self' blob:; base-uri 'none'; form-action 'none'",
        ))
        .body(html))
}

/// Preflight for cross-origin pages: only allowed origins get the go-ahead.
async fn preflight(state: web::Data<State>, req: HttpRequest) -> HttpResponse {
    let channel_id = req.match_info().get("channel_id").unwrap_or("").to_string();
    match Cx::load(&state, &channel_id, &req) {
        Err(e) => e.error_response(),
        Ok(cx) => {
            let mut resp = HttpResponse::NoContent();
            resp.insert_header(("Access-Control-Allow-Methods", "GET, POST"))
                .insert_header((
                    "Access-Control-Allow-Headers",
                    "authorization, content-type",
                ))
                .insert_header(("Access-Control-Max-Age", "600"));
            with_cors(resp.finish(), cx.cors_origin.as_deref())
        }
    }
}

// ----- sessions -------------------------------------------------------------

/// `POST /chat/{channel_id}/sessions`: a new session, or the same one again
/// for the token in `Authorization: Bearer` (or a `token` field).
async fn sessions(
    state: web::Data<State>,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let cx = match Cx::load(&state, &path, &req) {
        Ok(cx) => cx,
        Err(e) => return e.error_response(),
    };
    let r = sessions_inner(&state, &cx, &req, payload).await;
    finish(&cx, r)
}

async fn sessions_inner(
    state: &State,
    cx: &Cx,
    req: &HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    let body = super::webhooks::read_limited(req, payload, MAX_JSON_BYTES).await?;
    let v = json_object(&body)?;
    let identifier_ts = match v.get("identifier_ts") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.parse().ok(),
        Some(_) => None,
    };
    if v.get("identifier_ts").is_some_and(|t| !t.is_null()) && identifier_ts.is_none() {
        return Err(ApiError::validation("identifier_ts", "unix seconds"));
    }
    let request = SessionRequest {
        name: opt_string(&v, "name")?,
        email: opt_string(&v, "email")?,
        identifier: opt_string(&v, "identifier")?,
        identifier_hash: opt_string(&v, "identifier_hash")?,
        identifier_ts,
    };
    let token = bearer(req).or(opt_string(&v, "token")?);
    if token.is_none() {
        // New sessions per client address (the proxy's `X-Forwarded-For` when there is one).
        let ip = req
            .connection_info()
            .realip_remote_addr()
            .unwrap_or("unknown")
            .to_string();
        rate_limiter()
            .check(
                &format!("session-ip:{ip}"),
                NEW_SESSIONS_PER_MINUTE_PER_IP,
                Instant::now(),
            )
            .map_err(|secs| ApiError {
                retry_after: Some(secs),
                ..ApiError::new(
                    429,
                    "rate_limited",
                    format!("too many new chat sessions; try again in {secs} s"),
                )
            })?;
    }
    let grant = visitor::create_session(
        &state.gateway,
        &cx.settings,
        &cx.channel_id,
        request,
        token.as_deref(),
    )
    .await?;
    let body = json!({
        "session_id": grant.session.session_id,
        "token": grant.token,
        "verified": grant.session.verified,
        "resumed": grant.resumed,
        "name": grant.session.name,
    });
    let mut resp = if grant.resumed {
        HttpResponse::Ok()
    } else {
        HttpResponse::Created()
    };
    Ok(resp.insert_header(("Cache-Control", "no-store")).json(body))
}

async fn session_of(state: &State, cx: &Cx, req: &HttpRequest) -> ApiResult<ChatSession> {
    Ok(visitor::require_session(&state.gateway, &cx.channel_id, bearer(req).as_deref()).await?)
}

// ----- messages over HTTP -------------------------------------------------

fn parse_message(v: &Value) -> ApiResult<VisitorMessage> {
    let client_message_id = match v.get("client_message_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            return Err(ApiError::validation(
                "client_message_id",
                "client_message_id must be a string",
            ))
        }
    };
    let text = opt_string(v, "text")?.unwrap_or_default();
    let attachments = match v.get("attachments") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Some(s.clone()),
                // providers.md A8 writes them as `{upload_id}` objects.
                Value::Object(o) => o
                    .get("upload_id")
                    .or_else(|| o.get("id"))
                    .and_then(|x| x.as_str())
                    .map(str::to_string),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::validation("attachments", "attachments is a list of upload IDs")
            })?,
        Some(_) => {
            return Err(ApiError::validation(
                "attachments",
                "attachments is a list of upload IDs",
            ))
        }
    };
    Ok(VisitorMessage {
        client_message_id,
        text,
        attachments,
    })
}

/// `POST /chat/{channel_id}/messages`: the HTTP fallback of a `message` frame; answers the ack.
async fn post_message(
    state: web::Data<State>,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let cx = match Cx::load(&state, &path, &req) {
        Ok(cx) => cx,
        Err(e) => return e.error_response(),
    };
    let r = async {
        let session = session_of(&state, &cx, &req).await?;
        let body = super::webhooks::read_limited(&req, payload, MAX_JSON_BYTES).await?;
        let msg = parse_message(&json_object(&body)?)?;
        let ack = visitor::send_message(&state.gateway, &cx.settings, &session, msg).await?;
        Ok(HttpResponse::Ok().json(ack.frame()))
    }
    .await;
    finish(&cx, r)
}

/// `GET /chat/{channel_id}/messages?after_seq=N`: the visitor's timeline after `N`.
async fn get_messages(
    state: web::Data<State>,
    path: web::Path<String>,
    req: HttpRequest,
    q: web::Query<HashMap<String, String>>,
) -> HttpResponse {
    let cx = match Cx::load(&state, &path, &req) {
        Ok(cx) => cx,
        Err(e) => return e.error_response(),
    };
    let r = async {
        let session = session_of(&state, &cx, &req).await?;
        let after = match q.get("after_seq") {
            None => 0,
            Some(s) => s.parse::<usize>().map_err(|_| {
                ApiError::validation("after_seq", "after_seq is a number of messages")
            })?,
        };
        let t = visitor::timeline(&state.gateway, &session).await?;
        let messages: Vec<Value> = t
            .iter()
            .enumerate()
            .skip(after)
            .map(|(i, m)| visitor::message_json(&state.gateway, m, i + 1))
            .collect();
        Ok(HttpResponse::Ok()
            .insert_header(("Cache-Control", "no-store"))
            .json(json!({"messages": messages, "last_seq": t.len()})))
    }
    .await;
    finish(&cx, r)
}

// ----- attachments ------------------------------------------------------------

/// A file name safe to keep and show: no path, no control characters, not too long.
fn clean_filename(raw: &str) -> String {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let name: String = base.chars().filter(|c| !c.is_control()).take(200).collect();
    let name = name.trim().to_string();
    if name.is_empty() || name == "." || name == ".." {
        "attachment".into()
    } else {
        name
    }
}

/// `POST /chat/{channel_id}/attachments`: multipart part `file`, at most 10 MiB; answers `{"id"}`.
async fn upload(
    state: web::Data<State>,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let cx = match Cx::load(&state, &path, &req) {
        Ok(cx) => cx,
        Err(e) => return e.error_response(),
    };
    let r = upload_inner(&state, &cx, &req, payload).await;
    finish(&cx, r)
}

fn too_large(name: &str) -> ApiError {
    ApiError::new(
        413,
        "attachment_too_large",
        format!("{name} is larger than {MAX_ATTACHMENT_BYTES} bytes"),
    )
}

async fn upload_inner(
    state: &State,
    cx: &Cx,
    req: &HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    let session = session_of(state, cx, req).await?;
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("multipart/form-data") {
        return Err(ApiError::new(
            415,
            "unsupported_media_type",
            "send multipart/form-data with the file in a part named file",
        ));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_ATTACHMENT_BYTES + 64 * 1024) {
        return Err(too_large("the file"));
    }
    let mut mp = Multipart::new(req.headers(), payload);
    let mut file: Option<(String, String, Vec<u8>)> = None;
    while let Some(field) = mp.next().await {
        let mut field = field.map_err(|e| {
            ApiError::malformed(format!("the multipart body could not be read: {e}"))
        })?;
        let is_file = field.name() == Some("file");
        let filename = clean_filename(
            field
                .content_disposition()
                .and_then(|cd| cd.get_filename())
                .unwrap_or("attachment"),
        );
        let content_type = field
            .content_type()
            .map(|m| m.essence_str().to_string())
            .unwrap_or_else(|| "application/octet-stream".into());
        let cap = if is_file {
            MAX_ATTACHMENT_BYTES as usize
        } else {
            64 * 1024
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::malformed(format!("the multipart body could not be read: {e}"))
            })?;
            if bytes.len() + chunk.len() > cap {
                return Err(if is_file {
                    too_large(&filename)
                } else {
                    ApiError::too_large("a form field is larger than 64 KiB")
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if is_file {
            if file.is_some() {
                return Err(ApiError::validation("file", "one file per upload"));
            }
            file = Some((filename, content_type, bytes));
        }
    }
    let (filename, content_type, bytes) =
        file.ok_or_else(|| ApiError::validation("file", "put the file in a part named file"))?;
    let up = visitor::store_upload(
        &state.gateway,
        &cx.settings,
        &session,
        &filename,
        &content_type,
        &bytes,
    )
    .await?;
    Ok(HttpResponse::Created().json(json!({
        "id": up.id, "filename": up.filename, "content_type": up.content_type, "size": up.size,
    })))
}

/// `GET /chat/{channel_id}/attachments/{id}`: one of the session's uploads,
/// or an attachment of a message in its timeline. (`?internal=` is the
/// gateway fetching an upload from itself to attach it to a message.)
async fn download(
    state: web::Data<State>,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    q: web::Query<HashMap<String, String>>,
) -> HttpResponse {
    let (channel_id, id) = path.into_inner();
    let cx = match Cx::load(&state, &channel_id, &req) {
        Ok(cx) => cx,
        Err(e) => return e.error_response(),
    };
    let r = async {
        let g = &state.gateway;
        let not_found = || ApiError::not_found(format!("no attachment {id}"));
        if let Some(token) = q.get("internal") {
            if !verify_internal(&cx.channel_id, &id, token, chrono::Utc::now().timestamp()) {
                return Err(not_found());
            }
            let up = visitor::upload_by_id(g, &cx.channel_id, &id)
                .await?
                .ok_or_else(not_found)?;
            let bytes = g.store.blob(&up.id).await?.ok_or_else(not_found)?;
            return Ok(super::file_response(bytes, &up.content_type, &up.filename));
        }
        let session = session_of(&state, &cx, &req).await?;
        let f = visitor::file_for(g, &session, &id)
            .await?
            .ok_or_else(not_found)?;
        Ok(super::file_response(f.bytes, &f.content_type, &f.filename))
    }
    .await;
    finish(&cx, r)
}

// ----- the WebSocket ------------------------------------------------------------

/// `GET /chat/{channel_id}/ws?token=...[&after_seq=N]`: JSON frames both ways
/// (CONTRACT "Web chat frames"). The `Origin` is checked before the upgrade.
async fn socket(
    state: web::Data<State>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
    q: web::Query<HashMap<String, String>>,
) -> HttpResponse {
    let cx = match Cx::load(&state, &path, &req) {
        Ok(cx) => cx,
        Err(e) => return e.error_response(),
    };
    let session = match visitor::require_session(
        &state.gateway,
        &cx.channel_id,
        q.get("token").map(|s| s.as_str()),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return ApiError::from(e).error_response(),
    };
    let after_seq = match q.get("after_seq").map(|s| s.parse::<usize>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return ApiError::validation("after_seq", "after_seq is a number of messages")
                .error_response()
        }
    };
    let (resp, ws, stream) = match actix_ws::handle(&req, body) {
        Ok(x) => x,
        Err(e) => {
            return ApiError::malformed(format!("expected a WebSocket upgrade: {e}"))
                .error_response()
        }
    };
    let conn = Connection {
        gateway: state.gateway.clone(),
        settings: cx.settings,
        follower: Follower::new(session, 0),
        ws,
        typing_on: false,
        typing_sent: None,
    };
    actix_web::rt::spawn(conn.run(stream, after_seq, state.shutdown.clone()));
    resp
}

/// One visitor's socket.
struct Connection {
    gateway: Arc<crate::gateway::Gateway>,
    settings: ChatSettings,
    follower: Follower,
    ws: actix_ws::Session,
    typing_on: bool,
    typing_sent: Option<Instant>,
}

/// The socket is gone (the visitor left): stop.
struct Gone;

impl Connection {
    async fn send(&mut self, v: &Value) -> Result<(), Gone> {
        self.ws.text(v.to_string()).await.map_err(|_| Gone)
    }

    async fn error(&mut self, e: ApiError, client_message_id: Option<&str>) -> Result<(), Gone> {
        let mut v = json!({"type": "error", "code": e.code, "status": e.status.as_u16(), "detail": e.detail});
        if let Some(id) = client_message_id {
            v["client_message_id"] = json!(id);
        }
        if let Some(f) = &e.field {
            v["field"] = json!(f);
        }
        if let Some(s) = e.retry_after {
            v["retry_after"] = json!(s);
        }
        self.send(&v).await
    }

    /// Pushes every message the visitor has not had, in order.
    async fn catch_up(&mut self) -> Result<(), Gone> {
        match self.follower.catch_up(&self.gateway).await {
            Ok(frames) => {
                for f in frames {
                    self.send(&f).await?;
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "web chat: the timeline could not be read");
                let e: ApiError = crate::gateway::GatewayError::from(e).into();
                self.error(e, None).await
            }
        }
    }

    async fn run(
        mut self,
        stream: actix_ws::MessageStream,
        after_seq: Option<usize>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        // Subscribe before reading the timeline, so nothing falls between them.
        let mut events = self.gateway.store.subscribe();
        let _ = self
            .session_loop(stream, after_seq, &mut events, shutdown)
            .await;
    }

    async fn session_loop(
        &mut self,
        stream: actix_ws::MessageStream,
        after_seq: Option<usize>,
        events: &mut tokio::sync::broadcast::Receiver<crate::domain::Event>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(), Gone> {
        let last = match visitor::timeline(&self.gateway, &self.follower.session).await {
            Ok(t) => t.len(),
            Err(e) => {
                let e: ApiError = crate::gateway::GatewayError::from(e).into();
                self.error(e, None).await?;
                let _ = self.ws.clone().close(None).await;
                return Err(Gone);
            }
        };
        self.follower.last_sent = after_seq.unwrap_or(last);
        let ready = json!({"type": "ready", "session_id": self.follower.session.session_id,
            "verified": self.follower.session.verified, "last_seq": last});
        self.send(&ready).await?;
        if after_seq.is_some() {
            self.catch_up().await?;
        }
        let mut stream = stream
            .max_frame_size(MAX_FRAME_BYTES)
            .aggregate_continuations()
            .max_continuation_size(MAX_FRAME_BYTES);
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut heard = Instant::now();
        let mut window = (Instant::now(), 0u32);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Going away: the widget reconnects (to another process, if there is one).
                    let _ = self.ws.clone().close(Some(actix_ws::CloseCode::Away.into())).await;
                    return Ok(());
                }
                _ = ping.tick() => {
                    if heard.elapsed() > PING_EVERY * 3 {
                        let _ = self.ws.clone().close(Some(actix_ws::CloseCode::Normal.into())).await;
                        return Ok(());
                    }
                    self.ws.ping(b"").await.map_err(|_| Gone)?;
                }
                m = stream.recv() => {
                    let Some(m) = m else { return Ok(()) };
                    heard = Instant::now();
                    match m {
                        Ok(actix_ws::AggregatedMessage::Text(text)) => {
                            if window.0.elapsed() >= Duration::from_secs(1) {
                                window = (Instant::now(), 0);
                            }
                            window.1 += 1;
                            if window.1 > MAX_FRAMES_PER_SECOND {
                                let _ = self.ws.clone().close(Some(actix_ws::CloseReason {
                                    code: actix_ws::CloseCode::Policy,
                                    description: Some("too many frames".into()),
                                })).await;
                                return Ok(());
                            }
                            self.frame(&text).await?;
                        }
                        Ok(actix_ws::AggregatedMessage::Binary(_)) => {
                            self.error(ApiError::malformed("frames are JSON text"), None).await?;
                        }
                        Ok(actix_ws::AggregatedMessage::Ping(b)) => {
                            self.ws.pong(&b).await.map_err(|_| Gone)?;
                        }
                        Ok(actix_ws::AggregatedMessage::Pong(_)) => {}
                        Ok(actix_ws::AggregatedMessage::Close(reason)) => {
                            let _ = self.ws.clone().close(reason).await;
                            return Ok(());
                        }
                        Err(_) => {
                            let _ = self.ws.clone().close(Some(actix_ws::CloseCode::Protocol.into())).await;
                            return Ok(());
                        }
                    }
                }
                e = events.recv() => match e {
                    Ok(e) => match self.follower.classify(&self.gateway, &e).await {
                        Relevance::None => {}
                        Relevance::Sync => self.catch_up().await?,
                        Relevance::Typing(on) => {
                            self.send(&json!({"type": "typing", "state": if on { "on" } else { "off" }})).await?
                        }
                    },
                    // Missed some events: the timeline has everything.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.catch_up().await?,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        let _ = self.ws.clone().close(Some(actix_ws::CloseCode::Away.into())).await;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One frame from the visitor.
    async fn frame(&mut self, text: &str) -> Result<(), Gone> {
        let v: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return self
                    .error(ApiError::malformed("a frame is a JSON object"), None)
                    .await
            }
        };
        match v.get("type").and_then(|t| t.as_str()).unwrap_or("") {
            "message" => {
                let cmid = v
                    .get("client_message_id")
                    .and_then(|c| c.as_str())
                    .map(str::to_string);
                if cmid.is_none() {
                    return self
                        .error(
                            ApiError::validation(
                                "client_message_id",
                                "a message frame needs a client_message_id",
                            ),
                            None,
                        )
                        .await;
                }
                let msg = match parse_message(&v) {
                    Ok(m) => m,
                    Err(e) => return self.error(e, cmid.as_deref()).await,
                };
                let session = self.follower.session.clone();
                match visitor::send_message(&self.gateway, &self.settings, &session, msg).await {
                    Ok(ack) => {
                        self.typing_on = false;
                        self.send(&ack.frame()).await
                    }
                    Err(e) => self.error(e.into(), cmid.as_deref()).await,
                }
            }
            "typing" => {
                let on = match v.get("state").and_then(|s| s.as_str()) {
                    Some("on") => true,
                    Some("off") => false,
                    _ => {
                        return self
                            .error(ApiError::validation("state", "state is on or off"), None)
                            .await
                    }
                };
                let due = if on {
                    !self.typing_on
                        || self
                            .typing_sent
                            .is_none_or(|t| t.elapsed() >= TYPING_THROTTLE)
                } else {
                    self.typing_on
                };
                if !due {
                    return Ok(());
                }
                self.typing_on = on;
                self.typing_sent = Some(Instant::now());
                let session = self.follower.session.clone();
                if let Err(e) = visitor::typing(&self.gateway, &session, on).await {
                    return self.error(e.into(), None).await;
                }
                Ok(())
            }
            "resume" => {
                let Some(n) = v.get("after_seq").and_then(|n| n.as_u64()) else {
                    return self
                        .error(
                            ApiError::validation("after_seq", "after_seq is a number of messages"),
                            None,
                        )
                        .await;
                };
                self.follower.last_sent = n as usize;
                self.catch_up().await
            }
            "ping" => self.send(&json!({"type": "pong"})).await,
            other => {
                self.error(
                    ApiError::malformed(format!(
                        "unknown frame type {other:?}: message, typing, resume or ping"
                    )),
                    None,
                )
                .await
            }
        }
    }
}

//! Agent and routing-engine routes (`/api/v1/...`, `/agent/session`).

use super::auth::{Caller, SESSION_COOKIE};
use super::problem::{ApiError, ApiResult};
use super::State;
use crate::config::QueueKind;
use crate::domain::{Actor, Message, Status};
use crate::gateway::{parse_target, ListQuery, Upload};
use crate::manifest::{self, MAX_ATTACHMENT_BYTES};
use crate::store::Listed;
use actix_multipart::Multipart;
use actix_web::cookie::{Cookie, SameSite};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::Utc;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/v1/me", web::get().to(me))
        .route("/api/v1/queues", web::get().to(queues))
        .route("/api/v1/channels", web::get().to(channels))
        .route("/api/v1/tags", web::get().to(tags))
        .route("/api/v1/interactions", web::get().to(list))
        .service(
            web::resource("/api/v1/interactions/{case}")
                .route(web::get().to(show))
                .route(web::patch().to(patch)),
        )
        .route("/api/v1/interactions/{case}/assign", web::post().to(assign))
        .route("/api/v1/interactions/{case}/replies", web::post().to(reply))
        .route(
            "/api/v1/interactions/{case}/resolve",
            web::post().to(resolve),
        )
        .route("/api/v1/interactions/{case}/end", web::post().to(end))
        .route(
            "/api/v1/interactions/{case}/transfer",
            web::post().to(transfer),
        )
        .route(
            "/api/v1/interactions/{case}/contact",
            web::get().to(contact),
        )
        .route("/api/v1/interactions/{case}/typing", web::post().to(typing))
        .route("/api/v1/contacts/{id}/notes", web::put().to(put_notes))
        .route("/api/v1/outbound/sms", web::post().to(outbound_sms))
        .route("/api/v1/outbound/email", web::post().to(outbound_email))
        .route("/api/v1/sms/preview", web::post().to(sms_preview))
        .route("/api/v1/attachments/{id}", web::get().to(attachment))
        .route(
            "/api/v1/attachments/{id}/retry",
            web::post().to(retry_attachment),
        )
        .route(
            "/api/v1/events",
            web::get().to(crate::http::ops::agent_events),
        )
        .route(
            "/api/v1/routing/events",
            web::get().to(crate::http::ops::routing_events),
        )
        .route(
            "/api/v1/channels/{channel_id}/quarantine",
            web::get().to(crate::http::ops::quarantine),
        )
        .route(
            "/api/v1/channels/{channel_id}/quarantine/{blob}",
            web::get().to(crate::http::ops::quarantined_message),
        )
        .service(
            web::resource("/agent/session")
                .route(web::post().to(sign_in))
                .route(web::delete().to(sign_out)),
        );
}

fn case_number(raw: &str) -> ApiResult<u64> {
    raw.parse()
        .map_err(|_| ApiError::not_found(format!("no interaction {raw}")))
}

/// Parses an optional JSON object body; an empty body is `{}`.
fn json_body(body: &[u8]) -> ApiResult<Value> {
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

fn opt_str(v: &Value, key: &str) -> ApiResult<Option<String>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::validation(key, format!("{key} must be a string"))),
    }
}

fn agent_config<'a>(state: &'a State, actor: &Actor) -> Option<&'a crate::config::AgentConfig> {
    state
        .gateway
        .settings
        .agents
        .iter()
        .find(|a| a.id == actor.id())
}

async fn me(state: web::Data<State>, Caller(actor): Caller) -> ApiResult<HttpResponse> {
    let g = &state.gateway;
    let Some(agent) = agent_config(&state, &actor) else {
        return Ok(HttpResponse::Ok().json(json!({"id": actor.id(), "service": true})));
    };
    let unread = g.unread(&actor).await?;
    let queues: Vec<Value> = agent
        .queues
        .iter()
        .filter_map(|q| g.settings.queue(q))
        .map(|q| json!({"id": q.id, "name": q.name, "kind": q.kind}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "id": agent.id, "name": agent.name, "queues": queues,
        "can_transfer": agent.can_transfer,
        "unread": unread.count,
        "mine_unread": unread.mine,
    })))
}

async fn queues(state: web::Data<State>, Caller(actor): Caller) -> ApiResult<HttpResponse> {
    let mine = state.gateway.visible_queues(&actor);
    let items: Vec<Value> = state
        .gateway
        .settings
        .queues
        .iter()
        .map(
            |q| json!({"id": q.id, "name": q.name, "kind": q.kind, "member": mine.contains(&q.id)}),
        )
        .collect();
    Ok(HttpResponse::Ok().json(json!({"items": items})))
}

async fn channels(state: web::Data<State>, Caller(_): Caller) -> ApiResult<HttpResponse> {
    let mut items = vec![];
    for c in &state.gateway.settings.channels {
        let m = manifest::get(c.kind);
        items.push(json!({
            "id": c.id, "kind": c.kind, "name": c.name, "queue": c.queue,
            "health": state.gateway.channel_health(&c.id).await,
            "capabilities": {"emoji": m.emoji, "text": m.text, "attachments": m.attachments, "window": m.window,
                "max_attachment_bytes": m.attachments.max_bytes.unwrap_or(MAX_ATTACHMENT_BYTES).min(MAX_ATTACHMENT_BYTES)},
        }));
    }
    Ok(HttpResponse::Ok().json(json!({"items": items})))
}

async fn tags(state: web::Data<State>, Caller(actor): Caller) -> ApiResult<HttpResponse> {
    let tags = state.gateway.tags(&actor).await?;
    Ok(HttpResponse::Ok().json(json!({"items": tags})))
}

fn list_query(req: &HttpRequest) -> ApiResult<ListQuery> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(req.query_string())
        .map_err(|e| ApiError::malformed(format!("the query string could not be read: {e}")))?;
    let mut q = ListQuery::default();
    for (k, v) in pairs {
        match k.as_str() {
            "queue" => q.queue = Some(v),
            "tag" => q.tags.push(v),
            "view" => {
                if !["queue", "mine", "all"].contains(&v.as_str()) {
                    return Err(ApiError::validation("view", "view is queue, mine or all"));
                }
                q.view = v
            }
            "status" => {
                q.status = Some(Status::parse(&v).ok_or_else(|| {
                    ApiError::validation("status", "status is new, open or resolved")
                })?)
            }
            "sort" => {
                if !["received", "priority", "channel"].contains(&v.as_str()) {
                    return Err(ApiError::validation(
                        "sort",
                        "sort is received, priority or channel",
                    ));
                }
                q.sort = v
            }
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=500).contains(n))
                    .ok_or_else(|| {
                        ApiError::validation("limit", "limit is a number from 1 to 500")
                    })?
            }
            "cursor" => q.cursor = Some(v),
            _ => {}
        }
    }
    Ok(q)
}

async fn list(
    state: web::Data<State>,
    Caller(actor): Caller,
    req: HttpRequest,
) -> ApiResult<HttpResponse> {
    let q = list_query(&req)?;
    let (items, next) = state.gateway.list(&actor, &q).await?;
    let now = Utc::now();
    let items: Vec<Value> = items
        .iter()
        .map(
            |Listed {
                 interaction: i,
                 last_message,
             }| {
                let mut v = i.to_api(Some(actor.id()), state.gateway.window(i, now));
                // The list carries the latest message as a preview, not the
                // whole thread (the store left the others out), shown as the
                // thread shows it.
                v["last_message"] = json!(last_message.as_deref().map(Message::public_view));
                v
            },
        )
        .collect();
    Ok(HttpResponse::Ok().json(json!({"items": items, "next_cursor": next})))
}

async fn show(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let i = state.gateway.visible(&actor, case_number(&path)?).await?;
    Ok(HttpResponse::Ok().json(i.to_api(Some(actor.id()), state.gateway.window(&i, Utc::now()))))
}

fn answer(state: &State, actor: &Actor, i: &crate::domain::Interaction) -> HttpResponse {
    HttpResponse::Ok().json(i.to_api(Some(actor.id()), state.gateway.window(i, Utc::now())))
}

async fn patch(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let v = json_body(&body)?;
    let i = state
        .gateway
        .update(&actor, case_number(&path)?, &v)
        .await?;
    Ok(answer(&state, &actor, &i))
}

async fn assign(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let v = json_body(&body)?;
    let agent = opt_str(&v, "agent")?;
    let i = state
        .gateway
        .assign(&actor, case_number(&path)?, agent.as_deref())
        .await?;
    Ok(answer(&state, &actor, &i))
}

async fn resolve(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let i = state.gateway.resolve(&actor, case_number(&path)?).await?;
    Ok(answer(&state, &actor, &i))
}

async fn end(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let v = json_body(&body)?;
    let d = v.get("disposition").cloned().unwrap_or(json!({}));
    if !d.is_object() {
        return Err(ApiError::validation(
            "disposition",
            "disposition must be an object",
        ));
    }
    let i = state
        .gateway
        .end(
            &actor,
            case_number(&path)?,
            opt_str(&d, "related_name")?,
            opt_str(&d, "related_case")?,
            opt_str(&d, "notes")?,
        )
        .await?;
    Ok(answer(&state, &actor, &i))
}

async fn transfer(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let v = json_body(&body)?;
    let queue = opt_str(&v, "queue")?
        .ok_or_else(|| ApiError::validation("queue", "name the queue to transfer to"))?;
    let i = state
        .gateway
        .transfer(&actor, case_number(&path)?, &queue)
        .await?;
    Ok(answer(&state, &actor, &i))
}

async fn typing(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let v = json_body(&body)?;
    let on = match v.get("state").and_then(|s| s.as_str()).unwrap_or("on") {
        "on" => true,
        "off" => false,
        _ => return Err(ApiError::validation("state", "state is on or off")),
    };
    state
        .gateway
        .agent_typing(&actor, case_number(&path)?, on)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn contact(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(
        state
            .gateway
            .contact_details(&actor, case_number(&path)?)
            .await?,
    ))
}

async fn put_notes(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let v = json_body(&body)?;
    let notes = opt_str(&v, "notes")?.unwrap_or_default();
    if notes.len() > 64 * 1024 {
        return Err(ApiError::validation("notes", "notes are at most 64 KiB"));
    }
    state.gateway.put_notes(&actor, &path, &notes).await?;
    Ok(HttpResponse::Ok().json(json!({"contact_id": path.into_inner(), "notes": notes})))
}

/// A request body as fields and files: JSON, or multipart (files under `attachments`).
struct Form {
    fields: Value,
    uploads: Vec<Upload>,
}

async fn read_form(req: &HttpRequest, payload: web::Payload, file_field: &str) -> ApiResult<Form> {
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if !ct.starts_with("multipart/form-data") {
        let body = super::webhooks::read_limited(req, payload, 1024 * 1024).await?;
        return Ok(Form {
            fields: json_body(&body)?,
            uploads: vec![],
        });
    }
    let mut mp = Multipart::new(req.headers(), payload);
    let mut fields = serde_json::Map::new();
    let mut uploads = vec![];
    while let Some(field) = mp.next().await {
        let mut field = field.map_err(|e| {
            ApiError::malformed(format!("the multipart body could not be read: {e}"))
        })?;
        let name = field.name().unwrap_or("").to_string();
        let filename = field
            .content_disposition()
            .and_then(|cd| cd.get_filename())
            .map(str::to_string);
        let content_type = field
            .content_type()
            .map(|m| m.essence_str().to_string())
            .unwrap_or_else(|| "application/octet-stream".into());
        let is_file = name == file_field || filename.is_some();
        let cap = if is_file {
            MAX_ATTACHMENT_BYTES as usize
        } else {
            1024 * 1024
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::malformed(format!("the multipart body could not be read: {e}"))
            })?;
            if bytes.len() + chunk.len() > cap {
                return Err(if is_file {
                    ApiError::new(
                        413,
                        "attachment_too_large",
                        format!(
                            "{} is larger than {} bytes",
                            filename.unwrap_or(name),
                            MAX_ATTACHMENT_BYTES
                        ),
                    )
                } else {
                    ApiError::too_large(format!("field {name} is larger than 1 MiB"))
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if is_file {
            uploads.push(Upload {
                filename: filename.unwrap_or_else(|| "attachment".into()),
                content_type,
                bytes,
            });
        } else {
            let text = String::from_utf8(bytes)
                .map_err(|_| ApiError::malformed(format!("field {name} is not UTF-8")))?;
            fields.insert(name, Value::String(text));
        }
    }
    Ok(Form {
        fields: Value::Object(fields),
        uploads,
    })
}

async fn reply(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    let case = case_number(&path)?;
    let form = read_form(&req, payload, "attachments").await?;
    let text = opt_str(&form.fields, "text")?.unwrap_or_default();
    let html = opt_str(&form.fields, "html")?;
    let reply_to = opt_str(&form.fields, "reply_to")?;
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 255) {
        return Err(ApiError::validation(
            "Idempotency-Key",
            "1 to 255 characters",
        ));
    }
    let (i, msg) = state
        .gateway
        .reply(
            &actor,
            case,
            &text,
            html.as_deref(),
            &form.uploads,
            key.as_deref(),
            reply_to.as_deref(),
        )
        .await?;
    Ok(HttpResponse::Accepted()
        .json(json!({"case_number": i.case_number, "message": msg, "status": msg.status})))
}

async fn outbound(
    state: &State,
    actor: &Actor,
    kind: QueueKind,
    form: Form,
) -> ApiResult<HttpResponse> {
    let f = &form.fields;
    let channel = opt_str(f, "channel")?
        .ok_or_else(|| ApiError::validation("channel", "pick the sending channel"))?;
    let to = opt_str(f, "to")?.ok_or_else(|| ApiError::validation("to", "give the recipient"))?;
    let text = opt_str(f, "text")?.unwrap_or_default();
    let html = opt_str(f, "html")?;
    let subject = opt_str(f, "subject")?;
    if kind == QueueKind::OutboundEmail && subject.as_deref().unwrap_or("").trim().is_empty() {
        return Err(ApiError::validation("subject", "give a subject"));
    }
    let contact = match f.get("contact") {
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|_| ApiError::validation("contact", "contact must be a JSON object"))?,
        Some(v @ Value::Object(_)) => v.clone(),
        None | Some(Value::Null) => json!({}),
        Some(_) => return Err(ApiError::validation("contact", "contact must be an object")),
    };
    let (i, msg) = state
        .gateway
        .start_outbound(
            actor,
            crate::gateway::OutboundRequest {
                queue_kind: kind,
                channel_id: &channel,
                to: &to,
                text: &text,
                html: html.as_deref(),
                subject,
                uploads: &form.uploads,
                contact: &contact,
            },
        )
        .await?;
    Ok(HttpResponse::Accepted().json(json!({
        "case_number": i.case_number, "interaction": i.to_api(Some(actor.id()), None),
        "message": msg, "status": msg.status,
    })))
}

async fn outbound_sms(
    state: web::Data<State>,
    Caller(actor): Caller,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    let form = read_form(&req, payload, "attachments").await?;
    outbound(&state, &actor, QueueKind::OutboundSms, form).await
}

async fn outbound_email(
    state: web::Data<State>,
    Caller(actor): Caller,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    let form = read_form(&req, payload, "attachments").await?;
    outbound(&state, &actor, QueueKind::OutboundEmail, form).await
}

async fn sms_preview(Caller(_): Caller, body: web::Bytes) -> ApiResult<HttpResponse> {
    let v = json_body(&body)?;
    let text = opt_str(&v, "text")?.unwrap_or_default();
    Ok(HttpResponse::Ok().json(crate::adapters::sms::segments::analyze(&text)))
}

async fn attachment(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let g = &state.gateway;
    let target = g
        .store
        .lookup(&format!("att:{path}"))
        .await?
        .and_then(|v| parse_target(&v))
        .ok_or_else(|| ApiError::not_found(format!("no attachment {path}")))?;
    let i = g.visible(&actor, target.0).await?;
    // An email's raw message is downloadable like its attachments.
    let att = i
        .messages
        .iter()
        .flat_map(|m| m.attachments.iter().chain(m.raw.as_deref()))
        .find(|a| a.id == *path)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no attachment {path}")))?;
    let bytes = g.store.blob(&att.id).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "attachment {path} has no stored content ({})",
            att.state
        ))
    })?;
    Ok(super::file_response(
        bytes,
        &att.content_type,
        &att.filename,
    ))
}

async fn retry_attachment(
    state: web::Data<State>,
    Caller(actor): Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let a = state.gateway.retry_attachment(&actor, &path).await?;
    Ok(HttpResponse::Ok().json(
        json!({"id": a.id, "filename": a.filename, "content_type": a.content_type,
        "size": a.size, "state": a.state, "error": a.error}),
    ))
}

/// `GET /media/{token}`: what providers fetch for outbound media.
pub async fn public_media(
    state: web::Data<State>,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let g = &state.gateway;
    let (case, att_id) = g
        .verify_media_token(&path, Utc::now())
        .ok_or_else(|| ApiError::not_found("this link is not valid or has expired"))?;
    let i = g
        .store
        .interaction(case)
        .await?
        .ok_or_else(|| ApiError::not_found("this link is not valid or has expired"))?;
    let att = i
        .messages
        .iter()
        .flat_map(|m| m.attachments.iter())
        .find(|a| a.id == att_id)
        .cloned()
        .ok_or_else(|| ApiError::not_found("this link is not valid or has expired"))?;
    let bytes = g
        .store
        .blob(&att.id)
        .await?
        .ok_or_else(|| ApiError::not_found("this link is not valid or has expired"))?;
    Ok(super::file_response(
        bytes,
        &att.content_type,
        &att.filename,
    ))
}

async fn sign_in(state: web::Data<State>, body: web::Bytes) -> ApiResult<HttpResponse> {
    let v = json_body(&body)?;
    let token =
        opt_str(&v, "token")?.ok_or_else(|| ApiError::validation("token", "give your token"))?;
    let Some(actor @ Actor::Agent(_)) = state.tokens.actor(&token) else {
        return Err(ApiError::unauthorized("the token is not valid"));
    };
    let cookie = Cookie::build(SESSION_COOKIE, token)
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .max_age(actix_web::cookie::time::Duration::hours(12))
        .finish();
    Ok(HttpResponse::Ok()
        .cookie(cookie)
        .json(json!({"id": actor.id()})))
}

async fn sign_out() -> HttpResponse {
    let mut cookie = Cookie::build(SESSION_COOKIE, "")
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .finish();
    cookie.make_removal();
    HttpResponse::NoContent().cookie(cookie).finish()
}

/// Long-poll helper shared by the routing feed.
pub fn wait_duration(q: &HashMap<String, String>) -> ApiResult<Duration> {
    match q.get("wait") {
        None => Ok(Duration::ZERO),
        Some(w) => w
            .parse::<u64>()
            .ok()
            .filter(|s| *s <= 60)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                ApiError::validation("wait", "wait is a number of seconds from 0 to 60")
            }),
    }
}

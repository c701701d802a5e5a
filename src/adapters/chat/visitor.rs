//! The visitor's side of web chat, over the gateway: sessions, messages,
//! uploads, the visitor's timeline and the follower that tells a socket what
//! to push. The HTTP and WebSocket routes (`http/chat.rs`) only parse and
//! answer; the rules are here.
//!
//! The timeline is every message of the visitor's contact on the channel,
//! interaction after interaction, oldest first; a message's `seq` is its
//! 1-based position in it (with one interaction, its position in the
//! interaction's `messages`). Messages are only ever appended, so a `seq`
//! never changes and `resume` after `N` replays exactly what was missed.

use super::{
    rate_limiter, token_digest, upload_media_id, verify_identifier, ChatSession, ChatSettings,
    ChatUpload, IDENTITY_TS_SKEW_SECS,
};
use crate::adapters::{Inbound, InboundMessage, MediaRef};
use crate::domain::{
    contact_key, new_id, new_secret, ChannelKind, DigitalId, EmailAddress, Event, Message,
};
use crate::gateway::{parse_target, Gateway, GatewayError};
use crate::manifest;
use crate::store::StoreError;
use chrono::Utc;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

/// Most attachments on one visitor message.
pub const MAX_ATTACHMENTS_PER_MESSAGE: usize = 10;

/// A refusal of the visitor's side, with the problem code it answers with.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("{code}: {detail}")]
    Problem {
        status: u16,
        code: &'static str,
        detail: String,
        field: Option<String>,
        retry_after: Option<u64>,
    },
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> ChatError {
        ChatError::Gateway(e.into())
    }
}

impl ChatError {
    pub fn problem(status: u16, code: &'static str, detail: impl Into<String>) -> ChatError {
        ChatError::Problem {
            status,
            code,
            detail: detail.into(),
            field: None,
            retry_after: None,
        }
    }
    pub fn validation(field: &str, detail: impl Into<String>) -> ChatError {
        ChatError::Problem {
            status: 422,
            code: "validation_failed",
            detail: detail.into(),
            field: Some(field.to_string()),
            retry_after: None,
        }
    }
    pub fn unauthorized(detail: impl Into<String>) -> ChatError {
        ChatError::problem(401, "unauthorized", detail)
    }
    fn rate_limited(retry_after: u64) -> ChatError {
        ChatError::Problem {
            status: 429,
            code: "rate_limited",
            detail: format!("too many messages; try again in {retry_after} s"),
            field: None,
            retry_after: Some(retry_after),
        }
    }
}

pub type ChatResult<T> = Result<T, ChatError>;

/// What `POST /chat/{channel}/sessions` takes.
#[derive(Debug, Clone, Default)]
pub struct SessionRequest {
    pub name: Option<String>,
    pub email: Option<String>,
    pub identifier: Option<String>,
    pub identifier_hash: Option<String>,
    /// Unix seconds of a time-bound hash, `HMAC(secret, identifier + "." + ts)`.
    pub identifier_ts: Option<i64>,
}

/// A session and the token that proves it; `resumed` when the token was given back.
#[derive(Debug, Clone)]
pub struct SessionGrant {
    pub session: ChatSession,
    pub token: String,
    pub resumed: bool,
}

fn session_key(id: &str) -> String {
    format!("chat-session:{id}")
}

fn token_key(token: &str) -> String {
    format!("chat-token:{}", token_digest(token))
}

fn upload_key(id: &str) -> String {
    format!("chat-upload:{id}")
}

/// The session a token proves, on this channel.
pub async fn session_by_token(
    g: &Gateway,
    channel_id: &str,
    token: &str,
) -> ChatResult<Option<ChatSession>> {
    let token = token.trim();
    if token.is_empty() || token.len() > 200 {
        return Ok(None);
    }
    let Some(raw) = g.store.kv_get(&token_key(token)).await? else {
        return Ok(None);
    };
    let session: ChatSession = match serde_json::from_str(&raw) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    Ok((session.channel_id == channel_id).then_some(session))
}

/// The session a token proves, or 401.
pub async fn require_session(
    g: &Gateway,
    channel_id: &str,
    token: Option<&str>,
) -> ChatResult<ChatSession> {
    let Some(token) = token else {
        return Err(ChatError::unauthorized(
            "send the session token (Authorization: Bearer <token>)",
        ));
    };
    session_by_token(g, channel_id, token)
        .await?
        .ok_or_else(|| ChatError::unauthorized("the session token is not valid"))
}

fn clean_opt(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// The identifier a request proves, if any. A wrong hash is refused; an
/// identifier without a hash (or without a configured secret) proves nothing,
/// so it can never join the verified visitor's history.
fn verified_identifier(
    settings: &ChatSettings,
    req: &SessionRequest,
) -> ChatResult<Option<String>> {
    let (Some(id), Some(hash)) = (&req.identifier, &req.identifier_hash) else {
        return Ok(None);
    };
    let Some(secret) = &settings.identity_secret else {
        return Ok(None);
    };
    let parsed = DigitalId::parse(ChannelKind::Chat, id)
        .map_err(|e| ChatError::validation("identifier", e))?;
    if parsed.as_str() != id {
        return Err(ChatError::validation(
            "identifier",
            "the identifier has leading or trailing spaces",
        ));
    }
    let message = match req.identifier_ts {
        None => id.clone(),
        Some(ts) => {
            if (Utc::now().timestamp() - ts).abs() > IDENTITY_TS_SKEW_SECS {
                return Err(ChatError::problem(
                    401,
                    "invalid_signature",
                    "identifier_ts is more than 5 minutes off",
                ));
            }
            format!("{id}.{ts}")
        }
    };
    if !verify_identifier(secret, &message, hash) {
        return Err(ChatError::problem(
            401,
            "invalid_signature",
            "identifier_hash does not match the identifier",
        ));
    }
    Ok(Some(id.clone()))
}

/// Opens a session, or resumes the one `token` proves (a page reload).
pub async fn create_session(
    g: &Gateway,
    settings: &ChatSettings,
    channel_id: &str,
    req: SessionRequest,
    token: Option<&str>,
) -> ChatResult<SessionGrant> {
    let name = clean_opt(req.name.clone());
    if name.as_ref().is_some_and(|n| n.chars().count() > 200) {
        return Err(ChatError::validation("name", "at most 200 characters"));
    }
    let email = match clean_opt(req.email.clone()) {
        Some(e) => Some(
            EmailAddress::parse(&e)
                .map_err(|e| ChatError::validation("email", e.to_string()))?
                .as_str()
                .to_string(),
        ),
        None => None,
    };
    let verified = verified_identifier(settings, &req)?;
    if let Some(token) = token {
        let session = session_by_token(g, channel_id, token)
            .await?
            .ok_or_else(|| ChatError::unauthorized("the session token is not valid"))?;
        // A visitor who has since signed in as someone else gets a session of their own.
        let same_person = match &verified {
            Some(id) => session.verified && session.digital_id == *id,
            None => true,
        };
        if same_person {
            return Ok(SessionGrant {
                session,
                token: token.trim().to_string(),
                resumed: true,
            });
        }
    }
    let session_id = new_id();
    let session = ChatSession {
        digital_id: verified.clone().unwrap_or_else(|| session_id.clone()),
        session_id,
        channel_id: channel_id.to_string(),
        verified: verified.is_some(),
        name,
        email,
        created_at: Utc::now(),
    };
    let token = new_secret();
    let raw = serde_json::to_string(&session).expect("a session serializes");
    g.store
        .kv_set(&session_key(&session.session_id), &raw)
        .await?;
    g.store.kv_set(&token_key(&token), &raw).await?;
    Ok(SessionGrant {
        session,
        token,
        resumed: false,
    })
}

/// A message from the visitor.
#[derive(Debug, Clone, Default)]
pub struct VisitorMessage {
    /// The widget's ID of the message; a resend with the same one is not a duplicate.
    pub client_message_id: Option<String>,
    pub text: String,
    /// Upload IDs.
    pub attachments: Vec<String>,
}

/// What the gateway answers a stored message with.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    pub client_message_id: String,
    pub message_id: String,
    pub seq: usize,
}

impl Ack {
    pub fn frame(&self) -> Value {
        json!({"type": "ack", "client_message_id": self.client_message_id,
            "message_id": self.message_id, "seq": self.seq})
    }
}

fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

/// Stores a visitor's message (once per client message ID) and answers its ack.
pub async fn send_message(
    g: &Gateway,
    settings: &ChatSettings,
    session: &ChatSession,
    msg: VisitorMessage,
) -> ChatResult<Ack> {
    let channel_id = &session.channel_id;
    let client_id = match msg.client_message_id {
        Some(id) if valid_client_id(&id) => id,
        Some(_) => {
            return Err(ChatError::validation(
                "client_message_id",
                "1 to 100 letters, digits, -, _, . or :",
            ))
        }
        None => new_id(),
    };
    let provider_id = format!("{}:{client_id}", session.session_id);
    let claim = format!("msg:{channel_id}:{provider_id}");
    // A resend of a stored message is answered as before, and costs nothing.
    if let Some(ack) = ack_for(g, session, &claim, &client_id).await? {
        return Ok(ack);
    }
    let m = manifest::get(ChannelKind::Chat);
    if msg.text.trim().is_empty() && msg.attachments.is_empty() {
        return Err(ChatError::validation(
            "text",
            "write a message or attach a file",
        ));
    }
    if let Some(max) = m.text.max_chars {
        let n = msg.text.chars().count();
        if n > max {
            return Err(ChatError::validation(
                "text",
                format!("{n} characters; at most {max}"),
            ));
        }
    }
    if msg.attachments.len() > MAX_ATTACHMENTS_PER_MESSAGE {
        return Err(ChatError::validation(
            "attachments",
            format!("at most {MAX_ATTACHMENTS_PER_MESSAGE} files per message"),
        ));
    }
    let mut media = vec![];
    for id in &msg.attachments {
        let upload = upload_of(g, session, id)
            .await?
            .ok_or_else(|| ChatError::validation("attachments", format!("no upload {id}")))?;
        media.push(MediaRef {
            url: String::new(),
            content_type: Some(upload.content_type),
            filename: Some(upload.filename),
            media_id: Some(upload_media_id(&upload.id)),
        });
    }
    rate_limiter()
        .check(
            &format!("msg:{}", session.session_id),
            settings.messages_per_minute,
            Instant::now(),
        )
        .map_err(ChatError::rate_limited)?;
    let item = Inbound::Message(InboundMessage {
        provider_id,
        from: session.digital_id.clone(),
        contact_name: session.name.clone(),
        text: msg.text,
        sent_at: Utc::now(),
        media,
        ..InboundMessage::default()
    });
    g.receive_direct(channel_id, vec![item]).await?;
    ack_for(g, session, &claim, &client_id)
        .await?
        .ok_or_else(|| {
            ChatError::Gateway(GatewayError::Store(StoreError::Unavailable(
                "the message was stored but cannot be found yet; send it again".into(),
            )))
        })
}

async fn ack_for(
    g: &Gateway,
    session: &ChatSession,
    claim: &str,
    client_id: &str,
) -> ChatResult<Option<Ack>> {
    let Some((_, message_id)) = g.store.lookup(claim).await?.and_then(|v| parse_target(&v)) else {
        return Ok(None);
    };
    let t = timeline(g, session).await?;
    let seq = t
        .iter()
        .position(|m| m.id == message_id)
        .map(|p| p + 1)
        .unwrap_or(0);
    Ok(Some(Ack {
        client_message_id: client_id.to_string(),
        message_id,
        seq,
    }))
}

/// The visitor is typing (`on`) or stopped; agents see it live.
pub async fn typing(g: &Gateway, session: &ChatSession, on: bool) -> ChatResult<()> {
    g.receive_direct(
        &session.channel_id,
        vec![Inbound::Typing {
            from: session.digital_id.clone(),
            on,
        }],
    )
    .await?;
    Ok(())
}

/// Every message of the visitor's contact on the channel, oldest first.
pub async fn timeline(g: &Gateway, session: &ChatSession) -> Result<Vec<Message>, StoreError> {
    let key = contact_key(ChannelKind::Chat, &session.channel_id, &session.digital_id);
    let Some(contact) = g.store.contact(&key).await? else {
        return Ok(vec![]);
    };
    let mut out = vec![];
    for case in &contact.cases {
        if let Some(i) = g.store.interaction(*case).await? {
            if i.channel_id == session.channel_id {
                out.extend(i.messages.into_iter().map(Arc::unwrap_or_clone));
            }
        }
    }
    Ok(out)
}

/// A message as the visitor sees it: no provider IDs, no delivery internals.
pub fn message_json(g: &Gateway, m: &Message, seq: usize) -> Value {
    let author_name = m.author.as_deref().and_then(|a| {
        g.settings
            .agents
            .iter()
            .find(|x| x.id == a)
            .map(|x| x.name.clone())
    });
    let attachments: Vec<Value> = m
        .attachments
        .iter()
        .map(|a| {
            json!({"id": a.id, "filename": a.filename, "content_type": a.content_type,
                "size": a.size, "state": a.state})
        })
        .collect();
    json!({
        "id": m.id, "seq": seq, "direction": m.direction, "text": m.text,
        "attachments": attachments, "sent_at": m.sent_at, "author": m.author,
        "author_name": author_name, "status": m.status,
    })
}

/// Stores an upload of the visitor's; the caller has capped its size.
pub async fn store_upload(
    g: &Gateway,
    settings: &ChatSettings,
    session: &ChatSession,
    filename: &str,
    content_type: &str,
    bytes: &[u8],
) -> ChatResult<ChatUpload> {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if ct.is_empty() || !manifest::type_allowed(&settings.attachment_types, &ct) {
        return Err(ChatError::problem(
            415,
            "unsupported_media_type",
            format!("{filename} ({ct}) is not a type this chat accepts"),
        ));
    }
    if bytes.is_empty() {
        return Err(ChatError::validation("file", "the file is empty"));
    }
    rate_limiter()
        .check(
            &format!("upload:{}", session.session_id),
            settings.messages_per_minute,
            Instant::now(),
        )
        .map_err(ChatError::rate_limited)?;
    let upload = ChatUpload {
        id: new_id(),
        session_id: session.session_id.clone(),
        channel_id: session.channel_id.clone(),
        filename: filename.to_string(),
        content_type: ct,
        size: bytes.len() as u64,
        created_at: Utc::now(),
    };
    g.put_file("chat_visitor", &upload.id, bytes).await?;
    g.store
        .kv_set(
            &upload_key(&upload.id),
            &serde_json::to_string(&upload).expect("an upload serializes"),
        )
        .await?;
    Ok(upload)
}

/// An upload by ID, on its channel (whoever made it).
pub async fn upload_by_id(
    g: &Gateway,
    channel_id: &str,
    id: &str,
) -> ChatResult<Option<ChatUpload>> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Ok(None);
    }
    let Some(raw) = g.store.kv_get(&upload_key(id)).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_str::<ChatUpload>(&raw)
        .ok()
        .filter(|u| u.channel_id == channel_id))
}

/// An upload of this session's.
async fn upload_of(g: &Gateway, session: &ChatSession, id: &str) -> ChatResult<Option<ChatUpload>> {
    Ok(upload_by_id(g, &session.channel_id, id)
        .await?
        .filter(|u| u.session_id == session.session_id))
}

/// A file the visitor may download: one of their uploads, or an attachment
/// of a message of their own timeline (theirs or the agent's).
pub struct VisitorFile {
    pub bytes: Vec<u8>,
    pub content_type: String,
    pub filename: String,
}

pub async fn file_for(
    g: &Gateway,
    session: &ChatSession,
    id: &str,
) -> ChatResult<Option<VisitorFile>> {
    if let Some(u) = upload_of(g, session, id).await? {
        return Ok(g.store.blob(&u.id).await?.map(|bytes| VisitorFile {
            bytes,
            content_type: u.content_type,
            filename: u.filename,
        }));
    }
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Ok(None);
    }
    let Some((case, _)) = g
        .store
        .lookup(&format!("att:{id}"))
        .await?
        .and_then(|v| parse_target(&v))
    else {
        return Ok(None);
    };
    let Some(i) = g.store.interaction(case).await? else {
        return Ok(None);
    };
    if i.channel_id != session.channel_id || i.digital_id != session.digital_id {
        return Ok(None);
    }
    let Some(att) = i
        .messages
        .iter()
        .flat_map(|m| m.attachments.iter())
        .find(|a| a.id == id)
        .cloned()
    else {
        return Ok(None);
    };
    Ok(g.store.blob(&att.id).await?.map(|bytes| VisitorFile {
        bytes,
        content_type: att.content_type,
        filename: att.filename,
    }))
}

/// What an event means for one visitor's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relevance {
    None,
    /// Their timeline may have grown: push what they have not seen.
    Sync,
    /// The agent is typing (or stopped).
    Typing(bool),
}

/// Follows the store's events for one visitor's socket and knows what it has pushed.
pub struct Follower {
    pub session: ChatSession,
    /// The highest `seq` pushed (or that the visitor said it has).
    pub last_sent: usize,
    mine: HashSet<u64>,
    not_mine: HashSet<u64>,
}

impl Follower {
    pub fn new(session: ChatSession, last_sent: usize) -> Follower {
        Follower {
            session,
            last_sent,
            mine: HashSet::new(),
            not_mine: HashSet::new(),
        }
    }

    /// Whether an interaction is this visitor's (remembered: interactions never change hands).
    async fn is_mine(&mut self, g: &Gateway, case: u64) -> bool {
        if self.mine.contains(&case) {
            return true;
        }
        if self.not_mine.contains(&case) {
            return false;
        }
        match g.store.interaction(case).await {
            Ok(Some(i)) => {
                let mine = i.channel_id == self.session.channel_id
                    && i.digital_id == self.session.digital_id;
                if mine {
                    self.mine.insert(case);
                } else {
                    if self.not_mine.len() > 50_000 {
                        self.not_mine.clear();
                    }
                    self.not_mine.insert(case);
                }
                mine
            }
            _ => false,
        }
    }

    pub async fn classify(&mut self, g: &Gateway, e: &Event) -> Relevance {
        if e.channel_id().as_deref() != Some(self.session.channel_id.as_str()) {
            return Relevance::None;
        }
        let wanted = match e.kind.as_str() {
            "message.received"
            | "message.sent"
            | "interaction.resolved"
            | "message.updated"
            | "interaction.created" => Relevance::Sync,
            "interaction.typing" if e.data_str("who").as_deref() == Some("agent") => {
                Relevance::Typing(e.data_str("state").as_deref() == Some("on"))
            }
            _ => return Relevance::None,
        };
        if self.is_mine(g, e.case_number).await {
            wanted
        } else {
            Relevance::None
        }
    }

    /// The `message` frames the visitor has not had yet, in order.
    pub async fn catch_up(&mut self, g: &Gateway) -> Result<Vec<Value>, StoreError> {
        let t = timeline(g, &self.session).await?;
        let frames = t
            .iter()
            .enumerate()
            .skip(self.last_sent)
            .map(|(i, m)| json!({"type": "message", "message": message_json(g, m, i + 1)}))
            .collect();
        self.last_sent = self.last_sent.max(t.len());
        Ok(frames)
    }
}

//! Who is calling: agents and services by bearer token (or the agent
//! session cookie), compared in constant time against SHA-256 digests.

use super::problem::ApiError;
use super::State;
use crate::config::Settings;
use crate::domain::Actor;
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use sha2::{Digest, Sha256};
use std::future::{ready, Ready};
use subtle::ConstantTimeEq;

pub const SESSION_COOKIE: &str = "sb_session";

pub struct Tokens {
    entries: Vec<([u8; 32], Actor)>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    pub fn from_settings(s: &Settings) -> Tokens {
        let mut entries = vec![];
        let mut add = |sha: &Option<String>, plain: &Option<String>, actor: Actor| {
            let d = match (sha, plain) {
                (Some(h), _) => hex::decode(h)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok()),
                (None, Some(p)) => Some(digest(p)),
                _ => None,
            };
            if let Some(d) = d {
                entries.push((d, actor));
            }
        };
        for a in &s.agents {
            add(&a.token_sha256, &a.token, Actor::Agent(a.id.clone()));
        }
        for sv in &s.services {
            add(&sv.token_sha256, &sv.token, Actor::Service(sv.id.clone()));
        }
        Tokens { entries }
    }

    /// The actor a token belongs to. Every entry is compared, in constant time.
    pub fn actor(&self, token: &str) -> Option<Actor> {
        let d = digest(token);
        let mut found = None;
        for (entry, actor) in &self.entries {
            if bool::from(entry.ct_eq(&d)) {
                found = Some(actor.clone());
            }
        }
        found
    }
}

/// The caller of an agent or service route.
pub struct Caller(pub Actor);

pub fn presented_token(req: &HttpRequest) -> Option<String> {
    if let Some(h) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        return h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .map(|t| t.trim().to_string());
    }
    req.cookie(SESSION_COOKIE).map(|c| c.value().to_string())
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req
            .app_data::<web::Data<State>>()
            .expect("state is registered");
        ready(match presented_token(req) {
            None => Err(ApiError::unauthorized("send Authorization: Bearer <token>")),
            Some(t) => state
                .tokens
                .actor(&t)
                .map(Caller)
                .ok_or_else(|| ApiError::unauthorized("the token is not valid")),
        })
    }
}

//! X's OAuth 2.0 user access tokens, kept fresh and shared through the store.
//!
//! X user access tokens last two hours. With `offline.access` X also issues
//! a refresh token, and every refresh answers a new access token *and a new
//! refresh token*: the old refresh token stops working. So the tokens are
//! state shared by every process of the gateway, not configuration:
//!
//! - they live in the store under the kv key `x-tokens:{channel_id}` as
//!   versioned JSON (`{"v":"V1","access_token","refresh_token","expires_at",...}`),
//!   seeded from the channel's configuration until the first refresh; after
//!   it the stored tokens win, because the configured refresh token is spent;
//! - before a send or a media download, a token that expires within
//!   [`REFRESH_BEFORE`] (or whose expiry is unknown and that was stored more
//!   than [`ASSUMED_LIFETIME`] ago) is refreshed; a token X refused (401) is
//!   refreshed once;
//! - one refresh at a time across processes: the refresher holds the store
//!   lease `x-refresh:{channel_id}` ([`LEASE`]); the others wait and re-read
//!   the kv until the new tokens appear (or the lease frees up);
//! - the refresh is `POST {api_base}/2/oauth2/token` with the form
//!   `grant_type=refresh_token&refresh_token=...&client_id=...`, HTTP Basic
//!   `client_id:client_secret` for a confidential client (none for a public
//!   one). A 4xx answer means the grant is gone: [`DeliveryError`] with
//!   `needs_reauth`, which the gateway shows as the channel's health;
//! - when the operator configures new tokens (after re-authorising), they
//!   win over the stored chain, which is tied to the configured tokens it grew
//!   from (`seed`, a hash, never the tokens themselves).
//!
//! Without `client_id` and `refresh_token` the configured `access_token` is
//! used as it is and nothing is stored.

use crate::adapters::DeliveryError;
use crate::store::DynStore;
use chrono::{DateTime, Duration as Span, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::sync::Mutex;

/// Refresh a token this long before it expires.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// How long a token whose expiry we do not know is trusted: X's two hours.
pub const ASSUMED_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);
/// How long a refresher holds the lease (longer than one token request may take).
pub const LEASE: Duration = Duration::from_secs(30);
/// How long a process waits for another one's refresh before giving up (retryable).
const WAIT_FOR_OTHERS: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
const TOKEN_TIMEOUT: Duration = Duration::from_secs(15);

/// The kv key holding a channel's tokens.
pub fn kv_key(channel_id: &str) -> String {
    format!("x-tokens:{channel_id}")
}

/// The lease a channel's refresher holds.
pub fn lease_name(channel_id: &str) -> String {
    format!("x-refresh:{channel_id}")
}

/// One generation of a channel's tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenSet {
    pub access_token: String,
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// When X said the access token expires (`expires_in` after the refresh).
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    pub stored_at: DateTime<Utc>,
    /// A hash of the configured tokens this chain grew from.
    pub seed: String,
}

/// What is persisted: versioned, so an upgrade can still read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "v")]
enum Stored {
    V1(TokenSet),
}

impl TokenSet {
    /// Whether it should be refreshed before use at `now`.
    pub fn is_stale(&self, now: DateTime<Utc>) -> bool {
        let lead = Span::from_std(REFRESH_BEFORE).unwrap_or_default();
        match self.expires_at {
            Some(at) => at - now <= lead,
            None => now - self.stored_at >= Span::from_std(ASSUMED_LIFETIME).unwrap_or_default(),
        }
    }
}

/// The OAuth 2.0 client that refreshes: `client_id`, and `client_secret`
/// for a confidential client.
#[derive(Clone)]
pub struct Client {
    pub id: String,
    pub secret: Option<String>,
}

/// A channel's access token: read, refreshed and shared through the store.
pub struct Tokens {
    store: DynStore,
    channel_id: String,
    http: reqwest::Client,
    /// `{api_base}/2/oauth2/token`.
    token_url: String,
    /// `None`: no refresh configured, the configured token is used as it is.
    client: Option<Client>,
    /// The configured tokens.
    configured: TokenSet,
    /// This instance's name on the lease.
    owner: String,
    /// One refresh at a time in this process; holds tokens that X issued but
    /// the store could not take (kept so they are not lost).
    unsaved: Mutex<Option<TokenSet>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens.
        f.debug_struct("Tokens")
            .field("channel_id", &self.channel_id)
            .field("token_url", &self.token_url)
            .field("refreshes", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a token is being refreshed.
enum Reason<'a> {
    /// It expires soon.
    Stale,
    /// X refused this one.
    Rejected(&'a str),
}

impl Reason<'_> {
    /// Whether `current` already answers it (someone else refreshed).
    fn satisfied_by(&self, current: &TokenSet, now: DateTime<Utc>) -> bool {
        match self {
            Reason::Stale => !current.is_stale(now),
            Reason::Rejected(token) => current.access_token != *token,
        }
    }
}

fn seed_of(access_token: &str, refresh_token: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(access_token.as_bytes());
    h.update([0]);
    h.update(refresh_token.unwrap_or("").as_bytes());
    hex::encode(&h.finalize()[..12])
}

fn store_failure(e: impl std::fmt::Display) -> DeliveryError {
    DeliveryError::retryable(format!("cannot read the X tokens from the store: {e}"))
}

impl Tokens {
    pub fn new(
        store: DynStore,
        channel_id: &str,
        api_base: &str,
        access_token: &str,
        refresh_token: Option<&str>,
        client: Option<Client>,
    ) -> Tokens {
        let client = client.filter(|_| refresh_token.is_some());
        Tokens {
            store,
            channel_id: channel_id.to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(TOKEN_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a client"),
            token_url: format!("{}/2/oauth2/token", api_base.trim_end_matches('/')),
            client,
            configured: TokenSet {
                access_token: access_token.to_string(),
                refresh_token: refresh_token.map(str::to_string),
                expires_at: None,
                // Its age is unknown: trusted for two hours from start-up
                // (a refused one is refreshed at once anyway).
                stored_at: Utc::now(),
                seed: seed_of(access_token, refresh_token),
            },
            owner: format!("x-{}", uuid::Uuid::new_v4().simple()),
            unsaved: Mutex::new(None),
        }
    }

    /// Whether this channel can refresh its token at all.
    pub fn can_refresh(&self) -> bool {
        self.client.is_some()
    }

    /// The access token to use now, refreshed first when it is about to expire.
    pub async fn current(&self) -> Result<String, DeliveryError> {
        if self.client.is_none() {
            return Ok(self.configured.access_token.clone());
        }
        let tokens = self.load().await?;
        let now = Utc::now();
        if !tokens.is_stale(now) {
            return Ok(tokens.access_token);
        }
        match self.refresh(Reason::Stale).await {
            // X (or the store) failed for now, but the token has minutes left: use it.
            Err(e) if e.retryable && tokens.expires_at.is_some_and(|at| at > now) => {
                tracing::warn!(channel = %self.channel_id, error = %e, "cannot refresh the X access token yet; using it until it expires");
                Ok(tokens.access_token)
            }
            other => other,
        }
    }

    /// A new access token after X refused `rejected` (401), or `None` when
    /// this channel cannot refresh. Another process may have refreshed
    /// already: then its token is answered without a second refresh.
    pub async fn after_rejection(&self, rejected: &str) -> Result<Option<String>, DeliveryError> {
        if self.client.is_none() {
            return Ok(None);
        }
        self.refresh(Reason::Rejected(rejected)).await.map(Some)
    }

    /// The tokens in force: the stored chain when it grew from the configured
    /// tokens, else the configured ones.
    pub async fn load(&self) -> Result<TokenSet, DeliveryError> {
        {
            let mut unsaved = self.unsaved.lock().await;
            if let Some(t) = unsaved.clone() {
                // X rotated the refresh token and the store did not take it:
                // only this copy works. Try to share it again.
                if self.save(&t).await.is_ok() {
                    *unsaved = None;
                }
                return Ok(t);
            }
        }
        self.load_stored().await
    }

    async fn load_stored(&self) -> Result<TokenSet, DeliveryError> {
        let raw = self
            .store
            .kv_get(&kv_key(&self.channel_id))
            .await
            .map_err(store_failure)?;
        let stored = raw.and_then(|raw| match serde_json::from_str::<Stored>(&raw) {
            Ok(Stored::V1(t)) => Some(t),
            Err(e) => {
                tracing::warn!(channel = %self.channel_id, error = %e, "unreadable stored X tokens; using the configured ones");
                None
            }
        });
        Ok(match stored {
            Some(t) if t.seed == self.configured.seed => t,
            // Configured afresh (re-authorised): the old chain is not ours any more.
            _ => self.configured.clone(),
        })
    }

    async fn save(&self, t: &TokenSet) -> Result<(), crate::store::StoreError> {
        let json = serde_json::to_string(&Stored::V1(t.clone())).expect("tokens serialize");
        self.store.kv_set(&kv_key(&self.channel_id), &json).await
    }

    async fn release(&self) {
        // Renewing our own lease for a moment lets it lapse at once (both
        // backends), so waiting processes need not sit out the whole lease.
        let _ = self
            .store
            .try_lease(
                &lease_name(&self.channel_id),
                &self.owner,
                Duration::from_millis(1),
            )
            .await;
    }

    async fn refresh(&self, reason: Reason<'_>) -> Result<String, DeliveryError> {
        // In this process, one refresh at a time (the lease is per owner, and
        // every caller here is the same owner).
        let mut unsaved = self.unsaved.lock().await;
        let deadline = tokio::time::Instant::now() + WAIT_FOR_OTHERS;
        loop {
            let current = match unsaved.clone() {
                Some(t) => t,
                None => self.load_stored().await?,
            };
            if reason.satisfied_by(&current, Utc::now()) {
                return Ok(current.access_token);
            }
            let taken = self
                .store
                .try_lease(&lease_name(&self.channel_id), &self.owner, LEASE)
                .await
                .map_err(store_failure)?;
            if taken {
                // Read again under the lease: another process may have
                // finished between our read and taking it.
                let current = match unsaved.clone() {
                    Some(t) => t,
                    None => self.load_stored().await?,
                };
                if reason.satisfied_by(&current, Utc::now()) {
                    self.release().await;
                    return Ok(current.access_token);
                }
                let result = self.call_token_endpoint(&current).await;
                let outcome = match result {
                    Ok(fresh) => {
                        let mut saved = false;
                        for attempt in 0..3 {
                            match self.save(&fresh).await {
                                Ok(()) => {
                                    saved = true;
                                    break;
                                }
                                Err(e) => {
                                    tracing::warn!(channel = %self.channel_id, attempt, error = %e, "cannot store the refreshed X tokens");
                                    tokio::time::sleep(POLL).await;
                                }
                            }
                        }
                        if !saved {
                            tracing::error!(channel = %self.channel_id, "the refreshed X tokens are kept in this process only until the store takes them");
                            *unsaved = Some(fresh.clone());
                        } else {
                            *unsaved = None;
                        }
                        tracing::info!(channel = %self.channel_id, "X access token refreshed");
                        Ok(fresh.access_token)
                    }
                    Err(e) => Err(e),
                };
                self.release().await;
                return outcome;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DeliveryError::retryable(
                    "another process is refreshing the X access token; trying again later",
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `POST {api_base}/2/oauth2/token` with the refresh token of `current`.
    async fn call_token_endpoint(&self, current: &TokenSet) -> Result<TokenSet, DeliveryError> {
        let client = self.client.as_ref().expect("only called with a client");
        let Some(refresh_token) = current.refresh_token.as_deref() else {
            let mut e = DeliveryError::permanent(
                "the X access token expired and there is no refresh token: re-authorise the channel",
            );
            e.needs_reauth = true;
            return Err(e);
        };
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", client.id.as_str()),
        ];
        let mut req = self.http.post(&self.token_url).form(&form);
        if let Some(secret) = &client.secret {
            req = req.basic_auth(&client.id, Some(secret));
        }
        let resp = req.send().await.map_err(|e| {
            DeliveryError::retryable(format!(
                "X token endpoint unreachable: {}",
                super::send::describe(&e)
            ))
        })?;
        let status = resp.status().as_u16();
        let retry_after = super::send::retry_after(resp.headers(), Utc::now());
        let body = resp.bytes().await.map_err(|e| {
            DeliveryError::retryable(format!(
                "X token endpoint answer cut short: {}",
                super::send::describe(&e)
            ))
        })?;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if !(200..300).contains(&status) {
            let why = [v["error"].as_str(), v["error_description"].as_str()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ");
            let why = if why.is_empty() {
                format!("HTTP {status}")
            } else {
                why
            };
            if status == 429 || status >= 500 {
                let mut e =
                    DeliveryError::retryable(format!("X could not refresh the token now: {why}"));
                e.retry_after = retry_after;
                return Err(e);
            }
            let mut e = DeliveryError::permanent(format!(
                "X refused to refresh the access token ({why}): re-authorise the channel"
            ));
            e.code = v["error"].as_str().map(str::to_string);
            e.needs_reauth = true;
            return Err(e);
        }
        let Some(access_token) = v["access_token"].as_str().filter(|t| !t.is_empty()) else {
            let mut e = DeliveryError::permanent(
                "X answered the token refresh without an access_token: re-authorise the channel",
            );
            e.needs_reauth = true;
            return Err(e);
        };
        let now = Utc::now();
        Ok(TokenSet {
            access_token: access_token.to_string(),
            // X rotates it; keep the old one only if it sent none.
            refresh_token: v["refresh_token"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .or_else(|| current.refresh_token.clone()),
            expires_at: v["expires_in"]
                .as_i64()
                .filter(|s| *s > 0)
                .map(|s| now + Span::seconds(s)),
            stored_at: now,
            seed: current.seed.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(now: DateTime<Utc>, expires_in_secs: Option<i64>, stored_ago_secs: i64) -> TokenSet {
        TokenSet {
            access_token: "a".into(),
            refresh_token: Some("r".into()),
            expires_at: expires_in_secs.map(|s| now + Span::seconds(s)),
            stored_at: now - Span::seconds(stored_ago_secs),
            seed: "s".into(),
        }
    }

    /// If this breaks, sends fail with 401 at the end of every two hours, or
    /// the token is refreshed far more often than needed.
    #[test]
    fn stale_means_expiring_within_five_minutes_or_two_hours_old() {
        let now = Utc::now();
        assert!(!set(now, Some(301), 0).is_stale(now));
        assert!(set(now, Some(300), 0).is_stale(now));
        assert!(set(now, Some(-10), 0).is_stale(now));
        assert!(!set(now, None, 7_199).is_stale(now));
        assert!(set(now, None, 7_200).is_stale(now));
    }

    /// If this breaks, the stored tokens cannot be read back after an upgrade.
    #[test]
    fn the_stored_form_is_versioned_json() {
        let t = TokenSet {
            access_token: "acc".into(),
            refresh_token: Some("ref".into()),
            expires_at: Some(DateTime::from_timestamp(1_795_608_000, 0).unwrap()),
            stored_at: DateTime::from_timestamp(1_795_600_800, 0).unwrap(),
            seed: "abc".into(),
        };
        let json = serde_json::to_value(Stored::V1(t.clone())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "v": "V1",
                "access_token": "acc",
                "refresh_token": "ref",
                "expires_at": "2026-11-25T12:00:00Z",
                "stored_at": "2026-11-25T10:00:00Z",
                "seed": "abc",
            })
        );
        let Stored::V1(back) = serde_json::from_value(json).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn the_seed_names_the_configured_tokens_without_holding_them() {
        let a = seed_of("access", Some("refresh"));
        assert_eq!(a.len(), 24);
        assert!(!a.contains("access") && !a.contains("refresh"));
        assert_ne!(a, seed_of("access", Some("refresh2")));
        assert_ne!(a, seed_of("access2", Some("refresh")));
        assert_ne!(seed_of("ab", None), seed_of("a", Some("b")));
    }
}

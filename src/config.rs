//! Configuration: defaults, then the TOML file, then environment overrides,
//! checked once at start-up with errors that name the channel and the key.
//!
//! Environment overrides: `SWITCHBOARD__STORE__BACKEND=redis` sets
//! `store.backend`; for the lists of `channels`, `queues`, `agents` and
//! `services` the second part names the item by id, upper case with `-` as
//! `_`: `SWITCHBOARD__CHANNELS__WA_MAIN__APP_SECRET` sets `app_secret` of
//! channel `wa-main`.

use crate::domain::ChannelKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub store: StoreSettings,
    #[serde(default)]
    pub routing: RoutingSettings,
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
    #[serde(default)]
    pub agents: Vec<AgentConfig>,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    #[serde(default)]
    pub event_sinks: Vec<SinkConfig>,
    #[serde(default)]
    pub channels: Vec<ChannelConfig>,
    /// Set by `serve --demo`: the sandbox provider is mounted under `/sandbox/`.
    #[serde(default)]
    pub demo: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub listen: String,
    pub public_url: Option<String>,
    pub new_interaction_after_hours: u64,
    pub max_webhook_bytes: usize,
    pub max_email_bytes: usize,
    /// How long the outbox keeps retrying a reply before marking it failed.
    pub delivery_give_up_seconds: u64,
    /// HTTP worker threads; each serves its own connections.
    pub workers: usize,
    /// Keeps each HTTP worker thread on one CPU (worker *i* on the *i*-th CPU
    /// the process may use), so that two workers never queue on one CPU
    /// while another idles. For a machine the gateway has to itself.
    pub pin_workers: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            new_interaction_after_hours: 24,
            max_webhook_bytes: 4 * 1024 * 1024,
            max_email_bytes: 64 * 1024 * 1024,
            delivery_give_up_seconds: 24 * 3600,
            workers: 2,
            pin_workers: false,
        }
    }
}

impl ServerSettings {
    /// The URL providers call (and Twilio signs); defaults to the listen address.
    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
            .trim_end_matches('/')
            .to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Embedded,
    Redis,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    pub backend: Backend,
    pub path: PathBuf,
    pub redis_url: String,
    pub key_prefix: String,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            backend: Backend::Embedded,
            path: PathBuf::from("./data"),
            redis_url: "redis://127.0.0.1:6379/0".into(),
            key_prefix: "switchboard".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSettings {
    pub retention_hours: u64,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        RoutingSettings {
            retention_hours: 168,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueKind {
    Digital,
    Omnichannel,
    OutboundEmail,
    OutboundSms,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub id: String,
    pub name: String,
    pub kind: QueueKind,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub token_sha256: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub queues: Vec<String>,
    #[serde(default)]
    pub can_transfer: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub id: String,
    #[serde(default)]
    pub token_sha256: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub url: String,
    pub secret: String,
}

/// One configured channel. Kind-specific keys stay in `settings` and are
/// read by the kind's adapter; `check-config` checks them against the kind's
/// manifest.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChannelConfig {
    pub id: String,
    pub kind: ChannelKind,
    #[serde(default)]
    pub name: Option<String>,
    pub queue: String,
    #[serde(default)]
    pub api_base: Option<String>,
    #[serde(default)]
    pub media_hosts: Option<Vec<String>>,
    #[serde(flatten)]
    pub settings: toml::Table,
}

impl ChannelConfig {
    pub fn str(&self, key: &str) -> Option<&str> {
        self.settings
            .get(key)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
    }
    pub fn bool(&self, key: &str) -> Option<bool> {
        self.settings.get(key).and_then(|v| v.as_bool())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: String },
    #[error("{0}")]
    Parse(String),
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// Whether `id` is a usable channel ID: letters, digits, `-` and `_`, so
/// that it can stand in a URL path (`/webhooks/{id}`) as it is.
pub fn is_channel_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Turns an id into the form environment overrides use for it.
pub fn env_id(id: &str) -> String {
    id.to_uppercase().replace('-', "_")
}

fn env_value(raw: &str) -> toml::Value {
    if let Ok(b) = raw.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if raw.starts_with('[') || raw.starts_with('{') {
        if let Ok(v) = toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            if let Some(v) = v.get("v") {
                return v.clone();
            }
        }
    }
    toml::Value::String(raw.to_string())
}

const LISTS: [&str; 4] = ["channels", "queues", "agents", "services"];

/// Applies `SWITCHBOARD__...` overrides from `vars` to a parsed TOML document.
pub fn apply_env(
    doc: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("SWITCHBOARD__") else {
            continue;
        };
        let parts: Vec<String> = rest.split("__").map(|p| p.to_lowercase()).collect();
        if parts.iter().any(|p| p.is_empty()) {
            continue;
        }
        let mut table: &mut toml::Table = doc;
        let mut i = 0;
        if LISTS.contains(&parts[0].as_str()) && parts.len() >= 3 {
            let list = table
                .entry(parts[0].clone())
                .or_insert_with(|| toml::Value::Array(vec![]));
            let Some(items) = list.as_array_mut() else {
                return Err(ConfigError::Parse(format!("{} is not a list", parts[0])));
            };
            let wanted = parts[1].to_uppercase();
            let item = items.iter_mut().find(|it| {
                it.get("id")
                    .and_then(|v| v.as_str())
                    .is_some_and(|id| env_id(id) == wanted)
            });
            let Some(item) = item.and_then(|it| it.as_table_mut()) else {
                return Err(ConfigError::Parse(format!(
                    "{name}: no entry of {} has an id matching {}",
                    parts[0], parts[1]
                )));
            };
            table = item;
            i = 2;
        }
        while i + 1 < parts.len() {
            let entry = table
                .entry(parts[i].clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(t) = entry.as_table_mut() else {
                return Err(ConfigError::Parse(format!(
                    "{name}: {} is not a table",
                    parts[i]
                )));
            };
            table = t;
            i += 1;
        }
        table.insert(parts[i].clone(), env_value(&value));
    }
    Ok(())
}

impl Settings {
    /// Parses a TOML document with the process environment applied.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml_with_env(text, std::env::vars())
    }

    pub fn from_toml_with_env(
        text: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        apply_env(&mut doc, vars)?;
        toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))
    }

    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        Settings::from_toml(&text)
    }

    pub fn queue(&self, id: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.id == id)
    }

    pub fn channel(&self, id: &str) -> Option<&ChannelConfig> {
        self.channels.iter().find(|c| c.id == id)
    }

    /// Agents who are members of a queue.
    pub fn queue_members(&self, queue: &str) -> Vec<String> {
        self.agents
            .iter()
            .filter(|a| a.queues.iter().any(|q| q == queue))
            .map(|a| a.id.clone())
            .collect()
    }

    /// Every problem, each naming where it is.
    pub fn problems(&self) -> Vec<String> {
        let mut p = vec![];
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!(
                "server.listen: not an address: {}",
                self.server.listen
            ));
        }
        if let Some(u) = &self.server.public_url {
            if url::Url::parse(u).is_err() {
                p.push(format!("server.public_url: not a URL: {u}"));
            }
        }
        if self.server.workers == 0 {
            p.push("server.workers: must be at least 1".to_string());
        }
        let mut seen = std::collections::HashSet::new();
        for q in &self.queues {
            if !seen.insert(("queue", q.id.clone())) {
                p.push(format!("queue {}: id used twice", q.id));
            }
        }
        for a in &self.agents {
            if !seen.insert(("agent", a.id.clone())) {
                p.push(format!("agent {}: id used twice", a.id));
            }
            if a.token.is_none() && a.token_sha256.is_none() {
                p.push(format!("agent {}: token_sha256: missing (or token)", a.id));
            }
            if let Some(h) = &a.token_sha256 {
                if h.len() != 64 || hex::decode(h).is_err() {
                    p.push(format!("agent {}: token_sha256: not 64 hex digits", a.id));
                }
            }
            for q in &a.queues {
                if self.queue(q).is_none() {
                    p.push(format!("agent {}: queues: unknown queue {q}", a.id));
                }
            }
        }
        for s in &self.services {
            if s.token.is_none() && s.token_sha256.is_none() {
                p.push(format!(
                    "service {}: token_sha256: missing (or token)",
                    s.id
                ));
            }
        }
        for (i, s) in self.event_sinks.iter().enumerate() {
            if url::Url::parse(&s.url).is_err() {
                p.push(format!("event_sinks[{i}]: url: not a URL: {}", s.url));
            }
            if crate::routing::sink_key(&s.secret).is_none() {
                p.push(format!(
                    "event_sinks[{i}]: secret: not a whsec_ base64 secret"
                ));
            }
        }
        for c in &self.channels {
            if !seen.insert(("channel", c.id.clone())) {
                p.push(format!("channel {}: id used twice", c.id));
            }
            if !is_channel_id(&c.id) {
                p.push(format!(
                    "channel {}: id: use letters, digits, - and _",
                    c.id
                ));
            }
            match self.queue(&c.queue) {
                None => p.push(format!(
                    "channel {}: queue: unknown queue {}",
                    c.id, c.queue
                )),
                Some(q) if q.kind != QueueKind::Digital => p.push(format!(
                    "channel {}: queue: {} is not a digital queue",
                    c.id, c.queue
                )),
                _ => {}
            }
            if let Some(base) = &c.api_base {
                if url::Url::parse(base).is_err() {
                    p.push(format!("channel {}: api_base: not a URL: {base}", c.id));
                }
            }
            p.extend(crate::manifest::check_channel(c));
            if c.kind == crate::domain::ChannelKind::Email {
                p.extend(crate::adapters::email::config_problems(c));
            }
        }
        p
    }

    pub fn validate(self) -> Result<Settings, ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check that both the configuration and the webhook routes use:
    /// an ID that would not stand in a URL path as it is is refused.
    #[test]
    fn channel_ids_are_letters_digits_dashes_and_underscores() {
        for good in ["sms-main", "wa_2", "X"] {
            assert!(is_channel_id(good), "{good}");
        }
        for bad in ["", "sms main", "sms/main", "{id}", "sms.main", "ñ"] {
            assert!(!is_channel_id(bad), "{bad:?}");
        }
    }

    const DOC: &str = r#"
[[queues]]
id = "support"
name = "Support"
kind = "digital"

[[channels]]
id = "sms-main"
kind = "sms"
queue = "support"
account_sid = "AC1"
"#;

    #[test]
    fn env_overrides_address_channels_by_id() {
        let s = Settings::from_toml_with_env(
            DOC,
            vec![
                (
                    "SWITCHBOARD__CHANNELS__SMS_MAIN__AUTH_TOKEN".to_string(),
                    "tok".to_string(),
                ),
                (
                    "SWITCHBOARD__STORE__BACKEND".to_string(),
                    "redis".to_string(),
                ),
                (
                    "SWITCHBOARD__SERVER__MAX_WEBHOOK_BYTES".to_string(),
                    "10".to_string(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(s.channels[0].str("auth_token"), Some("tok"));
        assert_eq!(s.store.backend, Backend::Redis);
        assert_eq!(s.server.max_webhook_bytes, 10);
    }

    #[test]
    fn an_override_for_an_unknown_channel_is_an_error() {
        let err = Settings::from_toml_with_env(
            DOC,
            vec![(
                "SWITCHBOARD__CHANNELS__NOPE__AUTH_TOKEN".to_string(),
                "x".to_string(),
            )],
        )
        .unwrap_err();
        assert!(err.to_string().contains("NOPE") || err.to_string().contains("nope"));
    }

    /// If this fails, a gateway told to run no HTTP worker starts and
    /// answers nothing, instead of saying what is wrong.
    #[test]
    fn zero_workers_is_a_problem_and_pinning_is_read_from_the_environment() {
        let s = Settings::from_toml_with_env(
            DOC,
            vec![
                ("SWITCHBOARD__SERVER__WORKERS".to_string(), "0".to_string()),
                (
                    "SWITCHBOARD__SERVER__PIN_WORKERS".to_string(),
                    "true".to_string(),
                ),
            ],
        )
        .unwrap();
        assert!(s.server.pin_workers);
        assert!(
            s.problems()
                .contains(&"server.workers: must be at least 1".to_string()),
            "{:?}",
            s.problems()
        );
        let s = Settings::from_toml_with_env(DOC, vec![]).unwrap();
        assert_eq!((s.server.workers, s.server.pin_workers), (2, false));
        assert!(!s.problems().iter().any(|p| p.contains("workers")));
    }
}

//! Channel manifests: one declarative file per channel kind in `channels/`,
//! embedded at build time and parsed with `deny_unknown_fields`. Provider
//! facts live there as data (limits, window, signature, settings), and drive
//! the outbound pre-checks, `check-config` and the README's channel table.

use crate::config::ChannelConfig;
use crate::domain::ChannelKind;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub kind: ChannelKind,
    /// The provider and API, for people.
    pub provider: String,
    /// Whether the gateway has an adapter for this kind yet.
    pub adapter: bool,
    pub emoji: bool,
    pub text: TextLimits,
    pub attachments: AttachmentRules,
    pub window: Window,
    pub signature: Signature,
    pub handshake: Handshake,
    pub settings: SettingsSpec,
    /// Hosts media may be downloaded from by default, beside the `api_base` host.
    #[serde(default)]
    pub media_hosts: Vec<String>,
    /// The provider API root when a channel does not set `api_base`.
    #[serde(default)]
    pub default_api_base: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TextLimits {
    /// Longest text in characters (Unicode scalar values), if limited.
    #[serde(default)]
    pub max_chars: Option<usize>,
    /// Longest text in UTF-8 bytes, if limited (Instagram).
    #[serde(default)]
    pub max_bytes: Option<usize>,
    /// SMS: encoding and segments are computed and shown.
    #[serde(default)]
    pub segments: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRules {
    pub allowed: bool,
    /// Most attachments in one message.
    #[serde(default)]
    pub max_count: Option<usize>,
    /// The channel's own size limit in bytes; the gateway caps every
    /// attachment at 10 MiB whatever this says.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Allowed content types (`image/*` wildcards allowed); empty means any.
    #[serde(default)]
    pub types: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Free-form replies allowed this many hours after the customer's last
    /// message; absent when the channel has no window.
    #[serde(default)]
    pub hours: Option<u32>,
    /// With the `HUMAN_AGENT` tag (when the channel enables it), this long.
    #[serde(default)]
    pub human_agent_hours: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// `twilio-hmac-sha1`, `meta-hmac-sha256`, `x-hmac-sha256`, `standard-webhooks`, `session-token`.
    pub scheme: String,
    #[serde(default)]
    pub header: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Handshake {
    /// `none`, `meta-hub-challenge`, `x-crc`.
    pub scheme: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsSpec {
    /// Keys every channel of this kind must set.
    #[serde(default)]
    pub required: Vec<String>,
    /// Groups of keys of which at least one must be set.
    #[serde(default)]
    pub one_of: Vec<Vec<String>>,
    /// Keys that may be set.
    #[serde(default)]
    pub optional: Vec<String>,
    /// Keys holding secrets (never logged, best given as environment overrides).
    #[serde(default)]
    pub secrets: Vec<String>,
}

const SOURCES: [(ChannelKind, &str); 7] = [
    (ChannelKind::Chat, include_str!("../channels/chat.toml")),
    (ChannelKind::Email, include_str!("../channels/email.toml")),
    (
        ChannelKind::Facebook,
        include_str!("../channels/facebook.toml"),
    ),
    (
        ChannelKind::Instagram,
        include_str!("../channels/instagram.toml"),
    ),
    (ChannelKind::Sms, include_str!("../channels/sms.toml")),
    (
        ChannelKind::Twitter,
        include_str!("../channels/twitter.toml"),
    ),
    (
        ChannelKind::Whatsapp,
        include_str!("../channels/whatsapp.toml"),
    ),
];

/// Every manifest, parsed once. Panics at start-up if one is broken (a
/// build-time file, covered by tests).
pub fn all() -> &'static [Manifest] {
    static ALL: OnceLock<Vec<Manifest>> = OnceLock::new();
    ALL.get_or_init(|| {
        SOURCES
            .iter()
            .map(|(kind, src)| {
                let m: Manifest = toml::from_str(src)
                    .unwrap_or_else(|e| panic!("channels/{kind}.toml is invalid: {e}"));
                assert_eq!(m.kind, *kind, "channels/{kind}.toml names another kind");
                m
            })
            .collect()
    })
}

pub fn get(kind: ChannelKind) -> &'static Manifest {
    all()
        .iter()
        .find(|m| m.kind == kind)
        .expect("a manifest for every kind")
}

/// The hard cap on any attachment, whatever the channel allows (PRODUCT.md).
pub const MAX_ATTACHMENT_BYTES: u64 = 10 * 1024 * 1024;

/// Problems with a channel's kind-specific settings.
pub fn check_channel(c: &ChannelConfig) -> Vec<String> {
    let m = get(c.kind);
    let mut p = vec![];
    if !m.adapter {
        p.push(format!(
            "channel {}: kind: {} channels are not supported yet",
            c.id, c.kind
        ));
    }
    for key in &m.settings.required {
        if !c.settings.contains_key(key) {
            p.push(format!(
                "channel {}: {key}: missing (required for {} channels)",
                c.id, c.kind
            ));
        }
    }
    for group in &m.settings.one_of {
        if !group.iter().any(|k| c.settings.contains_key(k)) {
            p.push(format!(
                "channel {}: {}: set one of them",
                c.id,
                group.join(" or ")
            ));
        }
    }
    if c.kind == ChannelKind::Sms {
        if let Some(Err(e)) = c
            .str("from")
            .map(|from| crate::adapters::sms::own_number(&c.id, from))
        {
            p.push(e);
        }
    }
    for key in c.settings.keys() {
        let known = m.settings.required.contains(key)
            || m.settings.optional.contains(key)
            || m.settings.one_of.iter().any(|g| g.contains(key));
        if !known {
            p.push(format!(
                "channel {}: {key}: unknown key for {} channels",
                c.id, c.kind
            ));
        }
    }
    p
}

/// Content type allowed by a list of patterns (`image/*`), empty allowing all.
pub fn type_allowed(patterns: &[String], content_type: &str) -> bool {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    patterns.is_empty()
        || patterns.iter().any(|p| {
            p == &ct
                || p.strip_suffix("/*")
                    .is_some_and(|major| ct.starts_with(&format!("{major}/")))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_manifest_parses_and_names_its_kind() {
        assert_eq!(all().len(), 7);
        for kind in ChannelKind::ALL {
            assert_eq!(get(kind).kind, kind);
            assert!(get(kind).emoji, "all seven kinds allow emoji today");
        }
    }

    #[test]
    fn wildcard_types_match_their_family_only() {
        let p = vec!["image/*".to_string(), "application/pdf".to_string()];
        assert!(type_allowed(&p, "image/png"));
        assert!(type_allowed(&p, "application/pdf; name=a.pdf"));
        assert!(!type_allowed(&p, "video/mp4"));
        assert!(type_allowed(&[], "video/mp4"));
    }
}

//! Downloading inbound media from a provider, safely.
//!
//! A media URL arrives inside a webhook, so it is data from outside. The
//! rules, each a test in `tests/sms_adapter.rs`:
//!
//! - only `http`/`https` URLs whose host is in the channel's `media_hosts`
//!   (by default the `api_base` host plus the manifest's `media_hosts`) are
//!   fetched; anything else is refused before any request is made;
//! - credentials go only to the `api_base` origin (scheme, host and port),
//!   never to a CDN the provider redirects to, except to the hosts a channel
//!   names with [`MediaClient::with_credential_hosts`] (over https only:
//!   WhatsApp's `lookaside.fbsbx.com`, which wants the bearer token too);
//! - redirects are followed by hand, at most [`MAX_REDIRECTS`], each target
//!   checked as above;
//! - a `Content-Length` over the cap is refused up front, and the body is
//!   streamed and refused as soon as it passes the cap (10 MiB), never
//!   buffered beyond it.

use super::MediaRef;
use crate::config::ChannelConfig;
use crate::manifest::{Manifest, MAX_ATTACHMENT_BYTES};
use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;
use std::time::Duration;
use url::Url;

/// Most redirects followed for one download.
pub const MAX_REDIRECTS: usize = 5;

/// How a channel authenticates media downloads at its `api_base` host.
#[derive(Debug, Clone)]
pub enum Credentials {
    None,
    Basic {
        user: String,
        password: String,
    },
    Bearer(String),
    /// A bearer token that rotates (X's two-hour user tokens): asked for at each download.
    BearerFrom(std::sync::Arc<dyn TokenSource>),
}

/// Where a rotating bearer token comes from.
#[async_trait::async_trait]
pub trait TokenSource: Send + Sync + std::fmt::Debug {
    async fn bearer(&self) -> Result<String, String>;
}

#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub content_type: String,
}

#[derive(Clone)]
pub struct MediaClient {
    pub http: reqwest::Client,
    /// The host of the channel's `api_base` (lower case).
    pub api_host: Option<String>,
    /// Hosts media may be fetched from (lower case).
    pub allowed_hosts: Vec<String>,
    pub credentials: Credentials,
    pub max_bytes: u64,
    /// Scheme, host and port of `api_base`: where credentials go.
    api_origin: Option<url::Origin>,
    /// Hosts besides `api_base` that also get the credentials, over https only
    /// (lower case; see [`MediaClient::with_credential_hosts`]).
    pub credential_hosts: Vec<String>,
}

impl std::fmt::Debug for MediaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the credentials.
        f.debug_struct("MediaClient")
            .field("api_host", &self.api_host)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("credential_hosts", &self.credential_hosts)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// Whether `host` is one of `allowed`; an entry `*.example.com` allows every
/// subdomain of example.com (Meta serves media from numbered CDN hosts such as
/// `scontent-iad3-1.xx.fbcdn.net`), never example.com itself or a look-alike.
pub fn host_allowed(allowed: &[String], host: &str) -> bool {
    allowed.iter().any(|a| match a.strip_prefix("*.") {
        Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
        None => a == host,
    })
}

/// A host name as we compare them: lower case, no IPv6 brackets, no trailing dot.
fn normalize_host(host: &str) -> String {
    host.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

impl MediaClient {
    pub fn new(cfg: &ChannelConfig, manifest: &Manifest, credentials: Credentials) -> MediaClient {
        let api_base = cfg
            .api_base
            .as_deref()
            .or(manifest.default_api_base.as_deref())
            .and_then(|u| Url::parse(u).ok());
        let api_host = api_base
            .as_ref()
            .and_then(|u| u.host_str())
            .map(normalize_host);
        let api_origin = api_base.as_ref().map(|u| u.origin());
        let allowed_hosts = match &cfg.media_hosts {
            Some(hosts) => hosts.iter().map(|h| normalize_host(h)).collect(),
            None => api_host
                .iter()
                .cloned()
                .chain(manifest.media_hosts.iter().map(|h| normalize_host(h)))
                .collect(),
        };
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(15))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client with rustls builds");
        MediaClient {
            http,
            api_host,
            allowed_hosts,
            credentials,
            max_bytes: MAX_ATTACHMENT_BYTES,
            api_origin,
            credential_hosts: vec![],
        }
    }

    /// Also sends the credentials to `hosts` (beside the `api_base` origin),
    /// for providers whose media CDN wants them too: Meta's Media API says
    /// the WhatsApp media URL on `lookaside.fbsbx.com` is fetched with the
    /// bearer token. Only `https` URLs on these hosts get them, and only
    /// hosts in `allowed_hosts` are fetched at all: this widens where
    /// credentials go, never where requests go.
    pub fn with_credential_hosts(mut self, hosts: Vec<String>) -> MediaClient {
        self.credential_hosts = hosts
            .iter()
            .map(|h| normalize_host(h))
            .filter(|h| !h.is_empty())
            .collect();
        self
    }

    /// Whether a request to `url` carries the channel's credentials.
    fn gets_credentials(&self, url: &Url) -> bool {
        if self.api_origin.as_ref() == Some(&url.origin()) {
            return true;
        }
        url.scheme() == "https"
            && url
                .host_str()
                .map(normalize_host)
                .is_some_and(|h| self.credential_hosts.contains(&h))
    }

    /// Checks a URL against the rules; the error is what the user sees.
    fn check(&self, url: &Url) -> Result<(), String> {
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err(format!(
                "media URL scheme {} is not allowed (only http and https)",
                url.scheme()
            ));
        }
        let host = url.host_str().map(normalize_host).unwrap_or_default();
        if !host_allowed(&self.allowed_hosts, &host) {
            return Err(format!("media host {host} is not allowed"));
        }
        Ok(())
    }

    #[cfg(test)]
    fn authorize(&self, url: &Url, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        self.authorize_with(&self.credentials, url, req)
    }

    fn authorize_with(
        &self,
        creds: &Credentials,
        url: &Url,
        req: reqwest::RequestBuilder,
    ) -> reqwest::RequestBuilder {
        if !self.gets_credentials(url) {
            return req;
        }
        match creds {
            Credentials::None | Credentials::BearerFrom(_) => req,
            Credentials::Basic { user, password } => req.basic_auth(user, Some(password)),
            Credentials::Bearer(token) => req.bearer_auth(token),
        }
    }

    /// Downloads one media file under the rules of this module.
    pub async fn fetch(&self, media: &MediaRef) -> Result<Fetched, String> {
        let mut url = Url::parse(&media.url)
            .map_err(|e| format!("media URL is not a URL ({e}): {}", media.url))?;
        let mut redirects = 0;
        // A rotating token is asked for once per download, then used like a fixed one.
        let creds = match &self.credentials {
            Credentials::BearerFrom(source) => Credentials::Bearer(source.bearer().await?),
            c => c.clone(),
        };
        let mut resp = loop {
            self.check(&url)?;
            let req = self.authorize_with(&creds, &url, self.http.get(url.clone()));
            let resp = req
                .send()
                .await
                .map_err(|e| format!("media download failed: {}", describe(e)))?;
            let status = resp.status();
            if !matches!(
                status,
                StatusCode::MOVED_PERMANENTLY
                    | StatusCode::FOUND
                    | StatusCode::SEE_OTHER
                    | StatusCode::TEMPORARY_REDIRECT
                    | StatusCode::PERMANENT_REDIRECT
            ) {
                break resp;
            }
            if redirects == MAX_REDIRECTS {
                return Err(format!(
                    "media download failed: more than {MAX_REDIRECTS} redirects"
                ));
            }
            redirects += 1;
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| {
                    format!(
                        "media download failed: HTTP {} without a Location",
                        status.as_u16()
                    )
                })?;
            url = url
                .join(location)
                .map_err(|e| format!("media download failed: bad redirect {location}: {e}"))?;
        };
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("media download failed: HTTP {}", status.as_u16()));
        }
        let too_large = || format!("media is larger than {} bytes", self.max_bytes);
        let declared = resp.content_length();
        if declared.is_some_and(|n| n > self.max_bytes) {
            return Err(too_large());
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty() && !v.starts_with("application/octet-stream"))
            .or_else(|| media.content_type.clone())
            .unwrap_or_else(|| "application/octet-stream".to_string());
        let mut bytes = Vec::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("media download failed: {}", describe(e)))?
        {
            if (bytes.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Fetched {
            bytes,
            content_type,
        })
    }
}

/// A reqwest error without the URL (which may carry a signed query).
fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        e.without_url().to_string()
    }
}

/// File extensions for the content types providers send most.
const EXTENSIONS: &[(&str, &str)] = &[
    ("image/jpeg", "jpg"),
    ("image/jpg", "jpg"),
    ("image/pjpeg", "jpg"),
    ("image/png", "png"),
    ("image/gif", "gif"),
    ("image/webp", "webp"),
    ("image/bmp", "bmp"),
    ("image/heic", "heic"),
    ("image/heif", "heif"),
    ("image/tiff", "tiff"),
    ("image/svg+xml", "svg"),
    ("audio/mpeg", "mp3"),
    ("audio/mp3", "mp3"),
    ("audio/mp4", "m4a"),
    ("audio/aac", "aac"),
    ("audio/ogg", "ogg"),
    ("audio/opus", "opus"),
    ("audio/amr", "amr"),
    ("audio/wav", "wav"),
    ("audio/x-wav", "wav"),
    ("audio/webm", "weba"),
    ("audio/3gpp", "3gp"),
    ("video/mp4", "mp4"),
    ("video/3gpp", "3gp"),
    ("video/quicktime", "mov"),
    ("video/webm", "webm"),
    ("video/mpeg", "mpeg"),
    ("application/pdf", "pdf"),
    ("application/zip", "zip"),
    ("application/json", "json"),
    ("application/msword", "doc"),
    ("application/vnd.ms-excel", "xls"),
    ("application/vnd.ms-powerpoint", "ppt"),
    (
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "docx",
    ),
    (
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "xlsx",
    ),
    (
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "pptx",
    ),
    ("text/plain", "txt"),
    ("text/html", "html"),
    ("text/csv", "csv"),
    ("text/calendar", "ics"),
    ("text/vcard", "vcf"),
    ("text/x-vcard", "vcf"),
    ("text/directory", "vcf"),
];

/// A file name for media that came without one: `base` plus an extension for its type.
///
/// Known types use the usual extension (`image/jpeg` → `.jpg`); an unknown
/// type whose subtype is a short plain word uses it (`image/avif` →
/// `.avif`); anything else (`application/octet-stream`) leaves `base` alone.
pub fn filename_for(base: &str, content_type: &str) -> String {
    let Ok(mime) = content_type.trim().parse::<mime::Mime>() else {
        return base.to_string();
    };
    let essence = mime.essence_str().to_ascii_lowercase();
    let ext = EXTENSIONS
        .iter()
        .find(|(t, _)| *t == essence)
        .map(|(_, e)| e.to_string())
        .or_else(|| {
            let sub = mime.subtype().as_str().to_ascii_lowercase();
            (mime.suffix().is_none()
                && (2..=5).contains(&sub.len())
                && sub.chars().all(|c| c.is_ascii_alphanumeric()))
            .then_some(sub)
        });
    match ext {
        Some(ext) if !base.to_ascii_lowercase().ends_with(&format!(".{ext}")) => {
            format!("{base}.{ext}")
        }
        _ => base.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_get_the_usual_extension() {
        assert_eq!(
            filename_for("attachment-1", "image/jpeg"),
            "attachment-1.jpg"
        );
        assert_eq!(filename_for("a", "IMAGE/PNG"), "a.png");
        assert_eq!(filename_for("a", "text/plain; charset=utf-8"), "a.txt");
        assert_eq!(filename_for("card", "text/vcard"), "card.vcf");
        assert_eq!(filename_for("a", "video/3gpp"), "a.3gp");
        assert_eq!(filename_for("a", "application/pdf"), "a.pdf");
        assert_eq!(filename_for("a", "image/avif"), "a.avif");
    }

    #[test]
    fn unknown_or_broken_types_leave_the_name_alone() {
        assert_eq!(filename_for("a", "application/octet-stream"), "a");
        assert_eq!(filename_for("a", "application/ld+json"), "a");
        assert_eq!(filename_for("a", "not a type"), "a");
        assert_eq!(filename_for("a", ""), "a");
        assert_eq!(filename_for("photo.JPG", "image/jpeg"), "photo.JPG");
    }

    fn client(toml: &str) -> MediaClient {
        let cfg: ChannelConfig = toml::from_str(toml).unwrap();
        MediaClient::new(
            &cfg,
            crate::manifest::get(crate::domain::ChannelKind::Sms),
            Credentials::None,
        )
    }

    #[test]
    fn default_hosts_are_the_api_host_and_the_manifest_cdns() {
        let c = client("id = \"s\"\nkind = \"sms\"\nqueue = \"q\"");
        assert_eq!(c.api_host.as_deref(), Some("api.twilio.com"));
        assert!(c.allowed_hosts.contains(&"api.twilio.com".to_string()));
        assert!(c.allowed_hosts.contains(&"media.twiliocdn.com".to_string()));
        assert_eq!(c.max_bytes, 10 * 1024 * 1024);
    }

    #[test]
    fn configured_hosts_replace_the_defaults() {
        let c = client(
            "id = \"s\"\nkind = \"sms\"\nqueue = \"q\"\napi_base = \"http://127.0.0.1:9\"\nmedia_hosts = [\"CDN.Example.\"]",
        );
        assert_eq!(c.api_host.as_deref(), Some("127.0.0.1"));
        assert_eq!(c.allowed_hosts, vec!["cdn.example".to_string()]);
    }

    fn authorization(c: &MediaClient, url: &str) -> Option<String> {
        let url = Url::parse(url).unwrap();
        let req = c.authorize(&url, c.http.get(url.clone())).build().unwrap();
        req.headers()
            .get(reqwest::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_string())
    }

    fn whatsapp_client(hosts: Vec<String>) -> MediaClient {
        let cfg: ChannelConfig =
            toml::from_str("id = \"w\"\nkind = \"whatsapp\"\nqueue = \"q\"").unwrap();
        MediaClient::new(
            &cfg,
            crate::manifest::get(crate::domain::ChannelKind::Whatsapp),
            Credentials::Bearer("EAAtoken".into()),
        )
        .with_credential_hosts(hosts)
    }

    /// If this breaks, WhatsApp media on Meta's CDN is refused (no token),
    /// or the token goes in clear text or to hosts nobody named.
    #[test]
    fn credential_hosts_get_the_credentials_over_https_only() {
        let bearer = Some("Bearer EAAtoken".to_string());
        let c = whatsapp_client(vec!["Lookaside.FBSBX.com.".into()]);
        assert_eq!(c.credential_hosts, vec!["lookaside.fbsbx.com".to_string()]);
        assert_eq!(
            authorization(&c, "https://graph.facebook.com/v25.0/123"),
            bearer,
            "the api_base origin still gets them"
        );
        assert_eq!(
            authorization(
                &c,
                "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1"
            ),
            bearer
        );
        assert_eq!(
            authorization(&c, "https://LOOKASIDE.fbsbx.com:443/x"),
            bearer
        );
        assert_eq!(authorization(&c, "http://lookaside.fbsbx.com/x"), None);
        assert_eq!(authorization(&c, "https://scontent.fbsbx.com/x"), None);
        assert_eq!(
            authorization(&c, "https://lookaside.fbsbx.com.evil.example/x"),
            None
        );
        // Without the builder, only the api_base origin gets them.
        let plain = whatsapp_client(vec![]);
        assert_eq!(authorization(&plain, "https://lookaside.fbsbx.com/x"), None);
        assert_eq!(
            authorization(&plain, "https://graph.facebook.com/v25.0/123"),
            bearer
        );
    }

    #[test]
    fn wildcard_hosts_allow_subdomains_only() {
        let allowed = vec!["*.fbcdn.net".to_string(), "api.x.com".to_string()];
        assert!(host_allowed(&allowed, "scontent-iad3-1.xx.fbcdn.net"));
        assert!(host_allowed(&allowed, "video.xx.fbcdn.net"));
        assert!(!host_allowed(&allowed, "fbcdn.net"));
        assert!(!host_allowed(&allowed, "evilfbcdn.net"));
        assert!(!host_allowed(&allowed, "fbcdn.net.evil.com"));
        assert!(host_allowed(&allowed, "api.x.com"));
        assert!(!host_allowed(&allowed, "x.com"));
    }

    #[test]
    fn credential_hosts_do_not_widen_the_allowed_hosts() {
        let c = whatsapp_client(vec!["cdn.example".into()]);
        assert!(!c.allowed_hosts.contains(&"cdn.example".to_string()));
        assert!(c.allowed_hosts.contains(&"lookaside.fbsbx.com".to_string()));
    }

    #[tokio::test]
    async fn refuses_other_schemes_and_hosts_before_any_request() {
        let c = client("id = \"s\"\nkind = \"sms\"\nqueue = \"q\"");
        let fetch = |url: &str| {
            let m = MediaRef {
                url: url.into(),
                content_type: None,
                filename: None,
                media_id: None,
            };
            let c = c.clone();
            async move { c.fetch(&m).await.unwrap_err() }
        };
        assert_eq!(
            fetch("https://evil.example/x.jpg").await,
            "media host evil.example is not allowed"
        );
        assert!(fetch("file:///etc/passwd").await.contains("scheme file"));
        assert!(fetch("not a url")
            .await
            .starts_with("media URL is not a URL"));
    }
}

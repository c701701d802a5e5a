//! Checked identifiers: each has one constructor that proves it is well formed,
//! so code past the edge never re-validates (parse, don't validate).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The kind of a channel. The declaration order is the order PRODUCT.md gives
/// for sorting interactions by channel, so `Ord` sorts them that way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Chat,
    Email,
    Facebook,
    Instagram,
    Sms,
    Twitter,
    Whatsapp,
}

impl ChannelKind {
    pub const ALL: [ChannelKind; 7] = [
        ChannelKind::Chat,
        ChannelKind::Email,
        ChannelKind::Facebook,
        ChannelKind::Instagram,
        ChannelKind::Sms,
        ChannelKind::Twitter,
        ChannelKind::Whatsapp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Chat => "chat",
            ChannelKind::Email => "email",
            ChannelKind::Facebook => "facebook",
            ChannelKind::Instagram => "instagram",
            ChannelKind::Sms => "sms",
            ChannelKind::Twitter => "twitter",
            ChannelKind::Whatsapp => "whatsapp",
        }
    }

    pub fn parse(s: &str) -> Option<ChannelKind> {
        ChannelKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether a digital ID of this kind is scoped to one channel (a page,
    /// an account, a widget) rather than global to the kind.
    pub fn ids_scoped_to_channel(self) -> bool {
        matches!(
            self,
            ChannelKind::Facebook | ChannelKind::Instagram | ChannelKind::Chat
        )
    }
}

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A phone number in E.164 form (`+15551234567`), parsed with the
/// `phonenumber` crate (a port of Google's libphonenumber), so that
/// `+1 (555) 123-4567` and `+15551234567` are the same contact.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhoneNumber(String);

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("not a valid phone number in international form: {0}")]
pub struct InvalidPhoneNumber(pub String);

/// Numbers seen recently, as written → what they are (see [`Known`]).
/// libphonenumber's metadata regexes cost tens of microseconds a number, and
/// the same customers write again and again, so every webhook after a
/// number's first pays a hash lookup instead. Bounded, so it cannot grow
/// without limit whatever is sent.
static PHONE_CACHE: std::sync::LazyLock<quick_cache::sync::Cache<String, Known>> =
    std::sync::LazyLock::new(|| quick_cache::sync::Cache::new(100_000));

/// One number as written, parsed once for both ways of taking it.
#[derive(Clone)]
struct Known {
    /// Its E.164 form, if a provider's number would be taken
    /// ([`PhoneNumber::from_provider`]).
    e164: Option<String>,
    /// Whether the metadata knows it as valid ([`PhoneNumber::parse`]);
    /// `None` until something asks. The check runs the number against the
    /// patterns of every region that shares its country code (two dozen
    /// for +1), which a provider's number, taken on its digits, does not
    /// need: it doubled the cost of a new customer's first webhook.
    valid: Option<bool>,
}

impl Known {
    /// Looks `trimmed` (which starts with `+`) up, parsing it on first
    /// sight, or again if `validity` is wanted and not known yet.
    fn of(trimmed: &str, validity: bool) -> Known {
        if let Some(known) = PHONE_CACHE.get(trimmed) {
            if !validity || known.valid.is_some() {
                return known;
            }
        }
        std::sync::LazyLock::force(&METADATA);
        let known = match phonenumber::parse(None, trimmed) {
            Err(_) => Known {
                e164: None,
                valid: Some(false),
            },
            Ok(p) => {
                let e164 = p.format().mode(phonenumber::Mode::E164).to_string();
                let in_range = (7..=15).contains(&(e164.len() - 1));
                let valid = (validity || !in_range).then(|| phonenumber::is_valid(&p));
                Known {
                    e164: (in_range || valid == Some(true)).then_some(e164),
                    valid,
                }
            }
        };
        PHONE_CACHE.insert(trimmed.to_string(), known.clone());
        known
    }
}

/// How many compiled patterns libphonenumber keeps. Its own default, 100,
/// holds about 25 countries' (40 countries used 164): past that, every new
/// number paid for compiling its country's patterns again, 3–4 ms against
/// 45–105 µs with room for them. A pattern takes about 60 KB once compiled,
/// and only the countries that customers write from are compiled.
const PATTERNS_KEPT: usize = 1000;

/// libphonenumber's metadata, loaded with room for [`PATTERNS_KEPT`].
static METADATA: std::sync::LazyLock<()> = std::sync::LazyLock::new(|| {
    let db: &phonenumber::metadata::Database = &phonenumber::metadata::DATABASE;
    let cache = db.cache();
    let mut patterns = cache.lock().unwrap_or_else(|e| e.into_inner());
    *patterns = regex_cache::RegexCache::new(PATTERNS_KEPT);
});

impl PhoneNumber {
    pub fn parse(raw: &str) -> Result<PhoneNumber, InvalidPhoneNumber> {
        let trimmed = raw.trim();
        if !trimmed.starts_with('+') {
            return Err(InvalidPhoneNumber(raw.to_string()));
        }
        match Known::of(trimmed, true) {
            Known {
                e164: Some(e164),
                valid: Some(true),
            } => Ok(PhoneNumber(e164)),
            _ => Err(InvalidPhoneNumber(raw.to_string())),
        }
    }

    /// A sender's number as a provider reports it, once the provider has
    /// delivered a message from it. A number that [`PhoneNumber::parse`]
    /// takes comes out the same; one that libphonenumber's metadata does not
    /// know (a range allocated after the metadata was published, a test
    /// number) is still taken, in E.164 form, when its country code exists and
    /// it has 7 to 15 digits: refusing it would lose a real customer's
    /// message. Numbers an agent types are checked with `parse`. Both answers
    /// come from one cached parse: such a number writes as often as any other.
    pub fn from_provider(raw: &str) -> Result<PhoneNumber, InvalidPhoneNumber> {
        let trimmed = raw.trim();
        if !trimmed.starts_with('+') {
            return Err(InvalidPhoneNumber(raw.to_string()));
        }
        Known::of(trimmed, false)
            .e164
            .map(PhoneNumber)
            .ok_or_else(|| InvalidPhoneNumber(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Loads libphonenumber's metadata now. It is built on first use from
    /// thousands of patterns (120–170 ms on a 2-core machine), which would
    /// otherwise fall inside the first SMS webhook after a start. A
    /// country's patterns are compiled when first used (10–25 ms).
    pub fn load_metadata() {
        std::sync::LazyLock::force(&METADATA);
    }

    /// Whether the metadata is loaded yet.
    pub fn metadata_loaded() -> bool {
        once_cell::sync::Lazy::get(&phonenumber::metadata::DATABASE).is_some()
    }
}

impl TryFrom<String> for PhoneNumber {
    type Error = InvalidPhoneNumber;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        PhoneNumber::parse(&s)
    }
}

impl From<PhoneNumber> for String {
    fn from(p: PhoneNumber) -> String {
        p.0
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An email address, compared case-insensitively as a whole (PRODUCT.md).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EmailAddress(String);

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("not a valid email address: {0}")]
pub struct InvalidEmail(pub String);

impl EmailAddress {
    pub fn parse(raw: &str) -> Result<EmailAddress, InvalidEmail> {
        let s = raw.trim();
        let (local, domain) = s.rsplit_once('@').ok_or_else(|| InvalidEmail(raw.into()))?;
        if local.is_empty()
            || domain.is_empty()
            || !domain.contains('.')
            || s.chars().any(|c| c.is_whitespace() || c == '<' || c == '>')
        {
            return Err(InvalidEmail(raw.into()));
        }
        Ok(EmailAddress(s.to_lowercase()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A contact's digital ID on a channel kind, in the canonical form the
/// contact is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DigitalId(String);

impl DigitalId {
    /// A sender's ID as a provider reports it: as [`DigitalId::parse`], but
    /// an SMS number goes through [`PhoneNumber::from_provider`].
    pub fn from_provider(kind: ChannelKind, raw: &str) -> Result<DigitalId, String> {
        match kind {
            ChannelKind::Sms if !raw.trim().is_empty() => PhoneNumber::from_provider(raw)
                .map(|p| DigitalId(p.0))
                .map_err(|e| e.to_string()),
            _ => DigitalId::parse(kind, raw),
        }
    }

    /// Canonicalises a raw ID for a kind: E.164 for SMS, lower case for
    /// email, the provider's opaque ID otherwise.
    pub fn parse(kind: ChannelKind, raw: &str) -> Result<DigitalId, String> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err("empty digital ID".into());
        }
        match kind {
            ChannelKind::Sms => PhoneNumber::parse(raw)
                .map(|p| DigitalId(p.0))
                .map_err(|e| e.to_string()),
            ChannelKind::Email => EmailAddress::parse(raw)
                .map(|e| DigitalId(e.0))
                .map_err(|e| e.to_string()),
            ChannelKind::Twitter => {
                if raw.chars().all(|c| c.is_ascii_digit()) {
                    Ok(DigitalId(raw.into()))
                } else {
                    Err(format!("X user IDs are numeric: {raw}"))
                }
            }
            _ => {
                if raw.len() > 256 || raw.chars().any(|c| c.is_control()) {
                    Err(format!("not a valid ID: {raw}"))
                } else {
                    Ok(DigitalId(raw.into()))
                }
            }
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DigitalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A new random identifier (for messages, attachments, contacts).
pub fn new_id() -> String {
    // A v4 UUID from the thread's CSPRNG: `Uuid::new_v4` asks the kernel for
    // each one (a `getrandom` system call per ID, several per webhook).
    let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
    uuid.simple().encode_lower(&mut buf).to_owned()
}

/// An unguessable secret token: 256 bits, URL-safe.
pub fn new_secret() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_random_v4_uuids_in_simple_form() {
        let a = new_id();
        let parsed = uuid::Uuid::try_parse(&a).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(a, parsed.simple().to_string());
        assert_ne!(a, new_id());
    }

    /// Customers from many countries: each country's patterns stay compiled
    /// once used, instead of pushing each other out of libphonenumber's
    /// cache (100 patterns by default) and being compiled again.
    #[test]
    fn phone_patterns_of_many_countries_stay_compiled() {
        let numbers = [
            "+491512345678",
            "+447400123456",
            "+33612345678",
            "+34612345678",
            "+393123456789",
            "+31612345678",
            "+46701234567",
            "+4791234567",
            "+4520123456",
            "+358501234567",
            "+48660123456",
            "+420601234567",
            "+36201234567",
            "+40721234567",
            "+306912345678",
            "+351912345678",
            "+353871234567",
            "+32470123456",
            "+41791234567",
            "+436641234567",
            "+5511912345678",
            "+525512345678",
            "+5491123456789",
            "+573001234567",
            "+56912345678",
            "+51981234567",
            "+919812345678",
            "+8613812345678",
            "+819012345678",
            "+821012345678",
            "+6281234567890",
            "+639171234567",
            "+66812345678",
            "+84912345678",
            "+60123456789",
            "+6591234567",
            "+61412345678",
            "+64211234567",
            "+27831234567",
            "+2348012345678",
        ];
        for n in numbers {
            let _ = PhoneNumber::parse(n);
        }
        let compiled = phonenumber::metadata::DATABASE
            .cache()
            .lock()
            .unwrap()
            .len();
        assert!(compiled > 100, "only {compiled} patterns kept");
    }

    /// What a provider delivered from is kept, unless it is no number at all.
    #[test]
    fn a_senders_number_unknown_to_the_metadata_is_still_taken() {
        // The 555 area code is not allocated: an agent may not type it ...
        assert!(PhoneNumber::parse("+1 555 123 4567").is_err());
        // ... but a message from it is kept, under its E.164 form.
        let id = DigitalId::from_provider(ChannelKind::Sms, "+1 555 123 4567").unwrap();
        assert_eq!(id.as_str(), "+15551234567");
        // Taken first from a provider, then typed: the number is kept with
        // its E.164 form, its validity checked only once something asks,
        // and each way of taking it gets its own answer from the cache.
        let first = PhoneNumber::from_provider("+1 555 987 6543").unwrap();
        assert_eq!(first.as_str(), "+15559876543");
        let cached = PHONE_CACHE.get("+1 555 987 6543").expect("kept");
        assert_eq!(
            (cached.e164.as_deref(), cached.valid),
            (Some("+15559876543"), None)
        );
        assert!(PhoneNumber::parse("+1 555 987 6543").is_err());
        let cached = PHONE_CACHE.get("+1 555 987 6543").expect("kept");
        assert_eq!(
            (cached.e164.as_deref(), cached.valid),
            (Some("+15559876543"), Some(false))
        );
        assert_eq!(
            PhoneNumber::from_provider(" +1 555 987 6543").unwrap(),
            first
        );
        assert!(PhoneNumber::parse("+1 555 987 6543").is_err());
        // Valid numbers come out as `parse` gives them.
        assert_eq!(
            DigitalId::from_provider(ChannelKind::Sms, "+1 (415) 867-5309")
                .unwrap()
                .as_str(),
            "+14158675309"
        );
        for not_a_number in [
            "",
            "hello",
            "12345",
            "+4412",
            "+999123456789",
            "+123456789012345678",
        ] {
            assert!(
                DigitalId::from_provider(ChannelKind::Sms, not_a_number).is_err(),
                "{not_a_number:?}"
            );
        }
        // Other kinds are as `parse` has them.
        assert_eq!(
            DigitalId::from_provider(ChannelKind::Email, "Kerry@Example.COM").unwrap(),
            DigitalId::parse(ChannelKind::Email, "Kerry@Example.COM").unwrap()
        );
    }

    #[test]
    fn phone_numbers_are_normalised_to_e164() {
        assert_eq!(
            PhoneNumber::parse("+1 (415) 867-5309").unwrap().as_str(),
            "+14158675309"
        );
        assert!(PhoneNumber::parse("4158675309").is_err());
        assert!(PhoneNumber::parse("+1 123").is_err());
        // A second look is answered from the cache, with the same answers.
        assert_eq!(
            PhoneNumber::parse(" +1 (415) 867-5309 ").unwrap().as_str(),
            "+14158675309"
        );
        assert!(PhoneNumber::parse("+1 123").is_err());
    }

    #[test]
    fn emails_compare_case_insensitively() {
        assert_eq!(
            DigitalId::parse(ChannelKind::Email, "Kerry@Example.COM").unwrap(),
            DigitalId::parse(ChannelKind::Email, "kerry@example.com").unwrap()
        );
        assert!(EmailAddress::parse("no-at-sign").is_err());
    }

    #[test]
    fn channel_kinds_sort_in_product_order() {
        let mut kinds = vec![ChannelKind::Whatsapp, ChannelKind::Chat, ChannelKind::Sms];
        kinds.sort();
        assert_eq!(
            kinds,
            vec![ChannelKind::Chat, ChannelKind::Sms, ChannelKind::Whatsapp]
        );
    }
}

//! SMS encoding and segment count, as Twilio computes them.
//!
//! A text that fits the GSM 03.38 alphabet goes as GSM-7: 160 septets in a
//! single segment, 153 per segment once concatenated (the 6-octet user data
//! header takes the rest). One character outside it switches the **whole**
//! message to UCS-2: 70 UTF-16 code units, 67 per concatenated segment
//! (providers.md A5.4). Characters of the GSM extension table
//! (`€ [ ] { } \ ^ ~ |` and form feed) take two septets: an escape and the
//! character.
//!
//! A character is never split across two segments: an extension character's
//! two septets, and a surrogate pair (most emoji) in UCS-2, always travel
//! together, as in Twilio's own calculator (TwilioDevEd/message-segment-calculator,
//! whose vectors the tests below check). Twilio's calculator goes one step
//! further and keeps whole grapheme clusters (an emoji with a skin tone, a
//! flag) together; we pack by Unicode scalar value, which differs only for
//! multi-scalar clusters sitting exactly on a segment boundary.

/// What [`analyze`] finds out about a text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Segments {
    /// `"GSM-7"` or `"UCS-2"`.
    pub encoding: &'static str,
    /// How many SMS segments the text takes (0 for empty text).
    pub segments: u32,
    /// The length in the encoding's units: septets for GSM-7 (extension
    /// characters count 2), UTF-16 code units for UCS-2.
    pub characters: usize,
}

pub const GSM7: &str = "GSM-7";
pub const UCS2: &str = "UCS-2";

const GSM7_SINGLE: usize = 160;
const GSM7_CONCATENATED: usize = 153;
const UCS2_SINGLE: usize = 70;
const UCS2_CONCATENATED: usize = 67;

/// Septets a character takes in GSM-7, or `None` when it has no GSM-7 form.
///
/// The basic table and the extension table of 3GPP TS 23.038, as mapped by
/// Twilio's calculator (`UnicodeToGSM.ts`). The escape character itself is
/// not something a user can type, so it is not in the table.
pub fn gsm7_septets(c: char) -> Option<usize> {
    match c {
        // Extension table: escape + character.
        '\u{0C}' | '^' | '{' | '}' | '\\' | '[' | '~' | ']' | '|' | '€' => Some(2),
        // Basic table: printable ASCII except the few GSM moved elsewhere.
        ' '..='Z' | 'a'..='z' | '_' | '\n' | '\r' => Some(1),
        '£' | '¥' | 'è' | 'é' | 'ù' | 'ì' | 'ò' | 'Ç' | 'Ø' | 'ø' | 'Å' | 'å' | 'Δ' | 'Φ' | 'Γ'
        | 'Λ' | 'Ω' | 'Π' | 'Ψ' | 'Σ' | 'Θ' | 'Ξ' | 'Æ' | 'æ' | 'ß' | 'É' | '¤' | '¡' | 'Ä'
        | 'Ö' | 'Ñ' | 'Ü' | '§' | '¿' | 'ä' | 'ö' | 'ñ' | 'ü' | 'à' => Some(1),
        _ => None,
    }
}

/// Packs units of the given sizes into segments of `capacity`, never splitting one.
fn pack(sizes: impl Iterator<Item = usize>, capacity: usize) -> u32 {
    let mut segments = 1;
    let mut used = 0;
    for size in sizes {
        if used + size > capacity {
            segments += 1;
            used = 0;
        }
        used += size;
    }
    segments
}

/// The encoding, segment count and length of an SMS text.
pub fn analyze(text: &str) -> Segments {
    let gsm: Option<Vec<usize>> = text.chars().map(gsm7_septets).collect();
    let (encoding, sizes, single, concatenated) = match gsm {
        Some(sizes) => (GSM7, sizes, GSM7_SINGLE, GSM7_CONCATENATED),
        None => (
            UCS2,
            text.chars().map(char::len_utf16).collect(),
            UCS2_SINGLE,
            UCS2_CONCATENATED,
        ),
    };
    let characters: usize = sizes.iter().sum();
    let segments = match characters {
        0 => 0,
        n if n <= single => 1,
        _ => pack(sizes.into_iter(), concatenated),
    };
    Segments {
        encoding,
        segments,
        characters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "D" of the calculator's vectors: `2345678901` repeated.
    fn d(n: usize) -> String {
        "2345678901".chars().cycle().take(n).collect()
    }

    /// Message bits and total bits (with a 48-bit UDH per concatenated segment),
    /// as the calculator's vectors state them.
    fn bits(s: &Segments) -> (usize, usize) {
        let unit = if s.encoding == GSM7 { 7 } else { 16 };
        let message = s.characters * unit;
        let udh = if s.segments > 1 {
            48 * s.segments as usize
        } else {
            0
        };
        (message, message + udh)
    }

    /// Twilio's calculator vectors (providers.md A5.4, appendix 13-16): if
    /// these drift, the preview tells agents a different price than Twilio bills.
    #[test]
    fn twilio_calculator_vectors_match() {
        let cases = [
            (format!("{{{}", d(158)), GSM7, 1, 1120, 1120),
            (format!("{{{}", d(159)), GSM7, 2, 1127, 1223),
            (format!("😜{}", d(68)), UCS2, 1, 1120, 1120),
            (format!("😜{}", d(69)), UCS2, 2, 1136, 1232),
        ];
        for (body, encoding, segments, message_bits, total_bits) in cases {
            let s = analyze(&body);
            assert_eq!(s.encoding, encoding, "{body}");
            assert_eq!(s.segments, segments, "{body}");
            assert_eq!(bits(&s), (message_bits, total_bits), "{body}");
        }
    }

    #[test]
    fn empty_text_is_no_segment() {
        assert_eq!(
            analyze(""),
            Segments {
                encoding: GSM7,
                segments: 0,
                characters: 0
            }
        );
    }

    #[test]
    fn plain_text_fills_160_then_153_per_segment() {
        assert_eq!(analyze(&"a".repeat(160)).segments, 1);
        assert_eq!(analyze(&"a".repeat(161)).segments, 2);
        assert_eq!(analyze(&"a".repeat(306)).segments, 2);
        assert_eq!(analyze(&"a".repeat(307)).segments, 3);
        assert_eq!(analyze(&"a".repeat(1600)).characters, 1600);
    }

    #[test]
    fn extension_characters_count_two_septets() {
        let s = analyze("€[]{}\\^~|");
        assert_eq!(s.encoding, GSM7);
        assert_eq!(s.characters, 18);
        assert_eq!(analyze(&"€".repeat(80)).segments, 1);
        assert_eq!(analyze(&"€".repeat(81)).segments, 2);
    }

    /// An escape and its character stay in one segment: 152 plain septets
    /// then `€` leave no room for its two septets in the first segment.
    #[test]
    fn an_extension_character_is_not_split_across_segments() {
        let text = format!("{}€{}", "a".repeat(152), "a".repeat(10));
        let s = analyze(&text);
        assert_eq!(s.characters, 164);
        // 152 in the first (153 would split the €), 2 + 10 in the second.
        assert_eq!(s.segments, 2);
        let text = format!("{}€{}", "a".repeat(152), "a".repeat(152));
        // 152 | € + 151 | 1: a simple ceil(306 / 153) would say 2.
        assert_eq!(analyze(&text).segments, 3);
    }

    #[test]
    fn one_non_gsm_character_switches_the_whole_text_to_ucs2() {
        let s = analyze("Hello, world ç");
        assert_eq!(s.encoding, UCS2);
        assert_eq!(s.characters, 14);
        assert_eq!(analyze("Grüße àèé ÄÖÜ ñ").encoding, GSM7);
        assert_eq!(analyze("“quoted”").encoding, UCS2);
    }

    #[test]
    fn emoji_count_two_units_and_stay_whole() {
        assert_eq!(analyze("😀").characters, 2);
        assert_eq!(analyze(&"😀".repeat(35)).segments, 1);
        assert_eq!(analyze(&"😀".repeat(36)).segments, 2);
        // 66 units then an emoji: it does not fit in the 67-unit segment.
        let text = format!("{}😀", "ж".repeat(66));
        let s = analyze(&format!("{text}{}", "ж".repeat(66)));
        assert_eq!(s.characters, 134);
        assert_eq!(s.segments, 3, "66 | 2 + 65 | 1");
    }
}

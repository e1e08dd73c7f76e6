//! Rules for the names people type: display names of members and sessions, mesh names, group names.
//!
//! A display name is shown to people beside messages, so it must not be able to pass for another:
//! it is kept in Unicode NFC, may not hold invisible or direction-changing characters, and within a
//! mesh no two names may look alike by their confusable skeletons (Unicode TS #39, of the name in
//! lower case, as written and in upper case; [`NameKeys`]): `сla` (Cyrillic с) cannot stand beside
//! `cla`, nor `Alice` beside `alice`, nor `ВОВ` (Cyrillic) beside `bob`. The broker enforces the last
//! rule.

use unicode_normalization::UnicodeNormalization;
use unicode_security::GeneralSecurityProfile;
use unicode_security::general_security_profile::IdentifierType;

use crate::ProtoError;

pub const MAX_NAME_LEN: usize = 64;

/// What a user typed, in the form names are stored and compared in: NFC, without surrounding spaces.
pub fn normalize(name: &str) -> String {
    name.trim().nfc().collect()
}

/// A display name (of a member or a session) or a mesh name: 1 to 64 characters in NFC, no control,
/// invisible or bidirectional-control characters, no whitespace but plain spaces, no leading or
/// trailing space, not starting with `@` or `*` (those are targets), and not 8 or more hex digits (that
/// would read as a key, or as the key prefix shown beside names).
pub fn validate_display(name: &str) -> Result<(), ProtoError> {
    let bad = |why: &str| Err(ProtoError::BadName(format!("{}: {why}", printable(name))));
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.chars().count() > MAX_NAME_LEN {
        return bad("longer than 64 characters");
    }
    if name.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    if let Some(c) = name.chars().find(|&c| invisible(c)) {
        return bad(&format!("contains the invisible or direction-changing character U+{:04X}", c as u32));
    }
    if name.chars().any(|c| c.is_whitespace() && c != ' ') {
        return bad("contains whitespace other than plain spaces");
    }
    if name.trim() != name {
        return bad("has leading or trailing spaces");
    }
    if name.contains("  ") {
        // Runs of spaces could push a name's own text into the columns it is shown in.
        return bad("has two spaces in a row");
    }
    if name.nfc().ne(name.chars()) {
        return bad("is not in Unicode normal form C (normalise it first)");
    }
    if name.starts_with('@') || name.starts_with('*') {
        return bad("must not start with '@' or '*'");
    }
    if let Some(c) = name.chars().find(|&c| !allowed(c)) {
        return bad(&format!("{} is not allowed in a name (letters, digits, spaces and - _ . ' only)", shown(c)));
    }
    // Read as people read it (look-alikes folded, and l, i, o read as 1 and 0), a name holds no run
    // of 8 hex digits: it could pass for a key, or for the key prefix shown beside names.
    let as_read: String = skeleton_key(name)
        .chars()
        .map(|c| match c {
            'l' | 'i' | '|' => '1',
            'o' => '0',
            c => c,
        })
        .collect();
    if hex_run(&name.to_ascii_lowercase()) >= 8 || hex_run(&as_read) >= 8 {
        return bad("must not look like a key or the 8-digit key prefix shown beside names");
    }
    Ok(())
}

/// Letters, marks and digits that Unicode's general security profile (TS #39) allows in identifiers,
/// plain spaces, and `- _ . '`: no symbols or brackets that could forge the lines names are shown in,
/// and none of the letters made to look like others (small capitals `ʙᴏʙ`, superscripts `ᵇᵒᵇ`, circled
/// `ⓑⓞⓑ`, fullwidth, mathematical) or of scripts in limited use.
fn allowed(c: char) -> bool {
    c == ' ' || matches!(c, '-' | '_' | '.' | '\'') || ((c.is_alphanumeric() || is_mark(c)) && c.identifier_allowed())
}

/// Combining marks (accents written as a separate code point, as some scripts need).
fn is_mark(c: char) -> bool {
    use unicode_normalization::char::is_combining_mark;
    is_combining_mark(c)
}

/// The longest run of ASCII hex digits in `s`.
fn hex_run(s: &str) -> usize {
    s.split(|c: char| !c.is_ascii_hexdigit()).map(str::len).max().unwrap_or(0)
}

/// A character as an error message shows it: itself when plainly visible, else its code point.
fn shown(c: char) -> String {
    if c.is_ascii_graphic() { format!("{c:?}") } else { format!("U+{:04X}", c as u32) }
}

/// Characters that change how text around them looks without showing themselves: zero-width
/// characters, bidirectional controls, tag characters, variation selectors (Unicode's
/// Default_Ignorable_Code_Point), noncharacters, and the blank "filler" letters that render as
/// nothing (Hangul fillers, the Braille blank, Khmer inherent vowels).
pub fn invisible(c: char) -> bool {
    matches!(c.identifier_type(), Some(IdentifierType::Default_Ignorable | IdentifierType::Not_Character))
        || matches!(
            c,
            '\u{200E}'
                | '\u{200F}'
                | '\u{061C}'
                | '\u{202A}'..='\u{202E}'
                | '\u{200B}'..='\u{200D}'
                | '\u{2060}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{180B}'..='\u{180F}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{E0000}'..='\u{E0FFF}'
                | '\u{00AD}'
                | '\u{034F}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{2800}'
                | '\u{3164}'
                | '\u{FFA0}'
        )
}

/// A name as an error message shows it: only ASCII printable characters and letters as they are,
/// everything else as `\u{…}`, so an error never carries an invisible or reordering character.
fn printable(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' || (c.is_alphanumeric() && !invisible(c)) {
                c.to_string()
            } else {
                format!("\\u{{{:04X}}}", c as u32)
            }
        })
        .collect::<String>()
        .chars()
        .take(100)
        .collect()
}

/// A name as people read it for the key check: its TS #39 confusable skeleton in lower case, lowered
/// again (`R0bert` folds to `rObert`). [`name_keys`] are what names are compared by.
fn skeleton_key(name: &str) -> String {
    unicode_security::skeleton(&normalize(name).to_lowercase()).collect::<String>().to_lowercase()
}

/// The keys two names are compared by: the TS #39 confusable skeleton of the name in lower case, as
/// written, and in upper case, each keeping its case. Names that share any key look alike and may not
/// both be held in one mesh: `alice`, `Alice` and `ALICE` (case never tells names apart), `сla`
/// (Cyrillic с) and `cla`, `aIice` (a capital i) and `alice`, `ALlCE` (a lower-case l) and `ALICE`,
/// `Вob` (Cyrillic В) and `BOB`. Keeping case keeps `ALI` and `ALL`, or `Clara` and `Ciara`, apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameKeys {
    pub lower: String,
    pub written: String,
    pub upper: String,
}

impl NameKeys {
    /// Whether any key of one is any key of the other.
    pub fn collides(&self, other: &NameKeys) -> bool {
        self.all().iter().any(|k| other.all().contains(k))
    }

    pub fn all(&self) -> [&str; 3] {
        [&self.lower, &self.written, &self.upper]
    }
}

pub fn name_keys(name: &str) -> NameKeys {
    let name = normalize(name);
    let skeleton = |s: &str| unicode_security::skeleton(s).collect::<String>();
    NameKeys { lower: skeleton(&name.to_lowercase()), written: skeleton(&name), upper: skeleton(&name.to_uppercase()) }
}

/// Whether two names look alike (see [`NameKeys`]).
pub fn confusable(a: &str, b: &str) -> bool {
    name_keys(a).collides(&name_keys(b))
}

/// A group name (after the `@`): 1 to 64 of `a-z`, `0-9`, `-`, `_`, `.`.
pub fn validate_group(name: &str) -> Result<(), ProtoError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(()) } else { Err(ProtoError::BadName(format!("group {name:?}: use 1-64 of a-z 0-9 - _ ."))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names() {
        for good in ["alice", "Alice Smith", "agent-1", "ユーザー", "café", "o'brien", "r2.d2", "deadbee", "Ōsaka"]
        {
            validate_display(good).expect(good);
        }
        validate_display("cafe").expect("a short hex word is a name");
        for bad in
            ["", " alice", "alice ", "@ops", "*", "a\nb", &"a".repeat(65), &"ab".repeat(32), "5a515ce9", "DEADBEEF00"]
        {
            assert!(validate_display(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn invisible_and_direction_changing_characters_are_refused() {
        for bad in [
            "ali\u{200B}ce",  // zero-width space
            "ali\u{200D}ce",  // zero-width joiner
            "\u{202E}ecila",  // right-to-left override
            "ali\u{2066}ce",  // left-to-right isolate
            "ali\u{00AD}ce",  // soft hyphen
            "ali\u{FEFF}ce",  // byte order mark
            "ali\u{E0041}ce", // tag character
            "ali\u{FE0F}ce",  // variation selector
            "ali\u{2028}ce",  // line separator
            "ali\u{00A0}ce",  // no-break space
            "cafe\u{301}",    // not NFC (e + combining acute)
            "alice\u{2800}",  // Braille blank
            "alice\u{3164}",  // Hangul filler
            "Robert (c679b9a7)",
            "Robert \u{2192} you [team]: ok",
            "\u{0441}679b9\u{0430}7", // a key prefix in Cyrillic look-alikes
            "bob@home",
            "5a5l5ce9", // l for 1
        ] {
            assert!(validate_display(bad).is_err(), "{} accepted", bad.escape_unicode());
        }
        assert_eq!(normalize(" cafe\u{301} "), "café");
        validate_display(&normalize("cafe\u{301}")).expect("normalised");
    }

    #[test]
    fn confusable_names_share_a_key() {
        assert_eq!(skeleton_key("cla"), skeleton_key("\u{0441}la"), "Cyrillic es");
        assert_eq!(skeleton_key("alice"), skeleton_key("\u{0430}lice"), "Cyrillic a");
        assert_eq!(skeleton_key("Alice"), skeleton_key("alice"), "case");
        assert_eq!(skeleton_key("ALICE"), skeleton_key("alice"), "case");
        assert_eq!(skeleton_key("\u{0410}lice"), skeleton_key("alice"), "Cyrillic capital A");
        assert_eq!(skeleton_key("paypal"), skeleton_key("p\u{0430}yp\u{0430}l"));
        assert_eq!(skeleton_key("rn"), skeleton_key("m"), "TS #39 maps rn to m");
        assert_eq!(skeleton_key("R0bert"), skeleton_key("Robert"), "digit zero");
        assert_eq!(skeleton_key("R\u{043E}bert"), skeleton_key("Robert"), "Cyrillic o");
        assert_ne!(skeleton_key("alice"), skeleton_key("bob"));
    }

    #[test]
    fn letters_made_to_look_like_others_and_runs_of_spaces_are_refused() {
        for name in [
            "\u{0299}\u{1D0F}\u{0299}",                 // small capitals ʙᴏʙ
            "\u{1D2E}\u{1D3C}\u{1D2E}",                 // modifier letters ᴮᴼᴮ
            "\u{24D1}\u{24DE}\u{24D1}",                 // circled ⓑⓞⓑ
            "\u{1F171}ob",                              // 🅱ob
            "\u{FF42}\u{FF4F}\u{FF42}",                 // fullwidth ｂｏｂ
            "\u{1D41B}\u{1D428}\u{1D41B}",              // mathematical bold 𝐛𝐨𝐛
            "\u{13AA}\u{13DE}\u{13C6}\u{13DF}\u{13AC}", // Cherokee ᎪᏞᏆᏟᎬ
            "bob  1664157\u{1D05}",                     // a space run and a small-capital d
            "1664157\u{1D05}",
            "alice \u{2078}\u{00B9}\u{2079}\u{00B9}\u{2074}\u{1D43}\u{1D49}\u{1D9C}",
        ] {
            assert!(validate_display(name).is_err(), "{name:?} is accepted");
        }
        for name in ["Zoë", "José", "東京", "Ольга", "Σοφία", "محمد", "O'Brien", "build-bot 2", "ALİCE"]
        {
            assert!(validate_display(name).is_ok(), "{name:?} is refused");
        }
        for (a, b) in [("Ali", "All"), ("ALI", "ALL"), ("Eli", "Ell"), ("Clara", "Ciara"), ("Dan", "Dam")] {
            assert!(!confusable(a, b), "{a:?} and {b:?} are told apart");
        }
    }

    #[test]
    fn capitals_and_other_scripts_cannot_pass_for_a_name() {
        for (impostor, name) in [
            ("\u{0412}ob", "Bob"),
            ("\u{0412}ob", "bob"),
            ("\u{0412}\u{041E}\u{0412}", "bob"),
            ("\u{0392}\u{039F}\u{0392}", "bob"),
            ("\u{13F4}OB", "bob"),
            ("\u{042C}\u{043E}\u{042C}", "bob"),
            ("\u{0185}o\u{0185}", "bob"),
            ("aIice", "alice"),
            ("\u{13AA}LICE", "alice"),
            ("\u{13AA}Iice", "alice"),
            ("\u{0410}lice", "alice"),
            ("D\u{0391}VE", "dave"),
            ("ALlCE", "alice"),
        ] {
            // Refused outright (letters made to look like others), or as a look-alike of `name`.
            let refused = validate_display(impostor).is_err() || confusable(impostor, name);
            assert!(refused, "{impostor:?} passes for {name:?}");
        }
        for (a, b) in [("Ali", "All"), ("ALI", "ALL"), ("alice", "bob"), ("root", "root-2"), ("Eli", "Ell")] {
            assert!(!confusable(a, b), "{a:?} and {b:?} are told apart");
        }
        assert_ne!(skeleton_key("root"), skeleton_key("root-2"));
    }

    #[test]
    fn group_names() {
        validate_group("ops-team_1.x").expect("valid");
        assert!(validate_group("Ops").is_err());
        assert!(validate_group("").is_err());
    }
}

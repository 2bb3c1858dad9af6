//! When two names are "the same" to some backend: the spellings a case-insensitive JSON parser
//! (Go's `encoding/json`, .NET's `PropertyNameCaseInsensitive`, Jackson's
//! `ACCEPT_CASE_INSENSITIVE_PROPERTIES`) or a case-insensitive router (ASP.NET) would take for a
//! pricing field or a priced path.
//!
//! ASCII letters in either case, plus the four non-ASCII letters whose case mapping is an ASCII
//! letter (`ı` and `İ` → i, `ſ` → s, the Kelvin sign `K` → k): Go folds `ſ` and `K`, .NET upper-cases
//! `ı`, Java lower-cases `İ`. Everything else must match exactly. No allocation.

/// The letter `c` stands for when case is ignored.
fn fold(c: char) -> char {
    match c {
        'ı' | 'İ' => 'i',
        'ſ' => 's',
        '\u{212A}' => 'k',
        c => c.to_ascii_lowercase(),
    }
}

/// Whether `a` and `b` are spellings of one name.
pub fn same(a: &str, b: &str) -> bool {
    a.chars().map(fold).eq(b.chars().map(fold))
}

/// If `s` starts with a spelling of `prefix`, the byte length of that start of `s`.
pub fn prefix_len(s: &str, prefix: &str) -> Option<usize> {
    // Nearly every request spells it as configured: no need to fold character by character.
    if s.starts_with(prefix) {
        return Some(prefix.len());
    }
    let mut rest = s.char_indices();
    for p in prefix.chars() {
        let (_, c) = rest.next()?;
        if fold(c) != fold(p) {
            return None;
        }
    }
    Some(rest.next().map_or(s.len(), |(i, _)| i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_and_the_non_ascii_letters_that_fold_to_ascii() {
        for a in ["tier", "TIER", "Tier", "tıer", "TİER", "leadſ", "LEADS"] {
            assert!(same(a, "tier") || same(a, "leads"), "{a}");
        }
        assert!(same("\u{212A}ey", "key"));
        for a in ["tiers", "tie", "t ier", "tiér", ""] {
            assert!(!same(a, "tier"), "{a}");
        }
    }

    #[test]
    fn prefixes_report_the_matched_byte_length() {
        assert_eq!(prefix_len("/V1/Chat/x", "/v1/chat/"), Some(9));
        assert_eq!(prefix_len("/v1/leadſ", "/v1/leads"), Some("/v1/leadſ".len()));
        assert_eq!(prefix_len("/v1/ch", "/v1/chat"), None);
        assert_eq!(prefix_len("/v2/chat", "/v1/"), None);
        assert_eq!(prefix_len("/any", ""), Some(0));
    }
}

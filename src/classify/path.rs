//! Path normalisation before route matching, so a request cannot dodge a priced route by
//! spelling its path differently (`/v1/chat//completions`, `/v1/chat/%63ompletions`,
//! `/v1/chat/completions/`, `/v1/x/../chat/completions`). The normalised path is also the one
//! forwarded, so the upstream serves exactly what was priced.

use std::borrow::Cow;

/// Percent-decodes unreserved characters, merges repeated slashes, resolves `.` and `..`
/// segments and drops a trailing slash (except for `/`). Borrowed when nothing changes.
pub fn normalize(path: &str) -> Cow<'_, str> {
    let suspicious = path.contains('%')
        || path.contains("//")
        || path.contains("/.")
        || (path.len() > 1 && path.ends_with('/'))
        || !path.starts_with('/');
    if !suspicious {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    if out == path { Cow::Borrowed(path) } else { Cow::Owned(out) }
}

/// Decodes `%XX` only where XX is an unreserved character (RFC 3986 §2.3); other escapes
/// (such as `%2F`) stay as they are, upper-cased.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push(b[i + 1].to_ascii_uppercase() as char);
                    out.push(b[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn clean_paths_are_borrowed() {
        assert!(matches!(normalize("/v1/chat/completions"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(normalize("/"), "/");
    }

    #[test]
    fn disguised_paths_normalise_to_the_priced_one() {
        for p in [
            "/v1/chat//completions",
            "/v1/chat/%63ompletions",
            "/v1/chat/completions/",
            "/v1/x/../chat/completions",
            "/v1/./chat/completions",
            "//v1/chat/completions",
            "/v1/chat/%63%6F%6dpletions",
        ] {
            assert_eq!(normalize(p), "/v1/chat/completions", "{p}");
        }
    }

    #[test]
    fn reserved_escapes_stay_escaped_and_dotdot_cannot_escape_root() {
        assert_eq!(normalize("/files/a%2fb"), "/files/a%2Fb");
        assert_eq!(normalize("/../../etc"), "/etc");
        assert_eq!(normalize("/a%"), "/a%");
        assert_eq!(normalize("/a%zz"), "/a%zz");
    }
}

//! The request line before route matching, so a request cannot dodge a priced route by spelling
//! it differently. Spellings with one meaning are normalised (`/v1/chat//completions`,
//! `/v1/chat/%63ompletions`, `/v1/chat/completions/`, `/v1/x/../chat/completions`), and the
//! normalised path is the one forwarded, so the upstream serves exactly what was priced.
//! Spellings whose meaning depends on the backend are refused ([`check_target`],
//! [`check_method`]): an encoded `/` or `\`, a NUL, a backslash, a `;` path parameter, a
//! method that is not one of the standard upper-case ones.

use std::borrow::Cow;

use http::Method;

use super::ClassifyError;

/// Refuses a path that backends read in different ways: `%2F` (a `/` to some, part of a segment
/// to others), `%5C` and `\` (a separator on Windows servers and some frameworks), `%00` (cuts the
/// path short in C code) and `;` (a path parameter that Java servers strip before routing). Only
/// the path is checked; the query does not choose a route, and encoded URLs in it are common.
pub fn check_target(path: &str) -> Result<(), ClassifyError> {
    let b = path.as_bytes();
    let encoded = |i: usize| match (b.get(i + 1), b.get(i + 2)) {
        (Some(h), Some(l)) => matches!((*h, l.to_ascii_uppercase()), (b'2', b'F') | (b'5', b'C') | (b'0', b'0')),
        _ => false,
    };
    let bad = (0..b.len()).find(|&i| matches!(b[i], b'\\' | b';') || (b[i] == b'%' && encoded(i)));
    match bad {
        None => Ok(()),
        Some(i) => {
            let what = if b[i] == b'%' { &path[i..i + 3] } else { &path[i..i + 1] };
            Err(ClassifyError::Invalid(format!(
                "The request path may not contain \"{what}\" (an encoded / or \\, a NUL, a backslash or a ; \
                 path parameter): backends read such paths differently."
            )))
        }
    }
}

/// Refuses a method that is not one of the nine standard ones, spelled in upper case. `post`
/// reaches the gateway as its own (extension) method, so it would miss the `POST` routes and
/// fall through to a free one, while many backends upper-case it and serve the priced route.
pub fn check_method(method: &Method) -> Result<(), ClassifyError> {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::CONNECT,
        Method::OPTIONS,
        Method::TRACE,
        Method::PATCH,
    ];
    if STANDARD.contains(method) {
        return Ok(());
    }
    Err(ClassifyError::Invalid(format!(
        "Unknown method \"{method}\"; use one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH \
         (in upper case)."
    )))
}

/// Percent-decodes unreserved characters, merges repeated slashes, resolves `.` and `..`
/// segments and drops a trailing slash (except for `/`). Borrowed when nothing changes.
pub fn normalize(path: &str) -> Cow<'_, str> {
    // One pass over the bytes: `str::contains` with a two-byte needle sets up a substring
    // searcher per call, which costs more than the whole scan of a short path.
    let b = path.as_bytes();
    let suspicious = b.contains(&b'%')
        || b.windows(2).any(|w| w[0] == b'/' && (w[1] == b'/' || w[1] == b'.'))
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
    // Bytes, not chars: a non-ASCII character's UTF-8 bytes are copied as they are.
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c);
                } else {
                    out.extend_from_slice(&[b'%', b[i + 1].to_ascii_uppercase(), b[i + 2].to_ascii_uppercase()]);
                }
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII sequences were replaced, by ASCII: still UTF-8.
    String::from_utf8(out).expect("UTF-8 in, ASCII replacements")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_ascii_bytes_are_kept_as_they_are() {
        assert_eq!(decode_unreserved("/v1/d\u{e9}als/%41"), "/v1/d\u{e9}als/A");
    }

    #[test]
    fn targets_backends_read_differently_are_refused() {
        for p in [
            "/v1/chat%2Fcompletions",
            "/v1/chat%2fcompletions",
            "/v1%5Cchat/completions",
            "/v1%5cchat/completions",
            "/v1/chat/completions%00",
            "/v1\\chat/completions",
            "/v1/chat/completions;x=1",
            "/v1;/chat/completions",
        ] {
            let e = check_target(p).unwrap_err();
            assert!(matches!(e, ClassifyError::Invalid(_)), "{p}");
        }
        for p in ["/v1/chat/completions", "/files/a%20b", "/a%2", "/a%", "/%41%2E", "/v1/chat%2Ecompletions"] {
            assert_eq!(check_target(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn only_the_nine_standard_methods_in_upper_case() {
        for m in ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"] {
            assert!(check_method(&Method::from_bytes(m.as_bytes()).unwrap()).is_ok(), "{m}");
        }
        for m in ["post", "Post", "get", "FOO", "PROPFIND"] {
            let method = Method::from_bytes(m.as_bytes()).unwrap();
            assert_ne!(method, Method::POST, "http keeps {m} as its own method");
            assert!(check_method(&method).is_err(), "{m}");
        }
    }

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

//! A one-pass JSON probe: pulls a few top-level fields out of a request body without building a
//! `serde_json::Value` (no allocation for fields it does not need, none for borrowed strings).
//!
//! A probed field must be given once, in one spelling: parsers disagree on duplicate keys (first
//! wins, last wins, error) and some match keys ignoring case, so a second `tier`, a `TIER` next to
//! `tier`, or a lone `TIER` could be read by the backend as a field the gateway did not price.
//! Any of those is [`ProbeError::Ambiguous`]. So is a key that equals a probed name up to a NUL
//! character (`"tier\u0000x"`): parsers built on C strings stop reading it there.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// What a probed top-level field held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field<'a> {
    /// Not present (or `null`).
    Missing,
    /// A string.
    Str(Cow<'a, str>),
    /// A non-negative whole number.
    Number(u64),
    /// An array, with its length.
    Array(u64),
    /// Anything else (object, bool, negative or fractional number).
    Other,
}

impl Field<'_> {
    /// The count this field stands for: an array's length or a number.
    pub fn count(&self) -> Option<u64> {
        match self {
            Field::Number(n) | Field::Array(n) => Some(*n),
            _ => None,
        }
    }
}

/// Why a body could not be probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// Not one JSON object; the message says why.
    Invalid(String),
    /// The probed field `name` is also given as `spelling` (equal to `name` for an exact duplicate).
    Ambiguous {
        /// The probed name.
        name: String,
        /// The other key that a backend could read as `name`.
        spelling: String,
    },
}

/// Reads the top-level fields `names` of a JSON object body.
pub fn probe<'a, const N: usize>(body: &'a [u8], names: [&str; N]) -> Result<[Field<'a>; N], ProbeError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let (fields, ambiguous) = de.deserialize_map(ObjectVisitor { names }).map_err(describe)?;
    de.end().map_err(describe)?;
    match ambiguous {
        Some((i, spelling)) => Err(ProbeError::Ambiguous { name: names[i].to_owned(), spelling }),
        None => Ok(fields),
    }
}

/// `body` with its top-level `name` set to the string `value`: the value replaced where it
/// stands, or the member added first when absent; every other byte stays as sent. `body` must
/// have passed [`probe`] for `name` (one object, `name` given at most once, in one spelling).
pub fn set_string_field(body: &[u8], name: &str, value: &str) -> Result<Vec<u8>, ProbeError> {
    struct Find<'n> {
        name: &'n str,
    }
    impl<'de> Visitor<'de> for Find<'_> {
        type Value = (Option<&'de serde_json::value::RawValue>, usize);
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let (mut found, mut members) = (None, 0);
            while let Some(key) = map.next_key::<String>()? {
                members += 1;
                if key == self.name {
                    found = Some(map.next_value()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok((found, members))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let (found, members) = de.deserialize_map(Find { name }).map_err(describe)?;
    de.end().map_err(describe)?;
    let encoded = serde_json::to_string(value).map_err(describe)?;
    let mut out = Vec::with_capacity(body.len() + encoded.len() + name.len() + 4);
    match found {
        Some(raw) => {
            // The raw value is a slice of `body` itself.
            let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
            out.extend_from_slice(&body[..start]);
            out.extend_from_slice(encoded.as_bytes());
            out.extend_from_slice(&body[start + raw.get().len()..]);
        }
        None => {
            let brace = body.iter().position(|b| *b == b'{').expect("a parsed object has a brace") + 1;
            out.extend_from_slice(&body[..brace]);
            out.extend_from_slice(serde_json::to_string(name).map_err(describe)?.as_bytes());
            out.push(b':');
            out.extend_from_slice(encoded.as_bytes());
            if members > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&body[brace..]);
        }
    }
    Ok(out)
}

fn describe(e: serde_json::Error) -> ProbeError {
    ProbeError::Invalid(format!("The request body is not valid JSON ({e})."))
}

struct ObjectVisitor<'n, const N: usize> {
    names: [&'n str; N],
}

/// The first ambiguity seen: the index of the probed name and the other spelling.
type Ambiguity = Option<(usize, String)>;

impl<'de, const N: usize> Visitor<'de> for ObjectVisitor<'_, N> {
    type Value = ([Field<'de>; N], Ambiguity);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = std::array::from_fn(|_| Field::Missing);
        let mut seen = [false; N];
        let mut ambiguous: Ambiguity = None;
        // The whole object is still read after an ambiguity, so malformed JSON stays a 400 for that.
        while let Some(key) = map.next_key_seed(KeySeed { names: &self.names })? {
            match key {
                Key::Exact(i) if !seen[i] => {
                    seen[i] = true;
                    out[i] = map.next_value_seed(FieldSeed)?;
                    continue;
                }
                Key::Exact(i) => {
                    ambiguous.get_or_insert_with(|| (i, self.names[i].to_owned()));
                }
                Key::Spelling(i, spelling) => {
                    ambiguous.get_or_insert((i, spelling));
                }
                Key::Other => {}
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok((out, ambiguous))
    }
}

/// What a key is to the probe.
enum Key {
    /// Exactly the probed name at this index.
    Exact(usize),
    /// Another spelling of the probed name at this index (allocated: only on the way to a 400).
    Spelling(usize, String),
    /// Not a probed field.
    Other,
}

/// Matches a key against the wanted names, allocating only for an ambiguous spelling.
struct KeySeed<'s, 'n> {
    names: &'s [&'n str],
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_, '_> {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_, '_> {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if let Some(i) = self.names.iter().position(|n| *n == v) {
            return Ok(Key::Exact(i));
        }
        let up_to_nul = v.split('\0').next().unwrap_or(v);
        Ok(match self.names.iter().position(|n| super::spelling::same(up_to_nul, n)) {
            Some(i) => Key::Spelling(i, v.to_owned()),
            None => Key::Other,
        })
    }
}

struct FieldSeed;

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Field<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed {
    type Value = Field<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Field::Number(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(u64::try_from(v).map(Field::Number).unwrap_or(Field::Other))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        let whole = v.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&v);
        Ok(if whole { Field::Number(v as u64) } else { Field::Other })
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Missing)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut n = 0;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            n += 1;
        }
        Ok(Field::Array(n))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields_of_each_kind() {
        let body = br#"{"model":"x","tier":"fast","leads":[{"a":1},{"b":[1,2]},3],"steps":4,"n":{"x":1},"z":null}"#;
        let [tier, leads, steps, n, z, absent] = probe(body, ["tier", "leads", "steps", "n", "z", "absent"]).unwrap();
        assert_eq!(tier, Field::Str(Cow::Borrowed("fast")));
        assert_eq!(leads, Field::Array(3));
        assert_eq!(steps, Field::Number(4));
        assert_eq!(n, Field::Other);
        assert_eq!(z, Field::Missing);
        assert_eq!(absent, Field::Missing);
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let [t] = probe(br#"{"tier":"f\u0061st"}"#, ["tier"]).unwrap();
        assert_eq!(t, Field::Str(Cow::Owned("fast".into())));
    }

    #[test]
    fn numbers_that_are_not_counts() {
        let [a, b, c] = probe(br#"{"a":-1,"b":2.5,"c":3.0}"#, ["a", "b", "c"]).unwrap();
        assert_eq!((a.count(), b.count(), c.count()), (None, None, Some(3)));
    }

    fn ambiguous(body: &str) -> Option<(String, String)> {
        match probe(body.as_bytes(), ["tier", "leads"]) {
            Err(ProbeError::Ambiguous { name, spelling }) => Some((name, spelling)),
            Ok(_) => None,
            Err(e) => panic!("{body}: {e:?}"),
        }
    }

    #[test]
    fn a_probed_field_twice_or_in_another_spelling_is_ambiguous() {
        let both = |n: &str, s: &str| Some((n.to_owned(), s.to_owned()));
        assert_eq!(ambiguous(r#"{"tier":"fast","tier":"powerful"}"#), both("tier", "tier"));
        assert_eq!(ambiguous(r#"{"tier":null,"tier":"powerful"}"#), both("tier", "tier"));
        assert_eq!(ambiguous(r#"{"tier":"fast","ti\u0065r":"fast"}"#), both("tier", "tier"), "escaped duplicate");
        assert_eq!(ambiguous(r#"{"tier":"fast","TIER":"powerful"}"#), both("tier", "TIER"));
        assert_eq!(ambiguous(r#"{"TIER":"powerful","tier":"fast"}"#), both("tier", "TIER"), "either order");
        assert_eq!(ambiguous(r#"{"TIER":"powerful"}"#), both("tier", "TIER"), "a lone other spelling");
        assert_eq!(ambiguous(r#"{"leads":[1],"LEADS":[1,2,3]}"#), both("leads", "LEADS"));
        assert_eq!(ambiguous(r#"{"leadſ":[1,2]}"#), both("leads", "leadſ"));
        assert_eq!(ambiguous(r#"{"tier\u0000x":"powerful"}"#), both("tier", "tier\0x"), "cut at NUL");
        // Other fields may repeat or differ in case; nested objects are not the top level.
        assert_eq!(ambiguous(r#"{"Model":"a","model":"b","x":{"tier":1,"TIER":2},"tiers":1,"tier":"fast"}"#), None);
    }

    #[test]
    fn malformed_json_wins_over_ambiguity() {
        assert!(matches!(probe(br#"{"tier":"a","TIER":"b""#, ["tier"]), Err(ProbeError::Invalid(_))));
    }

    #[test]
    fn malformed_and_non_object_bodies_are_errors() {
        assert!(probe(b"{\"tier\":", ["tier"]).is_err());
        assert!(probe(b"[1,2]", ["tier"]).is_err());
        assert!(probe(b"{} trailing", ["tier"]).is_err());
        assert!(probe(b"", ["tier"]).is_err());
    }

    #[test]
    fn a_field_is_set_in_place_or_added_first() {
        let set = |body: &str| {
            String::from_utf8(super::set_string_field(body.as_bytes(), "model", "gpt-x").unwrap()).unwrap()
        };
        assert_eq!(set(r#"{"model":"powerful","messages":[]}"#), r#"{"model":"gpt-x","messages":[]}"#);
        assert_eq!(set(r#" { "messages" : [ ], "model" : "a\"b" } "#), r#" { "messages" : [ ], "model" : "gpt-x" } "#);
        assert_eq!(set(r#"{"messages":[{"model":"inner"}]}"#), r#"{"model":"gpt-x","messages":[{"model":"inner"}]}"#);
        assert_eq!(set("{}"), r#"{"model":"gpt-x"}"#);
        assert_eq!(set(r#"{"model":null}"#), r#"{"model":"gpt-x"}"#);
        assert!(super::set_string_field(b"[1]", "model", "x").is_err());
        for body in [r#"{"model":"powerful","messages":[]}"#, r#"{"a":1}"#] {
            let v: serde_json::Value = serde_json::from_str(&set(body)).unwrap();
            assert_eq!(v["model"], "gpt-x");
        }
    }
}

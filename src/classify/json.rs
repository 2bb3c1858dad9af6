//! A one-pass JSON probe: pulls a few top-level fields out of a request body without building a
//! `serde_json::Value` (no allocation for fields it does not need, none for borrowed strings).

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

/// Reads the top-level fields `names` of a JSON object body.
pub fn probe<'a, const N: usize>(body: &'a [u8], names: [&str; N]) -> Result<[Field<'a>; N], String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let fields = de.deserialize_map(ObjectVisitor { names }).map_err(describe)?;
    de.end().map_err(describe)?;
    Ok(fields)
}

fn describe(e: serde_json::Error) -> String {
    format!("The request body is not valid JSON ({e}).")
}

struct ObjectVisitor<'n, const N: usize> {
    names: [&'n str; N],
}

impl<'de, const N: usize> Visitor<'de> for ObjectVisitor<'_, N> {
    type Value = [Field<'de>; N];

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = std::array::from_fn(|_| Field::Missing);
        while let Some(slot) = map.next_key_seed(KeySeed { names: &self.names })? {
            match slot {
                Some(i) => out[i] = map.next_value_seed(FieldSeed)?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

/// Matches a key against the wanted names without allocating.
struct KeySeed<'s, 'n> {
    names: &'s [&'n str],
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_, '_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_, '_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.names.iter().position(|n| *n == v))
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

    #[test]
    fn malformed_and_non_object_bodies_are_errors() {
        assert!(probe(b"{\"tier\":", ["tier"]).is_err());
        assert!(probe(b"[1,2]", ["tier"]).is_err());
        assert!(probe(b"{} trailing", ["tier"]).is_err());
        assert!(probe(b"", ["tier"]).is_err());
    }
}

//! The text under one key of a JSON-lines record, without building the record.
//!
//! A serde visitor borrows the string when it has no escapes and skips every other value without
//! building it (no `serde_json::Value`); corpus preparation calls this once per record, on the
//! workers.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

/// The value under the wanted key: a string, or the kind of JSON value found instead.
enum Field<'a> {
    Str(Cow<'a, str>),
    Other(&'static str),
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v)))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Field<'de>, E> {
        Ok(Field::Other("a boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Field<'de>, E> {
        Ok(Field::Other("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Field<'de>, E> {
        Ok(Field::Other("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Field<'de>, E> {
        Ok(Field::Other("a number"))
    }
    fn visit_unit<E>(self) -> Result<Field<'de>, E> {
        Ok(Field::Other("null"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::Other("an object"))
    }
}

impl<'de> de::Deserialize<'de> for Field<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

/// Compares an object key with the wanted one without allocating when it is unescaped.
struct KeyIs<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// The top-level object: returns the last value under the key (as Python's `json.loads` keeps).
struct ObjectWith<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for ObjectWith<'_> {
    type Value = Option<Field<'de>>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectWith<'_> {
    type Value = Option<Field<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(is_key) = map.next_key_seed(KeyIs(self.0))? {
            if is_key {
                found = Some(map.next_value::<Field<'de>>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Why a line gave no text.
#[derive(Debug)]
pub enum KeyError {
    /// Not one JSON object.
    Malformed(String),
    /// The key is absent, or holds something other than a string.
    Missing(String),
}

/// The string under `key` in the JSON object `line` (the last one if the key repeats).
pub fn text_under_key<'a>(line: &'a str, key: &str) -> Result<Cow<'a, str>, KeyError> {
    let mut de = serde_json::Deserializer::from_str(line);
    let found = ObjectWith(key)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|_| v))
        .map_err(|e| KeyError::Malformed(format!("malformed JSON: {e}")))?;
    match found {
        Some(Field::Str(s)) => Ok(s),
        Some(Field::Other(what)) => Err(KeyError::Missing(format!(
            "key {key:?} holds {what}, not a string"
        ))),
        None => Err(KeyError::Missing(format!("missing key {key:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The visitor agrees with a full parse (serde_json::Value) on which string the key holds.
        #[test]
        fn json_key_like_a_full_parse(
            entries in proptest::collection::vec(("[a-z]{0,3}", proptest::option::of(".{0,12}")), 0..6),
            pretty in proptest::bool::ANY,
        ) {
            let mut obj = serde_json::Map::new();
            for (k, v) in &entries {
                obj.insert(k.clone(), v.clone().map_or(serde_json::Value::from(1.5), serde_json::Value::from));
            }
            let v = serde_json::Value::Object(obj);
            let line = if pretty { serde_json::to_string_pretty(&v).unwrap() } else { v.to_string() };
            for key in ["a", "", "ab"] {
                let want = v.get(key);
                match (text_under_key(&line, key), want) {
                    (Ok(got), Some(serde_json::Value::String(w))) => proptest::prop_assert_eq!(got.as_ref(), w.as_str()),
                    (Err(KeyError::Missing(_)), None) => {}
                    (Err(KeyError::Missing(m)), Some(w)) => proptest::prop_assert!(!w.is_string(), "{}", m),
                    (got, want) => proptest::prop_assert!(false, "{:?} vs {:?}", got.map(|c| c.into_owned()), want),
                }
            }
        }
    }
}

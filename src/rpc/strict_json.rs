//! Parsing a request line into a [`serde_json::Value`] that refuses duplicate object keys.
//!
//! `serde_json::Value` keeps the last of two equal keys, so `{"accountUserId":"u",
//! "accountUserId":"v"}` would silently mean `v`, while a proxy that reads the first value sees
//! another request. Here every object, at any depth, is built by a visitor that notes the first
//! repeated key; a line that is valid JSON but repeats a key is refused as a whole, with the
//! message a serde struct gives for a repeated field. serde_json does the parsing (and its depth
//! limit applies); this module only builds the tree.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why a line was refused.
#[derive(Debug)]
pub enum StrictJsonError {
    /// The line is not JSON.
    Syntax(serde_json::Error),
    /// The line is JSON, but an object repeats a key. The value is the tree read with the first
    /// of each repeated key, only to find what to answer (a request id), never to act on.
    DuplicateKey(DuplicateKey, Value),
}

/// The first repeated key found, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    /// The key.
    pub key: String,
    /// True when the key is repeated in the outermost object (the JSON-RPC envelope).
    pub top_level: bool,
}

impl DuplicateKey {
    /// The wording of serde's own duplicate-field error (`duplicate field `name``).
    pub fn message(&self) -> String {
        format!("duplicate field `{}`", self.key)
    }
}

/// Parses `bytes` as one JSON value, refusing trailing data and any repeated object key.
/// A syntax error anywhere wins over a repeated key (the line is then not JSON at all).
pub fn from_slice(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    let mut first_duplicate = None;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue {
        first_duplicate: &mut first_duplicate,
        depth: 0,
    }
    .deserialize(&mut de)
    .map_err(StrictJsonError::Syntax)?;
    de.end().map_err(StrictJsonError::Syntax)?;
    match first_duplicate {
        Some(d) => Err(StrictJsonError::DuplicateKey(d, value)),
        None => Ok(value),
    }
}

/// Builds a `Value`, recording the first repeated key in `first_duplicate`.
struct StrictValue<'a> {
    first_duplicate: &'a mut Option<DuplicateKey>,
    /// Objects enclosing this value.
    depth: usize,
}

impl<'a> StrictValue<'a> {
    fn child(&mut self, depth: usize) -> StrictValue<'_> {
        StrictValue {
            first_duplicate: self.first_duplicate,
            depth,
        }
    }
}

impl<'de> DeserializeSeed<'de> for StrictValue<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        let depth = self.depth;
        while let Some(item) = seq.next_element_seed(self.child(depth))? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        let depth = self.depth;
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(self.child(depth + 1))?;
            if object.contains_key(&key) {
                if self.first_duplicate.is_none() {
                    *self.first_duplicate = Some(DuplicateKey {
                        key,
                        top_level: depth == 0,
                    });
                }
            } else {
                object.insert(key, value);
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duplicate(line: &str) -> DuplicateKey {
        match from_slice(line.as_bytes()) {
            Err(StrictJsonError::DuplicateKey(d, _)) => d,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn same_tree_as_serde_json_without_duplicates() {
        let line = r#"{"a":[1,-2,3.5,1e300,18446744073709551615,"x\u00e9\n",true,false,null,{}],"b":{"c":{"d":[]}}}"#;
        let strict = from_slice(line.as_bytes()).unwrap();
        let loose: Value = serde_json::from_str(line).unwrap();
        assert_eq!(strict, loose);
        // The same key in different objects is not a duplicate.
        from_slice(br#"{"a":{"a":1},"b":[{"a":1},{"a":2}]}"#).unwrap();
    }

    #[test]
    fn duplicates_anywhere_are_found() {
        let d = duplicate(r#"{"id":1,"id":2}"#);
        assert_eq!(d.key, "id");
        assert!(d.top_level);
        assert_eq!(d.message(), "duplicate field `id`");
        let d = duplicate(r#"{"id":1,"params":{"p":{"t":"a","t":"b"}}}"#);
        assert_eq!(d.key, "t");
        assert!(!d.top_level);
        let d = duplicate(r#"[{"k":1,"k":1}]"#);
        assert_eq!(d.key, "k");
        // Escapes that spell the same key are the same key.
        assert_eq!(duplicate(r#"{"k":1,"\u006b":2}"#).key, "k");
    }

    #[test]
    fn the_wording_is_serdes() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct S {
            k: u8,
        }
        let e = serde_json::from_value::<S>(serde_json::json!({"k": 1})).map(|_| ());
        assert!(e.is_ok());
        let serde_says = serde_json::from_str::<S>(r#"{"k":1,"k":2}"#)
            .unwrap_err()
            .to_string();
        let ours = duplicate(r#"{"k":1,"k":2}"#).message();
        assert!(serde_says.starts_with(&ours), "{serde_says} / {ours}");
    }

    #[test]
    fn syntax_errors_win_and_trailing_data_is_refused() {
        for line in [r#"{"a":1,"a":2"#, r#"{"a":1} x"#, "", "{\"a\":1,\"a\":}"] {
            assert!(
                matches!(from_slice(line.as_bytes()), Err(StrictJsonError::Syntax(_))),
                "{line}"
            );
        }
    }
}

//! Reads a parsed JSON document into the serde types of src/config/raw.rs, keeping the
//! path of the value being read so that a refusal names its field (`routes[2].cost`).
//!
//! Why not serde_json's own `Value` deserializer with serde_path_to_error: the two cost
//! about 75 KB of wasm, and their reasons speak serde ("expected u64", "unknown variant").
//! This one is only what the config's types use, it words reasons as JSON does, and it
//! reads objects as structs only by name (serde would also take an array by position)
//! and enums only from strings (serde would also take `{"lease": null}`).
//!
//! `#[inline(never)]`: each is instantiated once per type read; inlined into every field
//! of a derived struct, they made the module 20 KB larger.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::ConfigError;

/// Where a value is: a chain of borrowed segments, rendered only for an error.
#[derive(Clone, Copy)]
pub enum At<'p> {
    Root,
    Key(&'p At<'p>, &'p str),
    Index(&'p At<'p>, usize),
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Root => f.write_str("(root)"),
            At::Key(At::Root, key) => f.write_str(key),
            At::Key(parent, key) => write!(f, "{parent}.{key}"),
            At::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

impl de::Error for ConfigError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ConfigError {
            field: String::new(),
            reason: msg.to_string(),
        }
    }

    fn invalid_type(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        de::Error::custom(format_args!("must be {exp}, not {}", kind(&unexp)))
    }

    fn invalid_value(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        de::Error::custom(format_args!("must be {exp}, not {}", kind(&unexp)))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        let reason = match expected {
            [a, b] => format!("{variant:?} is not {a:?} or {b:?}"),
            _ => {
                let names: Vec<String> = expected.iter().map(|e| format!("{e:?}")).collect();
                format!("{variant:?} is not one of {}", names.join(", "))
            }
        };
        de::Error::custom(reason)
    }

    fn unknown_field(_field: &str, expected: &'static [&'static str]) -> Self {
        de::Error::custom(format_args!(
            "unknown field (known fields: {})",
            expected.join(", ")
        ))
    }

    fn missing_field(_field: &'static str) -> Self {
        de::Error::custom("is required")
    }
}

/// JSON's name for the kind of a value serde saw (never the value itself: a float would
/// pull float formatting into the module).
fn kind(unexp: &de::Unexpected) -> &'static str {
    use de::Unexpected as U;
    match unexp {
        U::Bool(_) => "a boolean",
        U::Unsigned(_) | U::Signed(_) | U::Float(_) => "a number",
        U::Str(_) | U::Char(_) => "a string",
        U::Unit | U::Option => "null",
        U::Seq => "an array",
        U::Map => "an object",
        _ => "another kind of value",
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Names the field of an error that has none yet (the innermost value read gives it).
fn at(at: &At, mut e: ConfigError) -> ConfigError {
    if e.field.is_empty() {
        e.field = at.to_string();
    }
    e
}

/// One JSON value and where it is.
pub struct Reader<'a, 'p> {
    pub value: &'a Value,
    pub at: &'p At<'p>,
}

impl<'a> Reader<'a, '_> {
    fn wrong(&self, want: &str) -> ConfigError {
        ConfigError {
            field: self.at.to_string(),
            reason: format!("must be {want}, not {}", kind_of(self.value)),
        }
    }
}

impl<'de, 'a: 'de> Deserializer<'de> for Reader<'a, '_> {
    type Error = ConfigError;

    #[inline(never)]
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        let out = match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => visitor.visit_u64(u),
                (_, Some(i), _) => visitor.visit_i64(i),
                (_, _, Some(f)) => visitor.visit_f64(f),
                _ => visitor.visit_unit(),
            },
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(items) => return self.read_seq(items, visitor),
            Value::Object(map) => return self.read_map(map, visitor),
        };
        out.map_err(|e| at(self.at, e))
    }

    #[inline(never)]
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        // `null` is "absent", for every optional field.
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    #[inline(never)]
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.value {
            Value::Bool(b) => visitor.visit_bool(*b).map_err(|e| at(self.at, e)),
            _ => Err(self.wrong("true or false")),
        }
    }

    #[inline(never)]
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.value {
            Value::String(s) => visitor.visit_borrowed_str(s).map_err(|e| at(self.at, e)),
            _ => Err(self.wrong("a string")),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.value {
            Value::Array(items) => self.read_seq(items, visitor),
            _ => Err(self.wrong("an array")),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.value {
            Value::Object(map) => self.read_map(map, visitor),
            _ => Err(self.wrong("an object")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        self.deserialize_map(visitor)
    }

    #[inline(never)]
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        match self.value {
            Value::String(s) => visitor.visit_enum(Variant(s)).map_err(|e| at(self.at, e)),
            _ => Err(self.wrong("a string")),
        }
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf
        unit unit_struct newtype_struct tuple tuple_struct identifier ignored_any
    }
}

impl<'a> Reader<'a, '_> {
    #[inline(never)]
    fn read_seq<'de, V: Visitor<'de>>(
        &self,
        items: &'a [Value],
        visitor: V,
    ) -> Result<V::Value, ConfigError>
    where
        'a: 'de,
    {
        visitor
            .visit_seq(Items {
                items: items.iter().enumerate(),
                at: self.at,
            })
            .map_err(|e| at(self.at, e))
    }

    #[inline(never)]
    fn read_map<'de, V: Visitor<'de>>(
        &self,
        map: &'a Map<String, Value>,
        visitor: V,
    ) -> Result<V::Value, ConfigError>
    where
        'a: 'de,
    {
        visitor
            .visit_map(Fields {
                fields: map.iter(),
                value: None,
                at: self.at,
            })
            .map_err(|e| at(self.at, e))
    }
}

struct Items<'a, 'p> {
    items: std::iter::Enumerate<std::slice::Iter<'a, Value>>,
    at: &'p At<'p>,
}

impl<'de, 'a: 'de> SeqAccess<'de> for Items<'a, '_> {
    type Error = ConfigError;

    #[inline(never)]
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ConfigError> {
        let Some((i, value)) = self.items.next() else {
            return Ok(None);
        };
        let here = At::Index(self.at, i);
        seed.deserialize(Reader { value, at: &here })
            .map(Some)
            .map_err(|e| at(&here, e))
    }
}

struct Fields<'a, 'p> {
    fields: serde_json::map::Iter<'a>,
    /// The key and value of the field whose key was read last.
    value: Option<(&'a str, &'a Value)>,
    at: &'p At<'p>,
}

impl<'de, 'a: 'de> MapAccess<'de> for Fields<'a, '_> {
    type Error = ConfigError;

    #[inline(never)]
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ConfigError> {
        let Some((key, value)) = self.fields.next() else {
            return Ok(None);
        };
        self.value = Some((key, value));
        // An unknown field is refused here, at its own path.
        seed.deserialize(de::value::BorrowedStrDeserializer::new(key))
            .map(Some)
            .map_err(|e| at(&At::Key(self.at, key), e))
    }

    #[inline(never)]
    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ConfigError> {
        let Some((key, value)) = self.value.take() else {
            return Err(at(self.at, de::Error::custom("a value without its key")));
        };
        let here = At::Key(self.at, key);
        seed.deserialize(Reader { value, at: &here })
            .map_err(|e| at(&here, e))
    }
}

/// An enum read from its name: only unit variants.
struct Variant<'a>(&'a str);

impl<'de, 'a: 'de> EnumAccess<'de> for Variant<'a> {
    type Error = ConfigError;
    type Variant = UnitOnly;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, UnitOnly), ConfigError> {
        seed.deserialize(de::value::BorrowedStrDeserializer::new(self.0))
            .map(|v| (v, UnitOnly))
    }
}

struct UnitOnly;

impl<'de> de::VariantAccess<'de> for UnitOnly {
    type Error = ConfigError;

    fn unit_variant(self) -> Result<(), ConfigError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        _seed: T,
    ) -> Result<T::Value, ConfigError> {
        Err(de::Error::custom("must be a name"))
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        _visitor: V,
    ) -> Result<V::Value, ConfigError> {
        Err(de::Error::custom("must be a name"))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ConfigError> {
        Err(de::Error::custom("must be a name"))
    }
}

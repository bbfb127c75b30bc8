//! The plugin configuration as written: one serde type per JSON object, every field
//! optional, unknown fields refused. These types are the one list of field names: the
//! JSON Schema, the README's table and the Kong metadata are checked against
//! [`known_fields`] (tests/config_schema.rs). What a value means, its range, defaults and
//! the rules between fields are the validation step's (src/config.rs).
//!
//! They are read by src/config/reader.rs. Numbers are read as any JSON number ([`Num`]) so that the validation step can say "must
//! be a whole number from 1 to 60000, not 1.5" instead of serde's "expected u64".

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Number;
use std::marker::PhantomData;

/// The top-level object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig<'a> {
    pub mode: Option<ModeName>,
    #[serde(borrow)]
    pub lease_path: Option<&'a str>,
    pub lease_want: Option<Num>,
    pub settle_interval_ms: Option<Num>,
    pub lease_expiry_margin_ms: Option<Num>,
    pub lease_recall_wait_ms: Option<Num>,
    pub lease_max_entries: Option<Num>,
    #[serde(borrow)]
    pub cluster: Option<&'a str>,
    #[serde(borrow)]
    pub authority: Option<&'a str>,
    #[serde(borrow)]
    pub authorize_path: Option<&'a str>,
    #[serde(borrow)]
    pub refund_path: Option<&'a str>,
    #[serde(borrow)]
    pub usage_path: Option<&'a str>,
    pub timeout_ms: Option<Num>,
    #[serde(borrow)]
    pub service_token: Option<&'a str>,
    pub credential: Option<RawCredential<'a>>,
    pub failure_mode: Option<FailureModeName>,
    pub failure_retry_after_s: Option<Num>,
    pub default_cost: Option<Num>,
    #[serde(borrow)]
    pub default_route: Option<&'a str>,
    pub routes: Option<Vec<RawRoute<'a>>>,
    pub no_charge_statuses: Option<Vec<StatusItem>>,
    #[serde(borrow)]
    pub account_header: Option<&'a str>,
    #[serde(borrow)]
    pub balance_header: Option<&'a str>,
    #[serde(borrow)]
    pub budget_header: Option<&'a str>,
    pub cache_max_entries: Option<Num>,
    pub cache_max_ttl_s: Option<Num>,
    #[serde(borrow)]
    pub problem_type_base: Option<&'a str>,
    pub challenges: Option<Vec<ChallengeName>>,
    pub accept_payments: Option<bool>,
    pub anonymous: Option<bool>,
    pub html_402: Option<bool>,
    pub access_log: Option<bool>,
    pub max_body_bytes: Option<Num>,
    pub usage_tail_bytes: Option<Num>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    Authorize,
    Lease,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureModeName {
    Closed,
    Open,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChallengeName {
    X402,
    Payment,
}

/// `credential`. One object for the three sources: `name` is refused with `bearer` by the
/// validation step, which can say why.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential<'a> {
    pub source: Option<SourceName>,
    #[serde(borrow)]
    pub name: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceName {
    Header,
    Bearer,
    Query,
}

/// An entry of `routes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute<'a> {
    #[serde(borrow)]
    pub name: Option<&'a str>,
    #[serde(borrow)]
    pub methods: Option<Vec<&'a str>>,
    #[serde(borrow)]
    pub exact: Option<&'a str>,
    #[serde(borrow)]
    pub prefix: Option<&'a str>,
    #[serde(borrow)]
    pub glob: Option<&'a str>,
    pub cost: Option<Num>,
    pub usage: Option<RawUsage<'a>>,
    pub mcp: Option<RawMcp<'a>>,
}

/// A route's `usage`: pointers into the response, or a price table for a known API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsage<'a> {
    #[serde(borrow)]
    pub json_pointer: Option<&'a str>,
    pub unit_cost: Option<Num>,
    #[serde(borrow)]
    pub input_pointer: Option<&'a str>,
    pub input_unit_cost: Option<Num>,
    #[serde(borrow)]
    pub output_pointer: Option<&'a str>,
    pub output_unit_cost: Option<Num>,
    pub estimate: Option<Num>,
    #[serde(borrow)]
    pub api: Option<&'a str>,
    pub per_tokens: Option<Num>,
    #[serde(borrow)]
    pub models: Option<Entries<'a, RawPrices>>,
    pub default_prices: Option<RawPrices>,
    pub model_from: Option<ModelFromName>,
    pub max_hold: Option<Num>,
    pub stream_include_usage: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFromName {
    Request,
    Response,
}

/// A model's prices (`usage.models.NAME`, `usage.default_prices`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrices {
    pub input: Option<Num>,
    pub cached_input: Option<Num>,
    pub cache_creation_input: Option<Num>,
    pub output: Option<Num>,
    pub reasoning: Option<Num>,
}

/// A route's `mcp`: costs by JSON-RPC method and by tool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMcp<'a> {
    #[serde(borrow)]
    pub methods: Option<Entries<'a, Num>>,
    #[serde(borrow)]
    pub tools: Option<Entries<'a, Num>>,
}

/// Any JSON number; whether it is whole and in range is the validation step's to say,
/// with the range.
#[derive(Debug, Clone)]
pub struct Num(pub Number);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NumVisitor;
        impl<'de> Visitor<'de> for NumVisitor {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Num, E> {
                Ok(Num(n.into()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Num, E> {
                Ok(Num(n.into()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Num, E> {
                // JSON has no NaN or infinity: serde_json reads every number finite.
                Number::from_f64(n)
                    .map(Num)
                    .ok_or_else(|| E::custom("must be a whole number"))
            }
        }
        deserializer.deserialize_any(NumVisitor)
    }
}

/// An object of names to values (`models`, `mcp.tools`), in the document's order. A list
/// rather than a map: the validation step builds the map, and another map type here would
/// cost the module its own copy of the B-tree code.
#[derive(Debug)]
pub struct Entries<'a, V>(pub Vec<(&'a str, V)>);

impl<'de: 'a, 'a, V: Deserialize<'de>> Deserialize<'de> for Entries<'a, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<'a, V>(PhantomData<(&'a (), V)>);
        impl<'de: 'a, 'a, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<'a, V> {
            type Value = Entries<'a, V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<'a, V>, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}

/// An entry of `no_charge_statuses`: a status, or a class like `"5xx"` (its first status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusItem {
    One(u16),
    Class(u16),
}

impl<'de> Deserialize<'de> for StatusItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StatusVisitor;
        fn not_a_status<E: de::Error>(n: impl fmt::Display) -> E {
            E::custom(format_args!("{n} is not an HTTP status (100-599)"))
        }
        impl<'de> Visitor<'de> for StatusVisitor {
            type Value = StatusItem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a status or a class like \"5xx\"")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<StatusItem, E> {
                match u16::try_from(n) {
                    Ok(s @ 100..=599) => Ok(StatusItem::One(s)),
                    _ => Err(not_a_status(n)),
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<StatusItem, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(not_a_status(n)),
                }
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<StatusItem, E> {
                // Shown as serde_json shows it (f64's own Display pulls in float formatting).
                match Number::from_f64(n) {
                    Some(n) => Err(not_a_status(n)),
                    None => Err(not_a_status("that")),
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StatusItem, E> {
                match s.as_bytes() {
                    [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                        Ok(StatusItem::Class(u16::from(c - b'0') * 100))
                    }
                    _ => Err(E::custom(format_args!(
                        "{s:?} is not a status class like \"5xx\""
                    ))),
                }
            }
        }
        deserializer.deserialize_any(StatusVisitor)
    }
}

/// The field names each object of the configuration accepts, read from the serde derive
/// itself (the list `deny_unknown_fields` checks against), by object: `top`, `credential`,
/// `route`, `usage`, `prices`, `mcp`.
pub fn known_fields() -> [(&'static str, &'static [&'static str]); 6] {
    [
        ("top", fields_of::<RawConfig>()),
        ("credential", fields_of::<RawCredential>()),
        ("route", fields_of::<RawRoute>()),
        ("usage", fields_of::<RawUsage>()),
        ("prices", fields_of::<RawPrices>()),
        ("mcp", fields_of::<RawMcp>()),
    ]
}

/// The `fields` a derived struct hands to `deserialize_struct`, caught by a deserializer
/// that reads nothing.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldCatcher(&mut fields));
    fields
}

struct FieldCatcher<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldCatcher<'_> {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("fields caught"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

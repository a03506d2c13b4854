//! Lenient serde helpers for wire fields whose JSON type differs between Oakestra versions and peers.
//!
//! The reference (Go) decodes `null` into a field as "leave the zero value", sends some numbers as strings
//! (`"cpu_percent": "12.5"` in `jobs/resources`, `"host_port": "50103"` in `service/deployed`), and Python peers send
//! floats where Go sends ints (and the reverse). We always *write* the reference's spelling and *read* all of them, so
//! a parse error means a message really is malformed.

use std::fmt;

use serde::{
    Deserialize, Deserializer, Serializer,
    de::{self, Visitor},
};

/// A string, or a number kept as its JSON text (`12.5` → `"12.5"`); `null` reads as `""`.
pub fn string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or a number")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_unit<E: de::Error>(self) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_none<E: de::Error>(self) -> Result<String, E> {
            Ok(String::new())
        }
    }
    deserializer.deserialize_any(V)
}

/// Largest magnitude below which every integer is exactly representable in an `f64` (2^53).
const EXACT_F64_INT: f64 = 9_007_199_254_740_992.0;

/// Reads an integer from a JSON integer, an integral float (`3.0`) or a string holding an integer; `null` and the
/// empty string (the reference's zero value for a missing port) read as `None`.
pub fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an integer, a string holding an integer, or null")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            i64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("integer {v} is out of range")))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            float_to_i64(v)
                .map(Some)
                .ok_or_else(|| E::custom(format!("{v} is not an integer")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            let t = v.trim();
            if t.is_empty() {
                return Ok(None);
            }
            t.parse()
                .map(Some)
                .map_err(|_| E::custom(format!("{v:?} is not an integer")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }
    }
    d.deserialize_any(V)
}

/// Like [`opt_i64`], with `null`/`""` reading as 0 (Go's zero value).
pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    opt_i64(d).map(Option::unwrap_or_default)
}

/// Reads a float from a JSON number or a string holding a number; `null` and `""` read as `None`.
pub fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<f64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number, a string holding a number, or null")
        }
        #[allow(
            clippy::cast_precision_loss,
            reason = "a percentage or a size; 2^53+ never occurs"
        )]
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        #[allow(
            clippy::cast_precision_loss,
            reason = "a percentage or a size; 2^53+ never occurs"
        )]
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            let t = v.trim();
            if t.is_empty() {
                return Ok(None);
            }
            match t.parse::<f64>() {
                // `"NaN"`/`"inf"` parse in Rust but are not numbers any peer means.
                Ok(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(E::custom(format!("{v:?} is not a number"))),
            }
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }
    }
    d.deserialize_any(V)
}

/// Like [`opt_f64`], with `null`/`""` reading as 0.0.
pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    opt_f64(d).map(Option::unwrap_or_default)
}

/// Like [`string`], with `null` reading as `None`.
pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Text(#[serde(deserialize_with = "string")] String);
    Option::<Text>::deserialize(d).map(|t| t.map(|Text(s)| s))
}

/// A boolean, or the strings `"true"`/`"false"`; `null` reads as `false`.
pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a boolean")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
            match v.trim() {
                "true" | "True" => Ok(true),
                "false" | "False" | "" => Ok(false),
                _ => Err(E::custom(format!("{v:?} is not a boolean"))),
            }
        }
        fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_none<E: de::Error>(self) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<bool, D2::Error> {
            d.deserialize_any(self)
        }
    }
    d.deserialize_any(V)
}

/// Any `Default` value, with `null` reading as the default (Go leaves the zero value on `null`; a nil slice is
/// marshalled as `null`).
pub fn or_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// Writes a float the way Go's `encoding/json` does: integral values without a fraction (`0`, not `0.0`), so
/// our messages are byte-for-byte what the reference worker sends.
#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with signature"
)]
pub fn ser_f64<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    match float_to_i64(*v) {
        Some(i) => s.serialize_i64(i),
        None => s.serialize_f64(*v),
    }
}

/// [`ser_f64`] for optional fields (used with `skip_serializing_if = "Option::is_none"`).
#[allow(clippy::ref_option, reason = "serde's serialize_with signature")]
pub fn ser_opt_f64<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(x) => ser_f64(x, s),
        None => s.serialize_none(),
    }
}

/// The integer an integral, exactly representable float stands for.
fn float_to_i64(v: f64) -> Option<i64> {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < EXACT_F64_INT {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "integral and below 2^53, checked above"
        )]
        Some(v as i64)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Deserialize, Serialize)]
    struct S {
        #[serde(default, deserialize_with = "super::opt_i64")]
        oi: Option<i64>,
        #[serde(default, deserialize_with = "super::i64")]
        i: i64,
        #[serde(default, deserialize_with = "super::f64", serialize_with = "super::ser_f64")]
        f: f64,
        #[serde(default, deserialize_with = "super::bool")]
        b: bool,
        #[serde(default, deserialize_with = "super::or_default")]
        v: Vec<String>,
    }

    #[test]
    fn reads_nulls_strings_and_floats() {
        let s: S = serde_json::from_str(r#"{"oi":"","i":"7","f":"2.5","b":"true","v":null}"#).unwrap();
        assert_eq!((s.oi, s.i, s.f, s.b, s.v.len()), (None, 7, 2.5, true, 0));
        let s: S = serde_json::from_str(r#"{"oi":3.0,"i":null,"f":4,"b":null}"#).unwrap();
        assert_eq!((s.oi, s.i, s.f, s.b), (Some(3), 0, 4.0, false));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            r#"{"oi":"x"}"#,
            r#"{"i":2.5}"#,
            r#"{"f":"abc"}"#,
            r#"{"f":"NaN"}"#,
            r#"{"b":"yes"}"#,
            r#"{"v":"a"}"#,
            r#"{"i":18446744073709551615}"#,
        ] {
            assert!(serde_json::from_str::<S>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn writes_integral_floats_like_go() {
        let s = S {
            oi: None,
            i: 0,
            f: 3.0,
            b: false,
            v: vec![],
        };
        assert_eq!(serde_json::to_value(&s).unwrap()["f"], serde_json::json!(3));
        let s = S { f: 3.25, ..s };
        assert_eq!(serde_json::to_value(&s).unwrap()["f"], serde_json::json!(3.25));
    }
}

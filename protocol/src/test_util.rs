//! Helpers shared by the unit tests of the wire types.

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// Parses `golden`, writes it back, and asserts the JSON is unchanged (same field names, same JSON types).
pub(crate) fn round_trip<T: Serialize + DeserializeOwned>(golden: &str) -> T {
    let parsed: T = serde_json::from_str(golden).unwrap();
    let back = serde_json::to_value(&parsed).unwrap();
    let want: Value = serde_json::from_str(golden).unwrap();
    assert_eq!(back, want, "round trip changed the JSON");
    parsed
}

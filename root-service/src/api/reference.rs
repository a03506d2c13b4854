//! The reference's user-facing JSON shapes, which Oakestra's dashboard and CLIs decode: ids as Mongo extended JSON
//! (`"_id": {"$oid": "<24 hex>"}`) on applications, services, users and organizations; instance metrics as text;
//! and, coming in, both id spellings.
//!
//! Only the user-facing REST API takes these shapes. What clusters and workers read (job documents, reports, MQTT)
//! keeps plain string ids: a reference Go worker decodes the job's `_id` as a string. Clusters keep a plain `_id`
//! in `GET /api/clusters/` too, as the reference serves them (the dashboard prints it and the Go CLI decodes a
//! string).

use axum::{
    extract::{FromRequest, Request},
    http::StatusCode,
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::{ApiError, JsonBody};
use crate::store::apps::{AppRow, ServiceRow, metric_text};

/// `{"$oid": id}`.
pub fn oid(id: &str) -> Value {
    json!({ "$oid": id })
}

/// `doc` with its `_id` (a string) spelled as `{"$oid": …}`.
pub fn with_oid(mut doc: Value) -> Value {
    if let Some(map) = doc.as_object_mut()
        && let Some(Value::String(id)) = map.get("_id")
    {
        let id = oid(id);
        map.insert("_id".to_owned(), id);
    }
    doc
}

/// An application as users see it.
pub fn application(app: &AppRow) -> Value {
    with_oid(app.to_json())
}

/// A service (job) as users see it: its instances carry the dashboard's and the Go CLI's fields.
pub fn service(service: &ServiceRow) -> Value {
    let mut doc = with_oid(service.to_json());
    if let Some(Value::Array(instances)) = doc.get_mut("instance_list") {
        for instance in instances.iter_mut().filter_map(Value::as_object_mut) {
            user_facing_instance(instance);
        }
    }
    doc
}

/// The reference keeps `cpu_percent`, `memory_percent` and `disk` as the worker's text (the Go CLI declares them
/// as strings) and `host_port` as a number, and every instance has `cpu_history`, `memory_history`,
/// `cluster_location`, `publicip` and `logs`, which the dashboard reads without a check.
fn user_facing_instance(instance: &mut Map<String, Value>) {
    for key in ["cpu_percent", "memory_percent", "disk"] {
        if let Some(value) = instance.get_mut(key)
            && let Some(text) = metric_text(value)
        {
            *value = Value::String(text);
        }
    }
    for key in ["cpu_history", "memory_history"] {
        instance.entry(key).or_insert_with(|| Value::Array(Vec::new()));
    }
    for key in ["cluster_location", "publicip", "logs"] {
        let value = instance.entry(key).or_insert(Value::Null);
        if value.is_null() {
            *value = Value::String(String::new());
        }
    }
    // The reference's `host_port` is the worker's port as a number (50011 by default); the Go CLI decodes an int.
    if let Some(port) = instance.get_mut("host_port")
        && let Some(number) = port.as_str().and_then(|p| p.parse::<u16>().ok())
    {
        *port = json!(number);
    }
}

/// Rewrites every `{"$oid": "<text>"}` object in `value` to the plain text, so a client may send ids in either
/// spelling (the dashboard sends back the documents it read, `_id` included).
pub fn collapse_oids(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.len() == 1
                && let Some(Value::String(id)) = map.get("$oid")
            {
                *value = Value::String(id.clone());
                return;
            }
            map.values_mut().for_each(collapse_oids);
        }
        Value::Array(items) => items.iter_mut().for_each(collapse_oids),
        _ => {}
    }
}

/// A user's JSON body: [`JsonBody`]'s limits and errors, with ids accepted as plain text or `{"$oid": …}`, then
/// read as `T` (a type mismatch is a 422 naming it).
#[derive(Debug)]
pub struct UserJson<T>(pub T);

impl<S, T> FromRequest<S> for UserJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let JsonBody(mut body) = JsonBody::<Value>::from_request(req, state).await?;
        collapse_oids(&mut body);
        serde_json::from_value(body)
            .map(Self)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("request body: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oids_collapse_anywhere_and_only_in_their_exact_form() {
        let mut body = json!({
            "_id": {"$oid": "0123456789abcdef01234567"},
            "member": [{"user_id": {"$oid": "aaaaaaaaaaaaaaaaaaaaaaaa"}, "roles": ["Admin"]}],
            "kept": {"$oid": "x", "other": 1},
            "number": {"$oid": 5},
        });
        collapse_oids(&mut body);
        assert_eq!(
            body,
            json!({
                "_id": "0123456789abcdef01234567",
                "member": [{"user_id": "aaaaaaaaaaaaaaaaaaaaaaaa", "roles": ["Admin"]}],
                "kept": {"$oid": "x", "other": 1},
                "number": {"$oid": 5},
            })
        );
    }

    #[test]
    fn ids_go_out_as_oids_and_other_fields_stay() {
        let doc =
            with_oid(json!({"_id": "0123456789abcdef01234567", "applicationID": "0123456789abcdef01234567"}));
        assert_eq!(
            doc,
            json!({"_id": {"$oid": "0123456789abcdef01234567"}, "applicationID": "0123456789abcdef01234567"})
        );
        assert_eq!(with_oid(json!({"name": "x"})), json!({"name": "x"}));
    }

    #[test]
    fn instances_get_text_metrics_histories_and_a_location() {
        let mut instance =
            json!({"cpu_percent": 3.25, "memory_percent": 0, "disk": 4096.0, "status": "RUNNING"})
                .as_object()
                .cloned()
                .unwrap_or_default();
        user_facing_instance(&mut instance);
        assert_eq!(
            Value::Object(instance),
            json!({
                "cpu_percent": "3.25", "memory_percent": "0", "disk": "4096", "status": "RUNNING",
                "cpu_history": [], "memory_history": [], "cluster_location": "", "publicip": "", "logs": "",
            })
        );
        let mut kept =
            json!({"cpu_percent": "7.5", "cluster_location": "48.1,11.6,1000", "host_port": "50011",
                              "cpu_history": [{"value": "1", "timestamp": "t"}]})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let before = kept.clone();
        user_facing_instance(&mut kept);
        assert_eq!(kept["cpu_percent"], before["cpu_percent"]);
        assert_eq!(kept["cluster_location"], before["cluster_location"]);
        assert_eq!(kept["cpu_history"], before["cpu_history"]);
        assert_eq!(kept["host_port"], json!(50011));
    }
}

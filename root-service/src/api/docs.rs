//! The API description: the OpenAPI 3.1 document (`/docs/openapi.json`, written by hand and checked against the
//! router by a test) and a self-contained docs page (`/api/docs`) that renders it without downloading anything.

use axum::{
    http::header,
    response::{Html, IntoResponse},
    routing::{MethodRouter, get},
};

use super::AppState;

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("openapi.json");
/// The docs page.
pub const DOCS_PAGE: &str = include_str!("docs.html");

/// The routes of this module.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/docs/openapi.json", get(openapi)),
        ("/api/docs", get(docs_page)),
    ]
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn docs_page() -> Html<&'static str> {
    Html(DOCS_PAGE)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use super::{DOCS_PAGE, OPENAPI};

    /// The HTTP methods an OpenAPI path item may hold.
    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn spec() -> Value {
        serde_json::from_str(OPENAPI).expect("openapi.json is valid JSON")
    }

    fn spec_paths(spec: &Value) -> &serde_json::Map<String, Value> {
        spec["paths"].as_object().expect("paths is an object")
    }

    /// Every path the router registers (without the trailing-slash twins).
    fn routed_paths() -> BTreeSet<&'static str> {
        let mut paths: BTreeSet<&'static str> = ["/api/health", "/metrics"].into_iter().collect();
        for routes in [
            super::super::auth::routes(),
            super::super::apps::routes(),
            super::super::clusters::routes(),
            super::super::net::routes(),
            super::super::users::routes(),
            super::super::addons::routes(),
            super::routes(),
        ] {
            for (path, _) in routes {
                assert!(paths.insert(path), "{path} is registered twice");
            }
        }
        for path in oakestra_addons::api::MANAGER_PATHS
            .into_iter()
            .chain(oakestra_addons::api::MARKETPLACE_PATHS)
        {
            assert!(paths.insert(path), "{path} is registered twice");
        }
        paths
    }

    /// The operations of a path item, by method.
    fn operations(item: &Value) -> BTreeMap<&str, &Value> {
        item.as_object()
            .expect("a path item is an object")
            .iter()
            .filter(|(k, _)| METHODS.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v))
            .collect()
    }

    #[test]
    fn document_is_openapi_3_1() {
        let spec = spec();
        let version = spec["openapi"].as_str().expect("openapi is a string");
        assert!(version.starts_with("3.1"), "openapi = {version}");
        assert!(spec["info"]["title"].is_string());
        assert!(spec["info"]["version"].is_string());
    }

    #[test]
    fn every_route_is_described_and_nothing_else() {
        let spec = spec();
        let described = spec_paths(&spec);
        let routed = routed_paths();
        for path in &routed {
            let item = described
                .get(*path)
                .unwrap_or_else(|| panic!("route {path} is missing from openapi.json"));
            assert!(!operations(item).is_empty(), "{path} has no operation");
        }
        for path in described.keys() {
            assert!(
                !path.ends_with('/'),
                "{path}: paths are written without the trailing slash"
            );
            assert!(
                routed.contains(path.as_str()),
                "openapi.json describes {path}, which no routes() list registers"
            );
        }
    }

    #[test]
    fn path_parameters_match_the_templates() {
        let spec = spec();
        for (path, item) in spec_paths(&spec) {
            let template: BTreeSet<&str> = path
                .split('/')
                .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            for (method, op) in operations(item) {
                let declared: BTreeSet<&str> = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "path")
                    .map(|p| {
                        assert_eq!(
                            p["required"], true,
                            "{method} {path}: path parameters are required"
                        );
                        p["name"].as_str().expect("parameter name")
                    })
                    .collect();
                assert_eq!(declared, template, "{method} {path}: path parameters");
            }
        }
    }

    #[test]
    fn operations_are_documented() {
        let spec = spec();
        let schemes = spec["components"]["securitySchemes"]
            .as_object()
            .expect("securitySchemes");
        for name in ["bearerAuth", "clusterAuth", "joinToken"] {
            assert!(schemes.contains_key(name), "security scheme {name}");
        }
        let mut ids = BTreeSet::new();
        let mut count = 0;
        for (path, item) in spec_paths(&spec) {
            for (method, op) in operations(item) {
                count += 1;
                let what = format!("{method} {path}");
                for key in ["summary", "description", "operationId"] {
                    let text = op[key].as_str().unwrap_or_default();
                    assert!(!text.trim().is_empty(), "{what}: {key} is missing");
                }
                assert!(
                    ids.insert(op["operationId"].as_str().unwrap_or_default()),
                    "{what}: duplicate operationId"
                );
                assert!(
                    op["tags"].as_array().is_some_and(|t| !t.is_empty()),
                    "{what}: no tag"
                );
                // Auth is always stated, `[]` for open endpoints, and only with declared schemes.
                let security = op["security"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{what}: no security"));
                for requirement in security {
                    for scheme in requirement.as_object().expect("a security requirement").keys() {
                        assert!(schemes.contains_key(scheme), "{what}: unknown scheme {scheme}");
                    }
                }
                let responses = op["responses"].as_object().expect("responses");
                assert!(
                    responses.keys().any(|c| c.starts_with('2') || c == "501"),
                    "{what}: no success (or 501) response"
                );
                for code in responses.keys() {
                    assert!(
                        code.len() == 3 && code.parse::<u16>().is_ok_and(|c| (200..600).contains(&c)),
                        "{what}: response code {code}"
                    );
                }
                if op.get("requestBody").is_some() {
                    for code in ["413", "415"] {
                        assert!(
                            responses.contains_key(code),
                            "{what}: a JSON body can be answered {code}"
                        );
                    }
                }
                if !security.is_empty() {
                    assert!(
                        responses.contains_key("401"),
                        "{what}: authenticated, so 401 is possible"
                    );
                }
            }
        }
        assert!(count >= 45, "only {count} operations");
    }

    /// Collects every `$ref` in the document.
    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_ref_resolves_and_every_component_is_used() {
        let spec = spec();
        let mut found = Vec::new();
        refs(&spec, &mut found);
        assert!(!found.is_empty());
        for r in &found {
            let pointer = r
                .strip_prefix("#/components/")
                .unwrap_or_else(|| panic!("{r}: only local component references are used"));
            assert!(
                spec.pointer(&format!("/components/{pointer}")).is_some(),
                "{r} does not resolve"
            );
        }
        let used: BTreeSet<&str> = found.iter().copied().collect();
        for kind in ["schemas", "responses"] {
            for name in spec["components"][kind].as_object().expect("components").keys() {
                let r = format!("#/components/{kind}/{name}");
                assert!(used.contains(r.as_str()), "{r} is never used");
            }
        }
        for name in [
            "Login",
            "Tokens",
            "Error",
            "SlaProblem",
            "SLA",
            "Application",
            "Service",
            "Instance",
            "Cluster",
            "ClusterRegistration",
            "ClusterRegistered",
            "DeployResult",
            "ClusterReport",
            "SubnetAllocation",
            "NetJob",
            "NetDeployStatus",
            "JobUpdate",
            "User",
            "Organization",
        ] {
            assert!(spec["components"]["schemas"].get(name).is_some(), "schema {name}");
        }
    }

    #[test]
    fn docs_page_loads_nothing_from_elsewhere() {
        let page = DOCS_PAGE.to_ascii_lowercase();
        for scheme in ["http://", "https://", "//cdn", "src=\"//", "href=\"//"] {
            assert!(!page.contains(scheme), "the docs page contains {scheme}");
        }
        assert!(DOCS_PAGE.contains("/docs/openapi.json"));
        assert!(page.contains("<noscript>"));
        assert!(!page.contains("<script src"), "scripts are inline");
        assert!(!page.contains("<link"), "styles are inline");
    }
}

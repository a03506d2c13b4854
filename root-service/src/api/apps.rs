//! Applications, services and instances: the user-facing deployment API with ownership checks.
//!
//! Owners see and change only their own applications and services (someone else's answer 404, as if absent);
//! Admins may read and change any; the listings of everything are Admin-only.

use std::{net::Ipv6Addr, sync::Arc};

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    routing::{MethodRouter, get, post},
};
use oakestra_protocol::{
    sla::{self, Application, Microservice, SlaError, Validated},
    text::Escaped,
};
use serde_json::{Map, Value, json};

use super::{
    ApiError, AppState,
    extract::AccessClaims,
    reference::{self, UserJson},
};
use crate::{
    Error,
    auth::is_admin,
    store::apps::{AppRow, NewApp, NewService, ServiceRow},
};

/// The routes of this module.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/api/application", post(create_application)),
        (
            "/api/application/{appid}",
            get(get_application)
                .put(update_application)
                .delete(delete_application),
        ),
        ("/api/applications", get(all_applications)),
        ("/api/applications/{userid}", get(user_applications)),
        ("/api/service", post(create_services)),
        (
            "/api/service/{id}",
            get(get_service).put(update_service).delete(delete_service),
        ),
        ("/api/services", get(all_services)),
        ("/api/services/{appid}", get(app_services)),
        ("/api/service/{id}/instance", post(request_instance)),
        (
            "/api/service/{id}/instance/{n}",
            axum::routing::delete(delete_instance),
        ),
        ("/api/service/{id}/instance/{n}/logs", get(instance_logs)),
    ]
}

/// 422 with every SLA problem (path, value, rule) and the warnings.
fn sla_error(e: &SlaError) -> ApiError {
    let (problems, warnings) = match e {
        SlaError::Syntax { .. } => (Vec::new(), Vec::new()),
        SlaError::Invalid { problems, warnings } => (problems.clone(), warnings.clone()),
    };
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        .with("problems", json!(problems))
        .with("warnings", json!(warnings))
}

/// The store's form of one validated microservice of `app_name.app_ns`.
fn new_service(app_name: &str, app_ns: &str, ms: &Microservice) -> Result<NewService, ApiError> {
    let job_name = oakestra_protocol::naming::JobName::new(
        app_name,
        app_ns,
        &ms.microservice_name,
        &ms.microservice_namespace,
    )
    .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let mut doc = match serde_json::to_value(ms) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    doc.remove("microserviceID");
    let rr_ip_v6 = ms
        .addresses
        .rr_ip_v6
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<Ipv6Addr>().map(|a| a.to_string()).map_err(|_| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("addresses.rr_ip_v6 = {s:?}: must be an IPv6 address"),
                )
            })
        })
        .transpose()?;
    Ok(NewService {
        doc,
        job_name: job_name.to_string(),
        rr_ip: ms.addresses.rr_ip.clone().filter(|s| !s.is_empty()),
        rr_ip_v6,
    })
}

fn app_input(app: &Application) -> NewApp {
    NewApp {
        name: app.application_name.clone(),
        namespace: app.application_namespace.clone(),
        description: app.application_desc.clone(),
        extra: app.extra.clone(),
    }
}

/// The application `id` if the caller may see it (owner or Admin), else 404.
async fn owned_app(state: &AppState, claims: &AccessClaims, id: String) -> Result<AppRow, ApiError> {
    let app = state.store.application(id.clone()).await?;
    match app {
        Some(app) if app.owner == claims.0.sub || is_admin(&claims.0) => Ok(app),
        _ => Err(Error::NotFound {
            what: "application",
            id,
        }
        .into()),
    }
}

/// The service `id` if the caller may see it (owner or Admin), else 404.
async fn owned_service(state: &AppState, claims: &AccessClaims, id: String) -> Result<ServiceRow, ApiError> {
    let service = state.store.service(id.clone()).await?;
    match service {
        Some(s) if s.owner == claims.0.sub || is_admin(&claims.0) => Ok(s),
        _ => Err(Error::NotFound { what: "service", id }.into()),
    }
}

async fn apps_of(state: &AppState, owner: Option<String>) -> Result<Json<Vec<Value>>, ApiError> {
    let apps = state.store.applications(owner).await?;
    Ok(Json(apps.iter().map(reference::application).collect()))
}

/// `POST /api/application/`: creates every application of the SLA with its services (nothing is created when
/// any of them fails); answers with all of the caller's applications, as the reference does.
async fn create_application(
    State(state): State<AppState>,
    claims: AccessClaims,
    UserJson(body): UserJson<Value>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let Validated { value: sla, warnings } =
        sla::validate::sla_from_value(body).map_err(|e| sla_error(&e))?;
    if !warnings.is_empty() {
        tracing::info!(user = %Escaped(&claims.0.sub), warnings = ?warnings, "SLA accepted with warnings");
    }
    let mut created: Vec<String> = Vec::new();
    for app in &sla.applications {
        let services = app
            .microservices
            .iter()
            .map(|ms| new_service(&app.application_name, &app.application_namespace, ms))
            .collect::<Result<Vec<_>, _>>()?;
        let input = app_input(app);
        let result = state
            .store
            .create_application(
                claims.0.sub.clone(),
                claims.0.organization.clone(),
                input,
                services,
            )
            .await;
        match result {
            Ok((id, _)) => {
                tracing::info!(user = %Escaped(&claims.0.sub), app = %Escaped(&app.application_name), %id, "application created");
                created.push(id);
            }
            Err(e) => {
                // All or nothing: take back the applications of this request created so far.
                for id in created {
                    let _ = state.store.delete_application(id).await;
                }
                return Err(e.into());
            }
        }
    }
    apps_of(&state, Some(claims.0.sub)).await
}

async fn get_application(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(reference::application(
        &owned_app(&state, &claims, id).await?,
    )))
}

/// `PUT /api/application/<id>`: renames or re-describes it (validated like the SLA's fields).
async fn update_application(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(id): Path<String>,
    UserJson(body): UserJson<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    let app = owned_app(&state, &claims, id).await?;
    let field = |key: &str, current: &str| -> Result<String, ApiError> {
        match body.get(key) {
            None | Some(Value::Null) => Ok(current.to_owned()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{key} = {other}: must be a string"),
            )),
        }
    };
    let name = field("application_name", &app.name)?;
    let namespace = field("application_namespace", &app.namespace)?;
    let description = field("application_desc", &app.description)?;
    for (key, value) in [("application_name", &name), ("application_namespace", &namespace)] {
        if !oakestra_protocol::naming::is_valid_name(value) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "{key} = {value:?}: must be {}",
                    oakestra_protocol::naming::NAME_RULE
                ),
            ));
        }
    }
    if (name != app.name || namespace != app.namespace) && !app.services.is_empty() {
        // Job names (the overlay's service identities) derive from these two; they cannot change under running
        // services.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "application_name and application_namespace cannot change while the application has services",
        ));
    }
    state
        .store
        .update_application(app.id.clone(), name, namespace, description)
        .await?;
    Ok(Json(json!({"message": "Application is updated"})))
}

/// `DELETE /api/application/<id>`: deletes its services (undeploying every instance) and the application.
async fn delete_application(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let app = owned_app(&state, &claims, id).await?;
    let deleted = state.store.delete_application(app.id.clone()).await?;
    state.engine.services_deleted(deleted).await;
    tracing::info!(user = %Escaped(&claims.0.sub), app = %app.id, "application deleted");
    Ok(Json(json!({"message": "Application Deleted"})))
}

/// `GET /api/applications/`: every application (Admin only).
async fn all_applications(
    State(state): State<AppState>,
    claims: AccessClaims,
) -> Result<Json<Vec<Value>>, ApiError> {
    if !is_admin(&claims.0) {
        return Err(ApiError::not_enough_permissions());
    }
    apps_of(&state, None).await
}

/// `GET /api/applications/<userid>`: the caller's applications; `<userid>` is the caller's user id (or name).
async fn user_applications(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(user): Path<String>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let me = state.store.user_by_name(claims.0.sub.clone()).await?;
    let is_me = me.is_some_and(|u| u.id == user || u.name == user);
    if !is_me && !is_admin(&claims.0) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "you may only list your own applications",
        ));
    }
    let owner = if is_me {
        claims.0.sub.clone()
    } else {
        // An Admin asking for someone else: resolve the id to a name.
        match state.store.user_by_id(user.clone()).await? {
            Some(u) => u.name,
            None => user,
        }
    };
    apps_of(&state, Some(owner)).await
}

/// `POST /api/service/`: adds services to an existing application of the caller. The body is a full SLA whose
/// first application carries `applicationID`, or the dashboard's `{"applicationID": …, "microservices": […]}`.
async fn create_services(
    State(state): State<AppState>,
    claims: AccessClaims,
    UserJson(body): UserJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let top_app_id = body
        .get("applicationID")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let descriptor = sla::validate::descriptor_from_value(body).map_err(|e| sla_error(&e))?;
    let (app_id, microservices) = match descriptor.value {
        sla::Descriptor::Full(sla) => {
            let Some(first) = sla.applications.into_iter().next() else {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "applications: must hold the application to add services to",
                ));
            };
            (Some(first.application_id), first.microservices)
        }
        sla::Descriptor::Services(list) => (top_app_id, list.microservices),
    };
    let Some(app_id) = app_id.filter(|id| !id.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "applicationID: must name an existing application of yours",
        ));
    };
    let app = owned_app(&state, &claims, app_id).await?;
    let services = microservices
        .iter()
        .map(|ms| new_service(&app.name, &app.namespace, ms))
        .collect::<Result<Vec<_>, _>>()?;
    let names: Vec<String> = microservices
        .iter()
        .map(|m| m.microservice_name.clone())
        .collect();
    let ids = state.store.add_services(app.id.clone(), services).await?;
    Ok(Json(json!({
        "job_id": ids.last(),
        "job_ids": ids,
        "deployed_services": names.iter().map(|n| json!({"service_name": n, "status": 200})).collect::<Vec<_>>(),
        "failed_services": [],
    })))
}

async fn get_service(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(reference::service(
        &owned_service(&state, &claims, id).await?,
    )))
}

/// `PUT /api/service/<id>`: not supported (the reference answers 501 too).
async fn update_service(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    owned_service(&state, &claims, id).await?;
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "updating a service in place is not supported: delete it and add it again",
    ))
}

/// `DELETE /api/service/<id>`: undeploys every instance and deletes the service.
async fn delete_service(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let service = owned_service(&state, &claims, id).await?;
    let deleted = state
        .store
        .delete_service(service.id.clone(), service.job_name.clone())
        .await?;
    state.engine.services_deleted(vec![deleted]).await;
    Ok(Json(json!({"message": "Job deleted"})))
}

/// `GET /api/services/`: every service (Admin only).
async fn all_services(
    State(state): State<AppState>,
    claims: AccessClaims,
) -> Result<Json<Vec<Value>>, ApiError> {
    if !is_admin(&claims.0) {
        return Err(ApiError::not_enough_permissions());
    }
    let services = state.store.all_services().await?;
    Ok(Json(services.iter().map(reference::service).collect()))
}

/// `GET /api/services/<appid>`: the services of one of the caller's applications.
async fn app_services(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(app_id): Path<String>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let app = owned_app(&state, &claims, app_id).await?;
    let services = state.store.services_of_app(app.id).await?;
    Ok(Json(services.iter().map(reference::service).collect()))
}

/// `POST /api/service/<id>/instance`: one more instance, scheduled at once. Answers `{"message":"ok"}` like the
/// reference, plus the instance number, its status and its cluster.
async fn request_instance(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let service = owned_service(&state, &claims, id).await?;
    let instance = Arc::clone(&state.engine).request_instance(&service.id).await?;
    Ok(Json(json!({
        "message": "ok",
        "instance_number": instance.number,
        "status": instance.status,
        "status_detail": instance.status_detail,
        "cluster_id": instance.cluster_id,
    })))
}

fn parse_instance_number(n: &str) -> Result<i64, ApiError> {
    n.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("instance number {n:?}: must be a non-negative integer"),
        )
    })
}

/// `DELETE /api/service/<id>/instance/<n>`.
async fn delete_instance(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path((id, n)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let number = parse_instance_number(&n)?;
    let service = owned_service(&state, &claims, id).await?;
    state.engine.delete_instance(&service, number).await?;
    Ok(Json(json!({"message": "ok"})))
}

/// `GET /api/service/<id>/instance/<n>/logs`: the log tail the cluster last reported for the instance.
async fn instance_logs(
    State(state): State<AppState>,
    claims: AccessClaims,
    Path((id, n)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let number = parse_instance_number(&n)?;
    let service = owned_service(&state, &claims, id).await?;
    let Some(instance) = service.instance(number) else {
        return Err(Error::NotFound {
            what: "instance",
            id: format!("{}/{number}", service.id),
        }
        .into());
    };
    let logs = instance
        .report
        .get("logs")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Ok(Json(json!({
        "job_id": service.id,
        "job_name": service.job_name,
        "instance_number": number,
        "status": instance.status,
        "logs": logs,
    })))
}

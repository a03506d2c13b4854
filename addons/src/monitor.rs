//! The addons monitor: the engine's loop. Each round (every poll interval, and at once after an API change) it
//! verifies new marketplace entries (pull + platform check), installs `installing` addons, removes `disabling`
//! ones, keeps active ones running (one restart per service, then `failed`/`partially_active` with the container's
//! last log lines), removes containers of addons that no longer want them, and points the plugin slots at running
//! slot services.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
};

use oakestra_protocol::addons::{
    AddonNetwork, AddonService, AddonSpec, AddonStatus, DEFAULT_NETWORK, LABEL_ADDON_ID, LABEL_SERVICE_NAME,
    MarketplaceStatus, Slot, container_name, split_command,
};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::{
    Addons,
    docker::{Docker, RunSpec, host_architecture},
    slots::Endpoint,
    store::{Addon, MarketplaceEntry},
};

/// Restarts a service gets before it counts as failed (the reference's `MAX_CONTAINER_RETRIES`).
pub const MAX_RESTARTS: u64 = 1;
/// Log lines kept of a failed service.
pub const LOG_LINES: usize = 100;
/// The port a scheduler plugin listens on unless its `API_PORT` says otherwise (the reference scheduler's).
pub const DEFAULT_PLUGIN_PORT: u16 = 10004;

/// Runs the monitor until `stop` turns true.
pub async fn run(addons: Arc<Addons>, mut stop: watch::Receiver<bool>) {
    let verifying = Arc::new(Mutex::new(HashSet::new()));
    loop {
        if *stop.borrow() {
            return;
        }
        round(&addons, &verifying).await;
        tokio::select! {
            () = addons.sleep(addons.config.poll_interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One pass over every check.
pub async fn round(addons: &Arc<Addons>, verifying: &Arc<Mutex<HashSet<String>>>) {
    let docker = match addons.docker().await {
        Ok(d) => d,
        Err(_) => {
            // Nothing can run without Docker: no slot is filled.
            for slot in Slot::ALL {
                addons.slots.set(slot, None);
            }
            return;
        }
    };
    if let Err(e) = checks(addons, &docker, verifying).await {
        tracing::warn!(error = %e, "addons monitor round failed");
    }
}

async fn checks(
    addons: &Arc<Addons>,
    docker: &Docker,
    verifying: &Arc<Mutex<HashSet<String>>>,
) -> Result<(), crate::Error> {
    if addons.config.plane == oakestra_protocol::addons::Plane::Root {
        for entry in addons
            .store
            .entries(Some(MarketplaceStatus::UnderReview), None)
            .await?
        {
            if verifying
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(entry.id.clone())
            {
                let (addons, docker, verifying) = (Arc::clone(addons), docker.clone(), Arc::clone(verifying));
                tokio::spawn(async move {
                    let id = entry.id.clone();
                    verify(&addons, &docker, entry).await;
                    verifying
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&id);
                });
            }
        }
    }
    for addon in addons.store.addons(None).await? {
        match addon.status {
            AddonStatus::Installing => install(addons, docker, &addon).await?,
            AddonStatus::Disabling => disable(addons, docker, &addon).await?,
            AddonStatus::Active | AddonStatus::PartiallyActive => {
                keep_running(addons, docker, &addon).await?
            }
            AddonStatus::Failed | AddonStatus::Disabled => {}
        }
    }
    cleanup(addons, docker).await?;
    fill_slots(addons, docker).await?;
    Ok(())
}

/// Pulls and inspects every image of a new entry: `approved`, or `verification_failed` with the reason.
pub async fn verify(addons: &Addons, docker: &Docker, entry: MarketplaceEntry) {
    let mut checked = Vec::new();
    let mut failure = None;
    for s in &entry.spec.services {
        match verify_image(docker, &s.image).await {
            Ok(platform) => {
                checked.push(json!({"service_name": s.service_name, "image": s.image, "platform": platform}))
            }
            Err(reason) => {
                failure = Some(json!({"service_name": s.service_name, "image": s.image, "reason": reason}));
                break;
            }
        }
    }
    let (status, details) = match failure {
        None => (MarketplaceStatus::Approved, json!({"checked": checked})),
        Some(f) => (
            MarketplaceStatus::VerificationFailed,
            json!({"reason": f["reason"].clone(), "failed": f, "checked": checked}),
        ),
    };
    let Value::Object(details) = details else { return };
    tracing::info!(addon = %entry.id, name = %entry.spec.name, status = status.as_str(), "marketplace entry verified");
    tracing::debug!(addon = %entry.id, details = ?details, "verification details");
    if let Err(e) = addons
        .store
        .set_entry_status(entry.id.clone(), status, details)
        .await
    {
        tracing::warn!(addon = %entry.id, error = %e, "cannot record the verification");
    }
}

/// Pulls `image` and checks it runs here; returns its `os/arch`. Images the pull brought are removed afterwards.
async fn verify_image(docker: &Docker, image: &str) -> Result<String, String> {
    let present_before = docker.has_image(image).await?;
    if let Err(e) = docker.pull(image).await {
        let lower = e.to_lowercase();
        let missing = ["not found", "manifest unknown", "does not exist", "name unknown"]
            .iter()
            .any(|k| lower.contains(k));
        return Err(if missing {
            format!("image missing: {e}")
        } else {
            format!("pull error: {e}")
        });
    }
    let (os, arch) = docker.platform(image).await?;
    if !present_before && let Err(e) = docker.remove_image(image).await {
        tracing::debug!(image, error = %e, "cannot remove the verified image");
    }
    let want = host_architecture();
    if os != "linux" || arch != want {
        return Err(format!(
            "wrong platform: the image is {os}/{arch}, this machine runs linux/{want}"
        ));
    }
    Ok(format!("{os}/{arch}"))
}

/// The environment a slot service gets on top of its own: where to reach the tier and the token to use.
async fn slot_environment(addons: &Addons, docker: &Docker, s: &AddonService) -> Vec<(String, String)> {
    let host = match &addons.config.manager_host {
        Some(h) => h.clone(),
        None => {
            let net = AddonSpec::networks_of(s)
                .into_iter()
                .next()
                .unwrap_or_else(|| DEFAULT_NETWORK.into());
            docker
                .network_gateway(&net)
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| "127.0.0.1".into())
        }
    };
    let port = addons.config.manager_port.to_string();
    let mut env = vec![
        ("MANAGER_URL".to_owned(), host.clone()),
        ("MANAGER_PORT".to_owned(), port.clone()),
        ("RESOURCE_ABSTRACTOR_URL".to_owned(), host),
        ("RESOURCE_ABSTRACTOR_PORT".to_owned(), port),
        ("OAK_PLUGIN_TOKEN".to_owned(), addons.slots.token().to_owned()),
    ];
    if !s.environment.contains_key("API_PORT") {
        env.push(("API_PORT".to_owned(), DEFAULT_PLUGIN_PORT.to_string()));
    }
    env
}

/// Starts service `s` of `addon` in its container, replacing whatever else holds that name (a core component's
/// container is replaced, inheriting its networks and published ports; the declared ones win).
async fn start_service(
    addons: &Addons,
    docker: &Docker,
    addon: &Addon,
    s: &AddonService,
) -> Result<(), String> {
    let plane = addons.config.plane;
    let name = container_name(plane, &s.service_name);
    let mut networks = AddonSpec::networks_of(s);
    let mut ports: Vec<(String, String, String)> = Vec::new();
    for (container, host) in &s.ports {
        let port = if container.contains('/') {
            container.clone()
        } else {
            format!("{container}/tcp")
        };
        let (ip, host_port) = host
            .rsplit_once(':')
            .map_or((String::new(), host.clone()), |(i, p)| {
                (i.to_owned(), p.to_owned())
            });
        ports.push((port, ip, host_port));
    }
    if let Some(existing) = docker.container(&name).await? {
        let ours = existing.labels.get(LABEL_ADDON_ID) == Some(&addon.id);
        if ours && existing.running && existing.image == s.image {
            return Ok(());
        }
        if !ours {
            tracing::warn!(container = %name, addon = %addon.id, "replacing the container that holds the service's name (hot swap); inheriting its networks and ports");
            for net in existing.networks.keys() {
                if !networks.contains(net) {
                    networks.push(net.clone());
                }
            }
            for p in existing.ports {
                if !ports.iter().any(|q| q.0 == p.0) {
                    ports.push(p);
                }
            }
        }
        docker.remove(&name).await?;
    }
    for net in &networks {
        let declared = addon.spec.networks.iter().find(|n| &n.name == net).cloned();
        let spec = declared.unwrap_or_else(|| AddonNetwork {
            name: net.clone(),
            driver: "bridge".into(),
            enable_ipv6: false,
        });
        docker.ensure_network(&spec, HashMap::new()).await?;
    }
    if !docker.has_image(&s.image).await? {
        docker.pull(&s.image).await?;
    }
    let mut env: BTreeMap<String, String> = s.environment.clone();
    env.insert("ORCHESTRATION_PLANE".into(), plane.as_str().into());
    if Slot::for_service(plane, &s.service_name).is_some() {
        env.extend(slot_environment(addons, docker, s).await);
    }
    let mut labels: HashMap<String, String> = s.labels.clone().into_iter().collect();
    labels.insert(LABEL_ADDON_ID.into(), addon.id.clone());
    labels.insert(LABEL_SERVICE_NAME.into(), s.service_name.clone());
    let spec = RunSpec {
        name: name.clone(),
        image: s.image.clone(),
        cmd: split_command(&s.command).map_err(|e| format!("command {e}"))?,
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        labels,
        networks,
        binds: s.volumes.clone(),
        ports,
    };
    docker.run(&spec).await.map(drop)
}

fn failed_entry(service: &str, reason: &str, logs: &str) -> Value {
    json!({"service_name": service, "reason": reason, "logs": logs})
}

/// Install check: networks, volumes, then every service's container.
async fn install(addons: &Addons, docker: &Docker, addon: &Addon) -> Result<(), crate::Error> {
    let mut failed = Vec::new();
    let mut prepared = Ok(());
    for net in &addon.spec.networks {
        let labels = HashMap::from([(LABEL_ADDON_ID.to_owned(), addon.id.clone())]);
        if let Err(e) = docker.ensure_network(net, labels).await {
            prepared = Err(e);
        }
    }
    for vol in &addon.spec.volumes {
        if let Err(e) = docker.ensure_volume(vol).await {
            prepared = Err(e);
        }
    }
    for s in &addon.spec.services {
        let outcome = match &prepared {
            Err(e) => Err(e.clone()),
            Ok(()) => start_service(addons, docker, addon, s).await,
        };
        if let Err(reason) = outcome {
            tracing::warn!(addon = %addon.id, service = %s.service_name, reason = %reason, "addon service did not start");
            failed.push(failed_entry(&s.service_name, &reason, ""));
        }
    }
    let status = summary(addon.spec.services.len(), failed.len());
    let mut details = Map::new();
    details.insert("failed_services".into(), Value::Array(failed));
    details.insert("restarts".into(), json!({}));
    if addons
        .store
        .set_addon_status(
            addon.id.clone(),
            status,
            Some(details),
            Some(AddonStatus::Installing),
        )
        .await?
    {
        tracing::info!(addon = %addon.id, name = %addon.spec.name, status = status.as_str(), "addon installed");
    }
    Ok(())
}

/// `active`, `partially_active` or `failed` for `failed` of `total` services down.
fn summary(total: usize, failed: usize) -> AddonStatus {
    if failed == 0 {
        AddonStatus::Active
    } else if failed >= total {
        AddonStatus::Failed
    } else {
        AddonStatus::PartiallyActive
    }
}

/// Disable check: every service container stopped and removed, then `disabled`.
async fn disable(addons: &Addons, docker: &Docker, addon: &Addon) -> Result<(), crate::Error> {
    let mut errors = Vec::new();
    for s in &addon.spec.services {
        let name = container_name(addons.config.plane, &s.service_name);
        if let Err(e) = docker.remove(&name).await {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        addons
            .store
            .set_addon_status(
                addon.id.clone(),
                AddonStatus::Disabled,
                None,
                Some(AddonStatus::Disabling),
            )
            .await?;
        tracing::info!(addon = %addon.id, name = %addon.spec.name, "addon disabled");
    } else {
        tracing::warn!(addon = %addon.id, errors = ?errors, "addon containers not removed yet");
    }
    Ok(())
}

/// Active check: a service whose container stopped is restarted once; the next time it counts as failed, with its
/// last log lines.
async fn keep_running(addons: &Addons, docker: &Docker, addon: &Addon) -> Result<(), crate::Error> {
    let plane = addons.config.plane;
    let mut details = addon.status_details.clone();
    let mut restarts: Map<String, Value> = details
        .get("restarts")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut failed: Vec<Value> = details
        .get("failed_services")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let given_up: HashSet<String> = failed
        .iter()
        .filter_map(|f| f.get("service_name").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let mut changed = false;
    for s in &addon.spec.services {
        if given_up.contains(&s.service_name) {
            continue;
        }
        let name = container_name(plane, &s.service_name);
        let info = match docker.container(&name).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(container = %name, error = %e, "cannot inspect an addon container");
                continue;
            }
        };
        if info
            .as_ref()
            .is_some_and(|c| c.running && c.labels.get(LABEL_ADDON_ID) == Some(&addon.id))
        {
            continue;
        }
        let why = match &info {
            Some(c) if c.labels.get(LABEL_ADDON_ID) != Some(&addon.id) => {
                "its container was replaced by another".to_owned()
            }
            Some(c) => format!("its container exited with code {}", c.exit_code),
            None => "its container is gone".to_owned(),
        };
        let count = restarts.get(&s.service_name).and_then(Value::as_u64).unwrap_or(0);
        changed = true;
        if count < MAX_RESTARTS {
            restarts.insert(s.service_name.clone(), Value::from(count + 1));
            let restarted = match &info {
                Some(c) if c.labels.get(LABEL_ADDON_ID) == Some(&addon.id) => docker.restart(&name).await,
                _ => start_service(addons, docker, addon, s).await,
            };
            tracing::warn!(addon = %addon.id, service = %s.service_name, why = %why, restarted = ?restarted, attempt = count + 1, "addon service stopped: restarting it");
            if let Err(e) = restarted {
                failed.push(failed_entry(
                    &s.service_name,
                    &format!("{why}; the restart failed: {e}"),
                    "",
                ));
            }
        } else {
            let logs = if info.is_some() {
                docker.logs_tail(&name, LOG_LINES).await
            } else {
                String::new()
            };
            tracing::warn!(addon = %addon.id, service = %s.service_name, why = %why, "addon service stopped again after its restart: failed");
            failed.push(failed_entry(
                &s.service_name,
                &format!("{why} after {count} restart(s)"),
                &logs,
            ));
        }
    }
    if !changed {
        return Ok(());
    }
    let status = summary(addon.spec.services.len(), failed.len());
    details.insert("restarts".into(), Value::Object(restarts));
    details.insert("failed_services".into(), Value::Array(failed));
    addons
        .store
        .set_addon_status(addon.id.clone(), status, Some(details), Some(addon.status))
        .await?;
    Ok(())
}

/// Cleanup check: a container labelled as an addon's, named for this plane, whose addon is gone or does not want
/// containers, is stopped and removed.
async fn cleanup(addons: &Addons, docker: &Docker) -> Result<(), crate::Error> {
    let prefix = format!("{}_", addons.config.plane.as_str());
    let containers = match docker.containers_labelled(LABEL_ADDON_ID).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list addon containers");
            return Ok(());
        }
    };
    for (name, labels) in containers {
        if !name.starts_with(&prefix) {
            continue;
        }
        let Some(id) = labels.get(LABEL_ADDON_ID) else {
            continue;
        };
        let keep = addons
            .store
            .addon(id.clone())
            .await?
            .is_some_and(|a| a.status.wants_containers());
        if !keep {
            tracing::info!(container = %name, addon = %id, "removing a container whose addon is gone or disabled");
            if let Err(e) = docker.remove(&name).await {
                tracing::warn!(container = %name, error = %e, "cannot remove an orphaned addon container");
            }
        }
    }
    Ok(())
}

/// Points each slot at the running container of an active addon's service named like it, or empties it.
async fn fill_slots(addons: &Addons, docker: &Docker) -> Result<(), crate::Error> {
    let plane = addons.config.plane;
    let mut filled: BTreeMap<Slot, Endpoint> = BTreeMap::new();
    for addon in addons.store.addons(None).await? {
        if !matches!(addon.status, AddonStatus::Active | AddonStatus::PartiallyActive) {
            continue;
        }
        for s in &addon.spec.services {
            let Some(slot) = Slot::for_service(plane, &s.service_name) else {
                continue;
            };
            let name = container_name(plane, &s.service_name);
            let Ok(Some(c)) = docker.container(&name).await else {
                continue;
            };
            if !c.running || c.labels.get(LABEL_ADDON_ID) != Some(&addon.id) {
                continue;
            }
            let first = AddonSpec::networks_of(s).into_iter().next().unwrap_or_default();
            let ip = c
                .networks
                .get(&first)
                .filter(|ip| !ip.is_empty())
                .or_else(|| c.networks.values().find(|ip| !ip.is_empty()));
            let port = s
                .environment
                .get("API_PORT")
                .and_then(|p| p.parse::<u16>().ok())
                .unwrap_or(DEFAULT_PLUGIN_PORT);
            if let Some(ip) = ip {
                filled.insert(
                    slot,
                    Endpoint {
                        addon_id: addon.id.clone(),
                        container: name,
                        url: oakestra_runtime::client::base_url(ip, port),
                    },
                );
            }
        }
    }
    for slot in Slot::ALL.into_iter().filter(|s| s.plane() == plane) {
        addons.slots.set(slot, filled.remove(&slot));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_failed_services() {
        assert_eq!(summary(2, 0), AddonStatus::Active);
        assert_eq!(summary(2, 1), AddonStatus::PartiallyActive);
        assert_eq!(summary(2, 2), AddonStatus::Failed);
        assert_eq!(summary(1, 1), AddonStatus::Failed);
    }
}

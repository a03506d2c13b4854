//! The root engine's decisions as pure functions: which cluster an instance goes to (or why none), what a cluster's
//! refusal or scheduling result means for an instance, which instances a maintenance round moves or retries, and
//! what a cluster report's reconciliation asks for.
//!
//! Plain data in (rows, candidates, the reservations, the time in milliseconds), a decision out: no database, no
//! HTTP, no clock, so every rule is unit-tested here. [`crate::engine`] gathers the inputs, asks, and carries the
//! decisions out (store writes, reservations, calls to clusters, metrics and logs).

use std::collections::BTreeMap;

use oakestra_addons::slots::PluginAnswer;
use oakestra_protocol::{
    api::{federation::DeployResult, root::ClusterAggregate},
    sched::{self, Candidate, Capacity, Demand, Policy, Reservations},
    status::Status,
    text::Escaped,
};
use serde_json::Value;

use crate::store::{
    apps::{InstanceRow, MaintenanceView, ReportApplied},
    clusters::ClusterRow,
};

/// `"<job_id>/<n>"`: how an instance is named in reservations, plugin requests and errors.
pub fn instance_key(service_id: &str, number: i64) -> String {
    format!("{service_id}/{number}")
}

fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The placement view of a cluster: its last aggregate and whether it is active.
pub fn candidate(row: &ClusterRow, active: bool) -> Candidate {
    let agg: ClusterAggregate =
        serde_json::from_value(Value::Object(row.aggregate.clone())).unwrap_or_default();
    let capacity = |vcpus: i64, memory: i64, gpus: i64| Capacity {
        vcpus: non_negative(vcpus),
        memory_mib: non_negative(memory),
        gpus: non_negative(gpus),
    };
    let total = capacity(agg.vcpus, agg.memory, agg.vgpus);
    let max_node = match (agg.max_node_vcpus, agg.max_node_memory) {
        (Some(v), Some(m)) => Some(capacity(v, m, agg.vgpus)),
        _ => None,
    };
    Candidate {
        id: row.id.clone(),
        name: row.name.clone(),
        active,
        virtualization: agg.virtualization,
        cpu_percent: agg.cpu_percent,
        total,
        per_arch: agg
            .aggregation_per_architecture
            .iter()
            .map(|(arch, a)| (arch.clone(), capacity(a.vcpus, a.memory, a.vgpus)))
            .collect::<BTreeMap<_, _>>(),
        max_node,
        csi_drivers: agg.csi_drivers,
        addons: agg.supported_addons,
    }
}

// === Placement =================================================================================================

/// Where an instance goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// On this cluster: reserve the demand there, record the placement, send the deploy call.
    Cluster(String),
    /// Nowhere: record this status and detail on the instance (it is retried later).
    Unplaced {
        /// A negative scheduling status.
        status: Status,
        /// Why, for the user.
        detail: String,
    },
}

/// A placement and what else came of deciding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementDecision {
    /// Where the instance goes.
    pub placement: Placement,
    /// The `root_scheduler` plugin chose a cluster the instance cannot go to, so the built-in policy decided: why
    /// (the slot counts it as a fallback).
    pub plugin_fallback: Option<String>,
}

/// Places `demand` (whose `exclude` holds the clusters already `tried`) among `candidates`, given what
/// `reservations` already hold and the plugin's answer if a plugin was asked.
///
/// A plugin's refusal is final. Its pick stands only if it is a known, active, not-yet-tried cluster the demand
/// fits on; otherwise the built-in `policy` places. Without any cluster, the status says why on a first attempt;
/// after clusters refused, it is `NO_ACTIVE_CLUSTER_WITH_CAPACITY` naming them.
pub fn place(
    candidates: &[Candidate],
    demand: &Demand,
    reservations: &Reservations,
    policy: Policy,
    plugin: Option<&PluginAnswer>,
    tried: &[String],
) -> PlacementDecision {
    let mut plugin_fallback = None;
    let picked = match plugin {
        Some(PluginAnswer::Refused(status)) => {
            return PlacementDecision {
                placement: Placement::Unplaced {
                    status: Status::NoActiveClusterWithCapacity,
                    detail: format!("the root_scheduler plugin found no cluster ({})", Escaped(status)),
                },
                plugin_fallback: None,
            };
        }
        Some(PluginAnswer::Candidate(id)) => {
            let fits = candidates
                .iter()
                .find(|c| &c.id == id)
                .is_some_and(|c| sched::place(std::slice::from_ref(c), demand, reservations, policy).is_ok());
            if !fits {
                plugin_fallback = Some(format!(
                    "the plugin chose cluster {} where the instance cannot go",
                    Escaped(id)
                ));
            }
            fits.then(|| id.clone())
        }
        None => None,
    };
    let choice = match picked {
        Some(id) => Ok(id),
        None => sched::place(candidates, demand, reservations, policy).map(|c| c.id.clone()),
    };
    let placement = match choice {
        Ok(id) => Placement::Cluster(id),
        Err(refusal) if tried.is_empty() => Placement::Unplaced {
            status: refusal.root_status(),
            detail: refusal.to_string(),
        },
        Err(refusal) => Placement::Unplaced {
            status: Status::NoActiveClusterWithCapacity,
            detail: format!(
                "no other cluster can run it ({refusal}); refused by {}",
                tried.join(", ")
            ),
        },
    };
    PlacementDecision {
        placement,
        plugin_fallback,
    }
}

// === A cluster's answers =======================================================================================

/// What a cluster's refusal of an instance (or a failed deploy call to it) means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterRefusal {
    /// The instance is gone or already placed elsewhere: nothing to do.
    Ignore,
    /// Take it off that cluster (release its reservation, undeploy it there) and place it again on none of
    /// `exclude` (the clusters tried so far, the refusing one included).
    Reschedule {
        /// The clusters not to try again.
        exclude: Vec<String>,
    },
}

/// Cluster `cluster_id` cannot run `instance` (as root has it now, `None` if deleted).
pub fn after_refusal(instance: Option<&InstanceRow>, cluster_id: &str) -> AfterRefusal {
    let Some(instance) = instance else {
        return AfterRefusal::Ignore;
    };
    if instance.cluster_id.as_deref() != Some(cluster_id) {
        return AfterRefusal::Ignore; // Already moved on.
    }
    let mut exclude = instance.tried.clone();
    if !exclude.iter().any(|t| t == cluster_id) {
        exclude.push(cluster_id.to_owned());
    }
    AfterRefusal::Reschedule { exclude }
}

/// What a cluster's scheduling result for one instance says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultVerdict {
    /// The cluster found no worker: a refusal (see [`after_refusal`]), with why.
    Refused {
        /// The status, and its detail when there is one.
        why: String,
    },
    /// A worker took it: the instance is `NODE_SCHEDULED`, with this detail.
    Scheduled {
        /// `worker <id>` when the cluster named the worker.
        detail: String,
    },
}

/// Reads a cluster's scheduling result: a non-empty status is a refusal.
pub fn deploy_result(result: &DeployResult) -> ResultVerdict {
    if let Some(status) = result.status.as_deref().filter(|s| !s.is_empty()) {
        let why = match result.status_detail.as_deref() {
            Some(detail) if !detail.is_empty() => format!("{status}: {detail}"),
            _ => status.to_owned(),
        };
        return ResultVerdict::Refused { why };
    }
    ResultVerdict::Scheduled {
        detail: result
            .candidate_id
            .as_deref()
            .map(|w| format!("worker {w}"))
            .unwrap_or_default(),
    }
}

// === Maintenance ===============================================================================================

/// What a maintenance round does with one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Maintenance {
    /// Its cluster stopped reporting: release its reservation and place it again anywhere but there.
    Rescue {
        /// The job.
        service_id: String,
        /// The instance.
        number: i64,
        /// The silent cluster.
        from: String,
    },
    /// No cluster could take it and it has waited `retry_ms` since: place it again (on any cluster).
    Retry {
        /// The job.
        service_id: String,
        /// The instance.
        number: i64,
    },
}

/// The round at `now_ms`: every instance still alive on a silent cluster is rescued, then every unplaced instance
/// whose last attempt is at least `retry_ms` old is retried (a fixed pause, so a full platform is not hammered).
pub fn maintenance(now_ms: i64, retry_ms: i64, view: &MaintenanceView) -> Vec<Maintenance> {
    let rescues = view
        .on_silent_clusters
        .iter()
        .filter(|(_, instance)| !instance.status.parse::<Status>().is_ok_and(Status::is_terminal))
        .map(|(cluster_id, instance)| Maintenance::Rescue {
            service_id: instance.service_id.clone(),
            number: instance.number,
            from: cluster_id.clone(),
        });
    let retries = view
        .unplaced
        .iter()
        .filter(|instance| now_ms - instance.updated >= retry_ms)
        .map(|instance| Maintenance::Retry {
            service_id: instance.service_id.clone(),
            number: instance.number,
        });
    rescues.chain(retries).collect()
}

// === Reports ===================================================================================================

/// What a cluster's report asks root to do, in the order the engine does it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportAction {
    /// The instance's status moved past scheduling: its capacity reservation can go.
    Release {
        /// The reservation's key (`"<job>/<n>"`).
        key: String,
    },
    /// The cluster runs a job root does not know: delete it there (`DELETE …/<job>/-1`).
    UndeployJob {
        /// The job id.
        job_id: String,
    },
    /// The cluster runs an instance root placed elsewhere or deleted: delete it there.
    UndeployInstance {
        /// The job id.
        job_id: String,
        /// The instance.
        number: i64,
    },
    /// The cluster cannot place the instance (`NO_WORKER_CAPACITY`, …): try the next cluster.
    Refused {
        /// The job id.
        job_id: String,
        /// The instance.
        number: i64,
        /// The status, and its detail when there is one.
        why: String,
    },
}

/// Reconciles a report root has recorded (see [`crate::store::apps::apply_report`]): releases first (they only
/// free capacity), then the undeploys, then the refusals (each of which places an instance again).
pub fn reconcile(report: &ReportApplied) -> Vec<ReportAction> {
    let mut releases = Vec::new();
    let mut strays = Vec::new();
    let mut refusals = Vec::new();
    for reported in &report.instances {
        if !reported.placed_here {
            strays.push(ReportAction::UndeployInstance {
                job_id: reported.job_id.clone(),
                number: reported.number,
            });
            continue;
        }
        if reported.status.is_empty() {
            continue;
        }
        let parsed = reported.status.parse::<Status>().ok();
        if matches!(
            parsed,
            Some(Status::NoWorkerCapacity | Status::NoQualifiedWorkerFound | Status::NoNodeFound)
        ) {
            let why = if reported.detail.is_empty() {
                reported.status.clone()
            } else {
                format!("{}: {}", reported.status, reported.detail)
            };
            refusals.push(ReportAction::Refused {
                job_id: reported.job_id.clone(),
                number: reported.number,
                why,
            });
        } else if parsed.is_none_or(|s| !s.is_positive_scheduling()) {
            releases.push(ReportAction::Release {
                key: instance_key(&reported.job_id, reported.number),
            });
        }
    }
    let unknown = report
        .unknown_jobs
        .iter()
        .map(|job_id| ReportAction::UndeployJob {
            job_id: job_id.clone(),
        });
    releases
        .into_iter()
        .chain(unknown)
        .chain(strays)
        .chain(refusals)
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use super::*;
    use crate::store::apps::ReportedInstance;

    fn cluster(id: &str, vcpus: u64, memory_mib: u64) -> Candidate {
        Candidate {
            id: id.into(),
            name: format!("name-{id}"),
            active: true,
            virtualization: vec!["docker".into()],
            total: Capacity::new(vcpus, memory_mib, 0),
            ..Candidate::default()
        }
    }

    fn demand(key: &str, vcpus: u64, memory_mib: u64, tried: &[String]) -> Demand {
        Demand {
            key: key.into(),
            virtualization: "docker".into(),
            need: Capacity::new(vcpus, memory_mib, 0),
            exclude: tried.to_vec(),
            ..Demand::default()
        }
    }

    fn decide(
        candidates: &[Candidate],
        demand: &Demand,
        reservations: &Reservations,
        plugin: Option<&PluginAnswer>,
    ) -> PlacementDecision {
        place(
            candidates,
            demand,
            reservations,
            Policy::BestFit,
            plugin,
            &demand.exclude,
        )
    }

    fn instance(service_id: &str, number: i64, cluster_id: Option<&str>, status: Status) -> InstanceRow {
        InstanceRow {
            service_id: service_id.into(),
            number,
            cluster_id: cluster_id.map(str::to_owned),
            status: status.as_str().into(),
            status_detail: String::new(),
            instance_ip: None,
            instance_ip_v6: None,
            tried: Vec::new(),
            report: Map::new(),
            net: Map::new(),
            placed: None,
            updated: 0,
            cluster_location: String::new(),
        }
    }

    #[test]
    fn places_on_a_cluster_with_room_or_says_why_not() {
        let clusters = [cluster("small", 1, 512), cluster("big", 8, 8192)];
        let none = Reservations::default();
        let fits_both = decide(&clusters, &demand("j/0", 1, 256, &[]), &none, None);
        assert_eq!(
            fits_both,
            PlacementDecision {
                placement: Placement::Cluster("small".into()),
                plugin_fallback: None,
            },
            "best fit packs the smallest cluster that fits"
        );
        let too_big = decide(&clusters, &demand("j/1", 64, 256, &[]), &none, None);
        assert_eq!(
            too_big.placement,
            Placement::Unplaced {
                status: Status::NoActiveClusterWithCapacity,
                detail: sched::Refusal::NoCapacity.to_string(),
            }
        );
        let mut silent = clusters.clone();
        for c in &mut silent {
            c.active = false;
        }
        let nowhere = decide(&silent, &demand("j/2", 1, 256, &[]), &none, None);
        assert_eq!(
            nowhere.placement,
            Placement::Unplaced {
                status: Status::TargetClusterNotActive,
                detail: sched::Refusal::NoActiveCandidate.to_string(),
            }
        );
    }

    #[test]
    fn reservations_keep_a_burst_from_overcommitting_a_cluster() {
        let clusters = [cluster("only", 2, 1024)];
        let mut reservations = Reservations::default();
        let first = decide(&clusters, &demand("j/0", 2, 1024, &[]), &reservations, None);
        assert_eq!(first.placement, Placement::Cluster("only".into()));
        reservations.reserve("only", "j/0", Capacity::new(2, 1024, 0), 0, 60_000);
        let second = decide(&clusters, &demand("j/1", 2, 1024, &[]), &reservations, None);
        assert!(matches!(second.placement, Placement::Unplaced { .. }));
    }

    #[test]
    fn after_refusals_the_detail_names_the_clusters_tried() {
        let clusters = [cluster("a", 8, 8192)];
        let tried = vec!["a".to_owned()];
        let decision = decide(
            &clusters,
            &demand("j/0", 1, 256, &tried),
            &Reservations::default(),
            None,
        );
        assert_eq!(
            decision.placement,
            Placement::Unplaced {
                status: Status::NoActiveClusterWithCapacity,
                detail: format!(
                    "no other cluster can run it ({}); refused by a",
                    sched::Refusal::NoActiveCandidate
                ),
            }
        );
        let two = [cluster("a", 8, 8192), cluster("b", 8, 8192)];
        let next = decide(
            &two,
            &demand("j/0", 1, 256, &tried),
            &Reservations::default(),
            None,
        );
        assert_eq!(next.placement, Placement::Cluster("b".into()));
    }

    #[test]
    fn a_plugin_decides_within_the_rules() {
        let clusters = [cluster("small", 1, 512), cluster("big", 8, 8192)];
        let none = Reservations::default();
        let want = demand("j/0", 1, 256, &[]);
        let pick = |id: &str| PluginAnswer::Candidate(id.into());
        assert_eq!(
            decide(&clusters, &want, &none, Some(&pick("big"))),
            PlacementDecision {
                placement: Placement::Cluster("big".into()),
                plugin_fallback: None,
            },
            "a fitting pick stands even where the policy would choose another"
        );
        for unfit in ["nowhere", "small"] {
            let decision = decide(&clusters, &demand("j/0", 4, 256, &[]), &none, Some(&pick(unfit)));
            assert_eq!(decision.placement, Placement::Cluster("big".into()), "{unfit}");
            assert_eq!(
                decision.plugin_fallback,
                Some(format!(
                    "the plugin chose cluster {unfit} where the instance cannot go"
                ))
            );
        }
        let refused = decide(
            &clusters,
            &want,
            &none,
            Some(&PluginAnswer::Refused("NO_ACTIVE_CLUSTER_WITH_CAPACITY".into())),
        );
        assert_eq!(
            refused.placement,
            Placement::Unplaced {
                status: Status::NoActiveClusterWithCapacity,
                detail: "the root_scheduler plugin found no cluster (NO_ACTIVE_CLUSTER_WITH_CAPACITY)".into(),
            },
            "a plugin's refusal is final even when a cluster has room"
        );
    }

    #[test]
    fn a_refusal_moves_the_instance_on_unless_it_already_moved() {
        assert_eq!(after_refusal(None, "a"), AfterRefusal::Ignore);
        let elsewhere = instance("j", 0, Some("b"), Status::ClusterScheduled);
        assert_eq!(after_refusal(Some(&elsewhere), "a"), AfterRefusal::Ignore);
        let unplaced = instance("j", 0, None, Status::NoActiveClusterWithCapacity);
        assert_eq!(after_refusal(Some(&unplaced), "a"), AfterRefusal::Ignore);
        let mut here = instance("j", 0, Some("a"), Status::ClusterScheduled);
        here.tried = vec!["x".into()];
        assert_eq!(
            after_refusal(Some(&here), "a"),
            AfterRefusal::Reschedule {
                exclude: vec!["x".into(), "a".into()]
            }
        );
        here.tried = vec!["a".into()];
        assert_eq!(
            after_refusal(Some(&here), "a"),
            AfterRefusal::Reschedule {
                exclude: vec!["a".into()]
            },
            "a cluster refusing twice is listed once"
        );
    }

    #[test]
    fn a_result_with_a_status_is_a_refusal() {
        let result = |status: Option<&str>, detail: Option<&str>, worker: Option<&str>| DeployResult {
            job_id: "j/0".into(),
            status: status.map(str::to_owned),
            status_detail: detail.map(str::to_owned),
            candidate_id: worker.map(str::to_owned),
            ..DeployResult::default()
        };
        assert_eq!(
            deploy_result(&result(Some("NO_WORKER_CAPACITY"), Some("2 workers full"), None)),
            ResultVerdict::Refused {
                why: "NO_WORKER_CAPACITY: 2 workers full".into()
            }
        );
        assert_eq!(
            deploy_result(&result(Some("NO_NODE_FOUND"), Some(""), None)),
            ResultVerdict::Refused {
                why: "NO_NODE_FOUND".into()
            }
        );
        assert_eq!(
            deploy_result(&result(Some(""), None, Some("w1"))),
            ResultVerdict::Scheduled {
                detail: "worker w1".into()
            }
        );
        assert_eq!(
            deploy_result(&result(None, None, None)),
            ResultVerdict::Scheduled {
                detail: String::new()
            }
        );
    }

    #[test]
    fn maintenance_rescues_live_instances_of_silent_clusters_and_retries_after_the_pause() {
        let mut waited = instance("j", 2, None, Status::NoActiveClusterWithCapacity);
        waited.updated = 1_000;
        let mut fresh = instance("j", 3, None, Status::NoActiveClusterWithCapacity);
        fresh.updated = 9_500;
        let view = MaintenanceView {
            on_silent_clusters: vec![
                ("a".into(), instance("j", 0, Some("a"), Status::Running)),
                ("a".into(), instance("j", 1, Some("a"), Status::Completed)),
            ],
            unplaced: vec![waited, fresh],
        };
        assert_eq!(
            maintenance(10_000, 9_000, &view),
            vec![
                Maintenance::Rescue {
                    service_id: "j".into(),
                    number: 0,
                    from: "a".into(),
                },
                Maintenance::Retry {
                    service_id: "j".into(),
                    number: 2,
                },
            ],
            "a completed instance stays; one tried 500 ms ago waits"
        );
        assert_eq!(maintenance(0, 9_000, &MaintenanceView::default()), Vec::new());
    }

    #[test]
    fn a_report_asks_to_release_undeploy_and_move_on() {
        let reported =
            |job: &str, number: i64, placed_here: bool, status: &str, detail: &str| ReportedInstance {
                job_id: job.into(),
                number,
                placed_here,
                status: status.into(),
                detail: detail.into(),
            };
        let report = ReportApplied {
            unknown_jobs: vec!["ghost".into()],
            instances: vec![
                reported("j", 0, true, "NO_WORKER_CAPACITY", "full"),
                reported("j", 1, true, "RUNNING", ""),
                reported("j", 2, false, "RUNNING", ""),
                reported("j", 3, true, "NODE_SCHEDULED", ""),
                reported("j", 4, true, "", ""),
                reported("j", 5, true, "SOMETHING_NEW", ""),
                reported("j", 6, true, "NO_QUALIFIED_WORKER_FOUND", ""),
            ],
        };
        assert_eq!(
            reconcile(&report),
            vec![
                ReportAction::Release { key: "j/1".into() },
                ReportAction::Release { key: "j/5".into() },
                ReportAction::UndeployJob {
                    job_id: "ghost".into()
                },
                ReportAction::UndeployInstance {
                    job_id: "j".into(),
                    number: 2,
                },
                ReportAction::Refused {
                    job_id: "j".into(),
                    number: 0,
                    why: "NO_WORKER_CAPACITY: full".into(),
                },
                ReportAction::Refused {
                    job_id: "j".into(),
                    number: 6,
                    why: "NO_QUALIFIED_WORKER_FOUND".into(),
                },
            ],
            "still scheduling (NODE_SCHEDULED) or no status: the reservation stays"
        );
        assert_eq!(reconcile(&ReportApplied::default()), Vec::new());
    }
}

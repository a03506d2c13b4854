//! Applications, services (Oakestra "jobs") and their instances: rows, the JSON documents the API shows, and the
//! atomic updates (instance numbers, placement, reports, cascading deletes with address release). The [`Store`]
//! methods at the end are what handlers and the engine call, each one step under the store's lock.

use oakestra_protocol::status::Status;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use serde_json::{Map, Value, json};

use super::{
    Inner, Store,
    clusters::{self, ClusterRow},
    net::{self, Owner, PoolKind, Taken, interested_clusters},
    new_id, now_ms,
};
use crate::Error;

/// Detail shown while an instance waits for the root scheduler.
pub const WAITING_FOR_SCHEDULING: &str = "Waiting for scheduling decision";

/// An application row with the ids of its services.
#[derive(Debug, Clone, PartialEq)]
pub struct AppRow {
    /// 24 hex digits.
    pub id: String,
    /// `application_name`.
    pub name: String,
    /// `application_namespace`.
    pub namespace: String,
    /// `application_desc`.
    pub description: String,
    /// The owning user's name (the reference's `userId`).
    pub owner: String,
    /// The organization id the owner submitted it in.
    pub organization: String,
    /// Application fields we do not interpret, verbatim.
    pub extra: Map<String, Value>,
    /// Service ids, oldest first.
    pub services: Vec<String>,
}

impl AppRow {
    /// The document the API shows (the reference's application document, ids as plain strings).
    pub fn to_json(&self) -> Value {
        let mut doc = self.extra.clone();
        for (k, v) in [
            ("_id", json!(self.id)),
            ("applicationID", json!(self.id)),
            ("application_name", json!(self.name)),
            ("application_namespace", json!(self.namespace)),
            ("application_desc", json!(self.description)),
            ("userId", json!(self.owner)),
            ("microservices", json!(self.services)),
        ] {
            doc.insert(k.to_owned(), v);
        }
        Value::Object(doc)
    }
}

/// A service to create: the validated microservice document and its job name.
#[derive(Debug, Clone)]
pub struct NewService {
    /// The microservice as submitted (validated and normalised).
    pub doc: Map<String, Value>,
    /// `app.appns.svc.svcns`.
    pub job_name: String,
    /// The user's `addresses.rr_ip`, if any (validated: inside 10.30.0.0/16).
    pub rr_ip: Option<String>,
    /// The user's `addresses.rr_ip_v6`, if any (validated: inside the round-robin block), canonical spelling.
    pub rr_ip_v6: Option<String>,
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    /// The service.
    pub service_id: String,
    /// The instance number.
    pub number: i64,
    /// The cluster it is placed on (`None` while unplaced).
    pub cluster_id: Option<String>,
    /// Status string.
    pub status: String,
    /// Status detail.
    pub status_detail: String,
    /// Instance IPv4 (allocated at first placement).
    pub instance_ip: Option<String>,
    /// Instance IPv6.
    pub instance_ip_v6: Option<String>,
    /// Clusters that could not run it during the current placement attempt.
    pub tried: Vec<String>,
    /// What the cluster last reported about it (worker, host, metrics, logs).
    pub report: Map<String, Value>,
    /// What the cluster's network side reported (namespace IPs, host IP and port).
    pub net: Map<String, Value>,
    /// When it was last placed (Unix ms).
    pub placed: Option<i64>,
    /// Last change (Unix ms).
    pub updated: i64,
    /// The location of the cluster it is placed on (`""` while unplaced), as the cluster registered it.
    pub cluster_location: String,
}

impl InstanceRow {
    /// The `instance_list` entry the API shows.
    pub fn to_json(&self) -> Value {
        let mut doc = self.report.clone();
        doc.extend(self.net.clone());
        for (k, v) in [
            ("instance_number", json!(self.number)),
            ("cluster_id", json!(self.cluster_id)),
            ("cluster_location", json!(self.cluster_location)),
            ("status", json!(self.status)),
            ("status_detail", json!(self.status_detail)),
            ("instance_ip", json!(self.instance_ip)),
            ("instance_ip_v6", json!(self.instance_ip_v6)),
        ] {
            doc.insert(k.to_owned(), v);
        }
        Value::Object(doc)
    }

    /// Whether a running placement may hold worker resources (placed and not finished).
    pub fn is_placed(&self) -> bool {
        self.cluster_id.is_some()
    }
}

/// A service row with its application's identity and its instances.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRow {
    /// 24 hex digits (also the reference's `microserviceID` and `_id`).
    pub id: String,
    /// The application.
    pub app_id: String,
    /// The application's name.
    pub app_name: String,
    /// The application's namespace.
    pub app_ns: String,
    /// The owning user.
    pub owner: String,
    /// `app.appns.svc.svcns`.
    pub job_name: String,
    /// The microservice document as submitted.
    pub doc: Map<String, Value>,
    /// Job-level status.
    pub status: String,
    /// Job-level status detail.
    pub status_detail: String,
    /// The next instance number.
    pub next_instance: i64,
    /// Round-robin IPv4.
    pub rr_ip: Option<String>,
    /// Round-robin IPv6.
    pub rr_ip_v6: Option<String>,
    /// Instances by number.
    pub instances: Vec<InstanceRow>,
}

impl ServiceRow {
    /// The job document the API and clusters see: the microservice fields plus the reference's job fields.
    pub fn to_json(&self) -> Value {
        self.to_json_with(self.instances.iter().map(InstanceRow::to_json).collect())
    }

    /// The job document with only instance `number` in `instance_list` (what a cluster gets to deploy it).
    pub fn to_json_for_instance(&self, number: i64) -> Value {
        self.to_json_with(
            self.instances
                .iter()
                .filter(|i| i.number == number)
                .map(InstanceRow::to_json)
                .collect(),
        )
    }

    fn to_json_with(&self, instance_list: Vec<Value>) -> Value {
        let mut doc = self.doc.clone();
        let text = |k: &str| self.doc.get(k).cloned().unwrap_or(Value::Null);
        for (k, v) in [
            ("_id", json!(self.id)),
            ("microserviceID", json!(self.id)),
            ("applicationID", json!(self.app_id)),
            ("job_name", json!(self.job_name)),
            ("app_name", json!(self.app_name)),
            ("app_ns", json!(self.app_ns)),
            ("service_name", text("microservice_name")),
            ("service_ns", text("microservice_namespace")),
            ("image", text("code")),
            ("RR_ip", json!(self.rr_ip)),
            ("RR_ip_v6", json!(self.rr_ip_v6)),
            ("next_instance_progressive_number", json!(self.next_instance)),
            ("status", json!(self.status)),
            ("status_detail", json!(self.status_detail)),
            ("userId", json!(self.owner)),
            ("instance_list", Value::Array(instance_list)),
        ] {
            doc.insert(k.to_owned(), v);
        }
        Value::Object(doc)
    }

    /// Instance `number`, if present.
    pub fn instance(&self, number: i64) -> Option<&InstanceRow> {
        self.instances.iter().find(|i| i.number == number)
    }
}

fn json_map(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn json_strings(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------------------------
// Applications
// ---------------------------------------------------------------------------------------------------------------

/// What an application is created from.
#[derive(Debug, Clone)]
pub struct NewApp {
    /// `application_name`.
    pub name: String,
    /// `application_namespace`.
    pub namespace: String,
    /// `application_desc`.
    pub description: String,
    /// Other application fields, verbatim.
    pub extra: Map<String, Value>,
}

/// Creates an application and its services in one transaction (all or nothing). 409 when the owner already has
/// an application of that name and namespace, a job name is taken, or a chosen address is held.
pub fn create_application(
    inner: &mut Inner,
    owner: &str,
    organization: &str,
    app: &NewApp,
    services: &[NewService],
) -> Result<(String, Vec<String>), Error> {
    let Inner { conn, pools, .. } = inner;
    let mut taken = Taken::default();
    let tx = conn.transaction()?;
    let result = (|| {
        let exists: Option<String> = tx
            .query_row(
                "SELECT id FROM applications WHERE name = ?1 AND namespace = ?2 AND owner = ?3",
                params![app.name, app.namespace, owner],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = exists {
            return Err(Error::Conflict {
                message: format!(
                    "application {}.{} already exists (id {id})",
                    app.name, app.namespace
                ),
            });
        }
        let id = new_id()?;
        tx.execute(
            "INSERT INTO applications (id, name, namespace, description, owner, organization, extra, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                app.name,
                app.namespace,
                app.description,
                owner,
                organization,
                Value::Object(app.extra.clone()).to_string(),
                now_ms()
            ],
        )?;
        let service_ids = insert_services(&tx, pools, &mut taken, &id, services)?;
        Ok((id, service_ids))
    })();
    finish(tx, pools, taken, result)
}

/// Adds services to an existing application (all or nothing).
pub fn add_services(inner: &mut Inner, app_id: &str, services: &[NewService]) -> Result<Vec<String>, Error> {
    let Inner { conn, pools, .. } = inner;
    let mut taken = Taken::default();
    let tx = conn.transaction()?;
    let result = insert_services(&tx, pools, &mut taken, app_id, services);
    finish(tx, pools, taken, result)
}

/// Commits on success; on failure rolls back (by dropping the transaction) and gives taken addresses back.
fn finish<T>(
    tx: Transaction<'_>,
    pools: &mut net::Pools,
    taken: Taken,
    result: Result<T, Error>,
) -> Result<T, Error> {
    match result.and_then(|v| tx.commit().map(|()| v).map_err(Error::from)) {
        Ok(v) => Ok(v),
        Err(e) => {
            taken.undo(pools);
            Err(e)
        }
    }
}

fn insert_services(
    tx: &Transaction<'_>,
    pools: &mut net::Pools,
    taken: &mut Taken,
    app_id: &str,
    services: &[NewService],
) -> Result<Vec<String>, Error> {
    let mut ids = Vec::with_capacity(services.len());
    for service in services {
        let clash: Option<String> = tx
            .query_row(
                "SELECT id FROM services WHERE job_name = ?1",
                [&service.job_name],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(other) = clash {
            return Err(Error::Conflict {
                message: format!(
                    "service {} already exists (id {other}); job names are unique across all users",
                    service.job_name
                ),
            });
        }
        let id = new_id()?;
        let owner = Owner {
            service_id: Some(id.clone()),
            ..Owner::default()
        };
        let rr_ip = match &service.rr_ip {
            Some(ip) => {
                net::claim(tx, pools, taken, PoolKind::ServiceV4, ip, &owner)?;
                ip.clone()
            }
            None => net::allocate(tx, pools, taken, PoolKind::ServiceV4, &owner)?,
        };
        let rr_ip_v6 = match &service.rr_ip_v6 {
            Some(ip) => {
                net::claim(tx, pools, taken, PoolKind::RoundRobinV6, ip, &owner)?;
                ip.clone()
            }
            None => net::allocate(tx, pools, taken, PoolKind::RoundRobinV6, &owner)?,
        };
        tx.execute(
            "INSERT INTO services (id, app_id, job_name, doc, status, status_detail, next_instance, rr_ip, rr_ip_v6, created)
             VALUES (?1, ?2, ?3, ?4, ?5, '', 0, ?6, ?7, ?8)",
            params![
                id,
                app_id,
                service.job_name,
                Value::Object(service.doc.clone()).to_string(),
                // The reference's initial job status (there is no dedicated one): nothing requested yet.
                "CREATED",
                rr_ip,
                rr_ip_v6,
                now_ms()
            ],
        )?;
        ids.push(id);
    }
    Ok(ids)
}

const APP_COLUMNS: &str = "id, name, namespace, description, owner, organization, extra";

fn app_from_row(conn: &Connection, r: &Row<'_>) -> rusqlite::Result<AppRow> {
    let id: String = r.get(0)?;
    let services = service_ids(conn, &id)?;
    Ok(AppRow {
        id,
        name: r.get(1)?,
        namespace: r.get(2)?,
        description: r.get(3)?,
        owner: r.get(4)?,
        organization: r.get(5)?,
        extra: json_map(&r.get::<_, String>(6)?),
        services,
    })
}

fn service_ids(conn: &Connection, app_id: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT id FROM services WHERE app_id = ?1 ORDER BY rowid")?;
    let rows = stmt.query_map([app_id], |r| r.get(0))?;
    rows.collect()
}

/// The application `id`.
pub fn application(conn: &Connection, id: &str) -> Result<Option<AppRow>, Error> {
    Ok(conn
        .query_row(
            &format!("SELECT {APP_COLUMNS} FROM applications WHERE id = ?1"),
            [id],
            |r| app_from_row(conn, r),
        )
        .optional()?)
}

/// The applications of `owner`, or all of them.
pub fn applications(conn: &Connection, owner: Option<&str>) -> Result<Vec<AppRow>, Error> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {APP_COLUMNS} FROM applications WHERE ?1 IS NULL OR owner = ?1 ORDER BY rowid"
    ))?;
    let rows = stmt.query_map([owner], |r| app_from_row(conn, r))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Changes an application's name, namespace or description. 409 when the new name is taken by the owner.
pub fn update_application(
    conn: &Connection,
    id: &str,
    name: &str,
    namespace: &str,
    description: &str,
) -> Result<(), Error> {
    match conn.execute(
        "UPDATE applications SET name = ?2, namespace = ?3, description = ?4 WHERE id = ?1",
        params![id, name, namespace, description],
    ) {
        Ok(0) => Err(Error::NotFound {
            what: "application",
            id: id.to_owned(),
        }),
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
            Err(Error::Conflict {
                message: format!("application {name}.{namespace} already exists"),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Deletes an application with its services, instances and addresses. Returns the services as they were, so the
/// caller can undeploy their placed instances and notify interested clusters.
pub fn delete_application(inner: &mut Inner, id: &str) -> Result<Vec<ServiceRow>, Error> {
    let Inner { conn, pools, .. } = inner;
    let services = services_of_app(conn, id)?;
    let tx = conn.transaction()?;
    let mut freed = Vec::new();
    for service in &services {
        freed.extend(net::remove_owned(&tx, &service.id, None)?);
        tx.execute("DELETE FROM interests WHERE job_name = ?1", [&service.job_name])?;
    }
    if tx.execute("DELETE FROM applications WHERE id = ?1", [id])? == 0 {
        return Err(Error::NotFound {
            what: "application",
            id: id.to_owned(),
        });
    }
    tx.commit()?;
    for (kind, address) in freed {
        pools.release(kind, &address);
    }
    Ok(services)
}

// ---------------------------------------------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------------------------------------------

const SERVICE_SELECT: &str = "SELECT s.id, s.app_id, a.name, a.namespace, a.owner, s.job_name, s.doc, s.status,
    s.status_detail, s.next_instance, s.rr_ip, s.rr_ip_v6 FROM services s JOIN applications a ON a.id = s.app_id";

fn service_from_row(conn: &Connection, r: &Row<'_>) -> rusqlite::Result<ServiceRow> {
    let id: String = r.get(0)?;
    let instances = instances_of(conn, &id)?;
    Ok(ServiceRow {
        id,
        app_id: r.get(1)?,
        app_name: r.get(2)?,
        app_ns: r.get(3)?,
        owner: r.get(4)?,
        job_name: r.get(5)?,
        doc: json_map(&r.get::<_, String>(6)?),
        status: r.get(7)?,
        status_detail: r.get(8)?,
        next_instance: r.get(9)?,
        rr_ip: r.get(10)?,
        rr_ip_v6: r.get(11)?,
        instances,
    })
}

/// The service `id`.
pub fn service(conn: &Connection, id: &str) -> Result<Option<ServiceRow>, Error> {
    Ok(conn
        .query_row(&format!("{SERVICE_SELECT} WHERE s.id = ?1"), [id], |r| {
            service_from_row(conn, r)
        })
        .optional()?)
}

/// The service called `job_name`.
pub fn service_by_job_name(conn: &Connection, job_name: &str) -> Result<Option<ServiceRow>, Error> {
    Ok(conn
        .query_row(
            &format!("{SERVICE_SELECT} WHERE s.job_name = ?1"),
            [job_name],
            |r| service_from_row(conn, r),
        )
        .optional()?)
}

/// The services of application `app_id`.
pub fn services_of_app(conn: &Connection, app_id: &str) -> Result<Vec<ServiceRow>, Error> {
    let mut stmt = conn.prepare(&format!("{SERVICE_SELECT} WHERE s.app_id = ?1 ORDER BY s.rowid"))?;
    let rows = stmt.query_map([app_id], |r| service_from_row(conn, r))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Every service, or those of `owner`.
pub fn services(conn: &Connection, owner: Option<&str>) -> Result<Vec<ServiceRow>, Error> {
    let mut stmt = conn.prepare(&format!(
        "{SERVICE_SELECT} WHERE ?1 IS NULL OR a.owner = ?1 ORDER BY s.rowid"
    ))?;
    let rows = stmt.query_map([owner], |r| service_from_row(conn, r))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Deletes a service with its instances and addresses; returns it as it was.
pub fn delete_service(inner: &mut Inner, id: &str) -> Result<ServiceRow, Error> {
    let Inner { conn, pools, .. } = inner;
    let Some(service) = service(conn, id)? else {
        return Err(Error::NotFound {
            what: "service",
            id: id.to_owned(),
        });
    };
    let tx = conn.transaction()?;
    let freed = net::remove_owned(&tx, id, None)?;
    tx.execute("DELETE FROM interests WHERE job_name = ?1", [&service.job_name])?;
    tx.execute("DELETE FROM services WHERE id = ?1", [id])?;
    tx.commit()?;
    for (kind, address) in freed {
        pools.release(kind, &address);
    }
    Ok(service)
}

/// Sets the job-level status.
pub fn set_service_status(conn: &Connection, id: &str, status: &str, detail: &str) -> Result<(), Error> {
    conn.execute(
        "UPDATE services SET status = ?2, status_detail = ?3 WHERE id = ?1",
        params![id, status, detail],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Instances
// ---------------------------------------------------------------------------------------------------------------

const INSTANCE_COLUMNS: &str =
    "service_id, number, cluster_id, status, status_detail, instance_ip, instance_ip_v6,
    tried, report, net, placed, updated,
    COALESCE((SELECT location FROM clusters WHERE clusters.id = instances.cluster_id), '')";

fn instance_from_row(r: &Row<'_>) -> rusqlite::Result<InstanceRow> {
    Ok(InstanceRow {
        service_id: r.get(0)?,
        number: r.get(1)?,
        cluster_id: r.get(2)?,
        status: r.get(3)?,
        status_detail: r.get(4)?,
        instance_ip: r.get(5)?,
        instance_ip_v6: r.get(6)?,
        tried: json_strings(&r.get::<_, String>(7)?),
        report: json_map(&r.get::<_, String>(8)?),
        net: json_map(&r.get::<_, String>(9)?),
        placed: r.get(10)?,
        updated: r.get(11)?,
        cluster_location: r.get(12)?,
    })
}

fn instances_of(conn: &Connection, service_id: &str) -> rusqlite::Result<Vec<InstanceRow>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE service_id = ?1 ORDER BY number"
    ))?;
    let rows = stmt.query_map([service_id], instance_from_row)?;
    rows.collect()
}

/// Instance `number` of `service_id`.
pub fn instance(conn: &Connection, service_id: &str, number: i64) -> Result<Option<InstanceRow>, Error> {
    Ok(conn
        .query_row(
            &format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE service_id = ?1 AND number = ?2"),
            params![service_id, number],
            instance_from_row,
        )
        .optional()?)
}

/// Every instance placed on `cluster_id`.
pub fn instances_on_cluster(conn: &Connection, cluster_id: &str) -> Result<Vec<InstanceRow>, Error> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE cluster_id = ?1 ORDER BY service_id, number"
    ))?;
    let rows = stmt.query_map([cluster_id], instance_from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Every instance not placed on any cluster whose status is not terminal (waiting for a cluster).
pub fn unplaced_instances(conn: &Connection) -> Result<Vec<InstanceRow>, Error> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE cluster_id IS NULL
         AND status NOT IN ('COMPLETED', 'UNDEPLOYED') ORDER BY updated"
    ))?;
    let rows = stmt.query_map([], instance_from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Takes the service's next instance number and creates the instance as `REQUESTED`, atomically: concurrent
/// requests get distinct numbers and none is lost. The job status becomes `REQUESTED`.
pub fn new_instance(conn: &mut Connection, service_id: &str) -> Result<InstanceRow, Error> {
    let tx = conn.transaction()?;
    let number: Option<i64> = tx
        .query_row(
            "UPDATE services SET next_instance = next_instance + 1, status = ?2, status_detail = ?3
             WHERE id = ?1 RETURNING next_instance - 1",
            params![service_id, Status::Requested.as_str(), WAITING_FOR_SCHEDULING],
            |r| r.get(0),
        )
        .optional()?;
    let Some(number) = number else {
        return Err(Error::NotFound {
            what: "service",
            id: service_id.to_owned(),
        });
    };
    let now = now_ms();
    tx.execute(
        "INSERT INTO instances (service_id, number, status, status_detail, updated) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![service_id, number, Status::Requested.as_str(), WAITING_FOR_SCHEDULING, now],
    )?;
    tx.commit()?;
    Ok(InstanceRow {
        service_id: service_id.to_owned(),
        number,
        cluster_id: None,
        status: Status::Requested.as_str().to_owned(),
        status_detail: WAITING_FOR_SCHEDULING.to_owned(),
        instance_ip: None,
        instance_ip_v6: None,
        tried: Vec::new(),
        report: Map::new(),
        net: Map::new(),
        placed: None,
        updated: now,
        cluster_location: String::new(),
    })
}

/// Places an instance on `cluster_id` (`CLUSTER_SCHEDULED`), allocating its instance addresses on first placement.
/// The job status follows.
pub fn place_instance(
    inner: &mut Inner,
    service_id: &str,
    number: i64,
    cluster_id: &str,
    tried: &[String],
) -> Result<InstanceRow, Error> {
    let Inner { conn, pools, .. } = inner;
    let Some(current) = instance(conn, service_id, number)? else {
        return Err(Error::NotFound {
            what: "instance",
            id: format!("{service_id}/{number}"),
        });
    };
    let mut taken = Taken::default();
    let tx = conn.transaction()?;
    let result = (|| {
        let owner = Owner {
            service_id: Some(service_id.to_owned()),
            instance: Some(number),
            ..Owner::default()
        };
        let ip = match current.instance_ip {
            Some(ip) => ip,
            None => net::allocate(&tx, pools, &mut taken, PoolKind::ServiceV4, &owner)?,
        };
        let ip6 = match current.instance_ip_v6 {
            Some(ip) => ip,
            None => net::allocate(&tx, pools, &mut taken, PoolKind::InstanceV6, &owner)?,
        };
        let now = now_ms();
        let status = Status::ClusterScheduled.as_str();
        tx.execute(
            "UPDATE instances SET cluster_id = ?3, status = ?4, status_detail = '', instance_ip = ?5,
             instance_ip_v6 = ?6, tried = ?7, report = '{}', net = '{}', placed = ?8, updated = ?8
             WHERE service_id = ?1 AND number = ?2",
            params![
                service_id,
                number,
                cluster_id,
                status,
                ip,
                ip6,
                json!(tried).to_string(),
                now
            ],
        )?;
        tx.execute(
            "UPDATE services SET status = ?2, status_detail = '' WHERE id = ?1",
            params![service_id, status],
        )?;
        instance(&tx, service_id, number)?.ok_or_else(|| Error::NotFound {
            what: "instance",
            id: format!("{service_id}/{number}"),
        })
    })();
    finish(tx, pools, taken, result)
}

/// Takes an instance off its cluster with a (negative scheduling) status; `tried` records the clusters that could
/// not run it. The job status follows.
pub fn unplace_instance(
    conn: &Connection,
    service_id: &str,
    number: i64,
    status: &str,
    detail: &str,
    tried: &[String],
) -> Result<(), Error> {
    conn.execute(
        "UPDATE instances SET cluster_id = NULL, status = ?3, status_detail = ?4, tried = ?5, report = '{}',
         net = '{}', updated = ?6 WHERE service_id = ?1 AND number = ?2",
        params![
            service_id,
            number,
            status,
            detail,
            json!(tried).to_string(),
            now_ms()
        ],
    )?;
    set_service_status(conn, service_id, status, detail)
}

/// Sets an instance's status (and the job's).
pub fn set_instance_status(
    conn: &Connection,
    service_id: &str,
    number: i64,
    status: &str,
    detail: &str,
) -> Result<(), Error> {
    conn.execute(
        "UPDATE instances SET status = ?3, status_detail = ?4, updated = ?5 WHERE service_id = ?1 AND number = ?2",
        params![service_id, number, status, detail, now_ms()],
    )?;
    set_service_status(conn, service_id, status, detail)
}

/// Merges a cluster's network report (namespace IPs, host IP and port) into an instance.
pub fn set_instance_net(
    conn: &Connection,
    service_id: &str,
    number: i64,
    net: &Map<String, Value>,
) -> Result<bool, Error> {
    let Some(row) = instance(conn, service_id, number)? else {
        return Ok(false);
    };
    let mut merged = row.net;
    merged.extend(net.clone());
    conn.execute(
        "UPDATE instances SET net = ?3, updated = ?4 WHERE service_id = ?1 AND number = ?2",
        params![service_id, number, Value::Object(merged).to_string(), now_ms()],
    )?;
    Ok(true)
}

/// Deletes one instance and frees its addresses; returns it as it was.
pub fn delete_instance(inner: &mut Inner, service_id: &str, number: i64) -> Result<InstanceRow, Error> {
    let Inner { conn, pools, .. } = inner;
    let Some(row) = instance(conn, service_id, number)? else {
        return Err(Error::NotFound {
            what: "instance",
            id: format!("{service_id}/{number}"),
        });
    };
    let tx = conn.transaction()?;
    let freed = net::remove_owned(&tx, service_id, Some(number))?;
    tx.execute(
        "DELETE FROM instances WHERE service_id = ?1 AND number = ?2",
        params![service_id, number],
    )?;
    tx.commit()?;
    for (kind, address) in freed {
        pools.release(kind, &address);
    }
    Ok(row)
}

/// How many samples `cpu_history` and `memory_history` keep (the reference's `$slice: -100`).
pub const HISTORY_LEN: usize = 100;

/// Appends this report's `cpu_percent` and `memory_percent` to the instance's bounded `cpu_history` and
/// `memory_history` (`{value, timestamp}` with the value as text and an ISO 8601 UTC timestamp, as the reference
/// keeps them), carried over from the `previous` report (a new placement starts them afresh). A history a cluster sends along is ignored: root keeps its
/// own, so a reference cluster cannot make it grow beyond the bound.
fn record_history(details: &mut Map<String, Value>, previous: &Map<String, Value>, now: i64) {
    for (metric, history) in [
        ("cpu_percent", "cpu_history"),
        ("memory_percent", "memory_history"),
    ] {
        let mut samples = previous
            .get(history)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(value) = details.get(metric).and_then(metric_text) {
            samples.push(json!({
                "value": value,
                "timestamp": oakestra_protocol::time::iso8601_utc(now),
            }));
        }
        let excess = samples.len().saturating_sub(HISTORY_LEN);
        samples.drain(..excess);
        details.insert(history.to_owned(), Value::Array(samples));
    }
}

/// A metric as the reference's text: strings as they are, numbers without a needless `.0`.
pub fn metric_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{f:.0}"),
            _ => n.to_string(),
        }),
        _ => None,
    }
}

/// What applying a cluster report saw: the facts the engine's reconciliation ([`crate::plan::reconcile`]) decides
/// on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReportApplied {
    /// Jobs the cluster reported that root does not know.
    pub unknown_jobs: Vec<String>,
    /// Every reported instance (with a number) of a job root knows, in report order.
    pub instances: Vec<ReportedInstance>,
}

/// One instance as a cluster reported it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReportedInstance {
    /// Its job id.
    pub job_id: String,
    /// Its number.
    pub number: i64,
    /// Whether root placed it on the reporting cluster; only then was the report recorded.
    pub placed_here: bool,
    /// The status it reported (empty: none).
    pub status: String,
    /// The status detail it reported (may be empty).
    pub detail: String,
}

/// Applies the `jobs` of a cluster report: instance statuses and details for instances root placed on that
/// cluster, and job statuses. What the report asks for beyond that (undeploying what root does not have there,
/// releasing reservations, trying the next cluster) is decided from the returned facts.
pub fn apply_report(conn: &mut Connection, cluster_id: &str, jobs: &[Value]) -> Result<ReportApplied, Error> {
    let mut applied = ReportApplied::default();
    let tx = conn.transaction()?;
    let now = now_ms();
    for job in jobs {
        let Some(job_id) = job.get("_id").and_then(Value::as_str) else {
            continue;
        };
        let known: Option<String> = tx
            .query_row("SELECT id FROM services WHERE id = ?1", [job_id], |r| r.get(0))
            .optional()?;
        if known.is_none() {
            applied.unknown_jobs.push(job_id.to_owned());
            continue;
        }
        let reported = job
            .get("instance_list")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        let mut last_status = None;
        for reported in reported {
            let Some(number) = reported.get("instance_number").and_then(as_i64) else {
                continue;
            };
            let status = reported.get("status").and_then(Value::as_str).unwrap_or_default();
            let detail = reported
                .get("status_detail")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let ours: Option<(Option<String>, String)> = tx
                .query_row(
                    "SELECT cluster_id, report FROM instances WHERE service_id = ?1 AND number = ?2",
                    params![job_id, number],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let previous = match ours {
                Some((Some(placed_on), previous)) if placed_on == cluster_id => Some(previous),
                _ => None,
            };
            applied.instances.push(ReportedInstance {
                job_id: job_id.to_owned(),
                number,
                placed_here: previous.is_some(),
                status: status.to_owned(),
                detail: detail.to_owned(),
            });
            // Only the cluster root placed an instance on may report on it.
            let Some(previous) = previous else {
                continue;
            };
            let mut details = reported.as_object().cloned().unwrap_or_default();
            for k in [
                "instance_number",
                "status",
                "status_detail",
                "cluster_id",
                "instance_ip",
                "instance_ip_v6",
            ] {
                details.remove(k);
            }
            record_history(&mut details, &json_map(&previous), now);
            if status.is_empty() {
                tx.execute(
                    "UPDATE instances SET report = ?3, updated = ?4 WHERE service_id = ?1 AND number = ?2",
                    params![job_id, number, Value::Object(details).to_string(), now],
                )?;
            } else {
                tx.execute(
                    "UPDATE instances SET status = ?3, status_detail = ?4, report = ?5, updated = ?6
                     WHERE service_id = ?1 AND number = ?2",
                    params![
                        job_id,
                        number,
                        status,
                        detail,
                        Value::Object(details).to_string(),
                        now
                    ],
                )?;
                last_status = Some((status.to_owned(), detail.to_owned()));
            }
        }
        let job_status = job
            .get("status")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let (status, detail) = match (job_status, last_status) {
            (Some(s), _) => (
                s.to_owned(),
                job.get("status_detail")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            ),
            (None, Some(last)) => last,
            (None, None) => continue,
        };
        tx.execute(
            "UPDATE services SET status = ?2, status_detail = ?3 WHERE id = ?1",
            params![job_id, status, detail],
        )?;
    }
    tx.commit()?;
    Ok(applied)
}

fn as_i64(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        .or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0)
                .and_then(|f| format!("{f:.0}").parse().ok())
        })
}

/// How many instances are in each status, as `(status, count)` rows (for the metrics).
pub fn count_by_status(conn: &Connection) -> Result<Vec<(String, i64)>, Error> {
    let mut stmt = conn.prepare("SELECT status, COUNT(*) FROM instances GROUP BY status")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------------------------
// The store's methods over applications, services and instances
// ---------------------------------------------------------------------------------------------------------------

/// A deleted service as it was, with the clusters that were interested in it (read before the delete dropped their
/// interests), so they can be told.
pub type DeletedService = (ServiceRow, Vec<ClusterRow>);

/// A deleted instance as it was, the cluster it was placed on (if it still exists) and the clusters interested in
/// its service.
#[derive(Debug, Clone)]
pub struct DeletedInstance {
    /// The instance as it was.
    pub instance: InstanceRow,
    /// Its cluster, to undeploy it there.
    pub cluster: Option<ClusterRow>,
    /// The clusters to tell.
    pub interested: Vec<ClusterRow>,
}

/// What a maintenance round looks at.
#[derive(Debug, Clone, Default)]
pub struct MaintenanceView {
    /// Every instance on a cluster that stopped reporting, with that cluster's id (terminal ones included).
    pub on_silent_clusters: Vec<(String, InstanceRow)>,
    /// Every instance waiting for a cluster (see [`unplaced_instances`]).
    pub unplaced: Vec<InstanceRow>,
}

/// A cluster's network report recorded for a job's instances.
#[derive(Debug, Clone)]
pub struct NetRecorded {
    /// The job.
    pub service: ServiceRow,
    /// The clusters interested in it.
    pub interested: Vec<ClusterRow>,
    /// The instances whose network fields were recorded (the others do not exist).
    pub changed: Vec<i64>,
}

impl Store {
    /// The application `id`.
    pub async fn application(&self, id: String) -> Result<Option<AppRow>, Error> {
        self.with(move |inner| application(&inner.conn, &id)).await
    }

    /// The applications of `owner`, or all of them.
    pub async fn applications(&self, owner: Option<String>) -> Result<Vec<AppRow>, Error> {
        self.with(move |inner| applications(&inner.conn, owner.as_deref()))
            .await
    }

    /// Creates an application with its services (see [`create_application`]); its id and its services' ids.
    pub async fn create_application(
        &self,
        owner: String,
        organization: String,
        app: NewApp,
        services: Vec<NewService>,
    ) -> Result<(String, Vec<String>), Error> {
        self.with(move |inner| create_application(inner, &owner, &organization, &app, &services))
            .await
    }

    /// Changes an application's name, namespace or description (see [`update_application`]).
    pub async fn update_application(
        &self,
        id: String,
        name: String,
        namespace: String,
        description: String,
    ) -> Result<(), Error> {
        self.with(move |inner| update_application(&inner.conn, &id, &name, &namespace, &description))
            .await
    }

    /// Deletes an application with its services, instances and addresses; the services as they were.
    pub async fn delete_application(&self, id: String) -> Result<Vec<DeletedService>, Error> {
        self.with(move |inner| {
            let mut interested = Vec::new();
            for service in services_of_app(&inner.conn, &id)? {
                interested.push(interested_clusters(&inner.conn, &service.job_name)?);
            }
            let services = delete_application(inner, &id)?;
            Ok(services.into_iter().zip(interested).collect())
        })
        .await
    }

    /// The service `id`.
    pub async fn service(&self, id: String) -> Result<Option<ServiceRow>, Error> {
        self.with(move |inner| service(&inner.conn, &id)).await
    }

    /// Every service.
    pub async fn all_services(&self) -> Result<Vec<ServiceRow>, Error> {
        self.with(|inner| services(&inner.conn, None)).await
    }

    /// The services of application `app_id`.
    pub async fn services_of_app(&self, app_id: String) -> Result<Vec<ServiceRow>, Error> {
        self.with(move |inner| services_of_app(&inner.conn, &app_id))
            .await
    }

    /// Adds services to application `app_id` (all or nothing); their ids.
    pub async fn add_services(
        &self,
        app_id: String,
        services: Vec<NewService>,
    ) -> Result<Vec<String>, Error> {
        self.with(move |inner| add_services(inner, &app_id, &services))
            .await
    }

    /// Deletes service `id` (the job `job_name`) with its instances and addresses.
    pub async fn delete_service(&self, id: String, job_name: String) -> Result<DeletedService, Error> {
        self.with(move |inner| {
            let interested = interested_clusters(&inner.conn, &job_name)?;
            Ok((delete_service(inner, &id)?, interested))
        })
        .await
    }

    /// Creates the next instance of `service_id` (see [`new_instance`]).
    pub async fn new_instance(&self, service_id: String) -> Result<InstanceRow, Error> {
        self.with(move |inner| new_instance(&mut inner.conn, &service_id))
            .await
    }

    /// Instance `number` of `service_id`.
    pub async fn instance(&self, service_id: String, number: i64) -> Result<Option<InstanceRow>, Error> {
        self.with(move |inner| instance(&inner.conn, &service_id, number))
            .await
    }

    /// Instance `number` of `service_id` and the cluster `cluster_id`, read together.
    pub async fn instance_and_cluster(
        &self,
        service_id: String,
        number: i64,
        cluster_id: String,
    ) -> Result<(Option<InstanceRow>, Option<ClusterRow>), Error> {
        self.with(move |inner| {
            Ok((
                instance(&inner.conn, &service_id, number)?,
                clusters::by_id(&inner.conn, &cluster_id)?,
            ))
        })
        .await
    }

    /// The service `service_id` and every cluster, read together (what placing one of its instances needs).
    pub async fn service_and_clusters(
        &self,
        service_id: String,
    ) -> Result<(Option<ServiceRow>, Vec<ClusterRow>), Error> {
        self.with(move |inner| Ok((service(&inner.conn, &service_id)?, clusters::all(&inner.conn)?)))
            .await
    }

    /// Places instance `number` on `cluster_id` (see [`place_instance`]).
    pub async fn place_instance(
        &self,
        service_id: String,
        number: i64,
        cluster_id: String,
        tried: Vec<String>,
    ) -> Result<InstanceRow, Error> {
        self.with(move |inner| place_instance(inner, &service_id, number, &cluster_id, &tried))
            .await
    }

    /// Takes instance `number` off its cluster with `status` (see [`unplace_instance`]); the instance afterwards.
    pub async fn unplace_instance(
        &self,
        service_id: String,
        number: i64,
        status: Status,
        detail: String,
        tried: Vec<String>,
    ) -> Result<Option<InstanceRow>, Error> {
        self.with(move |inner| {
            unplace_instance(&inner.conn, &service_id, number, status.as_str(), &detail, &tried)?;
            instance(&inner.conn, &service_id, number)
        })
        .await
    }

    /// Sets an instance's status (and the job's).
    pub async fn set_instance_status(
        &self,
        service_id: String,
        number: i64,
        status: Status,
        detail: String,
    ) -> Result<(), Error> {
        self.with(move |inner| {
            set_instance_status(&inner.conn, &service_id, number, status.as_str(), &detail)
        })
        .await
    }

    /// Deletes instance `number` of `service_id` (the job `job_name`) and frees its addresses.
    pub async fn delete_instance(
        &self,
        service_id: String,
        job_name: String,
        number: i64,
    ) -> Result<DeletedInstance, Error> {
        self.with(move |inner| {
            let interested = interested_clusters(&inner.conn, &job_name)?;
            let instance = delete_instance(inner, &service_id, number)?;
            let cluster = match &instance.cluster_id {
                Some(id) => clusters::by_id(&inner.conn, id)?,
                None => None,
            };
            Ok(DeletedInstance {
                instance,
                cluster,
                interested,
            })
        })
        .await
    }

    /// Records cluster `cluster_id`'s report: its aggregate (see [`clusters::record_report`]) and its `jobs` (see
    /// [`apply_report`]), in one step.
    pub async fn apply_report(
        &self,
        cluster_id: String,
        aggregate: Map<String, Value>,
        jobs: Vec<Value>,
    ) -> Result<ReportApplied, Error> {
        self.with(move |inner| {
            clusters::record_report(&inner.conn, &cluster_id, &aggregate)?;
            apply_report(&mut inner.conn, &cluster_id, &jobs)
        })
        .await
    }

    /// The instances on clusters not active at `now` (no report within `window_ms`) and the unplaced ones.
    pub async fn maintenance_view(&self, now: i64, window_ms: i64) -> Result<MaintenanceView, Error> {
        self.with(move |inner| {
            let mut on_silent_clusters = Vec::new();
            for cluster in clusters::all(&inner.conn)? {
                if cluster.is_active(now, window_ms) {
                    continue;
                }
                for instance in instances_on_cluster(&inner.conn, &cluster.id)? {
                    on_silent_clusters.push((cluster.id.clone(), instance));
                }
            }
            Ok(MaintenanceView {
                on_silent_clusters,
                unplaced: unplaced_instances(&inner.conn)?,
            })
        })
        .await
    }

    /// Merges a cluster's network report into the instances of job `service_id` ([`Error::NotFound`] for an
    /// unknown job).
    pub async fn record_instance_net(
        &self,
        service_id: String,
        instances: Vec<(i64, Map<String, Value>)>,
    ) -> Result<NetRecorded, Error> {
        self.with(move |inner| {
            let Some(service) = service(&inner.conn, &service_id)? else {
                return Err(Error::NotFound {
                    what: "job",
                    id: service_id,
                });
            };
            let mut changed = Vec::new();
            for (number, fields) in &instances {
                if set_instance_net(&inner.conn, &service_id, *number, fields)? {
                    changed.push(*number);
                }
            }
            let interested = interested_clusters(&inner.conn, &service.job_name)?;
            Ok(NetRecorded {
                service,
                interested,
                changed,
            })
        })
        .await
    }

    /// How many instances are in each status, and every cluster (what the metrics show), read together.
    pub async fn instance_counts_and_clusters(&self) -> Result<(Vec<(String, i64)>, Vec<ClusterRow>), Error> {
        self.with(|inner| Ok((count_by_status(&inner.conn)?, clusters::all(&inner.conn)?)))
            .await
    }
}

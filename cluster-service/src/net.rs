//! The cluster network service: worker subnets, table queries by name and by IP (answered from a cache, resolved
//! through root on a miss), instance addresses reported by NetManagers (forwarded to root), interests, and the
//! `jobs/<job>/updates_available` broadcasts when root says a job changed.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, PoisonError},
};

use hyper::Method;
use oakestra_protocol::{
    api::federation::{
        JobUpdate, NET_DEPLOY_STATUS_PATH, NetDeployStatus, NetJob, SUBNET_PATH, SubnetAllocation,
        interest_path, job_by_ip_path, job_by_name_path,
    },
    mqtt::{
        net::{
            AddressChanged, InstanceEntry, InterestRemove, ServiceDeployed, SubnetMethod, SubnetRequest,
            SubnetResult, TableQueryRequest, TableQueryResult, UpdateType, UpdatesAvailable,
        },
        topics::{Topic, TopicId},
    },
};
use serde_json::{Map, Value};

use crate::engine::{Engine, decode, now_ms};

/// Jobs resolved for this cluster's workers and which workers asked for them.
#[derive(Debug, Default)]
pub struct NetCache {
    jobs: HashMap<String, NetJob>,
    interested: HashMap<String, BTreeSet<String>>,
}

impl NetCache {
    /// The cached job `name`.
    pub fn by_name(&self, name: &str) -> Option<&NetJob> {
        self.jobs.get(name)
    }

    /// The cached job owning address `ip`: round-robin addresses first, then instance addresses (the reference's
    /// search order).
    pub fn by_ip(&self, ip: IpAddr) -> Option<&NetJob> {
        let same = |text: &str| text.parse::<IpAddr>().is_ok_and(|a| a == ip);
        self.jobs
            .values()
            .find(|j| {
                j.service_ip_list
                    .iter()
                    .any(|s| same(&s.address) || same(&s.address_v6))
            })
            .or_else(|| {
                self.jobs.values().find(|j| {
                    j.instance_list.iter().any(|i| {
                        i.instance_ip.as_deref().is_some_and(same)
                            || i.instance_ip_v6.as_deref().is_some_and(same)
                    })
                })
            })
    }

    /// Caches (or replaces) a job.
    pub fn put(&mut self, job: NetJob) {
        self.jobs.insert(job.job_name.clone(), job);
    }

    /// Records that `worker` asked for `job`.
    pub fn interest(&mut self, job: &str, worker: &str) {
        self.interested
            .entry(job.to_owned())
            .or_default()
            .insert(worker.to_owned());
    }

    /// Drops `worker`'s interest in `job`; `true` if nobody is interested any more (the job leaves the cache).
    pub fn drop_interest(&mut self, job: &str, worker: &str) -> bool {
        let Some(set) = self.interested.get_mut(job) else {
            return false;
        };
        set.remove(worker);
        if set.is_empty() {
            self.interested.remove(job);
            self.jobs.remove(job);
            return true;
        }
        false
    }

    /// Whether any worker asked for `job`.
    pub fn is_interesting(&self, job: &str) -> bool {
        self.interested.get(job).is_some_and(|s| !s.is_empty())
    }

    /// Removes instance `number` (or, for -1, the whole job) from the cache.
    pub fn forget(&mut self, job: &str, number: i64) {
        if number < 0 {
            self.jobs.remove(job);
        } else if let Some(j) = self.jobs.get_mut(job) {
            j.instance_list.retain(|i| i.instance_number != number);
        }
    }
}

impl Engine {
    fn cache(&self) -> std::sync::MutexGuard<'_, NetCache> {
        self.net.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Handles one `nodes/<id>/net/...` message.
    pub(crate) async fn on_net(self: &Arc<Self>, topic: &Topic, payload: &[u8]) {
        let worker = topic.id().as_str().to_owned();
        if self.state().node(&worker).is_none() {
            self.publish(
                &worker,
                Topic::ControlError,
                &oakestra_protocol::mqtt::worker::ControlError::node_not_registered(),
            )
            .await;
            return;
        }
        match topic {
            Topic::NetSubnet(_) => {
                if let Some(req) = decode::<SubnetRequest>(topic, payload) {
                    self.subnet(&worker, &req).await;
                }
            }
            Topic::NetTableQueryRequest(_) => {
                if let Some(req) = decode::<TableQueryRequest>(topic, payload) {
                    self.table_query(&worker, &req).await;
                }
            }
            Topic::NetServiceDeployed(_) => {
                if let Some(d) = decode::<ServiceDeployed>(topic, payload) {
                    self.instance_addresses(
                        &worker,
                        &d.appname,
                        d.instance_number,
                        Some((&d.nsip, &d.nsipv6)),
                        &d.host_ip,
                        &d.host_port,
                    )
                    .await;
                }
            }
            Topic::NetServiceAddressChanged(_) => {
                if let Some(c) = decode::<AddressChanged>(topic, payload) {
                    self.instance_addresses(
                        &worker,
                        &c.appname,
                        c.instance_number,
                        None,
                        &c.host_ip,
                        &c.host_port,
                    )
                    .await;
                    self.broadcast(&c.appname, UpdatesAvailable::deployment()).await;
                }
            }
            Topic::NetInterestRemove(_) => {
                if let Some(r) = decode::<InterestRemove>(topic, payload) {
                    self.interest_removed(&worker, &r.appname).await;
                }
            }
            _ => {}
        }
    }

    /// `net/subnet`: the worker's subnets, asked from root once and then kept.
    async fn subnet(self: &Arc<Self>, worker: &str, req: &SubnetRequest) {
        if req.method != SubnetMethod::Get {
            return; // The reference accepts DELETE as a no-op; subnets stay with their worker.
        }
        let known = self.state().node(worker).and_then(|n| n.record.subnet.clone());
        let (v4, v6) = match known {
            Some(s) => s,
            None => {
                let path = format!("{SUBNET_PATH}?worker_id={worker}");
                let answer = match self.call_root::<Value>(Method::GET, &path, None).await {
                    Ok(r) => r,
                    Err(why) => {
                        tracing::warn!(node = %worker, %why, "cannot get a subnet from root; the worker will ask again");
                        return;
                    }
                };
                let Ok(alloc) = serde_json::from_value::<SubnetAllocation>(answer.body) else {
                    tracing::error!(node = %worker, "root answered the subnet request with something else");
                    return;
                };
                let pair = (alloc.subnet_addr, alloc.subnet_addr_v6);
                let effects = self.state().set_subnet(worker, pair.clone());
                self.apply(effects).await;
                pair
            }
        };
        tracing::info!(node = %worker, subnet = %v4, subnet_v6 = %v6, "worker subnet");
        let result = SubnetResult {
            address: v4,
            addressv6: v6,
            extra: Map::new(),
        };
        self.publish(worker, Topic::NetSubnetworkResult, &result).await;
    }

    /// `net/tablequery/request`: answers from the cache, resolving through root on a miss. An unknown job gets an
    /// empty `instance_list`, as the reference answers.
    async fn table_query(&self, worker: &str, req: &TableQueryRequest) {
        let key = req.query_key().to_owned();
        let by_ip = !req.sip.is_empty();
        let cached = if by_ip {
            key.parse::<IpAddr>()
                .ok()
                .and_then(|ip| self.cache().by_ip(ip).cloned())
        } else {
            self.cache().by_name(&key).cloned()
        };
        let job = match cached {
            Some(j) => Some(j),
            None => {
                let path = if by_ip {
                    job_by_ip_path(&key)
                } else {
                    job_by_name_path(&key)
                };
                match self.call_root::<Value>(Method::GET, &path, None).await {
                    Ok(r) => match serde_json::from_value::<NetJob>(r.body) {
                        Ok(j) => {
                            self.cache().put(j.clone());
                            Some(j)
                        }
                        Err(e) => {
                            tracing::warn!(key = %key, error = %e, "root's job answer is unreadable");
                            None
                        }
                    },
                    Err(why) => {
                        tracing::info!(node = %worker, key = %key, %why, "table query not resolved");
                        None
                    }
                }
            }
        };
        let result = match job {
            Some(j) => {
                self.cache().interest(&j.job_name, worker);
                TableQueryResult {
                    app_name: Some(j.job_name),
                    query_key: key,
                    instance_list: j.instance_list,
                    extra: Map::new(),
                }
            }
            None => TableQueryResult {
                app_name: None,
                query_key: key,
                instance_list: Vec::new(),
                extra: Map::new(),
            },
        };
        self.publish(worker, Topic::NetTableQueryResult, &result).await;
    }

    /// `service/deployed` and `address-changed`: records the instance's addresses and forwards them to root.
    async fn instance_addresses(
        self: &Arc<Self>,
        worker: &str,
        job_name: &str,
        number: i64,
        namespace: Option<(&str, &str)>,
        host_ip: &str,
        host_port: &str,
    ) {
        let mut fields = Map::new();
        let put = |fields: &mut Map<String, Value>, k: &str, v: &str| {
            if !v.is_empty() {
                fields.insert(k.to_owned(), Value::from(v));
            }
        };
        if let Some((v4, v6)) = namespace {
            put(&mut fields, "namespace_ip", v4);
            put(&mut fields, "namespace_ip_v6", v6);
        }
        put(&mut fields, "host_ip", host_ip);
        if let Ok(port) = host_port.trim().parse::<i64>() {
            fields.insert("host_port".to_owned(), Value::from(port));
        }
        fields.insert("worker_id".to_owned(), Value::from(worker));
        let Some((job_id, effects)) =
            self.state()
                .instance_net(worker, job_name, number, fields.clone(), now_ms())
        else {
            tracing::info!(node = %worker, job = ?job_name, instance = number, "addresses for an instance this cluster does not place on that worker; ignored");
            return;
        };
        self.apply(effects).await;
        let text = |k: &str| fields.get(k).and_then(Value::as_str).map(str::to_owned);
        let entry = InstanceEntry {
            instance_number: number,
            namespace_ip: text("namespace_ip"),
            namespace_ip_v6: text("namespace_ip_v6"),
            host_ip: text("host_ip"),
            host_port: fields.get("host_port").and_then(Value::as_i64),
            worker_id: Some(worker.to_owned()),
            ..InstanceEntry::default()
        };
        let body = NetDeployStatus {
            job_id: job_id.clone(),
            instances: vec![entry],
        };
        if let Err(why) = self
            .call_root(Method::POST, NET_DEPLOY_STATUS_PATH, Some(&body))
            .await
        {
            tracing::warn!(job = %job_name, instance = number, %why, "cannot forward the instance's addresses to root");
        }
    }

    /// `interest/remove`: when no worker wants the job any more, root stops sending its updates.
    async fn interest_removed(&self, worker: &str, job: &str) {
        let last = self.cache().drop_interest(job, worker);
        if last {
            let path = interest_path(job);
            if let Err(why) = self.call_root::<Value>(Method::DELETE, &path, None).await {
                tracing::info!(job = %job, %why, "root did not drop the interest");
            }
        }
    }

    /// Publishes `jobs/<job>/updates_available`.
    async fn broadcast(&self, job: &str, update: UpdatesAvailable) {
        match TopicId::new(job) {
            Ok(id) => {
                if let Err(e) = self
                    .publisher
                    .publish(&Topic::UpdatesAvailable(id), &update)
                    .await
                {
                    tracing::error!(job = %job, error = %e, "cannot publish the update");
                }
            }
            Err(e) => tracing::warn!(job = %job, error = %e, "job name cannot be a topic segment"),
        }
    }

    /// An instance was placed here: cache its job so the first table query is answered locally.
    pub(crate) async fn prefetch(&self, job_name: &str) {
        if self.cache().by_name(job_name).is_some() {
            return;
        }
        if let Ok(r) = self
            .call_root::<Value>(Method::GET, &job_by_name_path(job_name), None)
            .await
            && let Ok(job) = serde_json::from_value::<NetJob>(r.body)
        {
            self.cache().put(job);
        }
    }

    /// `POST /api/net/job/update` from root: refresh (or trim) the cached job, then tell the workers.
    pub async fn job_update(self: Arc<Self>, update: JobUpdate) {
        let job = update.job_name.clone();
        match update.kind {
            UpdateType::Undeployment => {
                self.cache().forget(&job, update.instance_number);
                self.broadcast(&job, UpdatesAvailable::undeployment()).await;
            }
            _ => {
                match self
                    .call_root::<Value>(Method::GET, &job_by_name_path(&job), None)
                    .await
                {
                    Ok(r) => match serde_json::from_value::<NetJob>(r.body) {
                        Ok(fresh) => self.cache().put(fresh),
                        Err(e) => tracing::warn!(job = %job, error = %e, "root's job answer is unreadable"),
                    },
                    Err(why) => {
                        tracing::warn!(job = %job, %why, "cannot refresh the job; dropping it from the cache");
                        self.cache().forget(&job, -1);
                    }
                }
                self.broadcast(&job, UpdatesAvailable::deployment()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use oakestra_protocol::mqtt::net::{IpType, ServiceIp};

    use super::*;

    fn job(name: &str, rr: &str, instance: &str) -> NetJob {
        NetJob {
            id: format!("id-{name}"),
            job_name: name.to_owned(),
            service_ip_list: vec![ServiceIp {
                ip_type: IpType::RoundRobin,
                address: rr.to_owned(),
                address_v6: String::new(),
                extra: Map::new(),
            }],
            instance_list: vec![InstanceEntry {
                instance_number: 0,
                instance_ip: Some(instance.to_owned()),
                ..InstanceEntry::default()
            }],
            extra: Map::new(),
        }
    }

    #[test]
    fn cache_resolves_by_name_and_ip_and_forgets_with_the_last_interest() {
        let mut c = NetCache::default();
        c.put(job("a.a.a.a", "10.30.0.1", "10.30.0.2"));
        c.put(job("b.b.b.b", "10.30.0.3", "10.30.0.1"));
        assert_eq!(c.by_name("a.a.a.a").unwrap().id, "id-a.a.a.a");
        // A round-robin address wins over another job's instance address.
        assert_eq!(c.by_ip("10.30.0.1".parse().unwrap()).unwrap().job_name, "a.a.a.a");
        assert_eq!(c.by_ip("10.30.0.2".parse().unwrap()).unwrap().job_name, "a.a.a.a");
        assert!(c.by_ip("10.30.9.9".parse().unwrap()).is_none());
        c.interest("a.a.a.a", "w1");
        c.interest("a.a.a.a", "w2");
        assert!(!c.drop_interest("a.a.a.a", "w1"));
        assert!(c.is_interesting("a.a.a.a"));
        assert!(c.drop_interest("a.a.a.a", "w2"));
        assert!(c.by_name("a.a.a.a").is_none());
        assert!(!c.drop_interest("zzz", "w1"));
        c.forget("b.b.b.b", 0);
        assert!(c.by_name("b.b.b.b").unwrap().instance_list.is_empty());
        c.forget("b.b.b.b", -1);
        assert!(c.by_name("b.b.b.b").is_none());
    }
}

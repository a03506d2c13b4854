//! Names that identify things across tiers: job names `app.appns.svc.svcns`, task ids `<job>.instance.<n>`.
//!
//! A job name is the service's identity in the overlay (table queries, `jobs/<job>/updates_available`) and on the
//! worker (containerd container and log file names), so every part is restricted to what all of those accept:
//! 1–30 ASCII letters or digits.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest name part Oakestra accepts.
pub const MAX_NAME_LEN: usize = 30;

/// The rule every name part follows, as shown in error messages.
pub const NAME_RULE: &str = "1-30 ASCII letters or digits";

/// Whether `s` is a valid application, namespace or service name part (1–30 ASCII alphanumerics).
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A job name could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not exactly four dot-separated parts.
    #[error("job name {value:?} must have four parts app.appns.svc.svcns")]
    PartCount {
        /// The offending name.
        value: String,
    },
    /// A part breaks the name rule.
    #[error("job name {value:?}: part {part:?} must be {NAME_RULE}")]
    BadPart {
        /// The offending name.
        value: String,
        /// The offending part.
        part: String,
    },
    /// A task id does not end in `.instance.<n>` with a decimal `n`.
    #[error("task id {value:?} must be <app>.<appns>.<svc>.<svcns>.instance.<number>")]
    BadTaskId {
        /// The offending task id.
        value: String,
    },
}

/// The fully qualified name of a service: `app.appns.svc.svcns`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobName {
    app: String,
    app_ns: String,
    service: String,
    service_ns: String,
}

impl JobName {
    /// Builds a job name from its four parts, checking each.
    pub fn new(app: &str, app_ns: &str, service: &str, service_ns: &str) -> Result<Self, NameError> {
        let parts = [app, app_ns, service, service_ns];
        for part in parts {
            if !is_valid_name(part) {
                return Err(NameError::BadPart {
                    value: parts.join("."),
                    part: part.to_owned(),
                });
            }
        }
        Ok(JobName {
            app: app.to_owned(),
            app_ns: app_ns.to_owned(),
            service: service.to_owned(),
            service_ns: service_ns.to_owned(),
        })
    }

    /// The application name.
    pub fn app(&self) -> &str {
        &self.app
    }
    /// The application namespace.
    pub fn app_ns(&self) -> &str {
        &self.app_ns
    }
    /// The service (microservice) name.
    pub fn service(&self) -> &str {
        &self.service
    }
    /// The service namespace.
    pub fn service_ns(&self) -> &str {
        &self.service_ns
    }

    /// The task id of instance `n` of this job.
    pub fn task(&self, instance: u32) -> TaskId {
        TaskId {
            job: self.clone(),
            instance,
        }
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.app, self.app_ns, self.service, self.service_ns
        )
    }
}

impl FromStr for JobName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('.').collect();
        let [app, app_ns, service, service_ns] = parts.as_slice() else {
            return Err(NameError::PartCount { value: s.to_owned() });
        };
        JobName::new(app, app_ns, service, service_ns)
    }
}

impl Serialize for JobName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for JobName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One instance of a job: `<job>.instance.<n>`. The worker uses it as container id and log file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId {
    /// The job this instance belongs to.
    pub job: JobName,
    /// The instance number (per service, monotonic, never reused).
    pub instance: u32,
}

impl TaskId {
    /// The container hostname Oakestra gives this instance: `instance-<n>`.
    pub fn hostname(&self) -> String {
        format!("instance-{}", self.instance)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.instance.{}", self.job, self.instance)
    }
}

impl FromStr for TaskId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NameError::BadTaskId { value: s.to_owned() };
        let (job, n) = s.rsplit_once(".instance.").ok_or_else(bad)?;
        // `u32::from_str` accepts a leading `+`; a task id never has one.
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let instance = n.parse().map_err(|_| bad())?;
        Ok(TaskId {
            job: job.parse()?,
            instance,
        })
    }
}

impl Serialize for TaskId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn seed_names() {
        let job: JobName = "clientsrvr.test.nginx.test".parse().unwrap();
        assert_eq!(
            (job.app(), job.app_ns(), job.service(), job.service_ns()),
            ("clientsrvr", "test", "nginx", "test")
        );
        let task = job.task(3);
        assert_eq!(task.to_string(), "clientsrvr.test.nginx.test.instance.3");
        assert_eq!(task.hostname(), "instance-3");
        assert_eq!(
            "clientsrvr.test.nginx.test.instance.3".parse::<TaskId>().unwrap(),
            task
        );
        assert_eq!(
            serde_json::to_string(&task).unwrap(),
            "\"clientsrvr.test.nginx.test.instance.3\""
        );
    }

    #[test]
    fn name_rule() {
        assert!(is_valid_name("a"));
        assert!(is_valid_name(&"x".repeat(30)));
        assert!(!is_valid_name(&"x".repeat(31)));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("my-app"));
        assert!(!is_valid_name("my_app"));
        assert!(!is_valid_name("ümlaut"));
        assert!(!is_valid_name("a b"));
    }

    #[test]
    fn bad_job_names_say_why() {
        assert_eq!(
            "a.b.c".parse::<JobName>().unwrap_err(),
            NameError::PartCount {
                value: "a.b.c".into()
            }
        );
        assert_eq!(
            "a.b-x.c.d".parse::<JobName>().unwrap_err(),
            NameError::BadPart {
                value: "a.b-x.c.d".into(),
                part: "b-x".into()
            }
        );
        assert!("a..c.d".parse::<JobName>().is_err());
        assert!("a.b.c.d.e".parse::<JobName>().is_err());
    }

    #[test]
    fn bad_task_ids() {
        for s in [
            "a.b.c.d",
            "a.b.c.d.instance.",
            "a.b.c.d.instance.x",
            "a.b.c.d.instance.+1",
            "a.b.c.d.instance.99999999999",
            "a.b.c.instance.1",
        ] {
            assert!(s.parse::<TaskId>().is_err(), "{s}");
        }
    }

    proptest! {
        #[test]
        fn task_id_round_trips(
            parts in proptest::collection::vec("[a-zA-Z0-9]{1,30}", 4),
            n in any::<u32>(),
        ) {
            let job = JobName::new(&parts[0], &parts[1], &parts[2], &parts[3]).unwrap();
            prop_assert_eq!(job.to_string().parse::<JobName>().unwrap(), job.clone());
            let task = job.task(n);
            prop_assert_eq!(task.to_string().parse::<TaskId>().unwrap(), task);
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".*") {
            let _ = s.parse::<JobName>();
            let _ = s.parse::<TaskId>();
        }
    }
}

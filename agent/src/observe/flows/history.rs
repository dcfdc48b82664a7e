//! The last flow records, in memory, for `egret flows`: a bounded ring read after the
//! fact (like Hubble's `observe`), and a broadcast of each new record for followers.

use std::{
    collections::VecDeque,
    fmt,
    str::FromStr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::FlowRecord;

/// Records kept by default (`--flow-history`), like Hubble's 4095 flows: under 1 KiB
/// each, about 3 MiB in all.
pub const DEFAULT_FLOW_HISTORY: usize = 4096;

/// New records a follower may fall behind by before it misses some.
const FOLLOWER_BACKLOG: usize = 1024;

/// The last records the flow log wrote, oldest first, and every new one as it comes.
/// Cheap to clone: clones share the ring.
#[derive(Clone, Debug)]
pub struct FlowHistory {
    ring: Arc<Mutex<VecDeque<FlowRecord>>>,
    capacity: usize,
    new: broadcast::Sender<FlowRecord>,
}

impl FlowHistory {
    /// Keeps at most `capacity` records (0: none, only followers see records).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Arc::new(Mutex::new(VecDeque::with_capacity(capacity.min(1024)))),
            capacity,
            new: broadcast::channel(FOLLOWER_BACKLOG).0,
        }
    }

    /// Keeps `records`, forgetting the oldest beyond the capacity, and sends each to
    /// the followers.
    pub fn extend(&self, records: Vec<FlowRecord>) {
        let mut ring = self.lock();
        for record in records {
            if self.new.receiver_count() > 0 {
                let _ = self.new.send(record.clone());
            }
            if self.capacity == 0 {
                continue;
            }
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(record);
        }
    }

    /// The kept records `query` asks for, oldest first, and the records that come after
    /// them. Both are taken under the ring's lock, so a follower misses none and sees
    /// none twice.
    #[must_use]
    pub fn read(&self, query: &FlowQuery) -> (Vec<FlowRecord>, broadcast::Receiver<FlowRecord>) {
        let ring = self.lock();
        let receiver = self.new.subscribe();
        if !query.wants_history() {
            return (Vec::new(), receiver);
        }
        let mut kept: Vec<FlowRecord> = ring
            .iter()
            .filter(|record| query.since.is_none_or(|since| record.time >= since))
            .filter(|record| query.matches(record))
            .cloned()
            .collect();
        if let Some(last) = query.last {
            kept.drain(..kept.len().saturating_sub(last));
        }
        (kept, receiver)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<FlowRecord>> {
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Which flows `GET /v1/flows` answers with: its query string, which `egret flows`
/// builds with [`FlowQuery::path`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowQuery {
    /// Only flows from pods of this namespace.
    pub namespace: Option<String>,
    /// Only flows from pods of this name.
    pub pod: Option<String>,
    /// Only flows of this verdict: `allow`, `deny` or `audit_deny`.
    pub verdict: Option<String>,
    /// Of the kept records, those of windows that closed at or after this time.
    pub since: Option<Timestamp>,
    /// Of the kept records that match, the last N.
    pub last: Option<usize>,
    /// Keep the answer open and send each new record that matches. Kept records come
    /// first only when `since` or `last` asks for them; without `follow`, the kept
    /// records are the whole answer (all of them when neither is given).
    #[serde(default)]
    pub follow: bool,
}

impl FlowQuery {
    /// Whether `record` passes the namespace, pod and verdict filters.
    #[must_use]
    pub fn matches(&self, record: &FlowRecord) -> bool {
        let is = |wanted: Option<&String>, value: Option<&String>| {
            wanted.is_none_or(|wanted| value == Some(wanted))
        };
        is(self.namespace.as_ref(), record.source.namespace.as_ref())
            && is(self.pod.as_ref(), record.source.pod.as_ref())
            && is(self.verdict.as_ref(), Some(&record.verdict))
    }

    fn wants_history(&self) -> bool {
        !self.follow || self.since.is_some() || self.last.is_some()
    }

    /// The admin API path that asks for these flows.
    #[must_use]
    pub fn path(&self) -> String {
        let mut pairs = Vec::new();
        for (name, value) in [
            ("namespace", self.namespace.clone()),
            ("pod", self.pod.clone()),
            ("verdict", self.verdict.clone()),
            ("since", self.since.map(|since| since.to_string())),
            ("last", self.last.map(|last| last.to_string())),
            ("follow", self.follow.then(|| "true".to_owned())),
        ] {
            if let Some(value) = value {
                pairs.push(format!("{name}={}", crate::admin_client::encode(&value)));
            }
        }
        if pairs.is_empty() {
            "/v1/flows".to_owned()
        } else {
            format!("/v1/flows?{}", pairs.join("&"))
        }
    }
}

/// A point in time, written as RFC 3339 in UTC with milliseconds
/// (`2025-06-02T09:14:03.000Z`); read from any RFC 3339 time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Timestamp(pub SystemTime);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_rfc3339_millis(self.0).fmt(f)
    }
}

impl FromStr for Timestamp {
    type Err = humantime::TimestampError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        humantime::parse_rfc3339_weak(text).map(Self)
    }
}

impl TryFrom<String> for Timestamp {
    type Error = humantime::TimestampError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Timestamp> for String {
    fn from(time: Timestamp) -> Self {
        time.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use super::*;
    use crate::observe::flows::Endpoint;

    fn record(seconds: u64, pod: &str, verdict: &str) -> FlowRecord {
        let end = |pod: Option<&str>| Endpoint {
            namespace: pod.map(|_| "shop".to_owned()),
            pod: pod.map(str::to_owned),
            service: None,
            ip: Ipv4Addr::LOCALHOST.into(),
            port: None,
        };
        FlowRecord {
            time: Timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)),
            verdict: verdict.to_owned(),
            audit: false,
            reason: "no_rule_allows".to_owned(),
            tier: "networkpolicy".to_owned(),
            rule: None,
            protocol: "TCP".to_owned(),
            source: end(Some(pod)),
            destination: end(None),
            policies: Vec::new(),
            count: 1,
            domain: None,
        }
    }

    fn pods(records: &[FlowRecord]) -> Vec<String> {
        records
            .iter()
            .map(|r| r.source.pod.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn the_ring_keeps_the_last_records_and_reads_them_oldest_first() {
        let history = FlowHistory::new(3);
        history.extend(
            (1..=5)
                .map(|n| record(n, &format!("p{n}"), "deny"))
                .collect(),
        );
        let (kept, _) = history.read(&FlowQuery::default());
        assert_eq!(pods(&kept), ["p3", "p4", "p5"]);
        let none = FlowHistory::new(0);
        none.extend(vec![record(1, "a", "deny")]);
        assert!(none.read(&FlowQuery::default()).0.is_empty());
    }

    #[test]
    fn filters_since_and_last_select_from_the_ring() {
        let history = FlowHistory::new(10);
        history.extend(vec![
            record(10, "a", "deny"),
            record(20, "b", "allow"),
            record(30, "a", "audit_deny"),
            record(40, "a", "deny"),
        ]);
        let read = |query: FlowQuery| pods(&history.read(&query).0);
        let a = || FlowQuery {
            pod: Some("a".to_owned()),
            ..FlowQuery::default()
        };
        assert_eq!(read(a()), ["a", "a", "a"]);
        let since = Timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(20));
        let times = |query: FlowQuery| -> Vec<u64> {
            history
                .read(&query)
                .0
                .iter()
                .map(|r| {
                    r.time
                        .0
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap()
                        .as_secs()
                })
                .collect()
        };
        let since_query = FlowQuery {
            since: Some(since),
            ..FlowQuery::default()
        };
        assert_eq!(times(since_query.clone()), [20, 30, 40]);
        assert_eq!(
            times(FlowQuery {
                last: Some(1),
                ..a()
            }),
            [40]
        );
        assert_eq!(
            times(FlowQuery {
                verdict: Some("deny".to_owned()),
                last: Some(5),
                ..since_query
            }),
            [40]
        );
        // Following with neither `since` nor `last`: new records only.
        let (kept, mut receiver) = history.read(&FlowQuery {
            follow: true,
            ..a()
        });
        assert!(kept.is_empty());
        history.extend(vec![record(50, "c", "deny")]);
        assert_eq!(
            receiver.try_recv().unwrap().source.pod.as_deref(),
            Some("c")
        );
    }

    #[test]
    fn a_query_round_trips_through_its_path() {
        let query = FlowQuery {
            namespace: Some("shop".to_owned()),
            pod: Some("web 1".to_owned()),
            verdict: None,
            since: Some("2025-06-02T09:14:03.250Z".parse().unwrap()),
            last: Some(5),
            follow: true,
        };
        let path = query.path();
        assert_eq!(
            path,
            "/v1/flows?namespace=shop&pod=web%201&since=2025-06-02T09%3A14%3A03.250Z&last=5&follow=true"
        );
        let uri: axum::http::Uri = path.parse().unwrap();
        let read = axum::extract::Query::<FlowQuery>::try_from_uri(&uri).unwrap();
        assert_eq!(read.0, query, "the admin API reads what the CLI asks");
        assert_eq!(FlowQuery::default().path(), "/v1/flows");
        let record = record(1, "a", "deny");
        let line = serde_json::to_string(&record).unwrap();
        assert!(line.starts_with(r#"{"time":"1970-01-01T00:00:01.000Z","verdict":"deny""#));
        assert_eq!(serde_json::from_str::<FlowRecord>(&line).unwrap(), record);
    }
}

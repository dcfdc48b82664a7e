//! The API server as a source: one watcher per kind (Pods, Namespaces,
//! NetworkPolicies, ClusterNetworkPolicies, Services, EndpointSlices), with kube-rs's
//! default backoff; a watcher re-lists by itself after `410 Gone` or a dropped
//! connection, and asks for bookmarks. Objects are read trimmed ([`super::trimmed`]:
//! what a served object carries beyond what policy reads is skipped while the JSON is
//! read) and converted to the snapshot's types as they arrive; nothing else keeps them
//! (no reflector store), and the pods' label sets are shared (`LabelSets`). A failing watch changes nothing: each kind is a source
//! that goes stale ([`Update::Failed`]) with its last good objects kept, and recovers
//! when the watch delivers again or the API server answers again.
//!
//! `ClusterNetworkPolicy` is a CRD that a cluster may not have. While the API server
//! answers `404` for it, the kind counts as synced with no objects (it neither holds
//! readiness back nor goes stale), and the API server is asked again every
//! [`CRD_RECHECK`]; once it serves the kind, it is watched like the others.

use std::{
    borrow::Cow,
    fmt::Debug,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client, Resource,
    api::ListParams,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    Object, ObjectId, Update,
    objects::{self, DEFAULT_NAMESPACE},
    trimmed,
};
use crate::{
    policy::{
        self,
        cluster::convert::{self as cluster, ClusterNetworkPolicyObject},
    },
    state::{LabelSets, ObjectKey},
};

/// The kinds watched; each reports `Update::Synced` once after its first full list
/// (`ClusterNetworkPolicy` also when its CRD is not installed).
pub const KINDS: [&str; 6] = [
    "Namespace",
    "Pod",
    "NetworkPolicy",
    cluster::KIND,
    "Service",
    "EndpointSlice",
];

/// While a kind's watch fails, the API server is asked this often whether it answers
/// again.
const PROBE: Duration = Duration::from_secs(5);

/// While the `ClusterNetworkPolicy` CRD is not installed, the API server is asked this
/// often whether it is.
pub const CRD_RECHECK: Duration = Duration::from_secs(30);

const CLUSTER_POLICY_GROUP: &str = "policy.networking.k8s.io";
const CLUSTER_POLICY_VERSION: &str = "v1alpha2";

impl Resource for ClusterNetworkPolicyObject {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind((): &()) -> Cow<'_, str> {
        cluster::KIND.into()
    }

    fn group((): &()) -> Cow<'_, str> {
        CLUSTER_POLICY_GROUP.into()
    }

    fn version((): &()) -> Cow<'_, str> {
        CLUSTER_POLICY_VERSION.into()
    }

    fn plural((): &()) -> Cow<'_, str> {
        "clusternetworkpolicies".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Watches every kind until the receiver is gone; `crd_recheck` is how often the API
/// server is asked whether the `ClusterNetworkPolicy` CRD appeared ([`CRD_RECHECK`]).
pub async fn run(client: Client, updates: mpsc::Sender<Update>, crd_recheck: Duration) {
    // Lives as long as the pod watch: label sets of pods gone are pruned as it goes.
    let mut label_sets = LabelSets::default();
    tokio::join!(
        watch::<trimmed::Namespace>(client.clone(), updates.clone(), "Namespace", |ns| {
            Ok(Object::Namespace(objects::namespace(ns)))
        }),
        watch::<trimmed::Pod>(client.clone(), updates.clone(), "Pod", move |pod| {
            objects::pod(pod, &mut label_sets)
                .map(Object::Pod)
                .map_err(|e| e.to_string())
        }),
        watch::<trimmed::NetworkPolicy>(client.clone(), updates.clone(), "NetworkPolicy", |p| {
            let converted =
                policy::convert::network_policy_failing_closed(&p.into_full(), DEFAULT_NAMESPACE)
                    .map_err(|e| e.to_string())?;
            for failed in &converted.failed_closed {
                warn!(kind = "NetworkPolicy", object = %converted.policy.id, "{failed}");
            }
            Ok(Object::Policy(converted.policy))
        }),
        watch_cluster_policies(client.clone(), updates.clone(), crd_recheck),
        watch::<trimmed::Service>(client.clone(), updates.clone(), "Service", |s| {
            objects::service(s)
                .map(Object::Service)
                .map_err(|e| e.to_string())
        }),
        watch::<trimmed::EndpointSlice>(client, updates, "EndpointSlice", |s| {
            objects::endpoint_slice(s)
                .map(Object::EndpointSlice)
                .map_err(|e| e.to_string())
        }),
    );
}

fn object_id<K: Resource>(kind: &'static str, object: &K) -> ObjectId {
    let meta = object.meta();
    ObjectId {
        kind,
        key: ObjectKey::new(
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        ),
    }
}

/// Watches a built-in kind until the receiver is gone.
async fn watch<K>(
    client: Client,
    updates: mpsc::Sender<Update>,
    kind: &'static str,
    mut convert: impl FnMut(K) -> Result<Object, String>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let mut synced = false;
    watch_served(
        Api::all(client),
        &updates,
        kind,
        &mut convert,
        &mut synced,
        false,
    )
    .await;
}

/// Why a watch ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The receiver is gone: the agent is stopping.
    Stopped,
    /// The API server does not serve the kind: its CRD is not installed.
    NotServed,
}

/// Whether the API server serves a kind.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    Yes,
    No,
    /// It fails, or cannot be reached.
    Unknown,
}

/// The API server does not serve the kind at all (as opposed to failing): `404`, which
/// for a resource it does not know comes as plain text (`404 page not found`), not as a
/// `Status` with a reason.
fn is_not_served(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404 || status.is_not_found())
}

/// Watches `ClusterNetworkPolicy` objects while the API server serves them, and waits
/// for the CRD, asking every `recheck`, while it does not. Without the CRD there are
/// no such policies: the kind is synced and empty, and says so once each time the CRD
/// is found missing.
async fn watch_cluster_policies(client: Client, updates: mpsc::Sender<Update>, recheck: Duration) {
    let kind = cluster::KIND;
    let api: Api<ClusterNetworkPolicyObject> = Api::all(client);
    let served = || async {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => Served::Yes,
            Err(error) if is_not_served(&error) => Served::No,
            // Forbidden and the like: the watch reports them (a stale source).
            Err(kube::Error::Api(status)) if status.code < 500 => Served::Yes,
            Err(_) => Served::Unknown,
        }
    };
    let mut synced = false;
    loop {
        // An API server that cannot say (it fails, or cannot be reached) is watched
        // like any other kind: the CRD may well be there.
        if served().await == Served::No {
            info!(
                "{kind} CRD ({}) is not installed: enforcing NetworkPolicies only; \
                 ClusterNetworkPolicies are picked up when it appears",
                cluster::API_VERSION
            );
            // A CRD removed takes its objects with it.
            let empty = Update::ReplaceKind {
                kind,
                objects: Vec::new(),
                received: Instant::now(),
            };
            if updates.send(empty).await.is_err() {
                return;
            }
            if !synced {
                synced = true;
                if updates.send(Update::Synced { source: kind }).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::time::sleep(recheck).await;
                if updates.is_closed() {
                    return;
                }
                // Meanwhile a failing API server is no news: still no policies.
                if served().await == Served::Yes {
                    break;
                }
            }
            info!(
                "{kind} CRD ({}) is installed: watching ClusterNetworkPolicies",
                cluster::API_VERSION
            );
        }
        let ended = watch_served(
            api.clone(),
            &updates,
            kind,
            &mut |object| convert_cluster_policy(&object),
            &mut synced,
            true,
        )
        .await;
        if ended == Ended::Stopped {
            return;
        }
    }
}

fn convert_cluster_policy(object: &ClusterNetworkPolicyObject) -> Result<Object, String> {
    let converted = cluster::cluster_network_policy(object).map_err(|e| e.to_string())?;
    let policy = converted.policy;
    for failed in &converted.failed_closed {
        warn!(kind = cluster::KIND, object = %policy.name, "{failed}");
    }
    debug!(
        object = %policy.name,
        tier = policy.tier.name(),
        priority = policy.priority,
        rules = policy.egress.len(),
        "ClusterNetworkPolicy loaded"
    );
    Ok(Object::ClusterPolicy(policy))
}

/// Watches `api` until the receiver is gone or, with `may_be_absent`, until the API
/// server answers that it does not serve the kind. `synced` is set once the kind
/// has reported [`Update::Synced`].
async fn watch_served<K>(
    api: Api<K>,
    updates: &mpsc::Sender<Update>,
    kind: &'static str,
    convert: &mut impl FnMut(K) -> Result<Object, String>,
    synced: &mut bool,
    may_be_absent: bool,
) -> Ended
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let mut stream = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Option<Vec<Object>> = None;
    // Set from a failure until the watch works again; meanwhile the snapshot keeps what
    // this kind delivered last, and the kernel keeps enforcing it.
    let mut failing = false;
    let mut probe = tokio::time::interval(PROBE);
    loop {
        let next = tokio::select! {
            next = stream.try_next() => next,
            _ = probe.tick(), if failing => {
                // A watch that resumes finds nothing to say when nothing changed: ask
                // the API server whether it answers again.
                match api.list_metadata(&ListParams::default().limit(1)).await {
                    Ok(_) => {
                        failing = false;
                        if updates.send(Update::Recovered { source: kind }).await.is_err() {
                            return Ended::Stopped;
                        }
                    }
                    Err(error) if may_be_absent && is_not_served(&error) => {
                        return not_served(updates, kind, failing).await;
                    }
                    Err(_) => {}
                }
                continue;
            }
        };
        let event = match next {
            Ok(Some(event)) => event,
            Ok(None) => return Ended::Stopped,
            Err(
                watcher::Error::InitialListFailed(error)
                | watcher::Error::WatchStartFailed(error)
                | watcher::Error::WatchFailed(error),
            ) if may_be_absent && is_not_served(&error) => {
                return not_served(updates, kind, failing).await;
            }
            Err(error) => {
                // The watcher backs off and re-lists by itself; count and report.
                warn!(kind, %error, "watch failed; retrying");
                if !failing {
                    failing = true;
                    probe.reset();
                }
                let problem = error.to_string();
                for update in [
                    Update::WatchRestarted { kind },
                    Update::Failed {
                        source: kind,
                        problem,
                    },
                ] {
                    if updates.send(update).await.is_err() {
                        return Ended::Stopped;
                    }
                }
                continue;
            }
        };
        // `Init` comes before the list is asked for, and a page is not the whole list.
        let works = !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_));
        if failing && works {
            failing = false;
            if updates
                .send(Update::Recovered { source: kind })
                .await
                .is_err()
            {
                return Ended::Stopped;
            }
        }
        let Some(update) = update_for(kind, event, &mut listing, convert) else {
            continue;
        };
        let first_sync = matches!(update, Update::ReplaceKind { .. }) && !*synced;
        if updates.send(update).await.is_err() {
            return Ended::Stopped;
        }
        if first_sync {
            *synced = true;
            if updates.send(Update::Synced { source: kind }).await.is_err() {
                return Ended::Stopped;
            }
        }
    }
}

/// Ends a watch of a kind the API server does not serve; a kind that was failing is
/// not any more (it is absent).
async fn not_served(updates: &mpsc::Sender<Update>, kind: &'static str, failing: bool) -> Ended {
    if failing
        && updates
            .send(Update::Recovered { source: kind })
            .await
            .is_err()
    {
        return Ended::Stopped;
    }
    Ended::NotServed
}

/// What a watch event means for the snapshot; `None` while a list is being read.
fn update_for<K: Resource>(
    kind: &'static str,
    event: watcher::Event<K>,
    listing: &mut Option<Vec<Object>>,
    convert: &mut impl FnMut(K) -> Result<Object, String>,
) -> Option<Update> {
    let received = Instant::now();
    let update = match event {
        watcher::Event::Init => {
            *listing = Some(Vec::new());
            return None;
        }
        watcher::Event::InitApply(object) => {
            if let Some(listing) = listing.as_mut()
                && let Ok(converted) = checked(kind, object, convert)
            {
                listing.push(converted);
            }
            return None;
        }
        watcher::Event::InitDone => {
            let objects = listing.take().unwrap_or_default();
            debug!(kind, count = objects.len(), "listed");
            Update::ReplaceKind {
                kind,
                objects,
                received,
            }
        }
        watcher::Event::Apply(object) => match checked(kind, object, convert) {
            Ok(converted) => Update::Apply {
                object: converted,
                received,
            },
            // A broken object counts as absent: the rest keeps being enforced.
            Err(id) => Update::Delete { id, received },
        },
        watcher::Event::Delete(object) => Update::Delete {
            id: object_id(kind, &object),
            received,
        },
    };
    Some(update)
}

/// The object converted, or (after saying why) the id of one Egret cannot read.
fn checked<K: Resource>(
    kind: &'static str,
    object: K,
    convert: &mut impl FnMut(K) -> Result<Object, String>,
) -> Result<Object, ObjectId> {
    // Taken before the object moves into the conversion; only a failure uses it.
    let id = object_id(kind, &object);
    convert(object).map_err(|problem| {
        warn!(kind, object = %id.key, %problem, "skipping an object Egret cannot read");
        id
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_network_policies_are_read_where_the_crd_serves_them() {
        assert_eq!(
            ClusterNetworkPolicyObject::api_version(&()),
            cluster::API_VERSION
        );
        assert_eq!(ClusterNetworkPolicyObject::kind(&()), cluster::KIND);
        assert_eq!(
            ClusterNetworkPolicyObject::url_path(&(), None),
            "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies"
        );
        assert!(
            KINDS.contains(&cluster::KIND),
            "readiness waits for the kind"
        );
    }

    #[test]
    fn only_a_404_means_the_crd_is_not_installed() {
        let status = |code: u16, reason: &str| {
            kube::Error::Api(
                kube::core::Status::failure("", reason)
                    .with_code(code)
                    .boxed(),
            )
        };
        // A resource no CRD defines: `404 page not found`, in plain text.
        assert!(is_not_served(&status(404, "Failed to parse error data")));
        assert!(is_not_served(&status(404, "NotFound")));
        assert!(!is_not_served(&status(403, "Forbidden")));
        assert!(!is_not_served(&status(500, "InternalError")));
    }
}

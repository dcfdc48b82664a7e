//! The API server as a source: one watcher per kind (Pods, Namespaces,
//! NetworkPolicies, Services, EndpointSlices), with kube-rs's default backoff; a
//! watcher re-lists by itself after `410 Gone` or a dropped connection, and asks for
//! bookmarks. Objects are trimmed to the snapshot's types as they arrive, so the agent
//! keeps only what policy needs.

use std::{fmt::Debug, time::Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1 as core, discovery::v1 as discovery, networking::v1 as networking,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{
    Object, ObjectId, Update,
    objects::{self, DEFAULT_NAMESPACE},
};
use crate::{policy, state::ObjectKey};

/// The kinds watched; each reports `Update::Synced` once after its first full list.
pub const KINDS: [&str; 5] = [
    "Namespace",
    "Pod",
    "NetworkPolicy",
    "Service",
    "EndpointSlice",
];

/// Watches every kind until the receiver is gone.
pub async fn run(client: Client, updates: mpsc::Sender<Update>) {
    tokio::join!(
        watch::<core::Namespace>(client.clone(), updates.clone(), "Namespace", |ns| {
            Ok(Object::Namespace(objects::namespace(ns)))
        }),
        watch::<core::Pod>(client.clone(), updates.clone(), "Pod", |pod| {
            objects::pod(pod)
                .map(Object::Pod)
                .map_err(|e| e.to_string())
        }),
        watch::<networking::NetworkPolicy>(client.clone(), updates.clone(), "NetworkPolicy", |p| {
            policy::convert::network_policy(p, DEFAULT_NAMESPACE)
                .map(Object::Policy)
                .map_err(|e| e.to_string())
        }),
        watch::<core::Service>(client.clone(), updates.clone(), "Service", |s| {
            objects::service(s)
                .map(Object::Service)
                .map_err(|e| e.to_string())
        }),
        watch::<discovery::EndpointSlice>(client, updates, "EndpointSlice", |s| {
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

async fn watch<K>(
    client: Client,
    updates: mpsc::Sender<Update>,
    kind: &'static str,
    convert: impl Fn(&K) -> Result<Object, String>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Option<Vec<Object>> = None;
    let mut synced = false;
    loop {
        let event = match stream.try_next().await {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(error) => {
                // The watcher backs off and re-lists by itself; count and report.
                warn!(kind, %error, "watch failed; retrying");
                if updates.send(Update::WatchRestarted { kind }).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let received = Instant::now();
        let update = match event {
            watcher::Event::Init => {
                listing = Some(Vec::new());
                continue;
            }
            watcher::Event::InitApply(object) => {
                if let (Some(listing), Some(converted)) =
                    (listing.as_mut(), checked(kind, &object, &convert))
                {
                    listing.push(converted);
                }
                continue;
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
            watcher::Event::Apply(object) => match checked(kind, &object, &convert) {
                Some(converted) => Update::Apply {
                    object: converted,
                    received,
                },
                // A broken object counts as absent: the rest keeps being enforced.
                None => Update::Delete {
                    id: object_id(kind, &object),
                    received,
                },
            },
            watcher::Event::Delete(object) => Update::Delete {
                id: object_id(kind, &object),
                received,
            },
        };
        let first_sync = matches!(update, Update::ReplaceKind { .. }) && !synced;
        if updates.send(update).await.is_err() {
            return;
        }
        if first_sync {
            synced = true;
            if updates.send(Update::Synced { source: kind }).await.is_err() {
                return;
            }
        }
    }
}

fn checked<K: Resource>(
    kind: &'static str,
    object: &K,
    convert: &impl Fn(&K) -> Result<Object, String>,
) -> Option<Object> {
    match convert(object) {
        Ok(converted) => Some(converted),
        Err(problem) => {
            let id = object_id(kind, object);
            warn!(kind, object = %id.key, %problem, "skipping an object Egret cannot read");
            None
        }
    }
}

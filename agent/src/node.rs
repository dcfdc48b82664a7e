//! What the node itself says about its local pods: which host interface or cgroup
//! leads to each one, when links and routes change, and which connections the kernel
//! already tracks for them. Read-only: nothing here writes a map or a link.

pub mod cgroups;
pub mod conntrack;
pub mod interfaces;

use std::{collections::BTreeMap, path::PathBuf};

use tracing::{debug, warn};

use self::{
    cgroups::PodCgroup,
    interfaces::{InterfaceError, PodInterface, Resolver},
};
use crate::state::{ObjectKey, Pod};

/// Where each local pod can be enforced, as found on the node at one reconcile. A pod
/// absent from both maps has nothing to attach to yet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// The host-side interface of each local pod (`--attach tc`).
    pub interfaces: BTreeMap<ObjectKey, PodInterface>,
    /// The cgroup of each local pod (`--attach cgroup`).
    pub cgroups: BTreeMap<ObjectKey, PodCgroup>,
}

/// How the local pods are found on the node: by the route to their address (TC) or by
/// the cgroup the kubelet named after their UID.
pub enum Discovery {
    Interfaces(Resolver),
    /// The cgroup v2 tree searched; `None` when the node has none mounted.
    Cgroups(Option<PathBuf>),
}

impl Discovery {
    /// Forgets what interfaces were found: the node's links or routes changed.
    pub fn forget(&self) {
        if let Discovery::Interfaces(resolver) = self {
            resolver.forget();
        }
    }

    /// Interface discovery through a route netlink socket in this network namespace.
    ///
    /// # Errors
    /// When the socket cannot be opened.
    pub fn interfaces() -> Result<Self, InterfaceError> {
        Ok(Self::Interfaces(Resolver::new()?))
    }

    /// Cgroup discovery below `root`, or below the cgroup2 mount when `None`.
    #[must_use]
    pub fn cgroups(root: Option<PathBuf>) -> Self {
        Self::Cgroups(root.or_else(cgroups::cgroup2_root))
    }

    /// Looks up where each of the `local` pods is on this node now.
    pub async fn look<'a>(
        &self,
        local: impl IntoIterator<Item = (&'a ObjectKey, &'a Pod)>,
    ) -> NodeView {
        match self {
            Discovery::Interfaces(resolver) => {
                let pods = local
                    .into_iter()
                    .map(|(key, pod)| (key, pod.ips.as_slice()));
                let (interfaces, problems) = resolver.resolve(pods).await;
                // A pod whose interface is not up yet is normal; the next netlink
                // message or resync finds it.
                for problem in &problems {
                    debug!("{problem}");
                }
                NodeView {
                    interfaces,
                    cgroups: BTreeMap::new(),
                }
            }
            Discovery::Cgroups(None) => {
                warn!("no cgroup v2 hierarchy found: pass --cgroup-root");
                NodeView::default()
            }
            Discovery::Cgroups(Some(root)) => {
                let pods = local.into_iter().map(|(key, pod)| (key, pod.uid.as_str()));
                NodeView {
                    interfaces: BTreeMap::new(),
                    cgroups: cgroups::find(root, pods),
                }
            }
        }
    }
}

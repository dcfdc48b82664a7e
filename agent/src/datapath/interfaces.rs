//! Which host interface leads to each local pod: the node's route to the pod's address,
//! as a routed (ptp) CNI installs it (`<pod IP>/32 dev <veth> scope link`).

use std::{collections::BTreeMap, net::IpAddr};

use futures::TryStreamExt as _;
use rtnetlink::{Handle, RouteMessageBuilder, packet_route::route::RouteAttribute};
use thiserror::Error;

use crate::state::ObjectKey;

#[derive(Debug, Error)]
pub enum InterfaceError {
    #[error("opening a netlink socket: {0}")]
    Netlink(#[from] std::io::Error),
    #[error("pod {pod}: no route to {ip} on this node")]
    NoRoute { pod: ObjectKey, ip: IpAddr },
    #[error("pod {pod}: the route to {ip} goes through a gateway, not a pod interface")]
    ViaGateway { pod: ObjectKey, ip: IpAddr },
    #[error("pod {pod}: its addresses route through different interfaces ({first} and {second})")]
    SplitRoutes {
        pod: ObjectKey,
        first: u32,
        second: u32,
    },
    #[error(
        "pods {first} and {second} share interface {ifindex}: per-pod TC enforcement needs one interface per pod"
    )]
    Shared {
        first: ObjectKey,
        second: ObjectKey,
        ifindex: u32,
    },
    #[error("interface {ifindex} has no name")]
    NoName { ifindex: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInterface {
    pub ifindex: u32,
    pub name: String,
}

pub struct Resolver {
    handle: Handle,
}

impl Resolver {
    /// Opens a route netlink socket in the current network namespace.
    ///
    /// # Errors
    /// When the socket cannot be opened.
    pub fn new() -> Result<Self, InterfaceError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The interface of every pod whose route can be found; the others are reported.
    pub async fn resolve<'a>(
        &self,
        pods: impl IntoIterator<Item = (&'a ObjectKey, &'a [IpAddr])>,
    ) -> (BTreeMap<ObjectKey, PodInterface>, Vec<InterfaceError>) {
        let mut found: BTreeMap<ObjectKey, PodInterface> = BTreeMap::new();
        let mut owners: BTreeMap<u32, ObjectKey> = BTreeMap::new();
        let mut problems = Vec::new();
        for (pod, ips) in pods {
            match self.pod_ifindex(pod, ips).await {
                Ok(ifindex) => {
                    if let Some(first) = owners.get(&ifindex) {
                        problems.push(InterfaceError::Shared {
                            first: first.clone(),
                            second: pod.clone(),
                            ifindex,
                        });
                        found.remove(first);
                        continue;
                    }
                    match if_name(ifindex) {
                        Some(name) => {
                            owners.insert(ifindex, pod.clone());
                            found.insert(pod.clone(), PodInterface { ifindex, name });
                        }
                        None => problems.push(InterfaceError::NoName { ifindex }),
                    }
                }
                Err(problem) => problems.push(problem),
            }
        }
        (found, problems)
    }

    async fn pod_ifindex(&self, pod: &ObjectKey, ips: &[IpAddr]) -> Result<u32, InterfaceError> {
        let mut ifindex = None;
        for ip in ips {
            let index = self.route_oif(pod, *ip).await?;
            match ifindex {
                None => ifindex = Some(index),
                Some(first) if first != index => {
                    return Err(InterfaceError::SplitRoutes {
                        pod: pod.clone(),
                        first,
                        second: index,
                    });
                }
                Some(_) => {}
            }
        }
        ifindex.ok_or_else(|| InterfaceError::NoRoute {
            pod: pod.clone(),
            ip: IpAddr::from([0, 0, 0, 0]),
        })
    }

    /// `ip route get <ip>`: the output interface, when the route is direct.
    async fn route_oif(&self, pod: &ObjectKey, ip: IpAddr) -> Result<u32, InterfaceError> {
        let prefix_len = if ip.is_ipv4() { 32 } else { 128 };
        let message = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(ip, prefix_len)
            .map_err(|_| InterfaceError::NoRoute {
                pod: pod.clone(),
                ip,
            })?
            .build();
        let mut routes = self.handle.route().get(message).execute();
        let no_route = || InterfaceError::NoRoute {
            pod: pod.clone(),
            ip,
        };
        let route = routes
            .try_next()
            .await
            .map_err(|_| no_route())?
            .ok_or_else(no_route)?;
        let mut oif = None;
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => {
                    return Err(InterfaceError::ViaGateway {
                        pod: pod.clone(),
                        ip,
                    });
                }
                RouteAttribute::Oif(index) => oif = Some(*index),
                _ => {}
            }
        }
        // The loopback interface means the address is the node's own.
        oif.filter(|index| *index != 1).ok_or_else(no_route)
    }
}

fn if_name(ifindex: u32) -> Option<String> {
    let mut buffer = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer is IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buffer.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into the buffer.
    let name = unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Reports link and route changes in this network namespace (a pod's veth or route
/// appearing or going) on `changed`, until the receiver is gone.
///
/// # Errors
/// When the netlink socket cannot be opened or joined to the groups.
pub async fn watch_changes(changed: tokio::sync::mpsc::Sender<()>) -> Result<(), InterfaceError> {
    use futures::StreamExt as _;
    use rtnetlink::sys::{AsyncSocket as _, SocketAddr};
    // RTNLGRP_LINK, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE.
    const GROUPS: [u32; 3] = [1, 7, 11];
    let (mut connection, _handle, mut messages) = rtnetlink::new_connection()?;
    let socket = connection.socket_mut().socket_mut();
    socket.bind(&SocketAddr::new(0, 0))?;
    for group in GROUPS {
        socket.add_membership(group)?;
    }
    tokio::spawn(connection);
    while messages.next().await.is_some() {
        if changed.send(()).await.is_err() {
            break;
        }
    }
    Ok(())
}

//! Which host interface leads to each local pod: the node's route to the pod's address,
//! as a routed (ptp) CNI installs it (`<pod IP>/32 dev <veth> scope link`).

use std::{collections::BTreeMap, net::IpAddr};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        RouteNetlinkMessage,
        link::LinkAttribute,
        route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteType},
    },
};
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
    /// What each pod's addresses resolved to, kept until the node's links or routes
    /// change (`forget`): a reconcile for a policy or a remote pod asks the kernel
    /// nothing about the local pods' interfaces.
    found: std::sync::Mutex<BTreeMap<ObjectKey, (Vec<IpAddr>, PodInterface)>>,
}

impl Resolver {
    /// Opens a route netlink socket in the current network namespace.
    ///
    /// # Errors
    /// When the socket cannot be opened.
    pub fn new() -> Result<Self, InterfaceError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            found: std::sync::Mutex::default(),
        })
    }

    /// Forgets what was resolved: the next `resolve` asks the kernel again.
    pub fn forget(&self) {
        self.found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// The pod's interface as last resolved, if its addresses are the same.
    fn known(&self, pod: &ObjectKey, ips: &[IpAddr]) -> Option<PodInterface> {
        let found = self
            .found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        found
            .get(pod)
            .filter(|(known_ips, _)| known_ips == ips)
            .map(|(_, interface)| interface.clone())
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
            let interface = match self.known(pod, ips) {
                Some(interface) => interface,
                None => match self.look_up(pod, ips).await {
                    Ok(interface) => interface,
                    Err(problem) => {
                        problems.push(problem);
                        continue;
                    }
                },
            };
            if let Some(first) = owners.get(&interface.ifindex) {
                problems.push(InterfaceError::Shared {
                    first: first.clone(),
                    second: pod.clone(),
                    ifindex: interface.ifindex,
                });
                found.remove(first);
                continue;
            }
            owners.insert(interface.ifindex, pod.clone());
            found.insert(pod.clone(), interface);
        }
        (found, problems)
    }

    /// Asks the kernel for the pod's interface, and remembers the answer.
    async fn look_up(
        &self,
        pod: &ObjectKey,
        ips: &[IpAddr],
    ) -> Result<PodInterface, InterfaceError> {
        let ifindex = self.pod_ifindex(pod, ips).await?;
        let name = if_name(ifindex).ok_or(InterfaceError::NoName { ifindex })?;
        let interface = PodInterface { ifindex, name };
        self.found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(pod.clone(), (ips.to_vec(), interface.clone()));
        Ok(interface)
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

/// Reports, on `changed`, the link and route changes in this network namespace that can
/// change which interface leads to a pod: a link appearing, going or being renamed, a
/// route appearing, going or changing its interface or gateway. Everything else the
/// node says on netlink (link flags and statistics, address and cache updates, the
/// agent's own attach work) is absorbed, so an idle node causes no reconcile. Runs
/// until the receiver is gone.
///
/// # Errors
/// When the netlink socket cannot be opened or joined to the groups.
pub async fn watch_changes(changed: tokio::sync::mpsc::Sender<()>) -> Result<(), InterfaceError> {
    use futures::StreamExt as _;
    use rtnetlink::{
        packet_core::NetlinkPayload,
        sys::{AsyncSocket as _, SocketAddr},
    };
    // RTNLGRP_LINK, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE.
    const GROUPS: [u32; 3] = [1, 7, 11];
    let (mut connection, handle, mut messages) = rtnetlink::new_connection()?;
    let socket = connection.socket_mut().socket_mut();
    socket.bind(&SocketAddr::new(0, 0))?;
    for group in GROUPS {
        socket.add_membership(group)?;
    }
    tokio::spawn(connection);
    // Joined before the dump: a change racing it is seen twice, never missed.
    let mut view = RouteView::default();
    view.prime(&handle).await;
    while let Some((message, _)) = messages.next().await {
        let NetlinkPayload::InnerMessage(message) = message.payload else {
            continue;
        };
        if view.absorb(&message) && changed.send(()).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// The node's links (by index) and routes, as far as they decide which interface leads
/// to a pod address.
#[derive(Debug, Default)]
pub struct RouteView {
    links: BTreeMap<u32, Option<String>>,
    routes: BTreeMap<RouteKey, RouteTarget>,
}

/// One route: the same destination may have routes in several tables, or at several
/// metrics.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RouteKey {
    table: u32,
    destination: Option<IpAddr>,
    prefix_len: u8,
    tos: u8,
    priority: Option<u32>,
}

/// Where a route sends packets: what [`Resolver`] reads from it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouteTarget {
    oif: Option<u32>,
    /// A gateway, a `via` or several next hops: not a pod interface.
    indirect: bool,
}

impl RouteView {
    /// Fills the view from a dump of the current links and routes.
    async fn prime(&mut self, handle: &Handle) {
        use std::net::{Ipv4Addr, Ipv6Addr};
        let mut links = handle.link().get().execute();
        while let Ok(Some(link)) = links.try_next().await {
            self.absorb(&RouteNetlinkMessage::NewLink(link));
        }
        let dumps = [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ];
        for dump in dumps {
            let mut routes = handle.route().get(dump).execute();
            while let Ok(Some(route)) = routes.try_next().await {
                self.absorb(&RouteNetlinkMessage::NewRoute(route));
            }
        }
    }

    /// Takes in one message; true when it changed the view.
    pub fn absorb(&mut self, message: &RouteNetlinkMessage) -> bool {
        match message {
            RouteNetlinkMessage::NewLink(link) => {
                let name = link
                    .attributes
                    .iter()
                    .find_map(|attribute| match attribute {
                        LinkAttribute::IfName(name) => Some(name.clone()),
                        _ => None,
                    });
                match self.links.get_mut(&link.header.index) {
                    // Messages about a known link (flags, carrier, IPv6 link state)
                    // without a new name change nothing here.
                    Some(known) if name.is_none() || *known == name => false,
                    Some(known) => {
                        *known = name;
                        true
                    }
                    None => {
                        self.links.insert(link.header.index, name);
                        true
                    }
                }
            }
            RouteNetlinkMessage::DelLink(link) => self.links.remove(&link.header.index).is_some(),
            RouteNetlinkMessage::NewRoute(route) => match route_entry(route) {
                Some((key, target)) => self.routes.insert(key, target.clone()) != Some(target),
                None => false,
            },
            RouteNetlinkMessage::DelRoute(route) => {
                route_entry(route).is_some_and(|(key, _)| self.routes.remove(&key).is_some())
            }
            _ => false,
        }
    }
}

/// The view's entry for a route that can lead to a pod: unicast routes that the kernel
/// installed or was given, not its cached clones.
fn route_entry(route: &RouteMessage) -> Option<(RouteKey, RouteTarget)> {
    let header = &route.header;
    if header.kind != RouteType::Unicast || header.flags.contains(RouteFlags::Cloned) {
        return None;
    }
    let mut key = RouteKey {
        table: u32::from(header.table),
        destination: None,
        prefix_len: header.destination_prefix_length,
        tos: header.tos,
        priority: None,
    };
    let mut target = RouteTarget {
        oif: None,
        indirect: false,
    };
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Table(table) => key.table = *table,
            RouteAttribute::Priority(priority) => key.priority = Some(*priority),
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                key.destination = Some(IpAddr::V4(*ip));
            }
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                key.destination = Some(IpAddr::V6(*ip));
            }
            RouteAttribute::Oif(index) => target.oif = Some(*index),
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) | RouteAttribute::MultiPath(_) => {
                target.indirect = true;
            }
            _ => {}
        }
    }
    Some((key, target))
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::{link::LinkMessage, route::RouteHeader};

    use super::*;

    fn link(index: u32, name: Option<&str>) -> LinkMessage {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message
            .attributes
            .extend(name.map(|n| LinkAttribute::IfName(n.to_owned())));
        message
    }

    fn pod_route(ip: [u8; 4], oif: u32) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.kind = RouteType::Unicast;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.destination_prefix_length = 32;
        message.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet(ip.into())),
            RouteAttribute::Oif(oif),
        ];
        message
    }

    #[test]
    fn only_links_appearing_going_or_renamed_count() {
        let mut view = RouteView::default();
        assert!(view.absorb(&RouteNetlinkMessage::NewLink(link(5, Some("veth5")))));
        assert!(
            !view.absorb(&RouteNetlinkMessage::NewLink(link(5, Some("veth5")))),
            "flags or carrier of a known link"
        );
        assert!(
            !view.absorb(&RouteNetlinkMessage::NewLink(link(5, None))),
            "IPv6 link state of a known link"
        );
        assert!(view.absorb(&RouteNetlinkMessage::NewLink(link(5, Some("pod-a")))));
        assert!(view.absorb(&RouteNetlinkMessage::DelLink(link(5, None))));
        assert!(!view.absorb(&RouteNetlinkMessage::DelLink(link(5, None))));
    }

    #[test]
    fn only_routes_appearing_going_or_moving_count() {
        let mut view = RouteView::default();
        let route = pod_route([10, 0, 0, 1], 5);
        assert!(view.absorb(&RouteNetlinkMessage::NewRoute(route.clone())));
        assert!(!view.absorb(&RouteNetlinkMessage::NewRoute(route.clone())));
        let mut refreshed = route.clone();
        refreshed.attributes.push(RouteAttribute::Expires(30));
        assert!(
            !view.absorb(&RouteNetlinkMessage::NewRoute(refreshed)),
            "same interface, new lifetime"
        );
        assert!(
            view.absorb(&RouteNetlinkMessage::NewRoute(pod_route([10, 0, 0, 1], 6))),
            "the pod's route moved to another interface"
        );
        let mut via = pod_route([10, 0, 0, 1], 6);
        via.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(
                [10, 0, 0, 254].into(),
            )));
        assert!(view.absorb(&RouteNetlinkMessage::NewRoute(via)));
        let mut cloned = pod_route([10, 0, 0, 2], 7);
        cloned.header.flags = RouteFlags::Cloned;
        assert!(!view.absorb(&RouteNetlinkMessage::NewRoute(cloned)));
        let mut local = pod_route([10, 0, 0, 3], 1);
        local.header.kind = RouteType::Local;
        assert!(!view.absorb(&RouteNetlinkMessage::NewRoute(local)));
        assert!(view.absorb(&RouteNetlinkMessage::DelRoute(pod_route([10, 0, 0, 1], 6))));
        assert!(!view.absorb(&RouteNetlinkMessage::DelRoute(route)));
    }
}

//! Egret's kernel programs. Each entry is thin: it finds the endpoint, calls the shared
//! verdict logic, and maps the verdict to the attach point's return code.
#![no_std]
#![no_main]

mod conntrack;
mod diagnostics;
mod dns;
mod events;
mod maps;
mod packet;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_skb_ancestor_cgroup_id,
    macros::{cgroup_skb, classifier},
    programs::{SkBuffContext, TcContext},
};
use egret_common::Verdict;

use crate::packet::ETH_HEADER_LEN;

/// TC ingress of a pod's host-side interface: everything the pod sends.
#[classifier]
pub fn egret_from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx) {
        Ok(verdict) => verdict,
        Err(code) => code,
    }
}

fn try_from_pod(ctx: &TcContext) -> Result<i32, i32> {
    // SAFETY: the context pointer is the kernel's sk_buff for this invocation.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let endpoint = maps::endpoint_by_ifindex(ifindex);
    // SAFETY: as above.
    let vlan_present = unsafe { (*ctx.skb.skb).vlan_present } != 0;
    let ethertype = if vlan_present {
        // A veth moves the 802.1Q tag out of the frame before TC runs: the ethertype
        // in the data is the inner one, the tag only shows here.
        packet::ETH_P_8021Q
    } else {
        match packet::ethertype(&ctx.skb) {
            Some(ethertype) => ethertype,
            // Shorter than an Ethernet header: the parser calls that malformed.
            None => 0,
        }
    };
    let outcome = verdict::judge(&ctx.skb, ETH_HEADER_LEN, ethertype, endpoint);
    Ok(match outcome {
        Verdict::Allow | Verdict::AuditDeny => TC_ACT_OK,
        Verdict::Deny => TC_ACT_SHOT,
    })
}

/// TC egress of a pod's host-side interface: everything that reaches the pod. Never
/// drops; it records the flows the pod accepts, so the pod's replies pass.
#[classifier]
pub fn egret_to_pod(ctx: TcContext) -> i32 {
    if let Some(ethertype) = packet::ethertype(&ctx.skb) {
        verdict::observe_received(&ctx.skb, ETH_HEADER_LEN, ethertype, || {
            // SAFETY: the context pointer is the kernel's sk_buff for this invocation.
            maps::endpoint_by_ifindex(unsafe { (*ctx.skb.skb).ifindex })
        });
    }
    TC_ACT_OK
}

/// cgroup_skb egress of a pod's cgroup: everything the pod's sockets send, before any
/// address translation (`--attach cgroup`).
#[cgroup_skb(egress)]
pub fn egret_cgroup_egress(ctx: SkBuffContext) -> i32 {
    let endpoint = cgroup_endpoint(&ctx);
    let ethertype = skb_ethertype(&ctx);
    match verdict::judge(&ctx.skb, 0, ethertype, endpoint) {
        Verdict::Allow | Verdict::AuditDeny => CGROUP_PASS,
        Verdict::Deny => CGROUP_DROP,
    }
}

/// cgroup_skb ingress of a pod's cgroup: records the flows the pod accepts.
#[cgroup_skb(ingress)]
pub fn egret_cgroup_ingress(ctx: SkBuffContext) -> i32 {
    verdict::observe_received(&ctx.skb, 0, skb_ethertype(&ctx), || cgroup_endpoint(&ctx));
    CGROUP_PASS
}

const CGROUP_PASS: i32 = 1;
const CGROUP_DROP: i32 = 0;

/// The packet's L3 protocol in host order; cgroup programs see no Ethernet header.
fn skb_ethertype(ctx: &SkBuffContext) -> u16 {
    // SAFETY: the context pointer is the kernel's sk_buff for this invocation.
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    u16::from_be(protocol as u16)
}

/// The endpoint whose cgroup holds the sending socket: the pod cgroup is an ancestor
/// of the container's, at a depth that depends on the kubelet's cgroup driver.
fn cgroup_endpoint(ctx: &SkBuffContext) -> Option<&'static egret_common::maps::Endpoint> {
    for level in 1..=egret_common::maps::CGROUP_MAX_LEVELS {
        // SAFETY: a helper call on this invocation's sk_buff.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level as i32) };
        if id == 0 {
            break;
        }
        if let Some(endpoint) = maps::endpoint_by_cgroup(id) {
            return Some(endpoint);
        }
    }
    None
}

/// Does nothing but pass: the floor for per-packet cost benchmarks.
#[classifier]
pub fn egret_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

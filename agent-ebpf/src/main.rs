//! Egret's kernel programs. Each entry is thin: it finds the endpoint, calls the shared
//! verdict logic, and maps the verdict to the attach point's return code.
#![no_std]
#![no_main]

mod conntrack;
mod events;
mod maps;
mod packet;
mod verdict;

use aya_ebpf::{
    bindings::TC_ACT_OK, bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext,
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
    let Some(ethertype) = packet::ethertype(&ctx.skb) else {
        return Ok(TC_ACT_OK);
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
        verdict::observe_received(&ctx.skb, ETH_HEADER_LEN, ethertype);
    }
    TC_ACT_OK
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

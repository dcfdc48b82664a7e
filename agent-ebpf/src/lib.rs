#![no_std]
//! Exists so `egret` can name this crate as a build dependency: cargo then reruns
//! `agent/build.rs` when the kernel programs change.

//! Where cluster state comes from.

pub mod manifest;

//! Where cluster state comes from.

pub mod manifest;
pub mod objects;

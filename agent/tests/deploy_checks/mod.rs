//! Reading and checking Egret's deployment artifacts: manifests as API objects, the
//! agent's own `--help`, the invariants of an install, Helm renderings. The tests that
//! use them are in `deploy.rs`.

pub mod args;
pub mod helm;
pub mod help;
pub mod install;
pub mod objects;

use std::path::{Path, PathBuf};

pub const AGENT: &str = env!("CARGO_BIN_EXE_egret");
pub const NAMESPACE: &str = "egret-system";

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate lives one level below the workspace root")
        .to_path_buf()
}

//! Files under the pin directory: pinned maps by name, pinned links under `links/`.

use std::path::{Path, PathBuf};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xCAFE_4A11;

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: c_path is a valid NUL-terminated string; stat is written by the kernel.
    let ok = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) } == 0;
    // SAFETY: statfs succeeded, so it filled `stat`.
    ok && unsafe { stat.assume_init() }.f_type == BPF_FS_MAGIC
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// Where the link attaching program `name` to interface `ifindex` is pinned.
pub fn link_path(pin_dir: &Path, name: &str, ifindex: u32) -> PathBuf {
    let dir = links_dir(pin_dir);
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{name}_if{ifindex}"))
}

/// Interfaces with a pinned link of program `name`.
pub fn pinned_link_ifindexes(pin_dir: &Path, name: &str) -> Vec<u32> {
    let prefix = format!("{name}_if");
    let Ok(entries) = std::fs::read_dir(links_dir(pin_dir)) else {
        return Vec::new();
    };
    let mut ifindexes: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.strip_prefix(&prefix)?.parse().ok())
        .collect();
    ifindexes.sort_unstable();
    ifindexes
}

/// Where the link attaching cgroup program `name` to cgroup `cgroup` is pinned.
pub fn cgroup_link_path(pin_dir: &Path, name: &str, cgroup: u64) -> PathBuf {
    let dir = links_dir(pin_dir);
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{name}_cg{cgroup}"))
}

/// Cgroups with a pinned egress link.
pub fn pinned_cgroup_ids(pin_dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(links_dir(pin_dir)) else {
        return Vec::new();
    };
    let mut ids: Vec<u64> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("cg_egress_cg")?
                .parse()
                .ok()
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// Unpins everything: links detach once nothing else holds them, maps are freed.
pub fn remove_all(pin_dir: &Path) -> std::io::Result<usize> {
    if !pin_dir.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    for entry in std::fs::read_dir(pin_dir)? {
        let path = entry?.path();
        if path.is_dir() {
            removed += remove_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    std::fs::remove_dir(pin_dir)?;
    Ok(removed)
}

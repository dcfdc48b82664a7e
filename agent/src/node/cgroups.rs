//! Which cgroup holds each local pod, for `--attach cgroup`: the kubelet names pod
//! cgroups after the pod's UID (`kubepods-<qos>-pod<uid>.slice` with the systemd
//! driver, `pod<uid>` with cgroupfs), somewhere below the cgroup v2 root.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::state::ObjectKey;

/// Depth searched below the root: kubelet puts pod cgroups two or three levels down.
const SEARCH_DEPTH: usize = 4;

/// The cgroup v2 mount point (`/sys/fs/cgroup` on most nodes; `/sys/fs/cgroup/unified`
/// on hybrid hosts).
#[must_use]
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(path))
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub path: PathBuf,
    /// The cgroup id: the directory's inode number, as `bpf_skb_ancestor_cgroup_id` reports.
    pub id: u64,
}

/// The cgroup of every pod (by UID) found below `root`.
#[must_use]
pub fn find<'a>(
    root: &Path,
    pods: impl IntoIterator<Item = (&'a ObjectKey, &'a str)>,
) -> BTreeMap<ObjectKey, PodCgroup> {
    let mut wanted: BTreeMap<String, ObjectKey> = BTreeMap::new();
    for (pod, uid) in pods {
        if !uid.is_empty() {
            wanted.insert(format!("pod{uid}"), pod.clone());
            wanted.insert(format!("pod{}", uid.replace('-', "_")), pod.clone());
        }
    }
    let mut found = BTreeMap::new();
    walk(root, 0, &wanted, &mut found);
    found
}

fn walk(
    dir: &Path,
    depth: usize,
    wanted: &BTreeMap<String, ObjectKey>,
    found: &mut BTreeMap<ObjectKey, PodCgroup>,
) {
    if depth > SEARCH_DEPTH || wanted.is_empty() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !kind.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let stem = name.trim_end_matches(".slice");
        let matched = wanted
            .iter()
            .find(|(needle, _)| stem.ends_with(needle.as_str()));
        if let Some((_, pod)) = matched {
            if let Ok(metadata) = entry.metadata() {
                found.entry(pod.clone()).or_insert(PodCgroup {
                    path: entry.path(),
                    id: metadata.ino(),
                });
            }
            continue;
        }
        walk(&entry.path(), depth + 1, wanted, found);
    }
}

//! A map the agent pinned, read as the kernel holds it: for benchmarks that time a
//! change from outside the agent (no request to the agent, so the clock costs it
//! nothing). Lookups only; the `bpf(2)` calls are made directly, as this crate has no
//! BPF library.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for `BPF_MAP_LOOKUP_ELEM`.
#[repr(C)]
struct Lookup {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct GetInfo {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_map_info`; the kernel fills what `info_len` allows.
#[repr(C)]
#[derive(Default)]
struct MapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
}

/// Calls `bpf(cmd, attr, size_of(attr))`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` prefix of `union bpf_attr`
    // for `cmd`, and its size is passed, so the kernel reads and writes only within it
    // (and treats the rest of the union as zero); pointers inside it point at buffers
    // the caller keeps alive for the call.
    let result =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// A pinned map, open for lookups.
pub struct PinnedMap {
    fd: OwnedFd,
    path: PathBuf,
    key_size: usize,
    value_size: usize,
}

impl PinnedMap {
    /// Opens the map pinned at `path`.
    ///
    /// # Errors
    /// When nothing is pinned there, or it is not a map.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let name = CString::new(path.as_os_str().as_encoded_bytes())
            .with_context(|| format!("{} holds a NUL byte", path.display()))?;
        let mut attr = ObjGet {
            pathname: name.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        };
        let fd = bpf(BPF_OBJ_GET, &mut attr)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) };
        let mut info = MapInfo::default();
        let mut attr = GetInfo {
            bpf_fd: u32::try_from(fd.as_raw_fd())?,
            info_len: u32::try_from(size_of::<MapInfo>())?,
            info: std::ptr::from_mut(&mut info) as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
            .with_context(|| format!("{} is not a map", path.display()))?;
        Ok(Self {
            fd,
            path: path.to_owned(),
            key_size: usize::try_from(info.key_size)?,
            value_size: usize::try_from(info.value_size)?,
        })
    }

    /// The value the kernel finds for `key` (for an LPM trie, the longest prefix
    /// matching it), or `None`.
    ///
    /// # Errors
    /// When `key` is not of the map's key size, or the lookup fails otherwise than
    /// finding nothing.
    pub fn lookup(&self, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        if key.len() != self.key_size {
            bail!(
                "a key of {} bytes for {}, whose keys are {} bytes",
                key.len(),
                self.path.display(),
                self.key_size
            );
        }
        let mut value = vec![0_u8; self.value_size];
        let mut attr = Lookup {
            map_fd: u32::try_from(self.fd.as_raw_fd())?,
            pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(error) => {
                Err(error).with_context(|| format!("looking up a key of {}", self.path.display()))
            }
        }
    }
}

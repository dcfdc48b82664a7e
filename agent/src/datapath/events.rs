//! Reading the kernel's flow events (ring buffer) and its lost-event counter.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use egret_common::maps::FlowEvent;

/// The ring buffer of flow events. Poll its fd (it implements `AsRawFd`) for
/// readability, then drain with [`EventReader::next_event`].
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// The next event, if any is waiting.
    pub fn next_event(&mut self) -> Option<FlowEvent> {
        let item = self.ring.next()?;
        if item.len() < size_of::<FlowEvent>() {
            return None;
        }
        // SAFETY: the kernel wrote a whole FlowEvent (checked length); the read is
        // unaligned-safe.
        Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) })
    }
}

impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl AsFd for EventReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

/// Events the kernel could not deliver (over budget or buffer full), summed over CPUs.
pub struct LostEvents {
    pub(super) counter: PerCpuArray<MapData, u64>,
}

impl LostEvents {
    #[must_use]
    pub fn total(&self) -> u64 {
        self.counter
            .get(&0, 0)
            .map_or(0, |values| values.iter().sum())
    }
}

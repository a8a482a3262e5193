//! The shared-memory ring between the HTTPS worker and the engine workers.

use serde::{Deserialize, Serialize};

use crate::scope::{engine, https};
use crate::{values, Reader};

crate::declare! {
    SHM_SLOTS {
        default: "64",
        doc: "requests in flight between the HTTPS worker and the engine (2-4096)",
        accepted: "an integer 2-4096",
        scope: |c| https(c).or_else(|| engine(c)),
    }
    SHM_SLOT_BYTES {
        default: "MAX_REQUEST_BYTES + 1 MiB",
        doc: "largest HTTPS request or response carried to the engine (bytes; pages past 1 MiB are returned after use, beyond SHM_WARM_BYTES)",
        accepted: "a byte count from 65536 to 4296015872",
        scope: |c| https(c).or_else(|| engine(c)),
    }
    SHM_WARM_BYTES {
        default: "67108864",
        doc: "memory past each slot's first MiB that the ring keeps between large HTTPS requests, all slots together (bytes; 0 returns it after every request)",
        accepted: "a byte count from 0 to 68719476736",
        scope: |c| https(c).or_else(|| engine(c)),
    }
}

/// The most the ring's region may take (both directions of every slot).
pub const MAX_REGION_BYTES: u64 = 64 << 30;

/// The ring section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    /// Slots of the shared-memory ring.
    pub slots: u32,
    /// Bytes per request (and per response) in a slot.
    pub slot_bytes: usize,
    /// Bytes past a slot's first MiB kept resident between requests, all slots together.
    pub warm_bytes: u64,
}

/// Reads the ring section; by default a slot carries `max_request_bytes`
/// (plus room for the headers), so HTTPS takes every body HTTP takes.
pub fn parse(r: &mut Reader, max_request_bytes: u64) -> Ring {
    let slots = r.get(&SHM_SLOTS, 64u32, |v| values::range(v, 2, 4096));
    // Pages past 1 MiB are given back after use. Within the region's bound:
    // with thousands of slots, slots shrink to fit.
    let fits = (MAX_REGION_BYTES as usize) / (2 * slots.max(1) as usize);
    let default_slot =
        usize::try_from(max_request_bytes).unwrap_or(usize::MAX).saturating_add(1 << 20).min(fits / 4096 * 4096);
    let slot_bytes = r.get(&SHM_SLOT_BYTES, default_slot, |v| values::range(v, 65536usize, (1 << 32) + (1 << 20)));
    if (slots as u64) * (slot_bytes as u64) * 2 > MAX_REGION_BYTES {
        r.bad(&SHM_SLOT_BYTES, &slot_bytes.to_string(), "SHM_SLOTS x SHM_SLOT_BYTES x 2 of at most 64 GiB");
    }
    let warm_bytes = r.get(&SHM_WARM_BYTES, 64 << 20, |v| values::range(v, 0u64, MAX_REGION_BYTES));
    Ring { slots, slot_bytes, warm_bytes }
}

//! Which node keeps the directory entry of a resource name (`dlm_hash2nodeid` in
//! `fs/dlm/dir.c`).
//!
//! The directory node of `name` is `members[(hash(name) >> 16) % members.len()]` over
//! the sorted members of the current generation, where `hash` is CRC-32C of the name
//! bytes (the Linux DLM uses jhash; any fixed function that every node computes the
//! same way will do, and crc32c is already a dependency with a hardware path).

use super::types::NodeId;

/// The fixed hash of a resource name: CRC-32C of its bytes.
pub fn name_hash(name: &[u8]) -> u32 {
    crc32c::crc32c(name)
}

/// The directory node of `name` among `sorted_members` (must be non-empty and sorted).
pub fn directory_node(sorted_members: &[NodeId], name: &[u8]) -> NodeId {
    assert!(!sorted_members.is_empty(), "a lockspace has at least one member (us)");
    let n = sorted_members.len() as u32;
    sorted_members[((name_hash(name) >> 16) % n) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_spreads_names_over_members() {
        let members = [1, 2, 3];
        let mut count = [0usize; 3];
        for i in 0..3000 {
            let name = format!("inode/{i}");
            let d = directory_node(&members, name.as_bytes());
            count[(d - 1) as usize] += 1;
        }
        for c in count {
            assert!(c > 800, "{count:?}");
        }
        assert_eq!(directory_node(&[7], b"x"), 7);
    }
}

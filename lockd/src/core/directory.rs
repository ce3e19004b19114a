//! Which node keeps the directory entry of a resource name (`dlm_hash2nodeid` in
//! `fs/dlm/dir.c`).
//!
//! The directory node of `name` is `members[(hash(key) >> 16) % members.len()]` over
//! the sorted members of the current generation, where `hash` is CRC-32C of the key
//! bytes (the Linux DLM uses jhash of the whole name; any fixed function that every
//! node computes the same way will do, and crc32c is already a dependency with a
//! hardware path). The key is the name, or the number part of a name of GFS2's glock
//! form ([`directory_key`]).

use super::types::NodeId;

/// The fixed hash of a resource name: CRC-32C of its bytes.
pub fn name_hash(name: &[u8]) -> u32 {
    crc32c::crc32c(name)
}

/// Length of a name of GFS2's glock form, `"%8x%16llx"` of type and number.
pub const GLOCK_NAME_LEN: usize = 24;

/// What places `name` among the members: the name itself, except that a name of
/// GFS2's glock form ([`GLOCK_NAME_LEN`] bytes) is placed by its number alone. The
/// glocks of one inode (inode, iopen, flock) then share a directory node, and a
/// filesystem can pick new inode numbers whose glocks have their directory on its own
/// node: the first request for them is answered there, with no message to another
/// node (docs/internals/cluster.md, "Creates without a round trip").
pub fn directory_key(name: &[u8]) -> &[u8] {
    if name.len() == GLOCK_NAME_LEN {
        &name[8..]
    } else {
        name
    }
}

/// The directory node of `name` among `sorted_members` (must be non-empty and sorted).
pub fn directory_node(sorted_members: &[NodeId], name: &[u8]) -> NodeId {
    assert!(!sorted_members.is_empty(), "a lockspace has at least one member (us)");
    let n = sorted_members.len() as u32;
    sorted_members[((name_hash(directory_key(name)) >> 16) % n) as usize]
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

    #[test]
    fn the_glocks_of_one_number_share_a_directory_node_and_numbers_spread() {
        let members = [1, 2, 3, 5];
        let mut count = [0usize; 4];
        for n in 0..4000u64 {
            let of = |ty: u32| directory_node(&members, format!("{ty:8x}{n:16x}").as_bytes());
            assert!([5, 6, 3].iter().all(|&ty| of(ty) == of(2)), "number {n}");
            count[members.iter().position(|&m| m == of(2)).unwrap()] += 1;
        }
        for c in count {
            assert!(c > 800, "{count:?}");
        }
        // Names of any other length are placed whole.
        assert_eq!(directory_key(b"inode/17"), b"inode/17");
        assert_eq!(directory_key(b"       2              1a"), b"              1a");
    }
}

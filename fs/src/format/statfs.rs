//! The records of the statfs system files (docs/internals/disk-format.md, "Master
//! directory"): the master record, `total u64, free u64, dinodes u64`, and each
//! journal's change record, `free_delta i64, dinodes_delta i64`, both little-endian and
//! stuffed in their dinodes. The free and dinode counts of the filesystem are the
//! master's plus every change file's.

use super::{get_u64, put_u64, Dinode, FormatError};

/// Bytes of the master record.
pub const STATFS_MASTER_LEN: usize = 24;
/// Bytes of a change record.
pub const STATFS_CHANGE_LEN: usize = 16;

/// The master statfs record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatfsMaster {
    pub total: u64,
    pub free: u64,
    pub dinodes: u64,
}

/// A change record: what one node allocated (negative free) and freed since it last
/// folded its changes into the master record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatfsChange {
    pub free: i64,
    pub dinodes: i64,
}

fn payload<'a>(d: &'a Dinode, ino: u64, len: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
    if d.height != 0 || d.size != len as u64 {
        return Err(FormatError::BadField {
            block: ino,
            field: what,
            reason: format!("a {len}-byte stuffed record expected, found size {} height {}", d.size, d.height),
        });
    }
    Ok(&d.payload[..len])
}

impl StatfsMaster {
    pub fn decode(d: &Dinode, ino: u64) -> Result<StatfsMaster, FormatError> {
        let p = payload(d, ino, STATFS_MASTER_LEN, "statfs master record")?;
        Ok(StatfsMaster { total: get_u64(p, 0), free: get_u64(p, 8), dinodes: get_u64(p, 16) })
    }

    /// Writes the record into `d`'s payload.
    pub fn store(&self, d: &mut Dinode) {
        d.size = STATFS_MASTER_LEN as u64;
        put_u64(&mut d.payload[..], 0, self.total);
        put_u64(&mut d.payload[..], 8, self.free);
        put_u64(&mut d.payload[..], 16, self.dinodes);
    }

    /// The master with `c` folded in (saturating: a count never goes below zero).
    pub fn plus(&self, c: StatfsChange) -> StatfsMaster {
        StatfsMaster {
            total: self.total,
            free: self.free.saturating_add_signed(c.free),
            dinodes: self.dinodes.saturating_add_signed(c.dinodes),
        }
    }
}

impl StatfsChange {
    pub fn decode(d: &Dinode, ino: u64) -> Result<StatfsChange, FormatError> {
        let p = payload(d, ino, STATFS_CHANGE_LEN, "statfs change record")?;
        Ok(StatfsChange { free: get_u64(p, 0) as i64, dinodes: get_u64(p, 8) as i64 })
    }

    /// Writes the record into `d`'s payload.
    pub fn store(&self, d: &mut Dinode) {
        d.size = STATFS_CHANGE_LEN as u64;
        put_u64(&mut d.payload[..], 0, self.free as u64);
        put_u64(&mut d.payload[..], 8, self.dinodes as u64);
    }

    pub fn plus(&self, o: StatfsChange) -> StatfsChange {
        StatfsChange { free: self.free.wrapping_add(o.free), dinodes: self.dinodes.wrapping_add(o.dinodes) }
    }

    pub fn is_zero(&self) -> bool {
        *self == StatfsChange::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_a_wrong_size() {
        let mut d = Dinode::new(0o100600, 0, 0, crate::format::Time::default(), 0);
        let m = StatfsMaster { total: 1 << 40, free: 12345, dinodes: 7 };
        m.store(&mut d);
        assert_eq!(StatfsMaster::decode(&d, 9).unwrap(), m);
        assert!(StatfsChange::decode(&d, 9).is_err(), "a master record is not a change record");
        let c = StatfsChange { free: -300, dinodes: 2 };
        c.store(&mut d);
        assert_eq!(StatfsChange::decode(&d, 9).unwrap(), c);
        assert_eq!(m.plus(c), StatfsMaster { total: 1 << 40, free: 12045, dinodes: 9 });
        assert_eq!(StatfsMaster::default().plus(c).free, 0, "never below zero");
        d.height = 1;
        assert!(StatfsChange::decode(&d, 9).is_err());
    }
}

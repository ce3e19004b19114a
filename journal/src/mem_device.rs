//! An in-memory [`BlockDevice`]: every write is durable at once.

use parking_lot::RwLock;

use crate::device::{check_io, BlockDevice, DeviceError, BLOCK_SIZE};

/// A device held in memory. Flush does nothing; nothing is ever lost.
#[derive(Debug)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
}

impl MemDevice {
    /// A zero-filled device of `len_bytes` (rounded down to whole blocks).
    pub fn new(len_bytes: u64) -> MemDevice {
        let len = usize::try_from(len_bytes).expect("MemDevice larger than the address space");
        MemDevice::from_vec(vec![0u8; len])
    }

    /// A device holding `image` (a ragged end beyond the last whole block is dropped).
    pub fn from_vec(mut image: Vec<u8>) -> MemDevice {
        image.truncate(image.len() / BLOCK_SIZE * BLOCK_SIZE);
        MemDevice { data: RwLock::new(image) }
    }

    /// A copy of the whole device.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().clone()
    }
}

impl BlockDevice for MemDevice {
    fn len(&self) -> u64 {
        self.data.read().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let data = self.data.read();
        check_io(offset, buf.len(), data.len() as u64)?;
        // check_io proved offset + len <= data.len(), so the casts and slice are in range.
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        let mut data = self.data.write();
        check_io(offset, buf.len(), data.len() as u64)?;
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{read_block, write_block, Block};

    #[test]
    fn write_then_read_back() {
        let dev = MemDevice::new(8 * BLOCK_SIZE as u64 + 100);
        assert_eq!(dev.len(), 8 * BLOCK_SIZE as u64);
        let b: Block = [7u8; BLOCK_SIZE];
        write_block(&dev, 3, &b).unwrap();
        let mut r = [0u8; BLOCK_SIZE];
        read_block(&dev, 3, &mut r).unwrap();
        assert_eq!(r, b);
        read_block(&dev, 2, &mut r).unwrap();
        assert_eq!(r, [0u8; BLOCK_SIZE]);
        assert_eq!(&dev.snapshot()[3 * BLOCK_SIZE..4 * BLOCK_SIZE], &b[..]);
    }

    #[test]
    fn rejects_unaligned_and_out_of_range() {
        let dev = MemDevice::new(4 * BLOCK_SIZE as u64);
        let mut buf = vec![0u8; BLOCK_SIZE];
        assert!(matches!(dev.read_at(1, &mut buf), Err(DeviceError::Unaligned { .. })));
        assert!(matches!(dev.read_at(0, &mut buf[..100]), Err(DeviceError::Unaligned { .. })));
        assert!(matches!(dev.write_at(4 * BLOCK_SIZE as u64, &buf), Err(DeviceError::OutOfRange { .. })));
        assert!(matches!(dev.read_at(u64::MAX - 4095, &mut buf), Err(DeviceError::OutOfRange { .. })));
        assert!(matches!(read_block(&dev, u64::MAX, &mut [0u8; BLOCK_SIZE]), Err(DeviceError::OutOfRange { .. })));
    }
}

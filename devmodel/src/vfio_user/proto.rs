//! vfio-user wire format (little-endian; vfio-user protocol §2-3) and the
//! VFIO constants it reuses (linux/vfio.h).

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;
/// Most file descriptors accepted with one message.
pub const MAX_FDS: usize = 16;

pub const CMD_VERSION: u16 = 1;
pub const CMD_DMA_MAP: u16 = 2;
pub const CMD_DMA_UNMAP: u16 = 3;
pub const CMD_DEVICE_GET_INFO: u16 = 4;
pub const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
pub const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
pub const CMD_DEVICE_SET_IRQS: u16 = 8;
pub const CMD_REGION_READ: u16 = 9;
pub const CMD_REGION_WRITE: u16 = 10;
pub const CMD_DEVICE_RESET: u16 = 13;

pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const FLAG_COMMAND: u32 = 0;
pub const FLAG_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 1 << 4;
pub const FLAG_ERROR: u32 = 1 << 5;

pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;
pub const NUM_REGIONS: u32 = 9;
pub const NUM_IRQS: u32 = 5;
pub const REGION_CONFIG: u32 = 7;
pub const REGION_READ: u32 = 1 << 0;
pub const REGION_WRITE: u32 = 1 << 1;

pub const IRQ_INTX: u32 = 0;
pub const IRQ_MSI: u32 = 1;
pub const IRQ_MSIX: u32 = 2;
pub const IRQ_ERR: u32 = 3;
pub const IRQ_REQ: u32 = 4;
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
pub const IRQ_SET_DATA_MASK: u32 = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
pub const IRQ_SET_ACTION_MASK_ALL: u32 =
    IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;

/// Message header.
#[derive(Debug, Clone, Copy, Default)]
pub struct Header {
    pub msg_id: u16,
    pub command: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Header {
        Header {
            msg_id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }
}

/// A reply to `h`: payload, or an error with `errno` and no payload.
pub fn encode_reply(h: &Header, errno: u32, payload: &[u8]) -> Vec<u8> {
    let (flags, payload) = if errno != 0 {
        (FLAG_REPLY | FLAG_ERROR, &[][..])
    } else {
        (FLAG_REPLY, payload)
    };
    let r = Header {
        msg_id: h.msg_id,
        command: h.command,
        size: (HEADER_SIZE + payload.len()) as u32,
        flags,
        error: errno,
    };
    let mut v = r.to_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Bounds-checked little-endian reader; a short payload is EINVAL.
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Reader { b }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], u32> {
        if self.b.len() < n {
            return Err(libc::EINVAL as u32);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    pub fn u16(&mut self) -> Result<u16, u32> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, u32> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
}

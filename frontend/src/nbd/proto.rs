//! NBD wire format: magics, flags, option/command/reply numbers and the fixed-size headers.
//!
//! Everything here follows the NBD protocol document (`doc/proto.md` of the NetworkBlockDevice
//! project); section names in comments refer to it. All integers on the wire are big-endian.
//! This module only encodes and decodes bytes: it never reads a socket and never decides what a
//! value means for the export. Decoders take exact-size arrays, so a short buffer cannot exist.

/// `NBDMAGIC`, the first 8 bytes the server sends ("Newstyle negotiation").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after `NBDMAGIC`, and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The `cliserv_magic` of oldstyle negotiation, which this implementation does not speak.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply ("Fixed newstyle negotiation").
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC` ("Request message").
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC` ("Simple reply message").
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: never sent here, recognised only to report it clearly.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag `NBD_FLAG_FIXED_NEWSTYLE`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag `NBD_FLAG_NO_ZEROES`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag `NBD_FLAG_HAS_FLAGS` (always set).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag `NBD_FLAG_READ_ONLY`.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag `NBD_FLAG_SEND_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag `NBD_FLAG_SEND_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag `NBD_FLAG_ROTATIONAL`.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag `NBD_FLAG_SEND_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag `NBD_FLAG_SEND_DF` (structured replies only; never set here).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag `NBD_FLAG_CAN_MULTI_CONN`.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag `NBD_FLAG_SEND_RESIZE` (never set here).
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag `NBD_FLAG_SEND_CACHE` (never set here).
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag `NBD_FLAG_SEND_FAST_ZERO` (never set here).
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// Option `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// Option `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// Option `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// Option `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// Option `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// Option reply `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// Option reply `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// Option reply `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option reply `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option reply `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option reply `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option reply `NBD_REP_ERR_PLATFORM`.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option reply `NBD_REP_ERR_TLS_REQD`.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option reply `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option reply `NBD_REP_ERR_SHUTDOWN`.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option reply `NBD_REP_ERR_BLOCK_SIZE_REQD`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option reply `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Structured reply flag `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply type `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured reply type `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply type `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply type `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply type `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Structured reply type `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// The one metadata context this server offers.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag `NBD_STATE_HOLE`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag `NBD_STATE_ZERO`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Information type `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// Information type `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// Information type `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// Command `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// Command `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// Command `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// Command `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// Command `NBD_CMD_CACHE` (not supported here).
pub const CMD_CACHE: u16 = 5;
/// Command `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command `NBD_CMD_BLOCK_STATUS` (not supported here: it needs structured replies).
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag `NBD_CMD_FLAG_NO_HOLE`.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag `NBD_CMD_FLAG_DF`.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag `NBD_CMD_FLAG_REQ_ONE`.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag `NBD_CMD_FLAG_FAST_ZERO`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Error `NBD_EPERM`.
pub const EPERM: u32 = 1;
/// Error `NBD_EIO`.
pub const EIO: u32 = 5;
/// Error `NBD_ENOMEM`.
pub const ENOMEM: u32 = 12;
/// Error `NBD_EINVAL`.
pub const EINVAL: u32 = 22;
/// Error `NBD_ENOSPC`.
pub const ENOSPC: u32 = 28;
/// Error `NBD_EOVERFLOW`.
pub const EOVERFLOW: u32 = 75;
/// Error `NBD_ENOTSUP`.
pub const ENOTSUP: u32 = 95;
/// Error `NBD_ESHUTDOWN`.
pub const ESHUTDOWN: u32 = 108;

/// Bytes of zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_PADDING: usize = 124;
/// The longest string the protocol allows ("Conventions": MUST be no longer than 4096 bytes).
pub const MAX_STRING_LEN: usize = 4096;
/// The largest minimum block size the protocol allows ("Block size constraints").
pub const MAX_MIN_BLOCK_SIZE: u32 = 1 << 16;
/// What a client may assume without `NBD_INFO_BLOCK_SIZE`: 32 MiB for reads and writes
/// ("Block size constraints").
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of an option header (`IHAVEOPT`, option, length) on the wire.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header (magic, option, type, length) on the wire.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// The name of an NBD error value, for messages.
pub fn errno_name(error: u32) -> &'static str {
    match error {
        0 => "success",
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// The name of a command, for messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// The name of an option reply type, for messages.
pub fn reply_name(reply: u32) -> &'static str {
    match reply {
        REP_ACK => "ACK",
        REP_SERVER => "SERVER",
        REP_INFO => "INFO",
        REP_META_CONTEXT => "META_CONTEXT",
        REP_ERR_UNSUP => "ERR_UNSUP",
        REP_ERR_POLICY => "ERR_POLICY",
        REP_ERR_INVALID => "ERR_INVALID",
        REP_ERR_PLATFORM => "ERR_PLATFORM",
        REP_ERR_TLS_REQD => "ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "ERR_TOO_BIG",
        r if r & REP_FLAG_ERROR != 0 => "unknown error reply",
        _ => "unknown reply",
    }
}

/// A transmission request header ("Request message"); a WRITE's payload follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub command: u16,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Encodes the header, magic included.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes a header; `Err` carries the magic found when it is not `NBD_REQUEST_MAGIC`.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, u32> {
        let magic = be32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Request {
            flags: be16(b, 4),
            command: be16(b, 6),
            handle: be64(b, 8),
            offset: be64(b, 16),
            length: be32(b, 24),
        })
    }
}

/// A simple reply header ("Simple reply message"); a successful READ's data follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// NBD error value, 0 on success.
    pub error: u32,
    /// The request's handle.
    pub handle: u64,
}

impl SimpleReply {
    /// Encodes the header, magic included.
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b
    }

    /// Decodes a header; `Err` carries the magic found when it is not `NBD_SIMPLE_REPLY_MAGIC`.
    pub fn decode(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<SimpleReply, u32> {
        let magic = be32(b, 0);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(magic);
        }
        Ok(SimpleReply {
            error: be32(b, 4),
            handle: be64(b, 8),
        })
    }
}

/// An option header sent by the client: `IHAVEOPT`, option, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option (`OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Encodes the header, magic included.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes a header; `Err` carries the magic found when it is not `IHAVEOPT`.
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, u64> {
        let magic = be64(b, 0);
        if magic != IHAVEOPT {
            return Err(magic);
        }
        Ok(OptionHeader {
            option: be32(b, 8),
            length: be32(b, 12),
        })
    }
}

/// An option reply header sent by the server: magic, option, reply type, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Encodes the header, magic included.
    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
        b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes a header; `Err` carries the magic found when it is not the option reply magic.
    pub fn decode(b: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<OptionReplyHeader, u64> {
        let magic = be64(b, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(magic);
        }
        Ok(OptionReplyHeader {
            option: be32(b, 8),
            reply: be32(b, 12),
            length: be32(b, 16),
        })
    }
}

/// Block size constraints, as carried by `NBD_INFO_BLOCK_SIZE` ("Block size constraints").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size: offsets and lengths are multiples of it.
    pub minimum: u32,
    /// Preferred block size: the smallest size with efficient I/O.
    pub preferred: u32,
    /// Maximum block size: the largest READ, WRITE or WRITE_ZEROES length.
    pub maximum: u32,
}

impl BlockSizes {
    /// What the protocol lets a server assume when nothing was advertised, with a client's
    /// 32 MiB payload limit.
    pub const DEFAULT: BlockSizes = BlockSizes {
        minimum: 1,
        preferred: 4096,
        maximum: DEFAULT_MAX_PAYLOAD,
    };

    /// Checks the rules of "Block size constraints": the minimum is a power of two no larger
    /// than 64 KiB, the preferred size a power of two at least max(minimum, 512), and the
    /// maximum a multiple of the minimum (or `0xffffffff`) at least as large as the preferred
    /// size or the export size, whichever is smaller.
    pub fn check(&self, export_size: u64) -> Result<(), &'static str> {
        if !self.minimum.is_power_of_two() || self.minimum > MAX_MIN_BLOCK_SIZE {
            return Err("the minimum block size is not a power of two up to 64 KiB");
        }
        if !self.preferred.is_power_of_two() || self.preferred < self.minimum.max(512) {
            return Err("the preferred block size is not a power of two of at least 512 bytes");
        }
        if self.maximum != u32::MAX && self.maximum % self.minimum != 0 {
            return Err("the maximum block size is not a multiple of the minimum");
        }
        if u64::from(self.maximum) < u64::from(self.preferred).min(export_size) {
            return Err("the maximum block size is smaller than the preferred block size");
        }
        Ok(())
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_what_the_protocol_says() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
        assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(REP_ERR_TOO_BIG, 0x8000_0009);
    }

    #[test]
    fn request_layout_is_big_endian_and_round_trips() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 0x1122_3344_5566_7788,
            length: 0xa0b0_c0d0,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[24..28], &[0xa0, 0xb0, 0xc0, 0xd0]);
        assert_eq!(Request::decode(&b), Ok(r));
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(Request::decode(&bad), Err(0x0060_9513));
    }

    #[test]
    fn replies_and_option_headers_round_trip() {
        let s = SimpleReply {
            error: EINVAL,
            handle: 7,
        };
        assert_eq!(SimpleReply::decode(&s.encode()), Ok(s));
        let o = OptionHeader {
            option: OPT_GO,
            length: 12,
        };
        assert_eq!(OptionHeader::decode(&o.encode()), Ok(o));
        let r = OptionReplyHeader {
            option: OPT_LIST,
            reply: REP_SERVER,
            length: 8,
        };
        let b = r.encode();
        assert_eq!(&b[0..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        assert_eq!(OptionReplyHeader::decode(&b), Ok(r));
    }

    #[test]
    fn block_size_rules() {
        let ok = BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 25,
        };
        assert_eq!(ok.check(1 << 30), Ok(()));
        assert!(BlockSizes::DEFAULT.check(1 << 30).is_ok());
        assert!(BlockSizes { minimum: 3, ..ok }.check(1 << 30).is_err());
        assert!(
            BlockSizes {
                minimum: 1 << 17,
                ..ok
            }
            .check(1 << 30)
            .is_err()
        );
        assert!(
            BlockSizes {
                preferred: 256,
                ..ok
            }
            .check(1 << 30)
            .is_err()
        );
        assert!(
            BlockSizes {
                maximum: (1 << 25) + 1,
                ..ok
            }
            .check(1 << 30)
            .is_err()
        );
        assert!(
            BlockSizes {
                maximum: u32::MAX,
                ..ok
            }
            .check(1 << 30)
            .is_ok()
        );
        assert!(
            BlockSizes {
                maximum: 1024,
                ..ok
            }
            .check(1 << 30)
            .is_err()
        );
        // A tiny export needs no maximum beyond its size.
        assert!(
            BlockSizes {
                maximum: 1024,
                ..ok
            }
            .check(1024)
            .is_ok()
        );
    }
}

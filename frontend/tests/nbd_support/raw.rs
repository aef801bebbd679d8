//! A client speaking raw NBD bytes, for tests of the server's protocol handling.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use xenvirtio_frontend::nbd::proto::{self, OptionHeader, OptionReplyHeader, Request, SimpleReply};

use super::EXPORT;

/// A client speaking raw bytes.
pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }

    /// Connects, checks the greeting and sends `client_flags`.
    pub fn hello(path: &Path, client_flags: u32) -> Raw {
        let mut raw = Raw::connect(path);
        let mut greeting = [0u8; 18];
        raw.s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[0..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        raw.send(&client_flags.to_be_bytes());
        raw
    }

    /// A fixed-newstyle client that agreed to NO_ZEROES and entered transmission with GO.
    pub fn transmission(path: &Path) -> (Raw, u64, u16) {
        let mut raw = Raw::hello(path, 3);
        let (size, flags) = raw.go(EXPORT);
        (raw, size, flags)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send");
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = OptionHeader {
            option,
            length: data.len() as u32,
        }
        .encode()
        .to_vec();
        m.extend_from_slice(data);
        self.send(&m);
    }

    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).expect("option reply");
        let h = OptionReplyHeader::decode(&h).expect("option reply magic");
        let mut data = vec![0u8; h.length as usize];
        self.s.read_exact(&mut data).unwrap();
        (h.option, h.reply, data)
    }

    /// GO with no information requests; returns size and flags.
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        self.option(proto::OPT_GO, &info_data(name, &[]));
        let mut export = None;
        loop {
            let (option, reply, data) = self.option_reply();
            assert_eq!(option, proto::OPT_GO);
            match reply {
                proto::REP_INFO if u16::from_be_bytes([data[0], data[1]]) == proto::INFO_EXPORT => {
                    assert_eq!(data.len(), 12);
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    export = Some((size, u16::from_be_bytes([data[10], data[11]])));
                }
                proto::REP_INFO => {}
                proto::REP_ACK => return export.expect("GO succeeded without NBD_INFO_EXPORT"),
                r => panic!("GO refused with {}", proto::reply_name(r)),
            }
        }
    }

    pub fn request(&mut self, flags: u16, command: u16, handle: u64, offset: u64, length: u32) {
        self.send(
            &Request {
                flags,
                command,
                handle,
                offset,
                length,
            }
            .encode(),
        );
    }

    pub fn reply(&mut self) -> SimpleReply {
        let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).expect("simple reply");
        SimpleReply::decode(&h).expect("simple reply magic")
    }

    /// Sends a request and returns the error of its reply (and no data).
    pub fn error_of(&mut self, flags: u16, command: u16, offset: u64, length: u32) -> u32 {
        self.request(flags, command, 42, offset, length);
        if command == proto::CMD_WRITE {
            self.send(&vec![0xee; length as usize]);
        }
        let reply = self.reply();
        assert_eq!(reply.handle, 42);
        reply.error
    }

    pub fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        self.request(0, proto::CMD_READ, 7, offset, length);
        let reply = self.reply();
        assert_eq!((reply.error, reply.handle), (0, 7));
        let mut data = vec![0u8; length as usize];
        self.s.read_exact(&mut data).unwrap();
        data
    }

    pub fn write(&mut self, flags: u16, offset: u64, data: &[u8]) {
        self.request(flags, proto::CMD_WRITE, 8, offset, data.len() as u32);
        self.send(data);
        let reply = self.reply();
        assert_eq!((reply.error, reply.handle), (0, 8));
    }

    /// Asserts that the server closes the connection (EOF, or a reset) within the timeout.
    pub fn expect_closed(&mut self) {
        let mut byte = [0u8; 1];
        match self.s.read(&mut byte) {
            Ok(0) => {}
            Ok(_) => panic!("the server sent {byte:?} instead of closing"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("waiting for the server to close: {e}"),
        }
    }
}

pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

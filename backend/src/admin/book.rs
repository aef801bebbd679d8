//! The device book: which devices each domain should have, by domain name, so that a domain
//! created again (a reboot gets a new domid; `xl create` of a config) gets its devices back.
//!
//! One JSON file per domain name in the state directory (`/var/lib/xenvirtio/domains/<name>.json`
//! by default), written by `attach` and pruned by `detach`; the daemon reads it when a domain
//! appears (`crate::follow`). A file is replaced whole (write, fsync, rename), so a crash leaves
//! the old book or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xenvirtio_virtio::ids::DeviceKind;

use super::{AttachRequest, ConsoleOutput, DmaSetting, NetOptions};

/// Where the daemon and the admin commands keep their state by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/xenvirtio";

/// One remembered device: what `attach` was asked for, with the devid it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookEntry {
    /// The devid.
    pub devid: u32,
    /// `blk`, `console`, `rng` or `net`.
    #[serde(rename = "type")]
    pub kind: String,
    /// blk: the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// blk: read-only.
    #[serde(default)]
    pub readonly: bool,
    /// blk: `force-share`.
    #[serde(default)]
    pub force_share: bool,
    /// Requested queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u32>,
    /// The `dma` setting, as `attach --dma` takes it.
    pub dma: String,
    /// console: `pty` or `socket:PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// net: the MAC address (kept, so that the guest's NIC keeps it across reboots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// net: the bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// net: the MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// net: the TAP's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vifname: Option<String>,
    /// net: the frame socket instead of a TAP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl BookEntry {
    /// The entry for `req`, which got `devid`.
    pub fn of(req: &AttachRequest, devid: u32) -> BookEntry {
        BookEntry {
            devid,
            kind: req.kind.name().to_owned(),
            image: req.image.clone(),
            readonly: req.readonly,
            force_share: req.force_share,
            queues: req.queues,
            dma: req.dma.to_string(),
            console: req.console.as_ref().map(ToString::to_string),
            mac: req.net.mac.map(|m| m.to_string()),
            bridge: req.net.bridge.clone(),
            mtu: req.net.mtu,
            vifname: req.net.vifname.clone(),
            socket: req.net.socket.clone(),
        }
    }

    /// The attach request that recreates this device for `domid`.
    pub fn request(&self, domid: super::DomId) -> Result<AttachRequest, BookError> {
        let bad = |what: String| BookError::BadEntry {
            devid: self.devid,
            what,
        };
        let kind = [
            DeviceKind::Block,
            DeviceKind::Console,
            DeviceKind::Rng,
            DeviceKind::Net,
        ]
        .into_iter()
        .find(|k| k.name() == self.kind)
        .ok_or_else(|| bad(format!("unknown type {:?}", self.kind)))?;
        let dma: DmaSetting = self.dma.parse().map_err(|e| bad(format!("{e}")))?;
        let console = self
            .console
            .as_deref()
            .map(str::parse::<ConsoleOutput>)
            .transpose()
            .map_err(|e| bad(format!("{e}")))?;
        let mac = self
            .mac
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| bad(format!("{e}")))?;
        Ok(AttachRequest {
            image: self.image.clone(),
            readonly: self.readonly,
            force_share: self.force_share,
            devid: Some(self.devid),
            queues: self.queues,
            dma,
            console,
            net: NetOptions {
                mac,
                bridge: self.bridge.clone(),
                mtu: self.mtu,
                vifname: self.vifname.clone(),
                socket: self.socket.clone(),
            },
            ..AttachRequest::new(domid, kind)
        })
    }
}

/// The file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Page {
    devices: Vec<BookEntry>,
}

/// Why the book could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    /// A domain name that cannot be a file name.
    #[error("domain name {0:?} cannot be remembered (empty, too long, or a control character)")]
    BadName(String),
    /// The file could not be read or written.
    #[error("{what} {}", path.display())]
    Io {
        /// Reading or writing.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a book.
    #[error("{} is not a device book: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// An entry that no longer parses.
    #[error("remembered device {devid}: {what}")]
    BadEntry {
        /// Its devid.
        devid: u32,
        /// What is wrong.
        what: String,
    },
}

/// The books in one state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBook {
    dir: PathBuf,
}

impl DeviceBook {
    /// The books under `state_dir` (in its `domains/` folder).
    pub fn new(state_dir: &Path) -> DeviceBook {
        DeviceBook {
            dir: state_dir.join("domains"),
        }
    }

    /// The file of domain `name`. Names are kept readable; `/`, `%`, a leading `.` and
    /// control characters are percent-encoded.
    pub fn file(&self, name: &str) -> Result<PathBuf, BookError> {
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err(BookError::BadName(name.to_owned()));
        }
        let mut file = String::new();
        for (i, c) in name.chars().enumerate() {
            if c == '/' || c == '%' || (i == 0 && c == '.') {
                file.push_str(&format!("%{:02X}", c as u32));
            } else {
                file.push(c);
            }
        }
        file.push_str(".json");
        Ok(self.dir.join(file))
    }

    /// The devices remembered for `name` (none if it has no book), by devid.
    pub fn entries(&self, name: &str) -> Result<Vec<BookEntry>, BookError> {
        let path = self.file(name)?;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(BookError::Io {
                    what: "cannot read",
                    path,
                    source,
                });
            }
        };
        let page: Page = serde_json::from_str(&text).map_err(|e| BookError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut devices = page.devices;
        devices.sort_by_key(|e| e.devid);
        Ok(devices)
    }

    /// Remembers `entry` for `name`, replacing an entry of the same devid.
    pub fn record(&self, name: &str, entry: BookEntry) -> Result<(), BookError> {
        let mut devices = self.entries(name)?;
        devices.retain(|e| e.devid != entry.devid);
        devices.push(entry);
        self.write(name, devices)
    }

    /// Forgets device `devid` of `name`; true if it was remembered.
    pub fn forget(&self, name: &str, devid: u32) -> Result<bool, BookError> {
        let mut devices = self.entries(name)?;
        let before = devices.len();
        devices.retain(|e| e.devid != devid);
        if devices.len() == before {
            return Ok(false);
        }
        self.write(name, devices)?;
        Ok(true)
    }

    fn write(&self, name: &str, mut devices: Vec<BookEntry>) -> Result<(), BookError> {
        let path = self.file(name)?;
        let io = |what, source| BookError::Io {
            what,
            path: path.clone(),
            source,
        };
        if devices.is_empty() {
            return match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io("cannot remove", e)),
            };
        }
        devices.sort_by_key(|e| e.devid);
        std::fs::create_dir_all(&self.dir).map_err(|e| io("cannot create the folder of", e))?;
        let text = serde_json::to_string_pretty(&Page { devices }).unwrap_or_default();
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("cannot write", e))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .map_err(|e| io("cannot write", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("cannot replace", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk(devid: u32, image: &str) -> BookEntry {
        let mut req = AttachRequest::blk(5, image);
        req.readonly = devid % 2 == 1;
        req.queues = Some(2);
        BookEntry::of(&req, devid)
    }

    #[test]
    fn entries_are_recorded_replaced_forgotten_and_give_back_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let book = DeviceBook::new(dir.path());
        assert!(book.entries("guest1").unwrap().is_empty());
        book.record("guest1", blk(1, "/srv/b.img")).unwrap();
        book.record("guest1", blk(0, "/srv/a.img")).unwrap();
        let mut console = AttachRequest::new(5, DeviceKind::Console);
        console.console = Some(ConsoleOutput::Socket("/run/g1.sock".into()));
        book.record("guest1", BookEntry::of(&console, 2)).unwrap();
        // Same devid: replaced.
        book.record("guest1", blk(1, "/srv/c.img")).unwrap();
        let got = book.entries("guest1").unwrap();
        assert_eq!(got.iter().map(|e| e.devid).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(got[1].image.as_deref(), Some(Path::new("/srv/c.img")));
        // The request comes back for the new domid, devid pinned.
        let req = got[1].request(9).unwrap();
        assert_eq!(req.frontend, super::super::DomainRef::Id(9));
        assert_eq!(req.devid, Some(1));
        assert!(req.readonly);
        assert_eq!(req.queues, Some(2));
        assert_eq!(req.kind, DeviceKind::Block);
        let c = got[2].request(9).unwrap();
        assert_eq!(
            c.console,
            Some(ConsoleOutput::Socket("/run/g1.sock".into()))
        );
        // Books are per name.
        assert!(book.entries("guest2").unwrap().is_empty());
        assert!(book.forget("guest1", 1).unwrap());
        assert!(!book.forget("guest1", 1).unwrap());
        assert_eq!(book.entries("guest1").unwrap().len(), 2);
        book.forget("guest1", 0).unwrap();
        book.forget("guest1", 2).unwrap();
        assert!(
            !book.file("guest1").unwrap().exists(),
            "an empty book is removed"
        );
    }

    #[test]
    fn a_net_device_comes_back_with_its_mac_and_bridge() {
        let dir = tempfile::tempdir().unwrap();
        let book = DeviceBook::new(dir.path());
        let mut net = AttachRequest::new(5, DeviceKind::Net);
        net.net = NetOptions {
            mac: Some("00:16:3e:aa:bb:cc".parse().unwrap()),
            bridge: Some("xenbr1".into()),
            mtu: Some(1400),
            vifname: Some("g1-net".into()),
            socket: None,
        };
        book.record("guest1", BookEntry::of(&net, 3)).unwrap();
        let got = book.entries("guest1").unwrap();
        let req = got[0].request(12).unwrap();
        assert_eq!(req.kind, DeviceKind::Net);
        assert_eq!(
            req.net, net.net,
            "the guest keeps its MAC, bridge, MTU and name"
        );
        assert_eq!(req.devid, Some(3));
    }

    #[test]
    fn names_become_safe_file_names_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let book = DeviceBook::new(dir.path());
        let f = |n: &str| book.file(n).unwrap().file_name().unwrap().to_owned();
        assert_eq!(f("guest1"), "guest1.json");
        assert_eq!(f("a/b"), "a%2Fb.json");
        assert_eq!(f(".."), "%2E..json");
        assert_eq!(f("50%"), "50%25.json");
        for bad in ["", "a\nb", &"x".repeat(201)] {
            assert!(book.file(bad).is_err(), "{bad:?}");
        }
        std::fs::create_dir_all(dir.path().join("domains")).unwrap();
        std::fs::write(book.file("broken").unwrap(), "{not json").unwrap();
        let e = book.entries("broken").unwrap_err().to_string();
        assert!(e.contains("broken.json is not a device book"), "{e}");
    }
}

//! The service manager's readiness protocol (`sd_notify(3)`): a long-running command tells
//! systemd (a `Type=notify` unit) that it is ready, or is stopping, with one datagram to the
//! socket in `$NOTIFY_SOCKET`. Without that variable (not started by systemd) nothing happens.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// Sends `state` (`READY=1`, `STOPPING=1`, `STATUS=...`, newline-separated) to the service
/// manager, if the process was started with `$NOTIFY_SOCKET`. Returns whether it was sent.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => notify_to(Path::new(&socket), state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the notification socket at `socket`: a path, or an abstract socket
/// name written with a leading `@`.
pub fn notify_to(socket: &Path, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let text = socket.as_os_str().as_encoded_bytes();
    if let Some(name) = text.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), socket)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reaches_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(&path, "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("xenvirtio-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(Path::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(notify_to(&dir.path().join("nobody"), "READY=1").is_err());
    }
}

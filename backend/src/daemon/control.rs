//! The control socket (mode 0600; one request line, `stats` or `stats json`, then the answer
//! until EOF) and the `xenvirtio-backend stats` client of it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{DEFAULT_CONTROL_SOCKET, DaemonError, Shared, io_err};

/// The control socket, removed on drop.
pub(super) struct ControlSocket {
    pub(super) listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    pub(super) fn bind(path: &Path) -> Result<Self, DaemonError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Io {
                what: format!("another backend is listening on {}", path.display()),
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            });
        }
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).map_err(io_err(format!("listening on {}", path.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("making the control socket non-blocking"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("chmod {}", path.display())))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers one control client: one request line, the answer, EOF.
pub(super) fn answer_control(std_stream: UnixStream, shared: &Shared) {
    if std_stream.set_nonblocking(false).is_err()
        || std_stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .is_err()
    {
        return;
    }
    let mut line = String::new();
    let mut reader = BufReader::new((&std_stream).take(256));
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let answer = match line.trim() {
        "stats" => shared.report().to_table(),
        "stats json" => {
            let mut j = shared.report().to_json();
            j.push('\n');
            j
        }
        other => format!(
            "error: unknown request {:?} (expected \"stats\" or \"stats json\")\n",
            other.chars().take(32).collect::<String>()
        ),
    };
    let _ = (&std_stream).write_all(answer.as_bytes());
}

/// Options of `xenvirtio-backend stats`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatsArgs {
    /// The daemon's control socket (`serve --socket`).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub socket: PathBuf,

    /// Print one JSON object (`{"devices":[...],"process":{...}}`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Asks a running daemon for its statistics and returns its answer.
pub fn query_stats(socket: &Path, json: bool) -> std::io::Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(if json { b"stats json\n" } else { b"stats\n" })?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `xenvirtio-backend stats`: prints the daemon's statistics.
pub fn stats(args: &StatsArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let out = query_stats(&args.socket, args.json).with_context(|| {
        format!(
            "cannot reach the backend at {} (is `xenvirtio-backend serve` running? see --socket)",
            args.socket.display()
        )
    })?;
    if let Some(e) = out.strip_prefix("error: ") {
        anyhow::bail!("the backend answered: {}", e.trim());
    }
    print!("{out}");
    Ok(())
}

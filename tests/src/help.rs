//! `--help` as an operator reads it in an 80-column terminal: no line wider than 80 columns
//! (clap's usage lines aside), and examples that are whole commands, comments, or the
//! continuation of a command that ends in `\`.

use std::process::Command;

/// Runs `bin [sub...] --help` for the top level and each of `subcommands`, and checks every
/// line. `commands` are the words an example command may start with (`xenvirtio-backend`).
pub fn check_help_fits(bin: &str, subcommands: &[&str], commands: &[&str]) {
    for sub in std::iter::once(None).chain(subcommands.iter().map(Some)) {
        let mut c = Command::new(bin);
        c.args(sub).arg("--help");
        let out = c.output().expect("running --help");
        assert!(out.status.success(), "{bin} {sub:?} --help failed");
        let text = String::from_utf8(out.stdout).expect("help is text");
        let (mut in_examples, mut continued) = (false, false);
        for line in text.lines() {
            if !line.starts_with("Usage:") {
                assert!(
                    line.chars().count() <= 80,
                    "{bin} {sub:?}: {} columns: {line}",
                    line.chars().count()
                );
            }
            if line.starts_with("Example") {
                in_examples = true;
                continue;
            }
            if line.is_empty() {
                in_examples = false;
            }
            if in_examples {
                let t = line.trim_start();
                let command = commands
                    .iter()
                    .any(|c| t.starts_with(c) || t.contains(&format!("| {c}")));
                assert!(
                    continued || t.starts_with('#') || command || t.contains("=$("),
                    "{bin} {sub:?}: an example line that is not a whole command: {line:?}"
                );
                continued = line.ends_with('\\');
            }
        }
    }
}

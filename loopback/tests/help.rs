//! `xenvirtio-loopback --help` and each subcommand's help fit an 80-column terminal, and their examples are
//! whole commands (issue 16, item 8).

#[test]
fn help_fits_80_columns_and_examples_are_whole_commands() {
    xenvirtio_tests::help::check_help_fits(
        env!("CARGO_BIN_EXE_xenvirtio-loopback"),
        &["bench", "soak"],
        &["xenvirtio-loopback", "echo "],
    );
}

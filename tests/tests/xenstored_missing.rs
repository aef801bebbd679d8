//! A missing xenstored is a test failure that says how to fix it, never a silent skip. This
//! binary holds one test because it changes the process environment.

use xenvirtio_tests::xenstored::Xenstored;

#[test]
#[should_panic(expected = "run scripts/install-deps.sh")]
fn a_missing_daemon_fails_the_test_with_the_fix() {
    // SAFETY: this test binary runs a single test, and nothing else in the process reads or
    // writes the environment while it runs.
    unsafe { std::env::set_var("XENVIRTIO_XENSTORED", "/nonexistent/xenstored") };
    let _ = Xenstored::start();
}

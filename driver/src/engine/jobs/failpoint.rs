//! Failpoints for the crash tests of jobs: with the `failpoints` feature,
//! `STRATA_FAILPOINT=<name>` kills the process (SIGKILL, as a crash would)
//! the first time the job reaches the step of that name, e.g.
//! `engine::merge::fold_top::after_checkpoint`. Without the feature they
//! compile to nothing.

/// Names of every failpoint, for the tests that visit each.
pub const NAMES: [&str; 10] = [
    "engine::merge::fold_top::after_chunk",
    "engine::merge::fold_top::after_checkpoint",
    "engine::merge::fold_top::after_switch",
    "engine::merge::fold_frozen::after_build",
    "engine::merge::fold_frozen::after_rename",
    "engine::merge::fold_frozen::after_commit",
    "engine::flatten::fold_top::after_chunk",
    "engine::flatten::fold_top::after_checkpoint",
    "engine::flatten::fold_top::after_switch",
    "engine::merge::job::after_done",
];

/// Kills the process if `STRATA_FAILPOINT` names this point.
#[cfg(feature = "failpoints")]
pub(crate) fn hit(name: &str) {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("STRATA_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("failpoint {name}: killing the process");
        // SAFETY: signalling ourselves; nothing runs after it.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &str) {}

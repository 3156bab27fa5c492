//! Failpoints for the crash tests of jobs: with the `failpoints` feature,
//! `STRATA_FAILPOINT=<name>` kills the process (SIGKILL, as a crash would)
//! the first time the job reaches the step of that name, e.g.
//! `engine::merge::fold_top::after_checkpoint`, and [`on`] makes a test's
//! code run there (to change the pool under a job at an exact step).
//! Without the feature they compile to nothing.

/// Names of every failpoint, for the tests that visit each.
pub const NAMES: [&str; 11] = [
    "engine::merge::fold_top::after_chunk",
    "engine::merge::fold_top::after_checkpoint",
    "engine::merge::fold_top::after_switch",
    "engine::merge::fold_frozen::planned",
    "engine::merge::fold_frozen::after_build",
    "engine::merge::fold_frozen::after_rename",
    "engine::merge::fold_frozen::after_commit",
    "engine::flatten::fold_top::after_chunk",
    "engine::flatten::fold_top::after_checkpoint",
    "engine::flatten::fold_top::after_switch",
    "engine::merge::job::after_done",
];

/// Code a test runs at a failpoint.
#[cfg(feature = "failpoints")]
type Hook = Box<dyn Fn() + Send + Sync>;

#[cfg(feature = "failpoints")]
static HOOKS: std::sync::Mutex<Vec<(String, std::sync::Arc<Hook>)>> =
    std::sync::Mutex::new(Vec::new());

/// Runs `f` (once) when a job next reaches failpoint `name`.
#[cfg(feature = "failpoints")]
pub fn on(name: &str, f: impl Fn() + Send + Sync + 'static) {
    HOOKS
        .lock()
        .expect("hooks")
        .push((name.to_string(), std::sync::Arc::new(Box::new(f))));
}

/// Kills the process if `STRATA_FAILPOINT` names this point; runs the
/// hook set for it.
#[cfg(feature = "failpoints")]
pub(crate) fn hit(name: &str) {
    let hook = {
        let mut hooks = HOOKS.lock().expect("hooks");
        let at = hooks.iter().position(|(n, _)| n == name);
        at.map(|i| hooks.remove(i).1)
    };
    if let Some(f) = hook {
        f();
    }
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

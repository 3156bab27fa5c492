//! A crash at every step of a merge and a flatten: for each failpoint, a
//! child process (this test binary, with `STRATA_FAILPOINT` set and the
//! `failpoints` feature) starts the job and is killed by the failpoint;
//! the pool is reopened, the job resumes (or has rolled back and runs
//! again), and every volume and snapshot must hold exactly what it held
//! before, with `strata pool check` finding nothing wrong.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use strata::engine::jobs::FAILPOINTS;
use strata::engine::{BLOCK_SIZE, JobState, Pool, PoolOptions, SnapshotId, VolumeId};

const BLOCKS: u64 = 2048;

/// What the parent set up, to check against.
struct Scene {
    volume: VolumeId,
    contents: Vec<u8>,
    snapshots: Vec<(SnapshotId, Vec<u8>)>,
    /// What the child does to start the job.
    trigger: String,
}

fn fill(vol: &strata::engine::Volume, model: &mut [u8], seed: u64, every: u64) {
    let mut rng = common::Rng::new(seed);
    // Runs long enough to span several pieces of a step.
    for b in (0..BLOCKS).filter(|b| b % every == seed % every) {
        let mut data = vec![0u8; BLOCK_SIZE as usize];
        rng.fill(&mut data);
        vol.write(b * BLOCK_SIZE, &data, false).unwrap();
        model[(b * BLOCK_SIZE) as usize..((b + 1) * BLOCK_SIZE) as usize].copy_from_slice(&data);
    }
    vol.flush().unwrap();
}

fn options() -> PoolOptions {
    PoolOptions {
        jobs: strata::engine::JobConfig {
            // Small pieces: a step has many, so `after_chunk` can hit mid-way.
            step_bytes: 64 << 10,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Builds the state the failpoint's job starts from.
fn scene(dir: &Path, failpoint: &str) -> Scene {
    let pool = Pool::open(dir, options()).unwrap();
    let v = pool.create_volume(BLOCKS * BLOCK_SIZE).unwrap().id;
    let vol = pool.volume(v).unwrap();
    let mut model = vec![0u8; (BLOCKS * BLOCK_SIZE) as usize];
    fill(&vol, &mut model, 1, 1);
    let s1 = pool.create_snapshot(v).unwrap().id;
    let snap1 = model.clone();
    fill(&vol, &mut model, 2, 3);
    let s2 = pool.create_snapshot(v).unwrap().id;
    let snap2 = model.clone();
    fill(&vol, &mut model, 3, 5);
    drop(vol);
    let (trigger, snapshots) = if failpoint.contains("fold_frozen") {
        // s1's layer lies under s2's frozen one.
        (format!("delete {s1}"), vec![(s2, snap2)])
    } else if failpoint.contains("flatten") {
        (format!("flatten {v}"), vec![(s1, snap1), (s2, snap2)])
    } else {
        // s2's layer lies right under the top.
        (format!("delete {s2}"), vec![(s1, snap1)])
    };
    pool.close().unwrap();
    Scene {
        volume: v,
        contents: model,
        snapshots,
        trigger,
    }
}

fn child(dir: &str, trigger: &str) {
    let pool = Pool::open(Path::new(dir), options()).unwrap();
    let (what, id) = trigger.split_once(' ').unwrap();
    match what {
        "delete" => pool.delete_snapshot(id.parse().unwrap()).unwrap(),
        "flatten" => {
            pool.flatten(id.parse().unwrap()).unwrap();
        }
        other => panic!("unknown trigger {other}"),
    }
    pool.wait_for_jobs(Duration::from_secs(120)).unwrap();
    // Reached only if the failpoint never fired.
    std::process::exit(3);
}

fn check(pool: &Pool, scene: &Scene, ctx: &str) {
    let vol = pool.volume(scene.volume).unwrap();
    let mut got = vec![0u8; scene.contents.len()];
    vol.read(0, &mut got).unwrap();
    assert!(got == scene.contents, "{ctx}: the volume changed");
    for (s, want) in &scene.snapshots {
        let r = pool.open_snapshot(*s).unwrap();
        let mut got = vec![0u8; want.len()];
        r.read(0, &mut got).unwrap();
        assert!(got == *want, "{ctx}: snapshot {s} changed");
    }
}

#[test]
fn a_kill_at_every_step_of_a_merge_or_flatten_resumes_with_nothing_changed() {
    if let (Ok(dir), Ok(trigger)) = (
        std::env::var("STRATA_MERGE_CHILD"),
        std::env::var("STRATA_MERGE_TRIGGER"),
    ) {
        return child(&dir, &trigger);
    }
    if common::require(
        cfg!(feature = "failpoints"),
        "built without the `failpoints` feature (scripts/test enables it)",
    )
    .is_err()
    {
        return;
    }
    for (fs, scratch) in common::filesystems() {
        for name in FAILPOINTS {
            let dir = scratch.path().join(name.replace("::", "-"));
            std::fs::create_dir_all(&dir).unwrap();
            let scene = scene(&dir, name);
            let ctx = format!("{fs}, {name}");
            let status = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "a_kill_at_every_step_of_a_merge_or_flatten_resumes_with_nothing_changed",
                    "--nocapture",
                ])
                .env("STRATA_MERGE_CHILD", &dir)
                .env("STRATA_MERGE_TRIGGER", &scene.trigger)
                .env("STRATA_FAILPOINT", name)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "{ctx}: the child was not killed by the failpoint ({status})"
            );
            // Reopen: the job resumes and finishes; nothing changed.
            let pool = Pool::open(&dir, options()).unwrap();
            check(&pool, &scene, &format!("{ctx}, right after the kill"));
            assert!(
                pool.wait_for_jobs(Duration::from_secs(120)).unwrap(),
                "{ctx}: stuck"
            );
            for j in pool.jobs().unwrap() {
                assert_ne!(j.state, JobState::Failed, "{ctx}: {j:?}");
            }
            check(&pool, &scene, &format!("{ctx}, after the job resumed"));
            let expected_depth = if name.contains("flatten") { 1 } else { 2 };
            assert_eq!(
                pool.volume(scene.volume).unwrap().depth(),
                expected_depth,
                "{ctx}: the chain is shorter"
            );
            drop(pool);
            let report = strata::engine::check::check_pool(&dir, false).unwrap();
            assert!(
                report.is_clean(),
                "{ctx}: pool check: {:?}",
                report.findings
            );
            let pool = Pool::open(&dir, options()).unwrap();
            check(&pool, &scene, &format!("{ctx}, after another restart"));
        }
    }
}

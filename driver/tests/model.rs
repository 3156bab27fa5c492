//! Model-based test: random sequences of every engine operation, checked
//! against a plain in-memory copy of every volume and snapshot. Runs on the
//! default filesystem and on XFS with reflink (a loop image; root).
//! `STRATA_SOAK_STEPS=100000` runs longer; `STRATA_TEST_SEED` replays.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Rng;
use strata::engine::{
    BLOCK_SIZE, Error, JobConfig, JobState, Pool, PoolOptions, SnapshotId, SnapshotReader,
    VolumeId, ZeroFlags,
};

const MAX_VOLUMES: usize = 6;
const MAX_SNAPSHOTS: usize = 10;

/// Insertion-ordered (so a seed replays exactly; IDs are random).
#[derive(Default)]
struct Model {
    volumes: Ordered<VolumeId>,
    snapshots: Ordered<SnapshotId>,
    /// Readers kept open across deletions: (reader, expected contents).
    pinned: Vec<(SnapshotReader, Vec<u8>)>,
}

/// A tiny insertion-ordered map.
struct Ordered<K>(Vec<(K, Vec<u8>)>);

impl<K> Default for Ordered<K> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<K: Copy + PartialEq + std::fmt::Debug> Ordered<K> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }
    fn iter(&self) -> impl Iterator<Item = (&K, &Vec<u8>)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
    fn insert(&mut self, k: K, v: Vec<u8>) {
        self.0.push((k, v));
    }
    fn remove(&mut self, k: &K) {
        self.0.retain(|(x, _)| x != k);
    }
    fn get_mut(&mut self, k: &K) -> Option<&mut Vec<u8>> {
        self.0.iter_mut().find(|(x, _)| x == k).map(|(_, v)| v)
    }
}

impl<K: Copy + PartialEq + std::fmt::Debug> std::ops::Index<&K> for Ordered<K> {
    type Output = Vec<u8>;
    fn index(&self, k: &K) -> &Vec<u8> {
        &self.0.iter().find(|(x, _)| x == k).expect("key in model").1
    }
}

fn pick<K: Copy>(rng: &mut Rng, keys: impl Iterator<Item = K>) -> Option<K> {
    let keys: Vec<K> = keys.collect();
    if keys.is_empty() {
        None
    } else {
        Some(keys[rng.below(keys.len() as u64) as usize])
    }
}

/// A random byte range inside `size`: often block-aligned, sometimes not.
fn range(rng: &mut Rng, size: u64) -> (u64, u64) {
    let aligned = rng.chance(60);
    let max_len = if rng.chance(10) { size } else { 6 * BLOCK_SIZE };
    let mut off = rng.below(size);
    let mut len = 1 + rng.below(max_len);
    if aligned {
        off -= off % BLOCK_SIZE;
        len = len.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    }
    len = len.min(size - off);
    (off, len)
}

fn check_all(pool: &Pool, model: &Model, ctx: &str) {
    for (id, want) in model.volumes.iter() {
        let mut got = vec![0u8; want.len()];
        pool.volume(*id).unwrap().read(0, &mut got).unwrap();
        if got != *want {
            let first = got
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap();
            let last = got.len()
                - got
                    .iter()
                    .rev()
                    .zip(want.iter().rev())
                    .position(|(a, b)| a != b)
                    .unwrap();
            panic!(
                "{ctx}: volume {id} differs from the model in bytes {first}..{last} of {}",
                got.len()
            );
        }
    }
    for (id, want) in model.snapshots.iter() {
        let mut got = vec![0u8; want.len()];
        pool.open_snapshot(*id).unwrap().read(0, &mut got).unwrap();
        assert!(got == *want, "{ctx}: snapshot {id} differs from the model");
    }
    for (reader, want) in &model.pinned {
        let mut got = vec![0u8; want.len()];
        reader.read(0, &mut got).unwrap();
        assert!(
            got == *want,
            "{ctx}: pinned reader of {} differs",
            reader.id()
        );
    }
}

fn run_model(dir: &Path, rng: &mut Rng, steps: u64) {
    // A tiny checkpoint threshold folds journals all the time; the default
    // one keeps frozen layers' presence in the journal for long stretches.
    let journal_checkpoint_bytes = if rng.chance(50) { 8192 } else { 4 << 20 };
    // Flushes that log their data, that sync the layer files, or a mix.
    let sync_log_bytes = [0, 8192, 256 << 10][rng.below(3) as usize];
    // Short chains, so the depth policy's merges run all the time too.
    let opts = PoolOptions {
        journal_checkpoint_bytes,
        sync_log_bytes,
        jobs: JobConfig {
            default_max_chain_depth: 1 + rng.below(4) as u32,
            ..JobConfig::default()
        },
        ..Default::default()
    };
    let mut pool = Pool::open(dir, opts.clone()).unwrap();
    let mut m = Model::default();
    let trace = std::env::var_os("STRATA_MODEL_TRACE").is_some();
    for step in 0..steps {
        let ctx = format!("step {step}");
        let op = rng.below(100);
        let vol = pick(rng, m.volumes.keys().copied());
        if trace {
            eprintln!("{ctx}: op {op} vol {vol:?}");
        }
        match (op, vol) {
            (0..=4, _) | (_, None) if m.volumes.len() < MAX_VOLUMES => {
                let size = (1 + rng.below(64)) * BLOCK_SIZE * 4;
                let info = pool.create_volume(size).unwrap();
                m.volumes.insert(info.id, vec![0; size as usize]);
            }
            (_, None) => {}
            (5..=34, Some(v)) => {
                let data = m.volumes.get_mut(&v).unwrap();
                let (off, len) = range(rng, data.len() as u64);
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                let fua = rng.chance(10);
                if trace {
                    eprintln!("  write {off}+{len} fua={fua}");
                }
                pool.volume(v).unwrap().write(off, &buf, fua).unwrap();
                data[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            (35..=49, Some(v)) => {
                let data = &m.volumes[&v];
                let (off, len) = range(rng, data.len() as u64);
                let mut buf = vec![0u8; len as usize];
                pool.volume(v).unwrap().read(off, &mut buf).unwrap();
                assert!(
                    buf == data[off as usize..(off + len) as usize],
                    "{ctx}: read of {v}"
                );
            }
            (50..=54, Some(v)) => {
                let data = m.volumes.get_mut(&v).unwrap();
                let (off, len) = range(rng, data.len() as u64);
                if trace {
                    eprintln!("  trim {off}+{len}");
                }
                pool.volume(v).unwrap().trim(off, len).unwrap();
                let first = off.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
                let end = ((off + len) / BLOCK_SIZE) * BLOCK_SIZE;
                if first < end {
                    data[first as usize..end as usize].fill(0);
                }
            }
            (55..=58, Some(v)) => {
                let data = m.volumes.get_mut(&v).unwrap();
                let (off, len) = range(rng, data.len() as u64);
                let flags = ZeroFlags {
                    no_hole: rng.chance(50),
                    fast: false,
                };
                if trace {
                    eprintln!("  zero {off}+{len} {flags:?}");
                }
                pool.volume(v)
                    .unwrap()
                    .write_zeroes(off, len, flags)
                    .unwrap();
                data[off as usize..(off + len) as usize].fill(0);
            }
            (59..=60, Some(v)) => {
                let data = &m.volumes[&v];
                let (off, len) = range(rng, data.len() as u64);
                let mut pos = off;
                for e in pool.volume(v).unwrap().block_status(off, len).unwrap() {
                    if e.zero {
                        let bytes = &data[pos as usize..(pos + e.len) as usize];
                        assert!(
                            bytes.iter().all(|&b| b == 0),
                            "{ctx}: zero extent with data"
                        );
                    }
                    pos += e.len;
                }
                assert_eq!(pos, off + len, "{ctx}: block status covers the range");
            }
            (61..=66, Some(v)) => pool.volume(v).unwrap().flush().unwrap(),
            (67..=74, Some(v)) if m.snapshots.len() < MAX_SNAPSHOTS => {
                let s = pool.create_snapshot(v).unwrap();
                m.snapshots.insert(s.id, m.volumes[&v].clone());
            }
            (75..=79, _) if m.volumes.len() < MAX_VOLUMES => {
                if let Some(s) = pick(rng, m.snapshots.keys().copied()) {
                    let base = m.snapshots[&s].clone();
                    let grow = rng.below(3) * 4 * BLOCK_SIZE;
                    let size = base.len() as u64 + grow;
                    let c = pool.clone_snapshot(s, Some(size)).unwrap();
                    let mut data = base;
                    data.resize(size as usize, 0);
                    m.volumes.insert(c.id, data);
                } else if let Some(v) = vol {
                    let c = pool.clone_volume(v, None).unwrap();
                    m.volumes.insert(c.id, m.volumes[&v].clone());
                }
            }
            (80..=83, Some(v)) => {
                pool.delete_volume(v).unwrap();
                m.volumes.remove(&v);
                assert!(matches!(pool.volume(v), Err(Error::VolumeNotFound(_))));
            }
            (84..=88, _) => {
                if let Some(s) = pick(rng, m.snapshots.keys().copied()) {
                    if rng.chance(30) {
                        let reader = pool.open_snapshot(s).unwrap();
                        m.pinned.push((reader, m.snapshots[&s].clone()));
                    }
                    pool.delete_snapshot(s).unwrap();
                    m.snapshots.remove(&s);
                }
            }
            (89..=92, Some(v)) => {
                let data = m.volumes.get_mut(&v).unwrap();
                let grow = (1 + rng.below(4)) * BLOCK_SIZE;
                let new = data.len() as u64 + grow;
                pool.resize_volume(v, new).unwrap();
                data.resize(new as usize, 0);
            }
            (93..=95, _) => {
                // A restart ends every open export.
                m.pinned.clear();
                drop(pool);
                pool = Pool::open(dir, opts.clone()).unwrap();
                check_all(&pool, &m, &format!("{ctx} after reopen"));
            }
            // Merges and flattens run in the background while the steps
            // go on; contents never change, so every check must hold.
            (96, Some(v)) => {
                pool.merge(v, rng.below(4) as u32).unwrap();
            }
            (97, Some(v)) => {
                pool.flatten(v).unwrap();
            }
            (98, _) if rng.chance(30) => {
                assert!(
                    pool.wait_for_jobs(Duration::from_secs(60)).unwrap(),
                    "{ctx}: jobs stuck"
                );
                check_all(&pool, &m, &format!("{ctx} after jobs"));
            }
            (98, _) => m.pinned.clear(),
            _ => check_all(&pool, &m, &ctx),
        }
        if trace {
            check_all(&pool, &m, &format!("{ctx} (traced)"));
        }
    }
    check_all(&pool, &m, "end");
    assert!(
        pool.wait_for_jobs(Duration::from_secs(120)).unwrap(),
        "jobs stuck at the end"
    );
    check_all(&pool, &m, "end, after jobs");
    for j in pool.jobs().unwrap() {
        assert_ne!(j.state, JobState::Failed, "{j:?}");
    }
    // Everything deleted: no file may be left behind.
    for v in m.volumes.keys() {
        pool.delete_volume(*v).unwrap();
    }
    for s in m.snapshots.keys() {
        pool.delete_snapshot(*s).unwrap();
    }
    m.pinned.clear();
    assert!(pool.wait_for_jobs(Duration::from_secs(60)).unwrap());
    drop(pool);
    let left = std::fs::read_dir(dir.join("layers")).unwrap().count();
    assert_eq!(left, 0, "layer files left after deleting everything");
}

#[test]
fn random_operations_match_the_model_on_every_filesystem() {
    let steps = common::steps(4000);
    for (fs, scratch) in common::filesystems() {
        let mut rng = Rng::from_env(&format!("model on {fs}"));
        run_model(scratch.path(), &mut rng, steps);
    }
}

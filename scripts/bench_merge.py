#!/usr/bin/python3
"""Background merges beside foreground I/O, measured with fio's nbd engine
against `strata standalone`; prints tables, asserts nothing.

1. Merge throughput: a volume whose snapshot layer holds DATA of data under
   a nearly empty top; the snapshot is deleted and the fold into the top is
   timed, on the machine's disk (ext4 here: byte copies) and, as root, on
   XFS with reflink on a loop image (pointer copies). Run unthrottled
   (--job-rate 64GiB) to show the mechanism's speed, and at the default
   budget (128 MiB/s per job) to show what a node does by default.
2. Foreground latency: 4 KiB random reads and, separately, writes at a
   moderate, fixed rate (--rate-iops, queue depth 4) on the volume being
   merged, once while idle and once while the fold runs at the default
   budget; p99 completion latency compared.
3. Write flood: 4 KiB random writes at queue depth 32, unthrottled, on the
   volume being merged: how long the fold takes to finish anyway (the write
   allowance makes writes wait for it), and the writes' mean and p99
   latency against the same flood without a merge.

Usage: scripts/bench-merge [--data 2G] [--rate-iops 2000] [--seconds 10] [--rounds 3]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATA = os.path.join(ROOT, "target", "release", "strata")
MIB = 1 << 20


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


class Strata:
    def __init__(self, work, job_rate):
        self.work = work
        os.makedirs(work, exist_ok=True)
        # The node's state (and the unflushed logs in it) on a tmpfs, as
        # /run is on a node.
        self.state = tempfile.mkdtemp(prefix="strata-bench-state-", dir="/dev/shm")
        self.env = dict(os.environ, STRATA_CSI_ENDPOINT=f"unix://{work}/csi.sock")
        self.proc = subprocess.Popen(
            [STRATA, "standalone", "--pool", f"{work}/pool", "--csi-endpoint", f"unix://{work}/csi.sock",
             "--nbd-listen", f"unix://{work}/nbd.sock", "--metrics-listen", "127.0.0.1:0",
             "--state-dir", self.state, "--job-rate", job_rate, "--node-job-rate", job_rate],
            stderr=open(f"{work}/strata.log", "w"))
        for _ in range(400):
            if subprocess.run([STRATA, "volume", "list"], env=self.env, capture_output=True).returncode == 0:
                return
            time.sleep(0.05)
        sys.exit("strata did not start: " + open(f"{work}/strata.log").read())

    def cli(self, *args):
        out = subprocess.run([STRATA, *args, "-o", "json"], check=True, capture_output=True, env=self.env)
        return json.loads(out.stdout)

    def uri(self, volume):
        return f"nbd+unix:///{volume}?socket={self.work}/nbd.sock"

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.state, ignore_errors=True)

    def job(self, job_id):
        return next(j for j in self.cli("jobs") if j["id"] == job_id)

    def jobs(self):
        return self.cli("jobs")


def fio(uri, span, args, seconds=None, out="/tmp/strata-bench-merge.json"):
    timing = [f"--runtime={seconds}", "--time_based"] if seconds else []
    sh("fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={span}", *timing,
       "--output-format=json", f"--output={out}", *args,
       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.load(open(out))["jobs"][0]


def clat_ms(job, rw, pct="99.000000"):
    c = job[rw]["clat_ns"]
    return c["percentile"][pct] / 1e6, c["mean"] / 1e6


def prepare(s, data):
    """A volume whose snapshot layer holds `data` bytes; returns (volume,
    snapshot) after a small write on top."""
    v = s.cli("volume", "create", f"v-{time.time_ns()}", "--size", f"{2 * data}", "--block")[0]["id"]
    fio(s.uri(v), data, ["--rw=write", "--bs=1M", "--iodepth=8"])
    snap = s.cli("snapshot", "create", f"s-{time.time_ns()}", "--volume", v)[0]["id"]
    fio(s.uri(v), "64M", ["--rw=randwrite", "--bs=4k", "--iodepth=4", "--io_size=4M"])
    return v, snap


def start_fold(s, snap):
    """Deletes the snapshot; returns the fold job it queued."""
    before = {j["id"] for j in s.jobs()}
    sh(STRATA, "snapshot", "delete", snap, env=s.env, stdout=subprocess.DEVNULL)
    for _ in range(100):
        new = [j for j in s.jobs() if j["id"] not in before and j["kind"] == "fold"]
        if new:
            return new[0]["id"]
        time.sleep(0.05)
    sys.exit("no fold job was queued")


def wait_job(s, job_id, timeout=3600):
    t = time.time()
    while time.time() - t < timeout:
        j = s.job(job_id)
        if j["state"] in ("done", "failed"):
            return j, time.time() - t
        time.sleep(0.1)
    sys.exit(f"job {job_id} did not finish")


def throughput(work, fs, data):
    rows = []
    for label, rate in [("unthrottled", "64GiB"), ("default budget", "128MiB")]:
        s = Strata(os.path.join(work, f"throughput-{rate}"), rate)
        try:
            v, snap = prepare(s, data)
            job = start_fold(s, snap)
            j, secs = wait_job(s, job)
            moved = j["reflink_bytes"] + j["copy_bytes"]
            method = "reflink" if j["reflink_bytes"] >= j["copy_bytes"] else "copy"
            rows.append((fs, label, method, moved, secs))
        finally:
            s.stop()
    return rows


def latency(work, data, rate_iops, seconds, rounds):
    """Median over `rounds` fresh volumes of: p99 while idle, then p99 while
    the volume's fold runs."""
    import statistics
    s = Strata(os.path.join(work, "latency"), "128MiB")
    rows = []
    try:
        for rw in ("randread", "randwrite"):
            key = "read" if rw == "randread" else "write"
            args = [f"--rw={rw}", "--bs=4k", "--iodepth=4", f"--rate_iops={rate_iops}"]
            idle, busy, took = [], [], []
            for _ in range(rounds):
                v, snap = prepare(s, data)
                idle.append(clat_ms(fio(s.uri(v), data, args, seconds), key))
                job = start_fold(s, snap)
                busy.append(clat_ms(fio(s.uri(v), data, args, seconds), key))
                j, _ = wait_job(s, job)
                took.append((j["finished_unix_ns"] - j["created_unix_ns"]) / 1e9)
                sh(STRATA, "volume", "delete", v, env=s.env, stdout=subprocess.DEVNULL)
            med = lambda xs, i: statistics.median(x[i] for x in xs)
            rows.append((rw, (med(idle, 0), med(idle, 1)), (med(busy, 0), med(busy, 1)), statistics.median(took)))
    finally:
        s.stop()
    return rows


def flood(work, data, seconds):
    s = Strata(os.path.join(work, "flood"), "128MiB")
    try:
        args = ["--rw=randwrite", "--bs=4k", "--iodepth=32"]
        v, snap = prepare(s, data)
        alone = clat_ms(fio(s.uri(v), data, args, seconds), "write")
        v, snap = prepare(s, data)
        job = start_fold(s, snap)
        t = time.time()
        # Flood until the fold is done (or a long bound), in slices.
        lat = []
        while s.job(job)["state"] not in ("done", "failed") and time.time() - t < 600:
            lat.append(clat_ms(fio(s.uri(v), data, args, 5), "write"))
        j, _ = wait_job(s, job)
        took = time.time() - t
        worst99 = max(l[0] for l in lat) if lat else 0.0
        mean = sum(l[1] for l in lat) / len(lat) if lat else 0.0
        return alone, (worst99, mean), took, j
    finally:
        s.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="2G", help="data in the snapshot layer that is folded")
    ap.add_argument("--rate-iops", type=int, default=2000, help="moderate foreground load")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="fresh volumes per latency figure (median)")
    a = ap.parse_args()
    data = size(a.data)
    work = tempfile.mkdtemp(prefix="strata-bench-merge-", dir="/var/tmp")
    loop = None
    try:
        rows = throughput(work, "ext4 (this disk)", data)
        if os.geteuid() == 0:
            img = os.path.join(work, "xfs.img")
            with open(img, "wb") as f:
                f.truncate(4 * data + (1 << 30))
            sh("mkfs.xfs", "-q", "-f", "-m", "reflink=1", img)
            loop = os.path.join(work, "xfs")
            os.makedirs(loop)
            sh("mount", "-o", "loop", img, loop)
            rows += throughput(loop, "XFS reflink=1 (loop)", data)
        print(f"\nMerge throughput: fold of a snapshot layer holding {data >> 20} MiB into the top\n", flush=True)
        print(f"| filesystem | budget | method | moved | seconds | MiB/s |")
        print(f"|---|---|---|---|---|---|")
        for fs, label, method, moved, secs in rows:
            print(f"| {fs} | {label} | {method} | {moved >> 20} MiB | {secs:.2f} | {moved / MIB / secs:.0f} |")

        fss = [("ext4 (this disk)", work)] + ([("XFS reflink=1 (loop)", loop)] if loop else [])
        print(f"\nForeground 4 KiB I/O at {a.rate_iops} IOPS, queue depth 4, on the volume being merged "
              f"(default budget), {a.seconds} s each, median of {a.rounds} fresh volumes\n")
        print("| filesystem | workload | idle p99 | during merge p99 | ratio | idle mean | during merge mean | merge took |")
        print("|---|---|---|---|---|---|---|---|")
        for fs, where in fss:
            for rw, idle, busy, took in latency(where, min(data, 1 << 30), a.rate_iops, a.seconds, a.rounds):
                print(f"| {fs} | {rw} | {idle[0]:.3f} ms | {busy[0]:.3f} ms | {busy[0] / idle[0]:.2f}x "
                      f"| {idle[1]:.3f} ms | {busy[1]:.3f} ms | {took:.1f} s |", flush=True)

        alone, during, took, j = flood(work, data, a.seconds)
        print(f"\nWrite flood (4 KiB random writes, queue depth 32, unthrottled) on the volume being merged\n")
        print(f"fold of {data >> 20} MiB finished in {took:.1f} s under the flood (state: {j['state']})")
        print(f"write latency without a merge: p99 {alone[0]:.3f} ms, mean {alone[1]:.3f} ms")
        print(f"write latency during the merge: worst 5-s p99 {during[0]:.3f} ms ({during[0] / alone[0]:.2f}x), "
              f"mean {during[1]:.3f} ms ({during[1] / alone[1]:.2f}x)")
    finally:
        if loop:
            subprocess.run(["umount", loop])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

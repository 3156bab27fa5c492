#!/usr/bin/python3
"""NBD servers compared with fio's nbd engine, in one run.

Targets: Strata (a volume at chain depth 1; a volume and a snapshot export
at depth 32, with data spread across the layers), qemu-nbd (raw; qcow2
chains of depth 1 and 32 with the same spread) and nbdkit's file plugin.
Workloads: 4 KiB random read and write at queue depth 32, 4 KiB random
write with a flush after every write and after every 32 writes, 1 MiB
sequential read, and 4 KiB sequential write (for the coalescing question).
Runs are alternated between targets; each figure is the median of the
rounds. Server CPU time per operation comes from /proc/PID/stat.

All images are 1 GiB and fit in the page cache, so reads measure the CPU
efficiency of each server's data path, not the disk. After setup the page
cache is dropped and every image is read once, sequentially, through its
own server, so all start from the same cache state.

Usage: scripts/bench-nbd [--rounds 5] [--seconds 5] [--quick] [--only WORKLOAD]
                         [--strata-args '--sync-log 0']
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATA = os.path.join(ROOT, "target", "release", "strata")
GIB = 1 << 30
RUN = 64 << 10  # data spread over layers in 64 KiB runs
DEPTH = 32


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(path, what):
    for _ in range(200):
        if os.path.exists(path):
            return
        time.sleep(0.05)
    sys.exit(f"{what} did not start")


class Target:
    def __init__(self, name, uri, pid, writable=True):
        self.name, self.uri, self.pid, self.writable = name, uri, pid, writable


def strata_cli(env, *args):
    out = subprocess.run([STRATA, *args, "-o", "json"], check=True, capture_output=True, env=env).stdout
    return json.loads(out)


def spread_with_libnbd(uri, raw, layer, after_layer):
    """Writes the runs of `layer` (run r belongs to layer r % DEPTH) from
    `raw` through libnbd, then calls `after_layer`."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    with open(raw, "rb") as f:
        for off in range(layer * RUN, GIB, DEPTH * RUN):
            f.seek(off)
            h.pwrite(f.read(RUN), off)
    h.flush()
    h.shutdown()
    after_layer()


def setup(work, strata_args):
    raw = os.path.join(work, "raw.img")
    print("creating a 1 GiB random image ...", flush=True)
    with open(raw, "wb") as f:
        for _ in range(GIB // (16 << 20)):
            f.write(os.urandom(16 << 20))
    procs, targets = [], []

    # Strata
    env = dict(os.environ, STRATA_CSI_ENDPOINT=f"unix://{work}/csi.sock")
    p = subprocess.Popen(
        [STRATA, "standalone", "--pool", f"{work}/pool", "--csi-endpoint", f"unix://{work}/csi.sock",
         "--nbd-listen", f"unix://{work}/strata.sock", "--metrics-listen", "127.0.0.1:0",
         "--state-dir", f"{work}/state", *strata_args],
        stderr=open(f"{work}/strata.log", "w"))
    procs.append(p)
    wait_for(f"{work}/csi.sock", "strata")
    for _ in range(200):  # the socket is up before the pool is open
        if subprocess.run([STRATA, "volume", "list"], env=env, capture_output=True).returncode == 0:
            break
        time.sleep(0.05)
    suri = lambda e: f"nbd+unix:///{e}?socket={work}/strata.sock"
    d1 = strata_cli(env, "volume", "create", "d1", "--size", "1GiB")[0]["id"]
    sh("nbdcopy", raw, suri(d1))
    d32 = strata_cli(env, "volume", "create", "d32", "--size", "1GiB")[0]["id"]
    print("writing the depth-32 Strata volume ...", flush=True)
    for layer in range(DEPTH):
        last = layer == DEPTH - 1
        spread_with_libnbd(suri(d32), raw, layer,
                           (lambda: None) if last else
                           (lambda l=layer: strata_cli(env, "snapshot", "create", f"l{l}", "--volume", d32)))
    snap = strata_cli(env, "snapshot", "create", "snap32", "--volume", d32)[0]["id"]
    targets += [Target("strata d1", suri(d1), p.pid),
                Target("strata d32 (volume)", suri(d32), p.pid),
                Target("strata d32 snapshot", suri(snap), p.pid, writable=False)]

    # qemu-nbd raw, qcow2 d1, qcow2 d32
    qraw = os.path.join(work, "qemu.raw")
    shutil.copyfile(raw, qraw)
    q1 = os.path.join(work, "q1.qcow2")
    sh("qemu-img", "convert", "-O", "qcow2", raw, q1)
    print("writing the depth-32 qcow2 chain ...", flush=True)
    prev = None
    for layer in range(DEPTH):
        img = os.path.join(work, f"q32-{layer}.qcow2")
        if prev:
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", prev, "-F", "qcow2", img)
        else:
            sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(GIB))
        sock = os.path.join(work, "q-write.sock")
        w = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", sock, img])
        wait_for(sock, "qemu-nbd")
        spread_with_libnbd(f"nbd+unix:///?socket={sock}", raw, layer, lambda: None)
        w.terminate()
        w.wait()
        prev = img
    for name, fmt, img in [("qemu-nbd raw", "raw", qraw), ("qemu-nbd qcow2 d1", "qcow2", q1),
                           ("qemu-nbd qcow2 d32", "qcow2", prev)]:
        sock = os.path.join(work, name.replace(" ", "_") + ".sock")
        q = subprocess.Popen(["qemu-nbd", "-t", "-f", fmt, "-k", sock, img])
        procs.append(q)
        wait_for(sock, "qemu-nbd")
        targets.append(Target(name, f"nbd+unix:///?socket={sock}", q.pid))

    # nbdkit file
    kraw = os.path.join(work, "nbdkit.raw")
    shutil.copyfile(raw, kraw)
    sock = os.path.join(work, "nbdkit.sock")
    k = subprocess.Popen(["nbdkit", "-f", "-U", sock, "file", f"file={kraw}"])
    procs.append(k)
    wait_for(sock, "nbdkit")
    targets.append(Target("nbdkit file", f"nbd+unix:///?socket={sock}", k.pid))

    # The same starting point for everyone: data on disk in each server's
    # own layout, page cache dropped, then filled by one sequential read
    # through each server (how large writes left the cache would otherwise
    # decide the read figures).
    print("dropping caches and warming every image with a sequential read ...", flush=True)
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except PermissionError:
        print("(not root: page cache not dropped; figures depend on how images were written)")
    for t in targets:
        sh("nbdcopy", t.uri, "null:")
    return procs, targets


WORKLOADS = [
    # name, fio args, unit, writes?
    ("4k randread qd32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "iops", False),
    ("4k randwrite qd32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "iops", True),
    # fio's nbd engine refuses fdatasync= (EINVAL inside fio); fsync=N sends
    # the same NBD_CMD_FLUSH after every N writes.
    ("4k randwrite flush every write", ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--fsync=1"], "iops", True),
    # A database committing every write: one write in flight, then its flush.
    ("4k randwrite qd1 flush every write", ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"], "iops", True),
    ("4k randwrite flush every 32", ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--fsync=32"], "iops", True),
    ("1M seqread qd32", ["--rw=read", "--bs=1M", "--iodepth=32"], "MB/s", False),
    ("4k seqwrite qd32", ["--rw=write", "--bs=4k", "--iodepth=32"], "iops", True),
]


def fio(target, args, seconds, out):
    before = proc_cpu(target.pid)
    sh("fio", "--name=bench", "--ioengine=nbd", f"--uri={target.uri}", "--size=1G",
       f"--runtime={seconds}", "--time_based", "--output-format=json", f"--output={out}", *args,
       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu = proc_cpu(target.pid) - before
    job = json.load(open(out))["jobs"][0]
    ops = job["read"]["total_ios"] + job["write"]["total_ios"]
    iops = job["read"]["iops"] + job["write"]["iops"]
    mbps = (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 1e6
    return iops, mbps, cpu * 1e6 / max(ops, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s (a smoke run)")
    ap.add_argument("--only", default="", help="run only workloads whose name contains this")
    ap.add_argument("--strata-args", default="", help="more arguments for strata standalone")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.seconds = 1, 2
    work = tempfile.mkdtemp(prefix="strata-bench-nbd-", dir="/var/tmp")
    procs = []
    try:
        procs, targets = setup(work, a.strata_args.split())
        results = {}
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds} ...", flush=True)
            for wname, args, unit, writes in WORKLOADS:
                if a.only not in wname:
                    continue
                for t in targets:
                    if writes and not t.writable:
                        continue
                    iops, mbps, cpu = fio(t, args, a.seconds, os.path.join(work, "fio.json"))
                    results.setdefault((wname, t.name), []).append((iops, mbps, cpu))
        print(f"\n## NBD servers, fio nbd engine, {a.rounds} alternated rounds of {a.seconds} s, medians")
        only = f" --only '{a.only}'" if a.only else ""
        only += f" --strata-args '{a.strata_args}'" if a.strata_args else ""
        print(f"command: scripts/bench-nbd --rounds {a.rounds} --seconds {a.seconds}{only}")
        print("Images are 1 GiB and fit in the page cache: reads measure CPU efficiency.")
        print("Reference: nbdkit file for reads, qemu-nbd raw for writes.\n")
        print("| workload | target | result | server CPU µs/op | vs reference |")
        print("|----------|--------|-------:|-----------------:|-------------:|")
        for wname, args, unit, writes in WORKLOADS:
            if a.only not in wname:
                continue
            ref_name = "qemu-nbd raw" if writes else "nbdkit file"
            med = {}
            for t in targets:
                runs = results.get((wname, t.name))
                if runs:
                    value = statistics.median(x[0] if unit == "iops" else x[1] for x in runs)
                    cpu = statistics.median(x[2] for x in runs)
                    med[t.name] = (value, cpu)
            ref = med[ref_name][0]
            for name, (value, cpu) in med.items():
                shown = f"{value:.0f} IOPS" if unit == "iops" else f"{value:.0f} MB/s"
                print(f"| {wname} | {name} | {shown} | {cpu:.1f} | {value / ref:.2f}x |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""kube-fim-agent benchmark helpers.

  measure.py tree ROOT FILES [mixed|small]
                                      generate a tree of FILES files of mixed sizes,
                                      or of 0-2 KiB in 10,000 directories
  measure.py watch BIN POLICY ROOT STATE N
                                      real-time latency (write -> change line) over N
                                      writes, then idle CPU of `watch` over 5 s
  measure.py foreground SECONDS ROUNDS [--pods AGENT_MCPU FG_MCPU] -- SCAN_COMMAND...
                                      throughput of a CPU-bound job at normal priority
                                      (one sha256 worker per core) alone and while
                                      SCAN_COMMAND runs over and over, alternated
                                      ROUNDS times; prints each ratio and the median.
                                      --pods: the scan and the job each in a CPU cgroup
                                      of its own, weighted as the kubelet weights two
                                      pods requesting AGENT_MCPU and FG_MCPU millicores
                                      (root; cgroup v2 cpu.weight or v1 cpu.shares)
"""

import hashlib
import json
import multiprocessing
import os
import statistics
import threading
import random
import select
import signal
import socket
import subprocess
import sys
import time


def tree(root, files, profile="mixed"):
    """mixed: ~100 files per directory, sizes skewed like /usr: mostly small
    files, some of tens of KiB, a few of hundreds of KiB and MiB.
    small: files of 0-2 KiB in 10,000 directories (like a container layer's
    /usr/share or /var/lib/dpkg)."""
    rng = random.Random(42)
    pool = os.urandom(8 << 20)
    total = 0
    per_dir = 100 if profile == "mixed" else max(1, files // 10000)
    for i in range(files):
        leaf = i // per_dir
        d = os.path.join(root, "data", f"d{leaf // 100:03d}", f"d{leaf:05d}")
        if i % per_dir == 0:
            os.makedirs(d, exist_ok=True)
        r = rng.random()
        if profile == "small":
            size = rng.randint(0, 2 << 10)
        elif r < 0.75:
            size = rng.randint(0, 8 << 10)
        elif r < 0.97:
            size = rng.randint(8 << 10, 64 << 10)
        elif r < 0.998:
            size = rng.randint(64 << 10, 512 << 10)
        else:
            size = rng.randint(512 << 10, 4 << 20)
        off = rng.randint(0, len(pool) - size)
        with open(os.path.join(d, f"f{i:07d}"), "wb") as f:
            f.write(i.to_bytes(8, "little"))
            f.write(pool[off:off + size])
        total += size + 8
    print(f"tree: {files} files ({profile}), {total / 1e6:.0f} MB in {root}/data")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_status(addr, path):
    host, port = addr.split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n".encode())
            data = s.recv(64)
            return int(data.split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def watch(binary, policy, root, state, n):
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [binary, "watch", "--policy", policy, "--root", root, "--state", state,
         "--output", "json", "--metrics-addr", addr],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    try:
        t0 = time.monotonic()
        while http_status(addr, "/readyz") != 200:
            if proc.poll() is not None:
                sys.exit(f"watch exited: {proc.returncode}")
            if time.monotonic() - t0 > 600:
                sys.exit("watch not ready after 600 s")
            time.sleep(0.05)
        startup = time.monotonic() - t0
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        buf = b""

        def lines(timeout):
            nonlocal buf
            out = []
            end = time.monotonic() + timeout
            while not out:
                left = end - time.monotonic()
                if left <= 0:
                    break
                r, _, _ = select.select([fd], [], [], left)
                if r:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        break
                    buf += chunk
                    *full, buf = buf.split(b"\n")
                    out += [json.loads(l) for l in full if l.strip()]
            return out

        lines(0.5)  # a Startup report, if any
        data = os.path.join(root, "data")
        dirs = sorted(os.listdir(data))
        lat = []
        for i in range(n):
            sub = os.path.join(data, dirs[i % len(dirs)])
            leaf = sorted(os.listdir(sub))[0]
            target = os.path.join(sub, leaf, sorted(os.listdir(os.path.join(sub, leaf)))[i % 50])
            host_path = "/" + os.path.relpath(target, root)
            t = time.monotonic()
            with open(target, "ab") as f:
                f.write(b"x")
            got = None
            while got is None:
                ls = lines(10)
                if not ls:
                    sys.exit(f"no change line within 10 s for {host_path}")
                for c in ls:
                    if c.get("path") == host_path:
                        got = time.monotonic()
            lat.append((got - t) * 1000)
        # Idle: nothing changes for 5 s.
        time.sleep(0.5)
        hz = os.sysconf("SC_CLK_TCK")
        c0, w0 = cpu_ticks(proc.pid), time.monotonic()
        time.sleep(5)
        c1, w1 = cpu_ticks(proc.pid), time.monotonic()
        idle = (c1 - c0) / hz / (w1 - w0) * 100
        hwm = status_kb(proc.pid, "VmHWM")
        rss = status_kb(proc.pid, "VmRSS")
        print(f"watch_startup_s={startup:.2f}")
        print(f"latency_ms_p50={pct(lat, 50):.0f} latency_ms_p99={pct(lat, 99):.0f} "
              f"latency_ms_max={max(lat):.0f} n={n}")
        print(f"idle_cpu_pct={idle:.2f} idle_cpu_ticks={c1 - c0} over={w1 - w0:.1f}s")
        print(f"watch_peak_rss_kb={hwm} watch_rss_kb={rss}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


class _Pods:
    """Two sibling CPU cgroups, `agent` and `foreground`, weighted from CPU
    requests as the kubelet weights pods: shares = millicores * 1024 / 1000
    (at least 2), on cgroup v2 cpu.weight = 1 + (shares - 2) * 9999 / 262142.
    Between sibling cgroups nice and SCHED_IDLE do not act: on a node, the
    weights are what bound the agent against the other pods."""

    def __init__(self, agent_mcpu, fg_mcpu):
        v2 = "/sys/fs/cgroup"
        if os.path.exists(f"{v2}/cgroup.controllers"):
            with open(f"{v2}/cgroup.controllers") as f:
                if "cpu" not in f.read().split():
                    sys.exit("foreground --pods: no cpu controller in cgroup v2")
            self.base = f"{v2}/kube-fim-bench"
            os.makedirs(self.base, exist_ok=True)
            for d in (v2, self.base):
                with open(f"{d}/cgroup.subtree_control", "w") as f:
                    f.write("+cpu")
            knob, value = "cpu.weight", lambda s: 1 + (s - 2) * 9999 // 262142
        elif os.path.isdir(f"{v2}/cpu"):
            self.base = f"{v2}/cpu/kube-fim-bench"
            knob, value = "cpu.shares", lambda s: s
        else:
            sys.exit("foreground --pods: no CPU cgroup controller mounted")
        self.weights = {}
        for name, mcpu in (("agent", agent_mcpu), ("foreground", fg_mcpu)):
            os.makedirs(f"{self.base}/{name}", exist_ok=True)
            shares = max(2, mcpu * 1024 // 1000)
            with open(f"{self.base}/{name}/{knob}", "w") as f:
                f.write(str(value(shares)))
            self.weights[name] = f"{knob}={value(shares)} ({mcpu}m)"

    def enter(self, name, pid=0):
        with open(f"{self.base}/{name}/cgroup.procs", "w") as f:
            f.write(str(pid or os.getpid()))

    def close(self):
        for name in ("agent", "foreground"):
            # Empty by now: every process of the round has exited.
            try:
                os.rmdir(f"{self.base}/{name}")
            except OSError:
                pass
        try:
            os.rmdir(self.base)
        except OSError:
            pass


def _hash_worker(seconds, out):
    buf = b"x" * (1 << 20)
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        hashlib.sha256(buf).digest()
        n += 1
    out.put(n)


def _throughput(seconds, pods=None):
    """MiB/s sha256'd by one worker process per core, at normal priority (in
    the `foreground` cgroup of `pods`)."""
    out = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_hash_worker, args=(seconds, out))
             for _ in range(os.cpu_count() or 1)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
        if pods:
            pods.enter("foreground", p.pid)
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return total / (time.monotonic() - t0)


def foreground(seconds, rounds, scan, pods=None):
    """The foreground job alone, then while scans run back to back (the agent
    as the chart runs it: its own priority, its default threads), ROUNDS
    times; the ratio of each pair. With `pods`, each in its pod's cgroup."""
    ratios, shares, scans, scan_cpu = [], [], 0, 0.0
    if pods:
        print(f"pods: agent {pods.weights['agent']}, foreground {pods.weights['foreground']}")
    for r in range(rounds):
        alone = _throughput(seconds, pods)
        stop = threading.Event()
        count, used, current = [0], [0.0], [None]
        lock = threading.Lock()

        def loop():
            while True:
                with lock:
                    if stop.is_set():
                        return
                    # In this session (a new one would be a scheduling
                    # group of its own under autogroup, sharing the CPU
                    # with the foreground job whatever its priority).
                    p = subprocess.Popen(
                        scan, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        preexec_fn=(lambda: pods.enter("agent")) if pods else None)
                    current[0] = p
                _, status, ru = os.wait4(p.pid, 0)
                p.returncode = status
                used[0] += ru.ru_utime + ru.ru_stime
                if status == 0:
                    count[0] += 1

        t = threading.Thread(target=loop)
        t.start()
        time.sleep(0.5)  # the scan under way
        busy = _throughput(seconds, pods)
        with lock:
            stop.set()
            if current[0] is not None and current[0].returncode is None:
                # A scan starved by the foreground job is not waited for.
                current[0].kill()
        t.join()
        cpu = used[0]
        scans += count[0]
        scan_cpu += cpu
        ratios.append(busy / alone)
        # What the scan took of the machine meanwhile: a bound on what the
        # foreground lost to it that the machine's other load does not blur.
        share = cpu / (seconds * (os.cpu_count() or 1))
        shares.append(share)
        print(f"foreground round {r + 1}: alone {alone:.1f} MiB/s, with scans {busy:.1f} MiB/s, "
              f"ratio {busy / alone:.3f} ({count[0]} scans finished, {cpu:.2f} s of scan CPU, "
              f"{share * 100:.1f}% of the CPU time)")
    med = statistics.median(ratios)
    print(f"foreground_ratio_median={med:.3f} foreground_loss_pct={(1 - med) * 100:.1f} "
          f"min={min(ratios):.3f} max={max(ratios):.3f} rounds={rounds} scans={scans} "
          f"scan_cpu_share_pct={statistics.median(shares) * 100:.1f}")


if __name__ == "__main__":
    if sys.argv[1] == "tree":
        tree(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
    elif sys.argv[1] == "watch":
        watch(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    elif sys.argv[1] == "foreground" and "--" in sys.argv[4:]:
        sep = sys.argv.index("--", 4)
        opts, pods = sys.argv[4:sep], None
        if opts:
            if len(opts) != 3 or opts[0] != "--pods":
                sys.exit(__doc__)
            pods = _Pods(int(opts[1]), int(opts[2]))
        try:
            foreground(float(sys.argv[2]), int(sys.argv[3]), sys.argv[sep + 1:], pods)
        finally:
            if pods:
                pods.close()
    else:
        sys.exit(__doc__)

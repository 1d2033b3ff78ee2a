#!/usr/bin/env python3
"""Cost of process attribution (`make bench-attribution`, needs root).

On the generated host tree (measure.py tree, BENCH_FILES files, 100 per
directory), `watch` runs twice: with inotify (processAttribution off) and
with fanotify (on). For each:
  - kernel objects: inotify watches and fanotify marks, counted from the
    agent's /proc/PID/fdinfo (what the kernel really holds), and the change of
    the kernel's unreclaimable slab (/proc/meminfo SUnreclaim) from before the
    agent started to after it was ready (noisy on a shared machine);
  - CPU per 1,000 events: BENCH_EVENTS files are rewritten one by one, each a
    close-after-write event and one Modified change line; the agent's
    utime+stime until the last line arrived, per 1,000.
  - CPU per 1,000 unrelated writes: BENCH_UNRELATED small files written
    beside the monitored tree on the same file system (as container logs and
    image pulls are on a node), none of them monitored; the agent's CPU from
    the first write to 1 s after the last, per 1,000: utime+stime (10 ms
    ticks) and the scheduler's nanoseconds on CPU of all its threads
    (/proc/PID/task/*/schedstat), and the fanotify events the kernel
    delivered to it (kube_fim_agent_attribution_events_total; a file system
    mark would deliver every write).

Usage: attribution.py BINARY WORKDIR
"""
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def meminfo_kb(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def cpu_ns(pid):
    """Nanoseconds on CPU of every thread of the process (schedstat)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def metric(addr, name):
    """The value of an unlabelled sample on the agent's /metrics, or None."""
    host, port = addr.split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(f"GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def kernel_objects(pid):
    watches = marks = 0
    fd_dir = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(fd_dir):
        try:
            with open(os.path.join(fd_dir, fd)) as f:
                for line in f:
                    if line.startswith("inotify wd:"):
                        watches += 1
                    elif line.startswith("fanotify ") and "mflags" in line:
                        marks += 1
        except OSError:
            pass
    return watches, marks


def run(binary, work, attribution, events):
    root = os.path.join(work, "root")
    state = os.path.join(work, f"state-{attribution}")
    policy = os.path.join(work, f"policy-{attribution}.yaml")
    with open(policy, "w") as f:
        f.write(
            "apiVersion: fim.kube-fim.io/v1alpha1\nkind: FileIntegrityPolicy\n"
            "metadata:\n  name: bench\nspec:\n  debounce: 50ms\n"
            f"  processAttribution: {'true' if attribution else 'false'}\n"
            "  paths:\n    - name: data\n      path: /data\n      recursive: true\n"
        )
    subprocess.run([binary, "baseline", "--policy", policy, "--root", root, "--state", state],
                   check=True, stdout=subprocess.DEVNULL)
    addr = f"127.0.0.1:{measure.free_port()}"
    slab0 = meminfo_kb("SUnreclaim")
    proc = subprocess.Popen(
        [binary, "watch", "--policy", policy, "--root", root, "--state", state,
         "--output", "json", "--metrics-addr", addr],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    try:
        while measure.http_status(addr, "/readyz") != 200:
            if proc.poll() is not None:
                sys.exit(f"watch exited: {proc.returncode}")
            time.sleep(0.05)
        time.sleep(1)
        watches, marks = kernel_objects(proc.pid)
        slab = meminfo_kb("SUnreclaim") - slab0
        rss = measure.status_kb(proc.pid, "VmRSS")
        files = sorted(
            os.path.join(dp, n)
            for dp, _, ns in os.walk(os.path.join(root, "data")) for n in ns
        )[:events]
        unrelated = int(os.environ.get("BENCH_UNRELATED", "20000"))
        beside = os.path.join(work, "root", f"unrelated-{attribution}")
        os.makedirs(beside, exist_ok=True)
        events0 = metric(addr, "kube_fim_agent_attribution_events_total")
        ticks0, ns0 = measure.cpu_ticks(proc.pid), cpu_ns(proc.pid)
        for i in range(unrelated):
            with open(os.path.join(beside, f"u{i % 1000}"), "wb") as f:
                f.write(b"x")
        time.sleep(1)
        unrelated_cpu = (measure.cpu_ticks(proc.pid) - ticks0) / TICK
        unrelated_ns = cpu_ns(proc.pid) - ns0
        events1 = metric(addr, "kube_fim_agent_attribution_events_total")
        delivered = None if events0 is None or events1 is None else int(events1 - events0)
        ticks0 = measure.cpu_ticks(proc.pid)
        t0 = time.monotonic()
        for i, p in enumerate(files):
            with open(p, "ab") as f:
                f.write(b"%d" % i)
        seen = attributed = 0
        for line in proc.stdout:
            c = json.loads(line)
            seen += 1
            attributed += "process" in c
            if seen >= len(files):
                break
        cpu = (measure.cpu_ticks(proc.pid) - ticks0) / TICK
        wall = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait()
    return {
        "mechanism": "fanotify" if attribution else "inotify",
        "inotify_watches": watches,
        "fanotify_marks": marks,
        "slab_delta_kib": slab,
        "rss_kib": rss,
        "events": len(files),
        "attributed": attributed,
        "cpu_s_per_1000": round(cpu * 1000 / len(files), 3),
        "unrelated_writes": unrelated,
        "unrelated_cpu_ms_per_1000": round(unrelated_cpu * 1e6 / unrelated, 2),
        "unrelated_sched_ms_per_1000": round(unrelated_ns / 1e3 / unrelated, 3),
        "unrelated_events_delivered": delivered,
        "wall_s": round(wall, 2),
    }


def main():
    binary, work = sys.argv[1], sys.argv[2]
    files = int(os.environ.get("BENCH_FILES", "100000"))
    events = int(os.environ.get("BENCH_EVENTS", "5000"))
    if not os.path.isdir(os.path.join(work, "root", "data")):
        if os.environ.get("BENCH_TINY"):
            # The same layout with 8-byte files: kernel objects depend on the
            # directories, and hashing does not drown the per-event cost.
            for i in range(files):
                d = os.path.join(work, "root", "data", f"d{i // 10000:02d}", f"d{i // 100:04d}")
                if i % 100 == 0:
                    os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
                    f.write(i.to_bytes(8, "little"))
        else:
            measure.tree(os.path.join(work, "root"), files)
    dirs = sum(1 for _ in os.walk(os.path.join(work, "root", "data")))
    print(f"tree: {files} files in {dirs} directories")
    for attribution in (False, True):
        r = run(binary, work, attribution, events)
        print(json.dumps(r))
        delivered = r["unrelated_events_delivered"]
        print(
            f"attribution {'on (fanotify)' if attribution else 'off (inotify)'}: "
            f"{r['unrelated_sched_ms_per_1000']} ms agent CPU per 1,000 unrelated writes "
            f"({r['unrelated_cpu_ms_per_1000']} ms by utime+stime), "
            f"{'-' if delivered is None else delivered} fanotify events delivered "
            f"for {r['unrelated_writes']} writes (target <= 1 ms)"
        )


if __name__ == "__main__":
    main()

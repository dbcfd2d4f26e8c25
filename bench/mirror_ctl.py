#!/usr/bin/env python3
"""Mirror helpers for bench/run.sh --mirror: drive a qcowfs mirror job over the mount's
control socket and a QEMU blockdev-mirror over qemu-storage-daemon's QMP socket, and time
each from the start command to the ready state. Prints one line of results on stdout;
errors go to stderr with a non-zero exit.

  mirror_ctl.py qcowfs-start SOCK JOB_JSON
      sends mirror-start, returns once the job runs; prints the job id.
  mirror_ctl.py qcowfs-ready SOCK JOB_JSON [TIMEOUT_S [PID]]
      sends mirror-start, polls mirror-status every POLL_S until "ready"; prints
      "SECONDS BYTES_DONE" (seconds from sending mirror-start until the first status that
      reports ready), and a third column: the seconds until mirror-start replied (target
      opened or created, job running), and a fourth: the CPU seconds (user + system) PID
      used meanwhile (0 without PID). Fails if the job fails or the timeout passes.
  mirror_ctl.py qcowfs-watch SOCK JOB_JSON OUT_FILE DELAY_S TIMEOUT_S
      sleeps DELAY_S, sends mirror-start, then polls the job every 10 ms until it is ready
      (or ends, or TIMEOUT_S passed); writes "STATE SECONDS" to OUT_FILE (seconds from
      sending mirror-start).
  mirror_ctl.py qcowfs-ready-wait SOCK ID TIMEOUT_S
      waits until the running job is ready; fails if it ends otherwise or times out.
  mirror_ctl.py qcowfs-rss SOCK JOB_JSON PID SECONDS
      sends mirror-start, samples VmRSS of PID and the job's status every 20 ms until the
      job is ready or SECONDS passed; prints "PEAK_KIB STATE SECONDS BYTES_DONE".
  mirror_ctl.py qcowfs-cmd SOCK CMD ARGS_JSON
      one control request; prints the result JSON.
  mirror_ctl.py qmp-mirror SOCK KIND [ARGS...] [TIMEOUT_S]
      KIND qcow2 PATH | raw PATH | nbd SOCKET EXPORT: blockdev-add the target, then
      blockdev-mirror device=src sync=full (tool defaults otherwise: granularity, buf-size),
      wait for BLOCK_JOB_READY; prints "SECONDS OFFSET SECONDS_TO_MIRROR": seconds from
      sending blockdev-add of the target until the event, the job's offset, and the
      seconds until blockdev-mirror was sent, and the CPU seconds of the daemon meanwhile
      (its PID in the environment variable BENCH_PID; 0 without). Then block-job-cancel (after ready: a soft
      cancel, the target is flushed and left an exact copy), BLOCK_JOB_COMPLETED,
      blockdev-del of the target nodes (the caller stops the daemon).
  mirror_ctl.py timed CMD [ARGS...]
      runs CMD; prints "SECONDS - - CPU_SECONDS" (wall time; user + system CPU of CMD).
  mirror_ctl.py qmp-rss SOCK PID SECONDS KIND [ARGS...]
      the same job, but samples VmRSS of PID every 20 ms until BLOCK_JOB_READY or SECONDS
      passed; prints "PEAK_KIB STATE SECONDS OFFSET", then force-cancels the job.
"""
import json
import os
import resource
import socket
import subprocess
import sys
import time

POLL_S = 0.002
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """user + system CPU seconds of PID (all threads), or 0 if PID is not given."""
    if not pid:
        return 0.0
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def die(msg):
    sys.stderr.write("mirror_ctl.py: %s\n" % msg)
    sys.exit(1)


class Lines:
    """Newline-delimited JSON over a Unix socket."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""

    def send(self, obj):
        self.s.sendall(json.dumps(obj).encode() + b"\n")

    def recv(self, deadline=None):
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.s.settimeout(left)
            chunk = self.s.recv(65536)
            if not chunk:
                die("connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


# --- qcowfs -------------------------------------------------------------------------------

def qcowfs_call(conn, cmd, args):
    conn.send({"cmd": cmd, "args": args})
    r = conn.recv()
    if not r.get("ok"):
        die("%s: %s" % (cmd, r.get("error")))
    res = r["result"]
    return json.loads(res) if isinstance(res, str) else res


def qcowfs_status(conn, job_id):
    return qcowfs_call(conn, "mirror-status", {"id": job_id})


def cmd_qcowfs_start(sock, job_json):
    conn = Lines(sock)
    r = qcowfs_call(conn, "mirror-start", json.loads(job_json))
    print(r["id"])


def cmd_qcowfs_ready(sock, job_json, timeout=600.0, pid=0):
    conn = Lines(sock)
    job = json.loads(job_json)
    c0 = cpu_s(pid)
    t0 = time.monotonic()
    r = qcowfs_call(conn, "mirror-start", job)
    t_started = time.monotonic() - t0
    job_id = r["id"]
    deadline = t0 + timeout
    while True:
        st = qcowfs_status(conn, job_id)
        if st["state"] == "ready":
            t = time.monotonic() - t0
            print("%.4f %d %.4f %.2f" % (t, st["bytes_done"], t_started, cpu_s(pid) - c0))
            return
        if st["state"] != "running":
            die("job %s %s: %s" % (job_id, st["state"], st.get("error")))
        if time.monotonic() > deadline:
            die("job %s not ready after %.0f s (%s)" % (job_id, timeout, json.dumps(st)))
        time.sleep(POLL_S)


def cmd_qcowfs_watch(sock, job_json, out, delay, timeout):
    time.sleep(delay)
    conn = Lines(sock)
    t0 = time.monotonic()
    try:
        r = qcowfs_call(conn, "mirror-start", json.loads(job_json))
    except SystemExit:
        with open(out, "w") as f:
            f.write("start-failed -\n")
        raise
    job_id = r["id"]
    deadline = t0 + timeout
    state = "running"
    while time.monotonic() < deadline:
        st = qcowfs_status(conn, job_id)
        state = st["state"]
        if state != "running":
            break
        time.sleep(0.01)
    with open(out, "w") as f:
        f.write("%s %.3f\n" % (state, time.monotonic() - t0))


def cmd_qcowfs_ready_wait(sock, job_id, timeout):
    conn = Lines(sock)
    deadline = time.monotonic() + timeout
    while True:
        st = qcowfs_status(conn, job_id)
        if st["state"] == "ready":
            return
        if st["state"] != "running":
            die("job %s %s: %s" % (job_id, st["state"], st.get("error")))
        if time.monotonic() > deadline:
            die("job %s not ready after %.0f s" % (job_id, timeout))
        time.sleep(0.01)


def vmrss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cmd_qcowfs_rss(sock, job_json, pid, secs):
    conn = Lines(sock)
    t0 = time.monotonic()
    peak = vmrss_kib(pid)
    r = qcowfs_call(conn, "mirror-start", json.loads(job_json))
    job_id = r["id"]
    deadline = t0 + secs
    while True:
        peak = max(peak, vmrss_kib(pid))
        st = qcowfs_status(conn, job_id)
        if st["state"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    peak = max(peak, vmrss_kib(pid))
    if st["state"] not in ("running", "ready"):
        die("job %s %s: %s" % (job_id, st["state"], st.get("error")))
    print("%d %s %.2f %d" % (peak, st["state"], time.monotonic() - t0, st["bytes_done"]))


def cmd_qcowfs_cmd(sock, cmd, args):
    conn = Lines(sock)
    print(json.dumps(qcowfs_call(conn, cmd, json.loads(args))))


# --- QMP ----------------------------------------------------------------------------------

class Qmp:
    def __init__(self, path):
        self.c = Lines(path)
        greeting = self.c.recv()
        if "QMP" not in greeting:
            die("not a QMP greeting: %r" % greeting)
        self.events = []
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.c.send({"execute": name, "arguments": args})
        while True:
            r = self.c.recv()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                die("QMP %s: %s" % (name, r["error"].get("desc")))
            return r.get("return")

    def event(self, name, timeout):
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e["event"] == name:
                return self.events.pop(i)
        while True:
            try:
                r = self.c.recv(deadline)
            except TimeoutError:
                die("no %s event within %.0f s" % (name, timeout))
            if "event" not in r:
                continue
            if r["event"] == name:
                return r
            if r["event"] == "BLOCK_JOB_COMPLETED" and name == "BLOCK_JOB_READY":
                die("job ended before ready: %r" % r)
            self.events.append(r)


def cmd_qmp_mirror(sock, kind, rest, pid=0):
    if kind in ("qcow2", "raw"):
        path, rest = rest[0], rest[1:]
    elif kind == "nbd":
        nbd_sock, export, rest = rest[0], rest[1], rest[2:]
    else:
        die("unknown target kind %s" % kind)
    timeout = float(rest[0]) if rest else 600.0
    q = Qmp(sock)
    c0 = cpu_s(pid)
    t0 = time.monotonic()
    nodes = []
    if kind == "nbd":
        q.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
              server={"type": "unix", "path": nbd_sock}, export=export)
        nodes = ["tgt"]
    else:
        q.cmd("blockdev-add", driver="file", filename=path, **{"node-name": "tgtfile"})
        nodes = ["tgtfile"]
        if kind == "qcow2":
            q.cmd("blockdev-add", driver="qcow2", file="tgtfile", **{"node-name": "tgt"})
            nodes.insert(0, "tgt")
        else:
            q.cmd("blockdev-add", driver="raw", file="tgtfile", **{"node-name": "tgt"})
            nodes.insert(0, "tgt")
    t1 = time.monotonic()
    q.cmd("blockdev-mirror", **{"job-id": "m0"}, device="src", target="tgt", sync="full")
    ev = q.event("BLOCK_JOB_READY", timeout)
    t2 = time.monotonic()
    c2 = cpu_s(pid)
    jobs = q.cmd("query-block-jobs")
    done = jobs[0]["offset"] if jobs else ev["data"].get("offset", 0)
    print("%.4f %d %.4f %.2f" % (t2 - t0, done, t1 - t0, c2 - c0))
    sys.stdout.flush()
    q.cmd("block-job-cancel", device="m0")
    ev = q.event("BLOCK_JOB_COMPLETED", 120)
    if ev["data"].get("error"):
        die("mirror completed with error: %s" % ev["data"]["error"])
    for n in nodes:
        q.cmd("blockdev-del", **{"node-name": n})


def cmd_qmp_rss(sock, pid, secs, kind, rest):
    q = Qmp(sock)
    t0 = time.monotonic()
    peak = vmrss_kib(pid)
    nodes = ["tgt"]
    if kind == "nbd":
        q.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
              server={"type": "unix", "path": rest[0]}, export=rest[1])
    else:
        q.cmd("blockdev-add", driver="file", filename=rest[0], **{"node-name": "tgtfile"})
        q.cmd("blockdev-add", driver=kind, file="tgtfile", **{"node-name": "tgt"})
        nodes.append("tgtfile")
    q.cmd("blockdev-mirror", **{"job-id": "m0"}, device="src", target="tgt", sync="full")
    deadline = t0 + secs
    state = "running"
    while True:
        peak = max(peak, vmrss_kib(pid))
        if any(e["event"] == "BLOCK_JOB_READY" for e in q.events):
            state = "ready"
            break
        if any(e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR") for e in q.events):
            die("QEMU mirror ended early: %r" % q.events)
        if time.monotonic() > deadline:
            break
        try:
            r = q.c.recv(time.monotonic() + 0.02)
            if "event" in r:
                q.events.append(r)
        except TimeoutError:
            pass
    peak = max(peak, vmrss_kib(pid))
    jobs = q.cmd("query-block-jobs")
    done = jobs[0]["offset"] if jobs else 0
    print("%d %s %.2f %d" % (peak, state, time.monotonic() - t0, done))
    sys.stdout.flush()
    q.cmd("block-job-cancel", device="m0", force=True)
    q.event("BLOCK_JOB_CANCELLED", 120)
    for n in nodes:
        q.cmd("blockdev-del", **{"node-name": n})


def cmd_timed(args):
    t0 = time.monotonic()
    r = subprocess.run(args)
    t = time.monotonic() - t0
    if r.returncode != 0:
        die("%s failed (exit %d)" % (" ".join(args), r.returncode))
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("%.4f - - %.2f" % (t, ru.ru_utime + ru.ru_stime))


def main(argv):
    if len(argv) < 2:
        die("usage: see the docstring")
    cmd, a = argv[1], argv[2:]
    if cmd == "qcowfs-start":
        cmd_qcowfs_start(a[0], a[1])
    elif cmd == "qcowfs-ready":
        cmd_qcowfs_ready(a[0], a[1], float(a[2]) if len(a) > 2 else 600.0, int(a[3]) if len(a) > 3 else 0)
    elif cmd == "qcowfs-watch":
        cmd_qcowfs_watch(a[0], a[1], a[2], float(a[3]), float(a[4]))
    elif cmd == "qcowfs-ready-wait":
        cmd_qcowfs_ready_wait(a[0], a[1], float(a[2]))
    elif cmd == "qcowfs-rss":
        cmd_qcowfs_rss(a[0], a[1], int(a[2]), float(a[3]))
    elif cmd == "qcowfs-cmd":
        cmd_qcowfs_cmd(a[0], a[1], a[2])
    elif cmd == "qmp-rss":
        cmd_qmp_rss(a[0], int(a[1]), float(a[2]), a[3], a[4:])
    elif cmd == "qmp-mirror":
        cmd_qmp_mirror(a[0], a[1], a[2:], int(os.environ.get("BENCH_PID", "0")))
    elif cmd == "timed":
        cmd_timed(a)
    else:
        die("unknown command %s" % cmd)


if __name__ == "__main__":
    main(sys.argv)

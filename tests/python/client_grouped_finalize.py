#!/usr/bin/env python3
"""End-to-end check with QEMU's official Python QMP client (PyPI `qemu.qmp`).

Starts DAEMON the way qemu-storage-daemon is started, connects with `QMPClient`, negotiates,
runs a grouped transaction of two blockdev-backup jobs with auto-finalize=false, waits for both
BLOCK_JOB_PENDING events, finalizes through one job, dismisses both, and checks the images with
`qemu-img compare`. Then drives the same daemon through a scripted `qmp-shell`.

Usage: client_grouped_finalize.py DAEMON [DAEMON-ARGS...]
Prints "N passed, N failed" and exits non-zero on any failure.
"""

import asyncio
import os
import subprocess
import sys
import tempfile

from qemu.qmp import QMPClient, ExecuteError


def run(argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def make_image(path, size, pattern=None):
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, size])
    if pattern:
        run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 {size}", path])


async def wait_for_socket(path, proc):
    for _ in range(200):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        await asyncio.sleep(0.05)
    raise RuntimeError("daemon socket never appeared")


async def grouped_finalize(tmp, sock, results):
    qmp = QMPClient("grouped-finalize")
    await qmp.connect(sock)  # negotiates capabilities
    results.append(("greeting has QMP version", "version" in qmp.greeting.QMP._raw))

    for name, size, pat in (("a", "1M", "0xaa"), ("b", "2M", "0xbb"), ("ta", "1M", None), ("tb", "2M", None)):
        await qmp.execute("blockdev-add", {
            "driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": os.path.join(tmp, name + ".qcow2")}})

    events = []
    pending = set()
    done = asyncio.Event()

    async def listen():
        async for ev in qmp.events:
            events.append((ev["event"], dict(ev.get("data", {}))))
            if ev["event"] == "BLOCK_JOB_PENDING":
                pending.add(ev["data"]["id"])
                if pending == {"ja", "jb"}:
                    done.set()

    listener = asyncio.create_task(listen())
    await qmp.execute("transaction", {
        "actions": [
            {"type": "blockdev-backup", "data": {"job-id": "ja", "device": "a", "target": "ta", "sync": "full",
                                                 "auto-finalize": False, "auto-dismiss": False}},
            {"type": "blockdev-backup", "data": {"job-id": "jb", "device": "b", "target": "tb", "sync": "full",
                                                 "auto-finalize": False, "auto-dismiss": False}},
        ],
        "properties": {"completion-mode": "grouped"},
    })
    await asyncio.wait_for(done.wait(), 20)
    jobs = await qmp.execute("query-jobs")
    results.append(("both jobs pending", sorted((j["id"], j["status"]) for j in jobs) ==
                    [("ja", "pending"), ("jb", "pending")]))

    await qmp.execute("job-finalize", {"id": "ja"})
    jobs = await qmp.execute("query-jobs")
    results.append(("finalize via one id concludes both",
                    sorted((j["id"], j["status"]) for j in jobs) == [("ja", "concluded"), ("jb", "concluded")]))
    completed = [d["device"] for (e, d) in events if e == "BLOCK_JOB_COMPLETED"]
    results.append(("COMPLETED for both, newest first", completed == ["jb", "ja"]))

    try:
        await qmp.execute("job-finalize", {"id": "ja"})
        results.append(("second finalize refused", False))
    except ExecuteError as err:
        results.append(("second finalize refused",
                        err.error.error.desc == "Job 'ja' in state 'concluded' cannot accept command verb 'finalize'"))

    await qmp.execute("job-dismiss", {"id": "ja"})
    await qmp.execute("block-job-dismiss", {"id": "jb"})
    results.append(("dismissed jobs are gone", await qmp.execute("query-jobs") == []))
    await asyncio.sleep(0.1)
    nulls = sorted(d["id"] for (e, d) in events if e == "JOB_STATUS_CHANGE" and d["status"] == "null")
    results.append(("null event for each job", nulls == ["ja", "jb"]))
    listener.cancel()
    await qmp.disconnect()


def qmp_shell(sock, results):
    shell = os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    script = "query-jobs\nblock-job-pause device=nosuch\nquery-version\n"
    p = subprocess.run([shell, sock], input=script, capture_output=True, text=True, timeout=30)
    out = p.stdout
    results.append(("qmp-shell lists no jobs", '{"return": []}' in out))
    results.append(("qmp-shell shows the lookup error", "Block job 'nosuch' not found" in out))
    results.append(("qmp-shell query-version answers", '"qemu"' in out))


def main():
    daemon = sys.argv[1:]
    if not daemon:
        print(__doc__)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        make_image(os.path.join(tmp, "a.qcow2"), "1M", "0xaa")
        make_image(os.path.join(tmp, "b.qcow2"), "2M", "0xbb")
        make_image(os.path.join(tmp, "ta.qcow2"), "1M")
        make_image(os.path.join(tmp, "tb.qcow2"), "2M")
        sock = os.path.join(tmp, "qmp.sock")
        log = open(os.path.join(tmp, "daemon.log"), "wb")
        proc = subprocess.Popen(daemon + ["--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                                          "--monitor", "chardev=m"], cwd=tmp, stdout=log, stderr=log)
        try:
            asyncio.run(wait_for_socket(sock, proc))
            asyncio.run(grouped_finalize(tmp, sock, results))
            qmp_shell(sock, results)

            async def quit_daemon():
                qmp = QMPClient("quit")
                await qmp.connect(sock)
                await qmp.execute("quit")
                try:
                    await qmp.disconnect()
                except EOFError:
                    pass  # the daemon closed first, as it may after quit (QEMU's tests allow it too)
            asyncio.run(quit_daemon())
            results.append(("daemon exits 0 after quit", proc.wait(timeout=20) == 0))
            for a, b in (("a", "ta"), ("b", "tb")):
                rc = subprocess.run(["qemu-img", "compare", os.path.join(tmp, a + ".qcow2"),
                                     os.path.join(tmp, b + ".qcow2")], capture_output=True).returncode
                results.append((f"{b} equals {a}", rc == 0))
        except Exception as exc:  # report, don't hide
            results.append((f"exception: {exc!r}", False))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            if not all(ok for _, ok in results):
                with open(os.path.join(tmp, "daemon.log"), "rb") as f:
                    sys.stderr.write(f.read().decode(errors="replace")[-4000:])
    failed = 0
    for name, ok in results:
        print(("PASS " if ok else "FAIL ") + name)
        failed += not ok
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

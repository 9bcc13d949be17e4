"""QMP round trips per second with QEMU's Python client (qemu.qmp), for the client
benchmark (tests/benches/client_roundtrip.rs): `query-version`, with 1 and 8 requests in
flight on one connection. Prints `WINDOW RATE CPU_US_PER_CALL` lines.

Usage: python bench_qemu_qmp.py SOCKET SECONDS
"""

import asyncio
import sys
import time

from qemu.qmp import QMPClient


async def measure(qmp, window, seconds):
    for _ in range(100):
        await qmp.execute("query-version")
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker():
        nonlocal done
        while time.perf_counter() < deadline:
            await qmp.execute("query-version")
            done += 1

    start = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(window)))
    rate = done / (time.perf_counter() - start)
    return rate, (time.process_time() - cpu) * 1e6 / done


async def main(socket, seconds):
    qmp = QMPClient("bench")
    await qmp.connect(socket)
    for window in (1, 8):
        rate, cpu_us = await measure(qmp, window, seconds)
        print(f"{window} {rate:.0f} {cpu_us:.1f}", flush=True)
    await qmp.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))

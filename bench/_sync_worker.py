"""One client process of bench/sync_barrier.py: members [first, first+count) of N."""
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from syncserver import SyncClient  # noqa: E402

url, token_file, run, first, count, total, rounds, mode = sys.argv[1:9]
first, count, total, rounds = int(first), int(count), int(total), int(rounds)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
token = Path(token_file).read_text().strip()
names = [f"m{i:04d}" for i in range(total)]


async def main():
    clients = [SyncClient(url, token=token, member=names[i], run_id=run, connect_timeout_s=60,
                          heartbeat_s=30) for i in range(first, first + count)]
    for i in range(0, len(clients), 50):
        await asyncio.gather(*(c.connect() for c in clients[i:i + 50]))
    sends, recvs = [], []
    t0 = time.monotonic()
    for rnd in range(rounds):
        s, r = [0.0] * count, [0.0] * count

        async def one(k, c):
            if mode == "barrier":
                s[k] = time.monotonic()
                await c.barrier("bench", names, timeout=120)
            elif mode == "exchange-all":
                s[k] = time.monotonic()
                await c.exchange("all", names, {"port": 4000 + k}, timeout=120)
            else:  # pairs: m0000<->m0001, m0002<->m0003, ...
                i = first + k
                pair = [names[i - i % 2], names[i - i % 2 + 1]]
                s[k] = time.monotonic()
                await c.exchange(f"pair{i // 2}", pair, {"port": 4000 + i}, timeout=120)
            r[k] = time.monotonic()

        await asyncio.gather(*(one(k, c) for k, c in enumerate(clients)))
        sends.append(s)
        recvs.append(r)
    elapsed = time.monotonic() - t0
    await asyncio.gather(*(c.close() for c in clients))
    print(json.dumps({"sends": sends, "recvs": recvs, "elapsed": elapsed}))

asyncio.run(main())

"""parallel-ssh side of bench/ssh_fanout.py; runs in its own venv (gevent). Prints JSON."""
import json
import sys
import time

from pssh.clients import ParallelSSHClient

hosts, key, rounds, command = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]), sys.argv[4]
times, outputs = [], None
client = ParallelSSHClient(hosts, user="root", pkey=key, num_retries=1, timeout=30)
for i in range(rounds + 1):                      # round 0 includes connecting
    t0 = time.monotonic()
    out = client.run_command(command)
    client.join(out)
    outputs = ["".join(o.stdout).strip() for o in out]
    codes = [o.exit_code for o in out]
    times.append(time.monotonic() - t0)
    if any(c != 0 for c in codes):
        sys.exit(f"parallel-ssh: non-zero exit codes {codes}")
print(json.dumps({"cold": times[0], "rounds": times[1:], "outputs": outputs}))

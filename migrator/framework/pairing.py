"""How the hosts typed on the command line become scenario instances."""

from __future__ import annotations

from ..errors import ConfigError


def group_hosts(hosts: list[str], all_hosts: bool = False) -> list[list[str]]:
    """Hosts in the order typed -> instances: consecutive pairs, or one group with ``--all``.

    ``[A, B, C, D]`` -> ``[[A, B], [C, D]]`` (run concurrently); with ``all_hosts``
    ``[[A, B, C, D]]``.

    :raise ConfigError: fewer than 2 hosts, a host named twice, or an odd host out.
    """
    if len(set(hosts)) != len(hosts):
        dup = sorted({h for h in hosts if hosts.count(h) > 1})
        raise ConfigError(f"host {', '.join(dup)} given twice in -m")
    if len(hosts) < 2:
        raise ConfigError(f"a migration needs at least 2 hosts (-m hostA,hostB), got {hosts}")
    if all_hosts:
        return [list(hosts)]
    if len(hosts) % 2:
        raise ConfigError(f"{len(hosts)} hosts cannot be paired: {hosts[-1]} is left over "
                          "(give an even number, or --all for one run over all hosts)")
    return [hosts[i:i + 2] for i in range(0, len(hosts), 2)]

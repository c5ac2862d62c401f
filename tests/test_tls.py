"""Migration over TLS (issue 19), both drivers: x509 credentials the lab made per host
(``<lab>/hosts/<name>/pki``, signed by the lab's CA; the qemu driver gives QEMU that
directory, libvirt reads it from the host's ``migrate_tls_x509_cert_dir``), the destination
the server and the source the client, each verifying the other. Positive: precopy, multifd
and postcopy over TLS with the memory checksum. Negative, each failing cleanly (rolled back:
the VM runs on its source with its memory intact, the destination gone) with the cause named:
the wrong hostname, a certificate from another CA, an expired certificate, TLS on one end
only (qemu: the destination listens in the clear; libvirt: the destination host has no
credentials). Bad credentials are put in hostB's own directory for the case and the lab's
put back after it.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from migrator.errors import MigrationError
from migrator.hypervisor import make_vm
from migrator.hypervisor.vm import VMSpec
from migrator.lab import pki
from migrator.migration import MigrationParams, make_migration
from migrator.migration.engine import Migration

from .test_drivers import leftovers


@pytest.fixture(params=["qemu", "libvirt"])
async def vm(lab, hosts, inventory, config, request):
    driver = request.param
    spec = VMSpec(f"tls{driver[0]}", kernel=str(inventory.guest.kernel),
                  initrd=str(inventory.guest.initrd),
                  append=f"{inventory.guest.append} lab.out=ttyS1".strip())
    the_vm = make_vm(driver, spec, hosts["hostA"], str(inventory.run_dir), config)
    the_vm.driver = driver
    await the_vm.start()
    session = await the_vm.wait_for_login()
    await session.cmd("memsum write 16 19")
    yield the_vm
    left = await leftovers(lab, hosts, inventory)
    async with asyncio.TaskGroup() as tg:      # side by side: libvirt's takes 0.36 s a host
        for h in hosts.values():
            tg.create_task(make_vm(driver, spec, h, str(inventory.run_dir), config).stop())
    await the_vm.disconnect()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed:
        assert left == [], f"left behind: {left}"


@pytest.fixture
def hostb_credentials(inventory):
    """``put(directory or None)``: hostB's credentials replaced by those of ``directory``
    (None: none at all); the lab's are put back afterwards."""
    d = Path(inventory.hosts["hostB"].tls_dir)
    saved = {f.name: (f.read_bytes(), stat.S_IMODE(f.stat().st_mode)) for f in d.iterdir()}

    def put(source: Path | None) -> None:
        for f in d.iterdir():
            f.unlink()
        for f in (source.iterdir() if source is not None else ()):
            (d / f.name).write_bytes(f.read_bytes())
            os.chmod(d / f.name, stat.S_IMODE(f.stat().st_mode))
    yield put
    for f in d.iterdir():
        f.unlink()
    for name, (data, mode) in saved.items():
        (d / name).write_bytes(data)
        os.chmod(d / name, mode)


def over_tls(vm, hosts, inventory, dst, cls=None, **params):
    params = MigrationParams(tls=True, **params)
    if cls is not None:
        return cls(vm, hosts[dst], inventory.hosts[dst].address, params, vm.config)
    return make_migration(vm, hosts[dst], inventory.hosts[dst].address, params, vm.config)


async def memory_intact(vm) -> None:
    session = await vm.wait_for_login()
    assert (await session.cmd("memsum verify")).split()[-1] == "ok=1"


def test_the_lab_made_each_host_its_own_credentials(lab, inventory):
    """Every host's directory: the CA's certificate, server and client pairs, keys and the
    directory readable by root only; the server certificate names the host and its
    address."""
    from cryptography import x509
    dirs = {name: h.tls_dir for name, h in inventory.hosts.items()}
    assert len(set(dirs.values())) == len(dirs) and all(dirs.values())
    for name, d in dirs.items():
        assert sorted(os.listdir(d)) == sorted(pki.FILES)
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        for key in ("server-key.pem", "client-key.pem"):
            assert stat.S_IMODE(os.stat(Path(d) / key).st_mode) == 0o600
        cert = x509.load_pem_x509_certificate((Path(d) / "server-cert.pem").read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert name in sans.get_values_for_type(x509.DNSName)
        assert inventory.hosts[name].address in [
            str(a) for a in sans.get_values_for_type(x509.IPAddress)]


async def test_precopy_multifd_and_postcopy_over_tls(vm, hosts, inventory):
    """There and back and there again, each kind over TLS: memory intact every time."""
    for dst, params in (("hostB", {}), ("hostA", {"multifd_channels": 2}),
                        ("hostB", {"postcopy_after_s": 0})):
        r = await over_tls(vm, hosts, inventory, dst, **params).run()
        assert (r.status, r.dst, r.params["tls"]) == ("completed", dst, True), r
        if "postcopy_after_s" in params:
            assert r.postcopy_switched is not None
        await memory_intact(vm)
    await vm.stop()


class SourceOnlyTLS(Migration):
    """The source speaks TLS, the destination listens in the clear (a misconfigured peer:
    real QEMUs, only the destination's TLS set-up left out)."""

    async def _configure_tls(self, src, dst) -> None:
        await super()._configure_tls(src, dst)
        await dst.execute("migrate-set-parameters", {"tls-creds": ""})


#: every bad peer through each driver is a matrix of 8 ('make matrix'); 'make test' runs each
#: bad peer once and each driver on two of them (the rollback is each driver's own, the
#: refusal QEMU's or libvirt's: both are met by every kept case's driver)
BAD_PEERS = [(case, driver) for case in ("wrong-hostname", "other-ca", "expired", "one-end")
             for driver in ("qemu", "libvirt")]
KEPT = {("wrong-hostname", "qemu"), ("expired", "qemu"), ("other-ca", "libvirt"),
        ("one-end", "libvirt")}


@pytest.mark.parametrize("case, vm", [
    pytest.param(case, driver, marks=() if (case, driver) in KEPT else pytest.mark.matrix,
                 id=f"{driver}-{case}") for case, driver in BAD_PEERS], indirect=["vm"])
async def test_a_bad_peer_fails_cleanly_naming_the_cause(case, vm, hosts, inventory, tmp_path,
                                                         hostb_credentials):
    """Each case: the migration fails, rolled back (the VM runs on hostA, memory intact, the
    destination gone), and the error says why."""
    params, cls = {}, None
    if case == "wrong-hostname":
        params["tls_hostname"] = "not-hostB.example"
        says = "not-hostB.example"
    elif case in ("other-ca", "expired"):
        ca = pki.make_ca("another CA") if case == "other-ca" else pki.load_ca(
            Path(inventory.hosts["hostA"].tls_dir).parents[2] / "pki" / "ca")
        hostb_credentials(pki.host_credentials(ca, tmp_path / case, "hostB",
                                               [inventory.hosts["hostB"].address],
                                               expired=case == "expired"))
        says = "issuer" if case == "other-ca" else "expired"
    elif vm.driver == "qemu":
        cls = SourceOnlyTLS
        says = "TLS"
    else:
        hostb_credentials(None)
        says = "unable to access credentials"
    m = over_tls(vm, hosts, inventory, "hostB", cls, **params)
    with pytest.raises(MigrationError) as caught:
        await m.run()
    err = caught.value
    assert m.phase.value == "ROLLED_BACK" and vm.host.name == "hostA", err
    assert says.lower() in str(err).lower(), err
    await memory_intact(vm)
    await vm.stop()

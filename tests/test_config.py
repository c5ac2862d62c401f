"""Config and inventory: strict validation, clear errors, and how the inventory is found."""

from pathlib import Path

import pytest

from migrator.config import Config, Inventory, find_inventory, load_inventory, validate_subnet
from migrator.errors import ConfigError, InventoryError

GOOD = """
version: 1
ssh: {user: root, known_hosts: keys/known_hosts, identity_file: keys/id}
shared_dir: /srv/shared
hosts:
  node1: {address: 192.0.2.10}
  node2: {address: 192.0.2.11, ssh: {port: 2222}}
"""


def write(tmp_path: Path, text: str, name: str = "inv.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_inventory_loads_keeps_order_and_resolves_relative_paths(tmp_path):
    inv = Inventory.load(write(tmp_path, GOOD))
    assert list(inv.hosts) == ["node1", "node2"]
    assert inv.ssh.known_hosts == tmp_path / "keys/known_hosts"
    assert inv.ssh_for("node2").port == 2222
    assert inv.ssh_for("node2").user == "root"          # inherited
    assert inv.ssh_for("node1").port == 22


def test_inventory_unknown_key_is_named(tmp_path):
    with pytest.raises(InventoryError, match=r"unknown key 'hosts.node1.adress'"):
        Inventory.load(write(tmp_path, "hosts:\n  node1: {adress: 1.2.3.4}\n"))


def test_inventory_bad_version_and_empty_hosts(tmp_path):
    with pytest.raises(InventoryError, match="unsupported inventory version 2"):
        Inventory.load(write(tmp_path, "version: 2\nhosts: {a: {address: x}}\n"))
    with pytest.raises(InventoryError, match="no hosts"):
        Inventory.load(write(tmp_path, "hosts: {}\n"))


def test_inventory_duplicate_address_refused(tmp_path):
    text = "hosts:\n  a: {address: 10.0.0.1}\n  b: {address: 10.0.0.1}\n"
    with pytest.raises(InventoryError, match="same address 10.0.0.1:22"):
        Inventory.load(write(tmp_path, text))


def test_inventory_not_yaml_and_missing(tmp_path):
    with pytest.raises(InventoryError, match="not valid YAML"):
        Inventory.load(write(tmp_path, "hosts: [unclosed\n"))
    with pytest.raises(InventoryError, match="does not exist"):
        Inventory.load(tmp_path / "nope.yaml")


def test_unknown_host_lists_known_ones(tmp_path):
    inv = Inventory.load(write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match=r"unknown host 'node3'.*has: node1, node2"):
        inv.host("node3")


def test_find_inventory_order(tmp_path, monkeypatch):
    explicit = write(tmp_path, GOOD, "explicit.yaml")
    from_env = write(tmp_path, GOOD, "env.yaml")
    monkeypatch.setenv("MIGRATOR_INVENTORY", str(from_env))
    assert find_inventory(explicit) == explicit
    assert find_inventory() == from_env
    monkeypatch.setenv("MIGRATOR_INVENTORY", str(tmp_path / "gone.yaml"))
    with pytest.raises(InventoryError, match=r"from \$MIGRATOR_INVENTORY\) does not exist"):
        load_inventory()
    monkeypatch.delenv("MIGRATOR_INVENTORY")
    monkeypatch.setattr("migrator.config.LAB_BASE_DIR", tmp_path / "nolab")
    with pytest.raises(InventoryError, match="migrate-lab up"):
        find_inventory()


def test_config_defaults_overrides_and_unknown_keys(tmp_path):
    cfg = Config.load(overrides={"timeouts.guest_boot_s": 5})
    assert cfg.timeouts.guest_boot_s == 5
    assert Config().timeouts.guest_boot_s > 5
    with pytest.raises(ConfigError, match="unknown key 'timeouts.guest_boot'"):
        Config.load(overrides={"timeouts.guest_boot": 5})
    with pytest.raises(ConfigError, match="timeouts.ssh_connect_s"):
        Config.load(write(tmp_path, "timeouts: {ssh_connect_s: 0}\n", "c.yaml"))


@pytest.mark.parametrize("subnet, message", [
    ("10.77.0.0/30", "too small"),
    ("8.8.8.0/24", "not a private range"),
    ("10.77.0.1/24", "host bits set"),
    ("fd00::/64", "IPv4 only"),
    ("banana", "bad subnet"),
])
def test_subnet_validation(subnet, message):
    with pytest.raises(ConfigError, match=message):
        validate_subnet(subnet)


def test_example_inventory_in_configs_is_valid():
    inv = Inventory.load(Path(__file__).parent.parent / "configs" / "inventory.example.yaml")
    assert list(inv.hosts) == ["compute-01", "compute-02"]
    assert inv.ssh_for("compute-02").port == 2222
    assert inv.ssh.known_hosts.is_absolute()


def test_example_run_config_in_configs_is_valid():
    cfg = Config.load(Path(__file__).parent.parent / "configs" / "run.example.yaml")
    assert cfg.vms["db1"].mem_mib == 512 and not cfg.migration.auto_converge
    assert cfg.migration.policy.completion_for(1024) == 180
    assert cfg.migration.policy.actions == ["auto-converge", "abort"]


def test_dotted_overrides_reach_every_section():
    cfg = Config.load(None, {"driver": "libvirt", "libvirt.p2p": True,
                             "migration.downtime_limit_ms": 100, "scenario.rounds": 5,
                             "vms.web.mem_mib": 256})
    assert (cfg.driver, cfg.libvirt.p2p, cfg.migration.downtime_limit_ms) == ("libvirt", True,
                                                                            100)
    assert cfg.scenario == {"rounds": 5} and cfg.vms["web"].mem_mib == 256
    with pytest.raises(ConfigError, match="unknown key 'libvirt.transprot'"):
        Config.load(None, {"libvirt.transprot": "ssh"})


# -- the migration section: one definition (MigrationParams), validated at load -------------

from migrator.cli import run_main  # noqa: E402
from migrator.migration import MigrationParams  # noqa: E402

#: values of migration.* that must be refused, whether they come from a config (file or -p)
#: or are given to MigrationParams directly: the same rules both ways
BAD_MIGRATION = [
    ({"downtime_limit_ms": 5000}, "downtime_limit_ms"),
    ({"downtime_limit_ms": 0}, "downtime_limit_ms"),
    ({"bandwidth_mibs": 0}, "bandwidth_mibs"),
    ({"bandwidth_mibs": -1}, "bandwidth_mibs"),
    ({"bandwidth_mibs": (1 << 20) + 1}, "bandwidth_mibs"),
    ({"multifd_channels": 0}, "multifd_channels"),
    ({"multifd_channels": 256}, "multifd_channels"),
    ({"postcopy_after_s": -0.5}, "postcopy_after_s"),
    ({"postcopy_recoveries": -1}, "postcopy_recoveries"),
    ({"xbzrle_cache_mib": 0}, "xbzrle_cache_mib"),
    ({"multifd_channels": 2, "postcopy_after_s": 1},
     "multifd_channels and postcopy_after_s cannot be combined"),
    ({"multifd_channels": 2, "xbzrle_cache_mib": 64},
     "multifd_channels and xbzrle_cache_mib cannot be combined"),
]

#: the edges of each bound, accepted both ways
GOOD_MIGRATION = [
    {"downtime_limit_ms": 1}, {"downtime_limit_ms": 2000},
    {"bandwidth_mibs": 0.5}, {"bandwidth_mibs": 1 << 20},
    {"multifd_channels": 1}, {"multifd_channels": 255},
    {"postcopy_after_s": 0, "postcopy_recoveries": 0}, {"xbzrle_cache_mib": 1},
    {"multifd_channels": 4, "auto_converge": True, "bandwidth_mibs": 64},
    {"postcopy_after_s": 1, "xbzrle_cache_mib": 16, "downtime_limit_ms": 100},
]


def _dotted(values: dict) -> dict:
    return {f"migration.{k}": v for k, v in values.items()}


@pytest.mark.parametrize("values, message", BAD_MIGRATION)
def test_bad_migration_values_are_refused_by_config_and_params_alike(values, message,
                                                                      tmp_path):
    with pytest.raises(ConfigError, match=message) as from_overrides:
        Config.load(overrides=_dotted(values))
    text = "migration:\n" + "".join(f"  {k}: {v}\n" for k, v in values.items())
    with pytest.raises(ConfigError, match=message):
        Config.load(write(tmp_path, text, "c.yaml"))
    with pytest.raises(ConfigError, match=message) as direct:
        MigrationParams(**values)
    for exc in (from_overrides.value, direct.value):
        assert "\n" not in str(exc) and "migration" in str(exc)


@pytest.mark.parametrize("values", GOOD_MIGRATION)
def test_good_migration_values_are_accepted_by_config_and_params_alike(values):
    section = Config.load(overrides=_dotted(values)).migration
    params = MigrationParams(**values)
    assert section.model_dump() == params.model_dump()
    assert MigrationParams(**section.model_dump()) == params   # the framework's path


def test_config_migration_section_is_migration_params_definition():
    """One source of truth: the config's section has exactly MigrationParams' fields, with the
    same types, defaults and bounds (not a second copy that can drift)."""
    section = Config.model_fields["migration"].annotation
    assert issubclass(MigrationParams, section)

    def shape(model) -> dict:
        return {name: (f.annotation, f.default, f.metadata)
                for name, f in model.model_fields.items()}
    assert shape(section) == shape(MigrationParams)
    assert Config().migration.model_dump() == MigrationParams().model_dump()


def test_conflicting_migration_options_are_one_line_naming_both_keys():
    with pytest.raises(ConfigError) as caught:
        Config.load(overrides={"migration.multifd_channels": 2,
                               "migration.postcopy_after_s": 1})
    assert str(caught.value).startswith(
        "config: migration: multifd_channels and postcopy_after_s cannot be combined")
    # a per-call override (params_append) that conflicts with the run's config: same rule
    cfg = Config.load(overrides={"migration.postcopy_after_s": 1})
    with pytest.raises(ConfigError, match="multifd_channels and postcopy_after_s"):
        MigrationParams(**(cfg.migration.model_dump() | {"multifd_channels": 2}))
    with pytest.raises(ConfigError, match="unknown key 'migration.bandwith_mibs'"):
        MigrationParams(bandwith_mibs=8)


def test_migrate_run_refuses_conflicting_options_before_any_host(tmp_path, capsys):
    """Exit 2 with one line, before the inventory is even read (it does not exist here)."""
    rc = run_main(["-m", "hostA,hostB", "-i", str(tmp_path / "no-inventory.yaml"),
                   "-p", "migration.multifd_channels=2", "-p", "migration.postcopy_after_s=1",
                   "ping_pong"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "inventory" not in err
    assert err.startswith("migrate-run: error: config: migration: multifd_channels and "
                          "postcopy_after_s cannot be combined")

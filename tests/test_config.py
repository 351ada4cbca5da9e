"""Settings: defaults, the precedence argument > config object > env > file > default,
size parsing, and errors that name the field and where the bad value came from."""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
import re
import typing
from collections.abc import Callable

import pytest

import mlstore
from mlstore.config import (
    ENV_VARS,
    CacheConfig,
    HttpPolicy,
    RetryPolicy,
    StoreConfig,
    parse_size,
)
from mlstore.errors import ConfigError

MiB = 1024**2
GiB = 1024**3

WriteConfig = Callable[[str], pathlib.Path]


@pytest.fixture
def config_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> WriteConfig:
    """Write a TOML config file and point MLSTORE_CONFIG at it."""

    def write(text: str) -> pathlib.Path:
        path = tmp_path / "mlstore.toml"
        path.write_text(text)
        monkeypatch.setenv("MLSTORE_CONFIG", str(path))
        return path

    return write


@pytest.fixture
def no_cache_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # conftest sets MLSTORE_CACHE_DIR for isolation; some tests need it unset.
    monkeypatch.delenv("MLSTORE_CACHE_DIR")


# ------------------------------------------------------------------ defaults


@pytest.mark.usefixtures("no_cache_dir_env")
def test_cache_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    c = CacheConfig()
    assert c.enabled is True
    assert c.memory_bytes == 512 * MiB
    assert c.disk_dir is None
    assert c.resolved_disk_dir == str(tmp_path / "mlstore")
    assert c.disk_bytes == 10 * GiB
    assert c.block_size == 8 * MiB
    assert c.block_threshold == 64 * MiB
    assert c.validate == "ttl"
    assert c.ttl == 300.0
    assert c.verify == "always"


@pytest.mark.parametrize("source", ["argument", "environment", "config file"])
def test_a_relative_disk_dir_is_made_absolute_when_resolved(
    source: str,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    config_file: WriteConfig,
) -> None:
    # A launcher that changes directory (Hydra does) must not move the cache with it.
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.delenv("MLSTORE_CACHE_DIR")
    if source == "environment":
        monkeypatch.setenv("MLSTORE_CACHE_DIR", ".cache/mlstore")
    elif source == "config file":
        config_file('[cache]\ndisk_dir = ".cache/mlstore"\n')
    monkeypatch.chdir(start)
    c = CacheConfig(disk_dir=".cache/mlstore") if source == "argument" else CacheConfig()
    expected = str(start / ".cache" / "mlstore")
    assert c.disk_dir == expected
    monkeypatch.chdir(elsewhere)
    assert c.resolved_disk_dir == expected
    assert pickle.loads(pickle.dumps(c)).resolved_disk_dir == expected
    assert dataclasses.replace(c, ttl=1).disk_dir == expected


@pytest.mark.s3
def test_reads_after_a_chdir_hit_the_same_cache(
    s3_options: dict[str, object],
    s3_bucket: str,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    url = f"s3://{s3_bucket}/chdir.bin"
    with mlstore.Store(options={"s3": s3_options}, cache={"enabled": False}) as writer:
        writer.write_bytes(url, b"cached before the chdir")
    monkeypatch.setenv("MLSTORE_CACHE_DIR", ".cache/mlstore")
    monkeypatch.chdir(start)
    # no memory tier: every read after the first must come from the disk tier
    with mlstore.Store(options={"s3": s3_options}, cache={"memory_bytes": 0}) as store:
        assert store.read_bytes(url) == b"cached before the chdir"
        monkeypatch.chdir(elsewhere)
        assert store.read_bytes(url) == b"cached before the chdir"
        stats = store.stats()
    assert (stats.get("misses", "cache"), stats.get("hits", "disk")) == (1, 1)
    assert (start / ".cache" / "mlstore" / "index.sqlite").exists()
    assert not (elsewhere / ".cache").exists(), "a second cache was made"


def test_retry_defaults() -> None:
    r = RetryPolicy()
    assert (r.max_attempts, r.deadline, r.backoff_base, r.backoff_max) == (5, 120.0, 0.2, 20.0)
    assert r.hedge_after is None
    assert (r.connect_timeout, r.read_timeout) == (10.0, 60.0)


def test_http_defaults_refuse_cloud_metadata() -> None:
    h = HttpPolicy()
    assert "169.254.0.0/16" in h.deny_networks
    assert "metadata.google.internal" in h.deny_hosts
    assert h.deny_private is False
    assert h.allow_hosts == ()
    assert h.max_redirects == 5


def test_store_config_defaults() -> None:
    s = StoreConfig()
    assert s.max_workers == 32
    assert dict(s.mounts) == {}
    assert dict(s.options) == {}
    assert isinstance(s.cache, CacheConfig)


def test_configs_are_frozen() -> None:
    c = CacheConfig()
    with pytest.raises(AttributeError):
        c.memory_bytes = 1  # type: ignore[misc]


# ------------------------------------------------------------------ precedence


@pytest.mark.parametrize(
    ("cls", "field", "env", "toml_value", "env_value", "arg", "expect_file", "expect_env"),
    [
        (CacheConfig, "memory_bytes", "MLSTORE_MEMORY_BYTES", '"1MiB"', "2MiB", 3, MiB, 2 * MiB),
        (CacheConfig, "ttl", "MLSTORE_TTL", "7", "8.5", 9.0, 7.0, 8.5),
        (
            CacheConfig,
            "validate",
            "MLSTORE_VALIDATE",
            '"never"',
            "always",
            "ttl",
            "never",
            "always",
        ),
        (RetryPolicy, "max_attempts", "MLSTORE_MAX_ATTEMPTS", "2", "3", 4, 2, 3),
        (RetryPolicy, "hedge_after", "MLSTORE_HEDGE_AFTER", "0.5", "0.25", 1.0, 0.5, 0.25),
        (
            HttpPolicy,
            "deny_private",
            "MLSTORE_HTTP_DENY_PRIVATE",
            "true",
            "false",
            True,
            True,
            False,
        ),
        (
            HttpPolicy,
            "allow_hosts",
            "MLSTORE_HTTP_ALLOW_HOSTS",
            '["a"]',
            "b, c",
            ("d",),
            ("a",),
            ("b", "c"),
        ),
        (HttpPolicy, "max_redirects", "MLSTORE_HTTP_MAX_REDIRECTS", "1", "2", 3, 1, 2),
    ],
)
def test_precedence_argument_env_file_default(
    config_file: WriteConfig,
    monkeypatch: pytest.MonkeyPatch,
    cls: type,
    field: str,
    env: str,
    toml_value: str,
    env_value: str,
    arg: object,
    expect_file: object,
    expect_env: object,
) -> None:
    section = cls._section  # type: ignore[attr-defined]
    default = getattr(cls(), field)
    config_file(f"[{section}]\n{field} = {toml_value}\n")
    assert getattr(cls(), field) == expect_file != default
    monkeypatch.setenv(env, env_value)
    assert getattr(cls(), field) == expect_env
    assert getattr(cls(**{field: arg}), field) == arg


def test_explicit_field_keeps_env_for_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSTORE_CACHE_DIR", "/var/tmp/from-env")
    c = CacheConfig(memory_bytes=2**20)
    assert c.memory_bytes == 2**20
    assert c.disk_dir == "/var/tmp/from-env"


def test_empty_env_var_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSTORE_MAX_ATTEMPTS", "")
    assert RetryPolicy().max_attempts == 5


def test_store_argument_beats_config_object_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSTORE_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("MLSTORE_MAX_WORKERS", "3")
    assert mlstore.Store().config.retry.max_attempts == 2
    assert mlstore.Store().config.max_workers == 3
    config = StoreConfig(retry=RetryPolicy(max_attempts=7), max_workers=5)
    store = mlstore.Store(config)
    assert store.config.retry.max_attempts == 7
    assert store.config.max_workers == 5
    store = mlstore.Store(config, retry={"max_attempts": 9}, max_workers=6)
    assert store.config.retry.max_attempts == 9
    assert store.config.max_workers == 6


def test_store_options_override_config_object_key_by_key() -> None:
    config = StoreConfig(options={"s3": {"endpoint_url": "http://a", "anon": False}})
    store = mlstore.Store(config, options={"s3": {"anon": True}})
    assert store.config.options["s3"] == {"endpoint_url": "http://a", "anon": True}


def test_store_max_workers_from_file_and_env(
    config_file: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file("[store]\nmax_workers = 4\n")
    assert StoreConfig().max_workers == 4
    monkeypatch.setenv("MLSTORE_MAX_WORKERS", "6")
    assert StoreConfig().max_workers == 6
    assert StoreConfig(max_workers=8).max_workers == 8


def test_mounts_and_options_merge_over_the_file(config_file: WriteConfig) -> None:
    config_file(
        """
        [mounts]
        imagenet = ["s3://bucket-a/imagenet", "gs://bucket-b/imagenet"]
        coco = "s3://bucket-a/coco/"

        [options.s3]
        endpoint_url = "http://127.0.0.1:9000"
        anon = true
        """.replace("\n        ", "\n")
    )
    config = StoreConfig(mounts={"coco": ("memory://coco",)}, options={"s3": {"anon": False}})
    assert dict(config.mounts) == {
        "imagenet": ("s3://bucket-a/imagenet", "gs://bucket-b/imagenet"),
        "coco": ("memory://coco",),
    }
    assert config.options["s3"] == {"endpoint_url": "http://127.0.0.1:9000", "anon": False}
    # a Store picks up the file's mounts
    assert mlstore.Store().resolve("mlstore://coco/x.jpg") == [
        mlstore.parse_url("s3://bucket-a/coco/x.jpg")
    ]


def test_nested_config_from_dicts() -> None:
    config = StoreConfig(cache={"memory_bytes": "1MiB"}, retry={"max_attempts": 2})  # type: ignore[arg-type]
    assert config.cache.memory_bytes == MiB
    assert config.retry.max_attempts == 2


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (1234, 1234),
        (2048.0, 2048),
        ("1234", 1234),
        ("512MiB", 512 * MiB),
        ("512 MiB", 512 * MiB),
        ("1GB", 10**9),
        ("1gb", 10**9),
        ("10G", 10 * GiB),
        ("10Gi", 10 * GiB),
        ("64KiB", 64 * 1024),
        ("64k", 64 * 1024),
        ("64KB", 64_000),
        ("1.5GiB", 3 * GiB // 2),
        ("2TB", 2 * 10**12),
        ("5B", 5),
        ("123456789012345678", 123456789012345678),
        ("9PiB", 9 * 1024**5),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "1XB", "-1", "1e9", "GiB", True, 1.5, None, [1]])
def test_parse_size_refuses(bad: object) -> None:
    with pytest.raises(ConfigError, match="must be a size"):
        parse_size(bad, name="CacheConfig.disk_bytes")


def test_size_fields_accept_strings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSTORE_DISK_BYTES", "20GB")
    monkeypatch.setenv("MLSTORE_BLOCK_SIZE", "4MiB")
    c = CacheConfig()
    assert c.disk_bytes == 20 * 10**9
    assert c.block_size == 4 * MiB


# ------------------------------------------------------------------ invalid values


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (CacheConfig, {"memory_bytes": -1}, "memory_bytes"),
        (CacheConfig, {"memory_bytes": "much"}, "memory_bytes"),
        (CacheConfig, {"block_size": 0}, "block_size"),
        (CacheConfig, {"validate": "sometimes"}, "validate"),
        (CacheConfig, {"verify": 1}, "verify"),
        (CacheConfig, {"ttl": -5}, "ttl"),
        (CacheConfig, {"ttl": "nan"}, "ttl"),
        (CacheConfig, {"enabled": "maybe"}, "enabled"),
        (CacheConfig, {"disk_dir": 5}, "disk_dir"),
        (RetryPolicy, {"max_attempts": 0}, "max_attempts"),
        (RetryPolicy, {"max_attempts": 2.5}, "max_attempts"),
        (RetryPolicy, {"max_attempts": True}, "max_attempts"),
        (RetryPolicy, {"deadline": 0}, "deadline"),
        (RetryPolicy, {"deadline": "soon"}, "deadline"),
        (RetryPolicy, {"hedge_after": -1}, "hedge_after"),
        (RetryPolicy, {"backoff_base": 5, "backoff_max": 1}, "backoff_max"),
        (HttpPolicy, {"deny_networks": ("not-a-cidr",)}, "deny_networks"),
        (HttpPolicy, {"deny_hosts": [1, 2]}, "deny_hosts"),
        (HttpPolicy, {"max_redirects": -1}, "max_redirects"),
        (StoreConfig, {"max_workers": 0}, "max_workers"),
        (StoreConfig, {"mounts": {"bad name!": ["s3://b/k"]}}, "mount"),
        (StoreConfig, {"mounts": {"ds": []}}, "mounts"),
        (StoreConfig, {"mounts": {"ds": ["ftp://host/x"]}}, "mounts"),
        (StoreConfig, {"mounts": {"ds": ["mlstore://other/x"]}}, "another mount"),
        (StoreConfig, {"options": {"s3": "endpoint"}}, "options"),
        (StoreConfig, {"cache": {"memory": 1}}, "cache"),
        (StoreConfig, {"cache": 5}, "cache"),
    ],
)
def test_invalid_argument_names_the_field(cls: type, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("MLSTORE_MEMORY_BYTES", "lots", "CacheConfig.memory_bytes"),
        ("MLSTORE_CACHE", "perhaps", "CacheConfig.enabled"),
        ("MLSTORE_TTL", "ten", "CacheConfig.ttl"),
        ("MLSTORE_VALIDATE", "sometimes", "CacheConfig.validate"),
        ("MLSTORE_MAX_ATTEMPTS", "-1", "RetryPolicy.max_attempts"),
        ("MLSTORE_DEADLINE", "0", "RetryPolicy.deadline"),
        ("MLSTORE_HTTP_MAX_REDIRECTS", "x", "HttpPolicy.max_redirects"),
        ("MLSTORE_MAX_WORKERS", "many", "StoreConfig.max_workers"),
        ("MLSTORE_HTTP_DENY_NETWORKS", "nope", "HttpPolicy.deny_networks"),
    ],
)
def test_invalid_env_value_names_field_and_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        mlstore.Store()
    assert field in str(info.value)
    assert env in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("toml", "field", "section"),
    [
        ("[cache]\nmemory_bytes = 'lots'", "CacheConfig.memory_bytes", "[cache]"),
        ("[cache]\nttl = -1", "CacheConfig.ttl", "[cache]"),
        ("[retry]\nmax_attempts = 0", "RetryPolicy.max_attempts", "[retry]"),
        ("[http]\ndeny_private = 'sometimes'", "HttpPolicy.deny_private", "[http]"),
        ("[store]\nmax_workers = 'x'", "StoreConfig.max_workers", "[store]"),
        ("[http]\ndeny_networks = ['nope']", "HttpPolicy.deny_networks", "[http]"),
        ("[mounts]\nds = 5", "ds", "[mounts]"),
        ("[mounts]\nds = ['mlstore://x/y']", "ds", "[mounts]"),
        ("[options]\ns3 = 5", "options", "[options]"),
        ("cache = 5", "cache", "[cache]"),
    ],
)
def test_invalid_file_value_names_field_and_section(
    config_file: WriteConfig, toml: str, field: str, section: str
) -> None:
    config_file(toml + "\n")
    with pytest.raises(ConfigError) as info:
        mlstore.Store()
    assert field in str(info.value)
    assert section in str(info.value)


def test_unknown_file_section_is_refused(config_file: WriteConfig) -> None:
    config_file("[cahce]\nmemory_bytes = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section.*cahce"):
        mlstore.Store()


@pytest.mark.parametrize("section", ["cache", "retry", "http", "store"])
def test_unknown_file_key_is_refused(config_file: WriteConfig, section: str) -> None:
    config_file(f"[{section}]\nmax_atempts = 3\n")
    with pytest.raises(ConfigError, match=rf"\[{section}\].*unknown key.*max_atempts"):
        mlstore.Store()


def test_missing_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("MLSTORE_CONFIG", str(missing))
    with pytest.raises(ConfigError, match="MLSTORE_CONFIG") as info:
        mlstore.Store()
    assert str(missing) in str(info.value)


def test_config_file_that_is_a_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv("MLSTORE_CONFIG", str(tmp_path))
    with pytest.raises(ConfigError, match="cannot be read"):
        mlstore.Store()


def test_malformed_config_file(config_file: WriteConfig) -> None:
    path = config_file("[cache\nmemory_bytes = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        mlstore.Store()
    assert str(path) in str(info.value)


def test_rewritten_config_file_is_read_again(config_file: WriteConfig) -> None:
    config_file("[retry]\nmax_attempts = 2\n")
    assert RetryPolicy().max_attempts == 2
    config_file("[retry]\nmax_attempts = 33\n")
    assert RetryPolicy().max_attempts == 33


def test_store_config_repr_hides_secret_options() -> None:
    config = StoreConfig(
        options={
            "s3": {
                "secret": "CANARY1",
                "endpoint_url": "http://x",
                "client_kwargs": {"aws_secret_access_key": "CANARY2"},
            }
        },
        mounts={"ds": ["https://h/p?sig=CANARY3"]},
    )
    text = repr(config)
    assert "CANARY" not in text
    assert "http://x" in text


# ------------------------------------------------------------------ env var table


def test_env_vars_lists_every_variable_the_package_reads() -> None:
    package = pathlib.Path(mlstore.__file__).parent
    found: set[str] = set()
    for path in package.rglob("*.py"):
        found |= set(re.findall(r"\bMLSTORE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert "MLSTORE_CONFIG" in found  # the scan itself works
    assert found <= set(ENV_VARS), sorted(found - set(ENV_VARS))


@pytest.mark.parametrize("name", sorted(ENV_VARS))
def test_every_listed_env_var_changes_a_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, name: str
) -> None:
    # An entry in ENV_VARS that the code ignores would be a lie on the docs page.
    if name == "MLSTORE_CONFIG":
        (tmp_path / "c.toml").write_text("[retry]\nmax_attempts = 17\n")
        monkeypatch.setenv(name, str(tmp_path / "c.toml"))
        assert RetryPolicy().max_attempts == 17
        return
    if name == "MLSTORE_NODE_ID":  # the node's name, not a setting (mlstore.cluster)
        monkeypatch.setenv(name, "node-17")
        assert mlstore.node_key() == "node-17"
        return
    if name == "MLSTORE_TENANT":  # the tenant's name under tenancy="namespace"
        monkeypatch.setenv(name, "team-17")
        assert CacheConfig(tenancy="namespace").resolved_disk_dir.endswith("ns-team-17")
        return
    before = repr(StoreConfig())
    values = ["3", "7", "off", "never", "true", "10.0.0.0/8", "example.org", "/var/tmp/x"]
    values.append("obstore")  # MLSTORE_TRANSPORT (the suite installs mlstore[fast])
    values.append("8MiB")  # MLSTORE_MULTIPART_PART_SIZE (5 MiB at least)
    values.append("internet")  # MLSTORE_EGRESS
    values.append("uid")  # MLSTORE_CACHE_TENANCY
    values.append("all")  # MLSTORE_DISK_CAP
    for value in values:
        monkeypatch.setenv(name, value)
        try:
            after = repr(StoreConfig())
        except ConfigError:
            continue
        if after != before:
            return
    pytest.fail(f"{name} changed no setting")


def test_backend_option_from_env_sits_between_argument_and_file(
    config_file: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file('[options.s3]\nendpoint_url = "http://file"\nanon = true\n')
    assert StoreConfig().options["s3"]["endpoint_url"] == "http://file"
    monkeypatch.setenv("MLSTORE_S3_ENDPOINT_URL", "http://env")
    assert StoreConfig().options["s3"] == {"endpoint_url": "http://env", "anon": True}
    given = StoreConfig(options={"s3": {"endpoint_url": "http://arg"}})
    assert given.options["s3"]["endpoint_url"] == "http://arg"


# ------------------------------------------------------------------ the public surface


def test_pickles_name_the_public_module_only() -> None:
    # A Store's config crosses a pickle to every DataLoader worker; the class paths in
    # it must not depend on which private module of mlstore.config defines a class.
    config = StoreConfig(
        cache=CacheConfig(policies={"s3://bucket-a/frozen/": {"validate": "never"}}),
        retry=RetryPolicy(overrides={"write": {"max_attempts": 3}}),
        mounts={"ds": ("s3://bucket-a/ds",)},
    )
    data = pickle.dumps(config)
    assert b"mlstore.config" in data
    assert b"mlstore.config._" not in data
    assert pickle.loads(data) == config


@pytest.mark.parametrize("cls", [CacheConfig, RetryPolicy, HttpPolicy, StoreConfig])
def test_config_classes_introspect_from_mlstore_config(cls: type) -> None:
    assert cls.__module__ == "mlstore.config"
    # Tools that build on dataclasses (structured configs, CLIs) resolve the annotations.
    hints = typing.get_type_hints(cls)
    assert {f.name for f in dataclasses.fields(cls)} <= set(hints)


def test_overrides_refuse_a_per_client_field_and_say_why() -> None:
    with pytest.raises(ConfigError, match="set on each backend's client") as info:
        RetryPolicy(overrides={"s3://bucket-a/": {"connect_timeout": 1}})
    assert "RetryPolicy.overrides['s3://bucket-a/']" in str(info.value)
    assert "'connect_timeout'" in str(info.value)


def test_store_arguments_add_to_a_config_object() -> None:
    base = mlstore.StoreConfig(
        mounts={"a": ["memory://a"]},
        options={"s3": {"region_name": "eu-west-1", "anon": True}},
        max_workers=5,
    )
    store = mlstore.Store(
        base, mounts={"b": "memory://b"}, options={"s3": {"anon": False}, "gs": {"anon": True}}
    )
    assert dict(store.config.mounts) == {"a": ("memory://a",), "b": ("memory://b",)}
    assert store.config.options["s3"] == {"region_name": "eu-west-1", "anon": False}
    assert store.config.options["gs"] == {"anon": True}
    assert store.config.max_workers == 5  # not given: the config object's value stays
    assert mlstore.Store(base, max_workers=2).config.max_workers == 2
    assert base.updated() is base  # nothing given, nothing rebuilt

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cluster.profiles import load_profile
from pipeline.cluster.up import worker_specs
from pipeline.errors import ConfigError, ReadError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "clusters"


def test_shipped_profiles_load_and_resolve_certificate_paths() -> None:
    assert load_profile(CONFIGS / "local.yaml").kind == "local"
    assert load_profile(CONFIGS / "address.yaml").address == "tcp://127.0.0.1:8786"
    tls = load_profile(CONFIGS / "tls.yaml").tls
    assert tls is not None and tls.ca_file == str((CONFIGS / "certs" / "ca.pem").resolve())


def test_bad_profiles_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ReadError, match="not found"):
        load_profile(tmp_path / "missing.yaml")
    (tmp_path / "p.yaml").write_text("kind: address\n")
    with pytest.raises(ConfigError, match="needs address"):
        load_profile(tmp_path / "p.yaml")
    (tmp_path / "q.yaml").write_text("kind: local\nworkers: 3\n")
    with pytest.raises(ConfigError, match="workers"):
        load_profile(tmp_path / "q.yaml")


def test_one_gpu_worker_per_device_with_the_gpu_resource() -> None:
    specs = worker_specs(2, 2, "4GiB")
    assert sorted(specs) == ["cpu-0", "cpu-1", "gpu-0", "gpu-1"]
    assert specs["gpu-1"]["options"]["resources"] == {"GPU": 1}
    assert specs["gpu-1"]["options"]["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert "resources" not in specs["cpu-0"]["options"]
    assert specs["cpu-0"]["options"]["env"]["OMP_NUM_THREADS"] == "1"

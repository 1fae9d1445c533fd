"""Hub ids resolved through a local Hugging Face cache laid out as the hub lays it out (no network here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from conftest import TINY, random_weights_, relative_error

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cache(root, repo_id: str, files: dict[str, bytes]) -> None:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)  # a file in a subfolder
        (snapshot / name).write_bytes(data)


def run(code: str, cache, offline: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"))
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_loads_from_the_cache(tmp_path, offline):
    reference = random_weights_(transformers.PvtV2ForImageClassification(transformers.PvtV2Config(**TINY, num_labels=3)))
    reference.save_pretrained(tmp_path / "saved")
    make_cache(tmp_path / "cache", "OpenGVLab/pvt_v2_tiny", {
        "config.json": (tmp_path / "saved" / "config.json").read_bytes(),
        "model.safetensors": (tmp_path / "saved" / "model.safetensors").read_bytes(),
    })
    x = torch.randn(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import torch, pvtv2\n"
        "m = pvtv2.PvtV2ForImageClassification.from_pretrained('OpenGVLab/pvt_v2_tiny')\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save(m(x).logits.detach(), {str(tmp_path / 'y.pt')!r})\n"
    )
    # Cached files need no network round trips (no retries against an unreachable hub): every lookup of a host and
    # every connection the process tries is refused, and counted unless huggingface_hub's own user-agent lookup
    # (utils/_detect_agent.py: one request for its list of agent harnesses, whatever is downloaded) made it.
    # (Counted rather than timed: under `pytest -n` a subprocess's wall time says more about the other workers than
    # about this one.)
    spy = (
        "import socket, traceback\n"
        "tried = []\n"
        "def refuse(name):\n"
        "    def call(*args, **kwargs):\n"
        "        if not any('_detect_agent' in frame.filename for frame in traceback.extract_stack()):\n"
        "            tried.append((name, args))\n"
        "        raise OSError(f'{name}: no network in this test')\n"
        "    return call\n"
        "socket.getaddrinfo = refuse('getaddrinfo')\n"
        "socket.create_connection = refuse('create_connection')\n"
        "socket.socket.connect = refuse('connect')\n"
        "socket.socket.connect_ex = refuse('connect_ex')\n"
    )
    result = run(spy + code + "print('network:', tried)\n", tmp_path / "cache", offline=offline)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "network: []", result.stdout
    with torch.no_grad():
        assert relative_error(reference.eval()(x).logits, torch.load(tmp_path / "y.pt")) < 1e-5


@pytest.mark.slow
def test_uncached_hub_id_says_how_to_get_the_weights(tmp_path):
    (tmp_path / "cache").mkdir()
    result = run("import pvtv2\npvtv2.PvtV2ForImageClassification.from_pretrained('OpenGVLab/pvt_v2_b0')", tmp_path / "cache")
    assert result.returncode != 0
    assert "HubFileNotFound" in result.stderr
    assert "not in the Hugging Face cache" in result.stderr and "hf download OpenGVLab/pvt_v2_b0" in result.stderr


@pytest.mark.slow
def test_cached_config_without_weights_is_a_clear_error(tmp_path):
    make_cache(tmp_path / "cache", "OpenGVLab/pvt_v2_b0", {"config.json": json.dumps({"model_type": "pvt_v2"}).encode()})
    result = run("import pvtv2\npvtv2.PvtV2ForImageClassification.from_pretrained('OpenGVLab/pvt_v2_b0')", tmp_path / "cache")
    assert result.returncode != 0 and "model.safetensors" in result.stderr and "not in the Hugging Face cache" in result.stderr

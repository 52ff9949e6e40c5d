"""Dispatch tables (lowc/kernels/dispatch.py): committed tables parse into valid configs, and a table for the
current GPU model is read once per device into the tuned-config cache, never overriding what was timed."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from lowc.kernels import dispatch  # noqa: E402
from lowc.kernels.wa16_gemm import _TUNED, GemmConfig  # noqa: E402


def test_device_slug():
    assert dispatch.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert dispatch.device_slug("  NVIDIA H200 ") == "nvidia-h200"


@pytest.mark.parametrize("path", sorted(dispatch.TABLE_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_committed_tables_are_valid(path):
    doc = json.loads(path.read_text())
    assert dispatch.device_slug(doc["device"]) == path.stem and doc["command"].startswith("lowc bench kernels")
    assert doc["entries"], "an empty table"
    for e in doc["entries"]:
        cfg = GemmConfig(**e["config"])
        assert e["kernel"] in ("wa16", "wa8") and e["bits"] in (4, 6, 8) and e["dtype"] in ("bfloat16", "float16")
        assert cfg.block_n > 0 and cfg.split_k >= 1 and (not cfg.gemv or e["m_bucket"] == 1)  # GEMV: 1 token
        assert not cfg.cuda or (e["m_bucket"] <= 16 and e["bits"] in (4, 6))
        # lossless round trip (fields added to GemmConfig later take their defaults in older tables)
        assert dispatch._key(e)[1] == e["m_bucket"] and dispatch._entry(dispatch._key(e), cfg) == \
            {**e, "config": cfg._asdict()}


def test_load_table_once_per_device(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(dispatch, "_LOADED", set())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Test GPU 9000")
    timed = GemmConfig(16, 64, 128, 2)
    tabled = GemmConfig(1, 8, 512, 1, 4, 1, gemv=True)
    # shapes no other test or tuning run uses, so the check does not depend on what this process timed before
    keys = [("wa16", 1, 12345, 4096, 4, 128, torch.bfloat16), ("wa16", 1, 12346, 4096, 4, 128, torch.bfloat16)]
    doc = {"device": "Test GPU 9000", "command": "lowc bench kernels", "entries": [
        dispatch._entry(keys[0], tabled), dispatch._entry(keys[1], tabled)]}
    (tmp_path / "test-gpu-9000.json").write_text(json.dumps(doc))
    saved = dict(_TUNED)
    try:
        for key in keys:
            _TUNED.pop(key, None)
        _TUNED[keys[1]] = timed  # timed in this process before the table was read: kept
        monkeypatch.setenv("LOWC_DISPATCH_TABLE", "0")
        assert dispatch.load_table(0) == 0 and keys[0] not in _TUNED
        monkeypatch.setenv("LOWC_DISPATCH_TABLE", "1")
        dispatch._LOADED.clear()
        assert dispatch.load_table(0) == 2
        assert _TUNED[keys[0]] == tabled and _TUNED[keys[1]] == timed
        assert dispatch.load_table(0) == 0  # once per device
    finally:
        _TUNED.clear()
        _TUNED.update(saved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_bench_kernels_needs_cuda():
    from click.testing import CliRunner

    from lowc.cli import cli

    result = CliRunner().invoke(cli, ["bench", "kernels", "--shapes", "64x64"])
    assert result.exit_code != 0 and "CUDA is not available" in result.output + str(result.exception)


@pytest.mark.parametrize("args,message", [(["--kernels", "btc"], "--kernels takes wa16 and/or wa8"),
                                          (["--shapes", "llama-3"], "--shapes: unknown 'llama-3'"),
                                          (["--bits", "5"], "--bits takes 4, 6, 8")])
def test_bench_kernels_rejects_bad_options(args, message):
    """Checked before any GPU work, on any machine."""
    from click.testing import CliRunner

    from lowc.cli import cli

    result = CliRunner().invoke(cli, ["bench", "kernels", *args])
    assert result.exit_code != 0 and message in result.output + str(result.exception)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pick_config times candidates as CUDA graphs")
def test_pick_config_drops_a_candidate_that_computes_something_else(monkeypatch):
    """A config whose output disagrees with the first (established) candidate never wins on speed."""
    from lowc.kernels import wa16_gemm

    monkeypatch.setenv("LOWC_AUTOTUNE", "1")
    x = torch.randn(256, 256, device="cuda")
    good, wrong = GemmConfig(1, 8, 64), GemmConfig(1, 16, 64)
    outputs = {good: lambda: x @ x, wrong: lambda: x * 3}  # the wrong one is also far faster
    with pytest.warns(UserWarning, match="disagrees"):
        assert wa16_gemm.pick_config(("test", 1), [good, wrong], lambda c: outputs[c]()) == good

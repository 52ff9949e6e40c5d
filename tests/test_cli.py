"""The lowc command line end to end on a tiny checkpoint, and every bad input it must refuse cleanly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama, run_cli


def assert_clean_failure(code: int, err: str, expected_code: int, *needles: str) -> None:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_compress_inspect_eval_run(tiny_llama, tiny_text, tmp_path, capsys):
    out = tmp_path / "art"
    code, _, err = run_cli(["compress", tiny_llama, "--vnm", "16:2:5", "--wbits", "6", "--group", "32", "-o", out, "-q"], capsys)
    assert code == 0, err
    assert (out / "lowc.json").is_file() and (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["sparsity"] == {"format": "vnm", "v": 16, "n": 2, "m": 5}

    code, stdout, _ = run_cli(["inspect", out, "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["totals"]["compressed_modules"] == 14
    assert {m["scheme"] for m in info["modules"]} == {"V:N:M 16:2:5 + W6 g32"}
    assert 0 < info["totals"]["ratio_vs_bf16"] < 1
    code, stdout, _ = run_cli(["inspect", out], capsys)
    assert code == 0 and "model.layers.1.mlp.down_proj" in stdout and "ratio" in stdout

    code, stdout, err = run_cli(["eval", out, "--data", tiny_text, "--seqlen", "32", "--json"], capsys)
    assert code == 0, err
    ppl = json.loads(stdout)
    code, stdout, _ = run_cli(["eval", tiny_llama, "--data", tiny_text, "--seqlen", "32", "--json"], capsys)
    dense = json.loads(stdout)
    assert ppl["tokens"] == dense["tokens"] > 100
    assert ppl["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-6)  # the artifact is really compressed

    code, stdout, err = run_cli(["run", out, "--prompt", "the city of", "-n", "5"], capsys)
    assert code == 0, err
    assert stdout.startswith("the city of") and len(stdout.split()) > 3


def test_dry_run_writes_nothing(tiny_llama, tmp_path, capsys):
    code, stdout, err = run_cli(["compress", tiny_llama, "--vnm", "64:2:5", "--pad-rows", "--wbits", "4", "-o", tmp_path / "x",
                                 "--dry-run"], capsys)
    assert code == 0, err
    assert "model.layers.0.self_attn.k_proj" in stdout and "estimated artifact size" in stdout
    assert not (tmp_path / "x").exists()


def test_v_not_dividing_rows_names_the_layer(tiny_llama, tmp_path, capsys):
    rc, _, err = run_cli(["compress", tiny_llama, "--vnm", "64:2:5", "-o", tmp_path / "o"], capsys)
    assert_clean_failure(rc, err, 2, "model.layers.0.self_attn.k_proj", "32 rows", "--pad-rows")
    assert not (tmp_path / "o").exists()
    rc, _, err = run_cli(["compress", tiny_llama, "--vnm", "64:2:5", "--pad-rows", "-o", tmp_path / "o", "-q"], capsys)
    assert rc == 0, err
    k = json.loads((tmp_path / "o" / "lowc.json").read_text())["modules"]["model.layers.0.self_attn.k_proj"]
    assert k["shape"] == [32, 64] and k["vnm"] == "64:2:5"


def test_recipe_file_and_skip(tiny_llama, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("vnm: '16:2:8'\nwbits: 8\nskip: ['*.down_proj']\n")
    out = tmp_path / "art"
    code, _, err = run_cli(["compress", tiny_llama, "--recipe", tmp_path / "r.yaml", "--wbits", "4", "-o", out, "-q"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "lowc.json").read_text())
    assert manifest["recipe"]["wbits"] == 4 and manifest["recipe"]["vnm"] == "16:2:8"  # flags override the file
    assert not any(m.endswith("down_proj") for m in manifest["modules"])
    assert len(manifest["modules"]) == 12


@pytest.mark.parametrize("args,code,needle", [
    (["--vnm", "64:3:5"], 2, "--vnm"), (["--vnm", "0:2:5"], 2, "--vnm"), (["--vnm", "64:2:3"], 2, "--vnm"),
    (["--wbits", "5"], 2, "--wbits"), (["--wbits", "six"], 2, "wbits"), ([], 2, "nothing to do"),
])
def test_malformed_flags(tiny_llama, tmp_path, capsys, args, code, needle):
    rc, _, err = run_cli(["compress", tiny_llama, "-o", tmp_path / "o", *args], capsys)
    assert_clean_failure(rc, err, code, needle)
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)


def test_missing_path(tmp_path, capsys):
    rc, _, err = run_cli(["compress", tmp_path / "nope", "--wbits", "6", "-o", tmp_path / "o"], capsys)
    assert_clean_failure(rc, err, 2, "nope", "no such file")
    rc, _, err = run_cli(["eval", tmp_path / "nope", "--data", tmp_path / "nope.txt"], capsys)
    assert_clean_failure(rc, err, 2, "nope")


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(["compress", tmp_path / "empty", "--wbits", "6", "-o", tmp_path / "o"], capsys)
    assert_clean_failure(rc, err, 2, "empty", "config.json")


def test_unsupported_architecture(tmp_path, capsys):
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    rc, _, err = run_cli(["compress", path, "--wbits", "6", "-o", tmp_path / "o"], capsys)
    assert_clean_failure(rc, err, 1, "GPT2LMHeadModel", "LlamaForCausalLM", "BertModel")


def test_existing_output_refused_without_force(tiny_llama, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc, _, err = run_cli(["compress", tiny_llama, "--wbits", "6", "-o", out], capsys)
    assert_clean_failure(rc, err, 2, "already exists", "--force")
    rc, _, err = run_cli(["compress", tiny_llama, "--wbits", "6", "-o", out, "--force"], capsys)
    assert_clean_failure(rc, err, 2, "not a lowc artifact")
    assert (out / "precious.txt").read_text() == "keep me"
    # an existing artifact is replaced with --force
    art = tmp_path / "art"
    assert run_cli(["compress", tiny_llama, "--wbits", "8", "-o", art, "-q"], capsys)[0] == 0
    assert run_cli(["compress", tiny_llama, "--wbits", "4", "-o", art, "-q", "--force"], capsys)[0] == 0
    assert json.loads((art / "lowc.json").read_text())["recipe"]["wbits"] == 4
    assert no_leftovers(tmp_path)


def test_truncated_shard(tiny_llama, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, ckpt)
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    rc, _, err = run_cli(["compress", ckpt, "--wbits", "6", "-o", tmp_path / "o"], capsys)
    assert_clean_failure(rc, err, 1, shard.name, "truncated or corrupted")
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)


def test_nan_weight_is_named(tmp_path, capsys):
    ckpt = make_tiny_llama(tmp_path / "ckpt", max_shard_bytes=10**9)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, ckpt / "model.safetensors")
    rc, _, err = run_cli(["compress", ckpt, "--wbits", "6", "-o", tmp_path / "o"], capsys)
    assert_clean_failure(rc, err, 1, "model.layers.1.mlp.up_proj.weight", "NaN or Inf")
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)


def test_corrupted_artifact_refused_by_every_command(tiny_llama, tiny_text, tmp_path, capsys):
    art = tmp_path / "art"
    assert run_cli(["compress", tiny_llama, "--wbits", "6", "-o", art, "-q"], capsys)[0] == 0
    (art / "tokenizer.json").write_text((art / "tokenizer.json").read_text().replace("school", "scho0l"))
    for args in (["inspect", art], ["eval", art, "--data", tiny_text], ["run", art, "--prompt", "the"]):
        rc, _, err = run_cli(args, capsys)
        assert_clean_failure(rc, err, 1, "tokenizer.json", "sha256")


def test_real_process_exit_codes(tmp_path):
    """The installed entry point: one line on stderr, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "lowc.cli", "compress", str(tmp_path / "nope"), "--wbits", "6",
                           "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert_clean_failure(proc.returncode, proc.stderr, 2, "no such file")


def test_generation_matches_dense_model_when_nothing_is_pruned(tiny_llama, tmp_path):
    """INT8 weights with 16-token groups barely move the logits: greedy tokens match the checkpoint's."""
    import lowc
    from lowc.runtime.generate import SamplingConfig, generate_ids

    art = lowc.compress(tiny_llama, tmp_path / "a", wbits=8, group=16, progress=False)
    dense, packed = lowc.load(tiny_llama), lowc.load(art)
    prompt = dense.tokenizer.encode_prompt("the first city of the world")
    cfg = SamplingConfig(max_new_tokens=8)
    assert list(generate_ids(dense, prompt, cfg)) == list(generate_ids(packed, prompt, cfg))
    ids = torch.tensor([prompt])
    rel = (dense(ids) - packed(ids)).norm() / dense(ids).norm()
    assert 0 < float(rel) < 0.02


def test_streamed_pieces_add_up_to_the_generated_text(tiny_llama):
    import lowc
    from lowc.runtime.generate import SamplingConfig, generate

    model = lowc.load(tiny_llama)
    pieces: list[str] = []
    text = generate(model, "the school of", SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=0),
                    on_text=pieces.append)
    assert pieces and "".join(pieces) == text
    again = generate(model, "the school of", SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=0))
    assert again == text  # seeded sampling is reproducible


def test_permutation_moves_channels_and_keeps_dtypes(tiny_llama, tmp_path, capsys):
    from lowc.artifact import open_artifact
    from lowc.checkpoint import Checkpoint

    ckpt = Checkpoint(tiny_llama)
    for flag in ("--permute", "--no-permute"):
        out = tmp_path / flag
        code, _, err = run_cli(["compress", tiny_llama, "--vnm", "16:2:5", flag, "-o", out, "-q"], capsys)
        assert code == 0, err
        art = open_artifact(out)
        metrics = art.manifest["metrics"]
        embed, norm = art.get("model.embed_tokens.weight"), art.get("model.norm.weight")
        assert embed.dtype == norm.dtype == torch.bfloat16
        source = ckpt.get("model.embed_tokens.weight")
        if flag == "--no-permute":
            assert "permutation" not in metrics and torch.equal(embed, source)
            continue
        report = metrics["permutation"]
        assert report["kept_after"] > report["kept_before"] and art.manifest["recipe"]["permute"] is True
        # the residual stream moved: the same hidden channels, in another order, in every tensor that carries it
        assert not torch.equal(embed, source)
        order = [int(torch.nonzero((source == embed[:, [j]]).all(0))[0]) for j in range(embed.shape[1])]
        assert sorted(order) == list(range(embed.shape[1]))
        assert torch.equal(norm, ckpt.get("model.norm.weight")[order])


def test_inspect_shows_the_kernel_per_device(tiny_llama, tmp_path, capsys):
    out = tmp_path / "w4"
    code, _, err = run_cli(["compress", tiny_llama, "--wbits", "4", "--group", "32", "--skip", "*.down_proj",
                            "-o", out, "-q"], capsys)
    assert code == 0, err
    code, stdout, _ = run_cli(["inspect", out, "--json", "--device", "cuda"], capsys)
    kernels = {m["name"]: m["kernel"] for m in json.loads(stdout)["modules"]}
    assert code == 0 and kernels["model.layers.0.self_attn.q_proj"] == "wa16"
    assert "model.layers.0.mlp.down_proj" not in kernels  # skipped: stays a dense tensor
    code, stdout, _ = run_cli(["inspect", out, "--json"], capsys)
    assert {m["kernel"] for m in json.loads(stdout)["modules"]} == {"reference"}
    code, stdout, _ = run_cli(["inspect", out, "--device", "cuda"], capsys)
    assert code == 0 and "kernel (cuda)" in stdout and "wa16" in stdout
    sparse = tmp_path / "vnm"
    code, _, err = run_cli(["compress", tiny_llama, "--vnm", "16:2:5", "--wbits", "6", "--group", "32",
                            "-o", sparse, "-q"], capsys)
    assert code == 0, err
    code, stdout, _ = run_cli(["inspect", sparse, "--json", "--device", "cuda"], capsys)
    assert {m["kernel"] for m in json.loads(stdout)["modules"]} == {"vnm"}  # 16-bit inputs: dequantized at load
    code, stdout, _ = run_cli(["inspect", sparse, "--json", "--device", "cuda", "--gpu", "Other GPU"], capsys)
    configs = json.loads(stdout)["modules"][0]["configs"]
    assert configs["16"] == "sparse tiles by token count" and configs["4096"] == "expanded to a dense weight + cuBLAS"
    sparse_a8 = tmp_path / "vnm-a8"
    code, _, err = run_cli(["compress", tiny_llama, "--vnm", "16:2:5", "--wbits", "6", "--abits", "8", "--group",
                            "32", "-o", sparse_a8, "-q"], capsys)
    assert code == 0, err
    code, stdout, _ = run_cli(["inspect", sparse_a8, "--json", "--device", "cuda"], capsys)
    assert {m["kernel"] for m in json.loads(stdout)["modules"]} == {"vnm_int8"}
    assert all(m["decode_fused_with"] is None for m in json.loads(stdout)["modules"])
    code, stdout, _ = run_cli(["inspect", sparse_a8, "--json", "--device", "cuda", "--gpu", "Other GPU"], capsys)
    mods = {m["name"]: m for m in json.loads(stdout)["modules"]}
    # q_proj (64 inputs, 26 kept values a row: one scale per row) expands; down_proj (96 inputs, 40 kept values in
    # groups of 32 = 80 dense columns of 16:2:5, which the W8A8 GEMM's K tiles cannot fit) stays on the SpMM
    assert mods["model.layers.0.self_attn.q_proj"]["configs"]["4096"] == "expanded to dense INT8 + W8A8 GEMM"
    assert mods["model.layers.0.mlp.down_proj"]["configs"]["4096"] == "sparse tiles by token count"
    w3 = tmp_path / "w3"
    code, _, err = run_cli(["compress", tiny_llama, "--wbits", "3", "--group", "32", "-o", w3, "-q"], capsys)
    assert code == 0, err
    code, stdout, _ = run_cli(["inspect", w3, "--json", "--device", "cuda"], capsys)
    assert {m["kernel"] for m in json.loads(stdout)["modules"]} == {"wa16"}  # INT3 codes in the INT4 layout


def test_inspect_shows_dispatch_table_configs(tiny_llama, tmp_path, capsys, monkeypatch):
    """--device cuda --gpu NAME: per module and token count the config of that GPU model's table; decode of q/k/v
    and gate/up looks up their fused weight; shapes the table lacks are "timed on first use"."""
    from lowc.kernels import dispatch
    from lowc.kernels.wa16_gemm import GemmConfig

    out = tmp_path / "w4"
    code, _, err = run_cli(["compress", tiny_llama, "--wbits", "4", "--group", "32", "-o", out, "-q"], capsys)
    assert code == 0, err
    hidden, inter = 64, 96  # conftest.TINY_LLAMA
    gemv, mma = GemmConfig(1, 8, 64, 2, gemv=True), GemmConfig(128, 64, 32, 1, 8, 3)
    keys = [("wa16", 1, hidden + 2 * 32, hidden, 4, 32, torch.bfloat16),  # fused q/k/v: 64 + 2 KV heads x 16
            ("wa16", 4096, hidden, hidden, 4, 32, torch.bfloat16)]  # q_proj alone (and o_proj) in prefill
    doc = {"device": "Test GPU 9000", "command": "lowc bench kernels",
           "entries": [dispatch._entry(keys[0], gemv), dispatch._entry(keys[1], mma)]}
    monkeypatch.setattr(dispatch, "TABLE_DIR", tmp_path)
    (tmp_path / "test-gpu-9000.json").write_text(json.dumps(doc))
    code, stdout, _ = run_cli(["inspect", out, "--json", "--device", "cuda", "--gpu", "Test GPU 9000"], capsys)
    d = json.loads(stdout)
    assert code == 0 and d["dispatch_table"]["file"].endswith("test-gpu-9000.json")
    mods = {m["name"]: m for m in d["modules"]}
    q, k, up = (mods[f"model.layers.0.{n}"] for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"))
    assert q["decode_fused_with"] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert q["configs"]["1"] == k["configs"]["1"] == "gemv 8x64 split 2"
    assert q["configs"]["4096"] == "mma 128x64x32" and k["configs"]["4096"] == "timed on first use"
    assert up["decode_fused_with"][0].endswith("gate_proj") and up["configs"]["16"] == "timed on first use"
    assert mods["model.layers.0.mlp.down_proj"]["decode_fused_with"] is None
    code, stdout, _ = run_cli(["inspect", out, "--device", "cuda", "--gpu", "Test GPU 9000"], capsys)
    assert code == 0 and "gemv 8x64 split 2" in stdout and "dispatch table" in stdout
    code, stdout, _ = run_cli(["inspect", out, "--device", "cuda", "--gpu", "Other GPU"], capsys)
    assert code == 0 and "none committed for this GPU model" in stdout

"""AST wired into `lowc compress`: the recipe's `ast` mapping, the --ast-* flags, trained weights and AST's masks in
the artifact, SLoRB branches stored in the artifact and executed by the runtime and the ONNX export, resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_cli  # noqa: E402

import lowc  # noqa: E402
from lowc.artifact import open_artifact  # noqa: E402
from lowc.checkpoint import Checkpoint  # noqa: E402
from lowc.compress import pipeline  # noqa: E402
from lowc.compress.pipeline import compress_module  # noqa: E402
from lowc.compress.sparsity import ast as ast_module, ast_cli  # noqa: E402
from lowc.compress.sparsity.ast import is_vnm  # noqa: E402
from lowc.compress.sparsity.vnm import VNMSpec  # noqa: E402
from lowc.errors import ArtifactError, UsageError  # noqa: E402
from lowc.kernels import reference  # noqa: E402
from lowc.recipe import Recipe  # noqa: E402
from lowc.runtime.packed_linear import PackedLinear  # noqa: E402
from lowc.scheme import ModuleScheme  # noqa: E402

VNM = "16:2:8"
AST = {"steps": 4, "batch_size": 4, "lr": 3e-3, "mask_interval": 2, "norm_samples": 8, "checkpoint_every": 0}
AST_SLORB = {**AST, "slorb": True}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def recipe(tiny_text: Path, **extra) -> dict:
    return {"vnm": VNM, "calib": str(tiny_text), "calib_samples": 8, "calib_seqlen": 32, "importance": "wanda",
            "reconstruct": "lstsq", **extra}


class Spy:
    """Wraps ast_cli.ast_from_pipeline (the pipeline imports it when it runs) to keep what AST returned."""

    def __init__(self, monkeypatch):
        self.weights: dict[str, torch.Tensor] = {}
        self.extra: dict[str, torch.Tensor] = {}
        real = ast_cli.ast_from_pipeline

        def spy(model, teacher, plan, *args, **kwargs):
            model, metrics, extra, scores = real(model, teacher, plan, *args, **kwargs)
            self.weights = {n: model.get_submodule(n).weight.detach().clone() for n, s in plan.schemes.items()
                            if s.vnm is not None}
            self.extra = {n: t.clone() for n, t in extra.items()}
            return model, metrics, extra, scores

        monkeypatch.setattr(ast_cli, "ast_from_pipeline", spy)


def keep_masks(art) -> dict[str, torch.Tensor]:
    """Each V:N:M module's stored keep pattern, decoded from its columns/positions alone (values set to 1)."""
    out = {}
    for name, s in art.schemes.items():
        t = art.module_tensors(name)
        ones = torch.ones(s.shape[0], 2 * t["columns"].shape[1])
        out[name] = reference.vnm_to_dense(ones, t["columns"], t["positions"], s.vnm.v, s.vnm.m, s.shape) != 0
    return out


def dense_weights(art) -> dict[str, torch.Tensor]:
    return {n: reference.dense_weight(art.module_tensors(n), s) for n, s in art.schemes.items()}


def hand_group_sums(x: torch.Tensor, group: int) -> torch.Tensor:
    return torch.stack([x[..., i:i + group].sum(-1) for i in range(0, x.shape[-1], group)], -1)


# ------------------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def trained(tiny_llama, tiny_text, tmp_path_factory) -> tuple[Path, Path, Spy]:
    """The same recipe compressed without and with AST (and what AST returned)."""
    tmp = tmp_path_factory.mktemp("ast")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        plain = lowc.compress(tiny_llama, tmp / "plain", progress=False, **recipe(tiny_text))
        spy = Spy(monkeypatch)
        out = lowc.compress(tiny_llama, tmp / "ast", progress=False, **recipe(tiny_text, ast=AST_SLORB))
    torch.set_num_threads(threads)
    return plain, out, spy


def test_compress_with_ast_writes_the_trained_weights(trained):
    plain, out, spy = trained
    tmp_path = out.parent
    art = open_artifact(out)
    metrics = art.metrics["ast"]
    assert metrics["steps"] == 4 and metrics["resumed_from"] == 0 and metrics["mode"] == "AST +SLoRB"
    assert metrics["tokens_per_second"] > 0 and metrics["seconds"] > 0 and metrics["peak_rss_bytes"] > 0
    assert 0 <= metrics["final_flip_rate"] < 1 and metrics["slorb_group"] == 16 and metrics["log"] == "ast_log.jsonl"
    log = [json.loads(line) for line in (out / "ast_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[-1]["loss"] == metrics["loss_last"]
    assert "ast_log.jsonl" in art.manifest["files"]  # hashed and verified like every other file
    assert art.recipe["ast"] == AST_SLORB and "reconstruction" in art.metrics
    assert not ast_cli.ast_workdir(out).exists()  # checkpoints and log removed once the artifact is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ast", "plain"]

    masks, weights = keep_masks(art), dense_weights(art)
    spec = VNMSpec.parse(VNM)
    assert set(masks) == set(spy.weights) and len(masks) == 14
    for name, trained in spy.weights.items():
        assert is_vnm(masks[name], spec), name
        assert masks[name].float().mean() == pytest.approx(2 / spec.m)
        assert torch.equal(masks[name] | (trained != 0), masks[name]), name  # AST's mask is the stored one
        # no bits: the stored values are AST's trained weights in the checkpoint's dtype
        assert torch.equal(weights[name], trained.to(torch.bfloat16).float()), name
    before = dense_weights(open_artifact(plain))
    assert sum(not torch.equal(before[n], weights[n]) for n in weights) == len(weights)  # every module trained

    model = lowc.load(out)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (1, 6, model.config.vocab_size) and torch.isfinite(logits).all()
        assert not torch.allclose(logits, lowc.load(plain)(ids))


def test_slorb_is_stored_and_executed_by_the_runtime(tiny_llama, tiny_text, tmp_path, monkeypatch, capsys):
    spy = Spy(monkeypatch)
    group = 24  # 64 inputs: groups of 24, 24 and a short one of 16
    real_reconstruct, checked = pipeline._reconstruct, []

    def reconstruct(model, *args, refit=None, **kwargs):
        """GPTQ after AST walks the model with its SLoRB branches: the later layers see what the runtime computes."""
        if refit is False:
            x = torch.randn(3, 64)
            for name, weight in spy.weights.items():
                if name.endswith("q_proj"):
                    s = spy.extra[f"{name}.slorb.weight"].to(torch.bfloat16).float()
                    want = x @ weight.T + hand_group_sums(x, group) @ s.T
                    torch.testing.assert_close(model.get_submodule(name)(x), want, rtol=1e-5, atol=1e-5)
                    checked.append(name)
        return real_reconstruct(model, *args, refit=refit, **kwargs)

    monkeypatch.setattr(pipeline, "_reconstruct", reconstruct)
    out = lowc.compress(tiny_llama, tmp_path / "slorb", progress=False,
                        **recipe(tiny_text, wbits=6, group=32, method="gptq",
                                 ast={**AST, "slorb": True, "slorb_group": group}))
    assert checked == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    art = open_artifact(out)
    assert art.metrics["ast"]["slorb_group"] == group and art.metrics["ast"]["mode"] == "AST +SLoRB"
    assert art.metrics["gptq_after_ast"]["method"] == "gptq" and art.metrics["gptq_after_ast"]["solver"] is None
    assert art.metrics["reconstruction"]["solver"] == "lstsq" and art.metrics["reconstruction"]["method"] is None
    masks = keep_masks(art)
    for name, s in art.schemes.items():
        assert s.slorb_group == group and art.manifest["modules"][name]["slorb_group"] == group
        assert art.tensor_info(f"{name}.slorb") == ((s.shape[0], -(-s.shape[1] // group)), "bfloat16")
        stored = art.get(f"{name}.slorb")
        assert torch.equal(stored, spy.extra[f"{name}.slorb.weight"].to(torch.bfloat16))  # the trained branch
        assert is_vnm(masks[name], s.vnm) and torch.equal(masks[name] | (spy.weights[name] != 0), masks[name])
    dense_bytes = sum(2 * torch.Size(art.tensor_info(n)[0]).numel() for n in art.dense_tensor_names())  # all bf16
    assert art.metrics["packed_bytes"] == sum(s.nbytes() for s in art.schemes.values()) + dense_bytes
    code, stdout, _ = run_cli(["inspect", out], capsys)
    assert code == 0 and f"V:N:M {VNM} + W6 g32 + SLoRB g{group}" in stdout

    # every packed module computes x W^T + group_sums(x) S^T, W decoded from the packed tensors
    model = lowc.load(out)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(3))
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            xi = x[..., : module.in_features]
            s = module.slorb.float()
            want = xi @ module.dense_weight().T + hand_group_sums(xi, group) @ s.T
            torch.testing.assert_close(module(xi), want, rtol=1e-5, atol=1e-5)

    # the whole model: every PackedLinear replaced by the same computation done by hand gives the same logits
    ids = torch.tensor([[3, 9, 4, 27, 5, 6, 40]])
    with torch.no_grad():
        logits = model(ids)
        by_hand = lowc.load(out)
        for name, module in list(by_hand.named_modules()):
            if isinstance(module, PackedLinear):
                parent, _, attr = name.rpartition(".")
                setattr(by_hand.get_submodule(parent), attr, HandLinear(module.dense_weight(), module.slorb, group))
        torch.testing.assert_close(by_hand(ids), logits, rtol=1e-4, atol=1e-4)
        for module in model.modules():
            if isinstance(module, PackedLinear):
                module.slorb.zero_()
        without = model(ids)
    assert (without - logits).abs().max() > 1e-3  # the branch matters


class HandLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, slorb: torch.Tensor, group: int):
        super().__init__()
        self.weight, self.slorb, self.group = weight, slorb.float(), group

    def forward(self, x):
        return x @ self.weight.T + hand_group_sums(x, self.group) @ self.slorb.T


def test_reference_slorb_branch_with_activation_quantization():
    """With A8 inputs the sparse product uses the quantized input, the SLoRB branch the unquantized one."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 40, generator=g), torch.randn(3, 40, generator=g)
    s = torch.randn(32, 3, generator=g)  # groups of 16: 16, 16, 8
    scheme = ModuleScheme("m", (32, 40), VNMSpec(16, 2, 5), 6, 16, "float32", abits=8, slorb_group=16)
    tensors = {**compress_module(w, scheme), "slorb": s}
    assert scheme.expected_tensors()["slorb"] == ((32, 3), "float32")
    codes, scale = reference.quantize_activations(x, 8)
    weight = reference.dense_weight(tensors, scheme)
    want = (codes.double() @ weight.double().T) * scale.double()[:, None] + hand_group_sums(x.double(), 16) @ s.double().T
    torch.testing.assert_close(reference.packed_linear(x, tensors, scheme), want.float(), rtol=1e-6, atol=1e-6)
    plain = ModuleScheme("m", (32, 40), VNMSpec(16, 2, 5), 6, 16, "float32", abits=8)
    assert not torch.allclose(reference.packed_linear(x, tensors, plain), want.float(), atol=1e-3)


def test_scheme_json_carries_the_slorb_group():
    s = ModuleScheme("m", (32, 40), VNMSpec(16, 2, 5), None, dtype="bfloat16", slorb_group=16)
    assert s.to_json()["slorb_group"] == 16 and ModuleScheme.from_json("m", s.to_json()) == s
    assert "slorb_group" not in ModuleScheme("m", (32, 40), VNMSpec(16, 2, 5)).to_json()
    assert "slorb" not in ModuleScheme("m", (32, 40), VNMSpec(16, 2, 5)).expected_tensors()
    assert s.nbytes() == ModuleScheme("m", (32, 40), VNMSpec(16, 2, 5), None, dtype="bfloat16").nbytes() + 32 * 3 * 2
    for bad in (0, -2, 2.5, True, "16"):
        with pytest.raises(ArtifactError, match="slorb_group"):
            ModuleScheme.from_json("m", {**s.to_json(), "slorb_group": bad})


def test_onnx_export_runs_the_slorb_branch(tiny_llama, tiny_text, tmp_path):
    pytest.importorskip("onnxruntime", reason="pip install onnx onnxruntime (lowc[onnx])")
    from lowc.export import export
    from lowc.export.onnx_run import decoder_step, empty_cache, session

    out = lowc.compress(tiny_llama, tmp_path / "art", progress=False,
                        **recipe(tiny_text, wbits=6, group=32, ast={**AST, "steps": 2, "slorb": True,
                                                                    "slorb_group": 24}))
    onnx_dir = export(out, output=tmp_path / "onnx")
    ids = torch.tensor([[3, 9, 4, 27, 5], [8, 8, 30, 2, 11]])
    sess = session(onnx_dir)
    got, past = decoder_step(sess, ids.numpy(), empty_cache(sess, 2))
    model = lowc.load(out)
    with torch.no_grad():
        want = model(ids)
        for module in model.modules():
            if isinstance(module, PackedLinear):
                module.slorb.zero_()
        without = model(ids)
    scale = want.abs().max()
    assert (torch.from_numpy(got) - want).abs().max() / scale < 1e-5
    assert (without - want).abs().max() / scale > 1e-3  # so the parity above needs the branch


def test_onnx_group_sums_and_fallback_linear_match_the_reference():
    """Module level, on rank-2 and rank-3 inputs: the exported packed and dequantized (fallback) forms of a SLoRB
    module agree with reference.packed_linear."""
    ort = pytest.importorskip("onnxruntime", reason="pip install onnx onnxruntime (lowc[onnx])")
    from onnx import TensorProto, helper

    from lowc.export.onnx_builder import IR_VERSION, LOWC_DOMAIN, OPSET, Builder
    from lowc.export.onnx_linear import fallback_linear, packed_linear
    from lowc.export.onnx_ops import OPS, function_proto

    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 40, generator=g)
    scheme = ModuleScheme("m", (32, 40), VNMSpec(16, 2, 5), 6, 16, "bfloat16", slorb_group=16)
    tensors = {**compress_module(w, scheme), "slorb": torch.randn(32, 3, generator=g).to(torch.bfloat16)}
    for emit in (packed_linear, fallback_linear):
        for x in (torch.randn(4, 40, generator=g), torch.randn(2, 3, 40, generator=g)):
            b = Builder()
            inp = helper.make_tensor_value_info(b.reserve("x"), TensorProto.FLOAT, list(x.shape))
            y = emit(b, "x", scheme, tensors)
            graph = helper.make_graph(b.nodes, "m", [inp], [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
                                      b.initializers)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                            helper.make_opsetid(LOWC_DOMAIN, 1)],
                                      functions=[function_proto(op) for op in OPS.values()], ir_version=IR_VERSION)
            got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                None, {"x": x.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(got), reference.packed_linear(x, tensors, scheme),
                                       rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- recipe and CLI
def test_recipe_ast_mapping_validates_and_round_trips(tiny_text, tmp_path):
    r = Recipe(**recipe(tiny_text, ast={"steps": 5, "slorb": True}))
    assert r.needs_calibration and r.to_dict()["ast"] == {"steps": 5, "slorb": True}
    r.save(tmp_path / "r.json")
    assert Recipe.from_file(tmp_path / "r.json") == r
    (tmp_path / "r.yaml").write_text(f"vnm: '{VNM}'\ncalib: {tiny_text}\nast: {{steps: 5, lr: 2.0e-4}}\n")
    assert Recipe.from_file(tmp_path / "r.yaml").ast == {"steps": 5, "lr": 2e-4}
    assert Recipe(vnm=VNM, calib="x.txt", ast={"steps": 1}).needs_calibration
    for data, needle in [(dict(vnm=VNM, ast={"steps": 5}), "--calib"), (dict(calib="x", ast={"steps": 5}), "--vnm"),
                         (dict(vnm=VNM, calib="x", ast={"stepz": 5}), "unknown option"),
                         (dict(vnm=VNM, calib="x", ast={"steps": 0}), "--ast-steps"),
                         (dict(vnm=VNM, calib="x", ast=[5]), "mapping"),
                         (dict(vnm=VNM, calib="x", wbits=4, method="awq", ast={"steps": 5}), "awq")]:
        with pytest.raises(UsageError, match=needle):
            Recipe.from_dict(data)
    with pytest.raises(UsageError, match="--ast-resume"):
        lowc.compress("unused", tmp_path / "o", vnm=VNM, ast_resume=True)


def test_cli_ast_flags_and_recipe_file(tiny_llama, tiny_text, tmp_path, capsys):
    code, stdout, _ = run_cli(["compress", "--help"], capsys)
    assert code == 0 and "--ast-steps" in stdout and "--ast-resume" in stdout and "--ast-slorb" in stdout
    # magnitude pruning, no permutation, no refit: only AST changes the weights before packing
    (tmp_path / "r.yaml").write_text(f"vnm: '{VNM}'\ncalib: {tiny_text}\ncalib_samples: 8\ncalib_seqlen: 32\n"
                                     "permute: false\nast: {steps: 2, lr: 3.0e-3, batch_size: 4, checkpoint_every: 0}\n")
    out = tmp_path / "out"
    code, _, err = run_cli(["compress", tiny_llama, "--recipe", tmp_path / "r.yaml", "--ast-steps", "3",
                            "--ast-mask-interval", "2", "-o", out, "-q"], capsys)
    assert code == 0, err
    art = open_artifact(out)
    assert art.recipe["ast"] == {"steps": 3, "lr": 3e-3, "batch_size": 4, "checkpoint_every": 0, "mask_interval": 2}
    assert art.metrics["ast"]["steps"] == 3 and len((out / "ast_log.jsonl").read_text().splitlines()) == 3
    source = Checkpoint(tiny_llama)
    for name, weight in dense_weights(art).items():
        pruned = source.get(f"{name}.weight").float() * (weight != 0)
        assert not torch.equal(weight, pruned), name  # trained, not the checkpoint's weights pruned
    code, stdout, _ = run_cli(["compress", tiny_llama, "--vnm", VNM, "--calib", tiny_text, "--ast-slorb",
                               "--ast-slorb-group", "32", "--dry-run"], capsys)
    assert code == 0 and "V:N:M 16:2:8 + SLoRB g32" in stdout and "200 steps of AST" in stdout  # ASTConfig's default
    code, _, err = run_cli(["compress", tiny_llama, "--vnm", VNM, "--ast-steps", "3", "-o", tmp_path / "o2"], capsys)
    assert code == 2 and "--calib" in err and not (tmp_path / "o2").exists()
    code, _, err = run_cli(["compress", tiny_llama, "--vnm", VNM, "--ast-resume", "-o", tmp_path / "o3"], capsys)
    assert code == 2 and "--ast-resume" in err


def test_interrupted_run_resumes_with_ast_resume(tiny_llama, tiny_text, tmp_path, capsys, monkeypatch):
    """Ctrl-C during training leaves no output and a checkpoint; the same command with --ast-resume continues it
    and writes exactly the artifact of an uninterrupted run."""
    args = ["compress", tiny_llama, "--vnm", VNM, "--calib", tiny_text, "--calib-samples", "8", "--calib-seqlen", "32",
            "--importance", "wanda", "--reconstruct", "lstsq", "--wbits", "6", "--group", "32",
            "--ast-steps", "6", "--ast-batch-size", "4", "--ast-lr", "3e-3", "--ast-mask-interval", "2",
            "--ast-checkpoint-every", "2", "--ast-slorb", "-q"]
    assert run_cli([*args, "-o", tmp_path / "whole"], capsys)[0] == 0

    out = tmp_path / "cut"
    real = ast_module.lambda_at

    def interrupt(step, config):
        if step == 4:  # during step 5: the checkpoint of step 4 is the last one
            raise KeyboardInterrupt
        return real(step, config)

    monkeypatch.setattr(ast_module, "lambda_at", interrupt)
    code, _, err = run_cli([*args, "-o", out], capsys)
    assert code == 130 and "interrupted" in err
    assert not out.exists() and not list(tmp_path.glob(".cut.tmp-*"))
    assert (ast_cli.ast_workdir(out) / "ast" / "checkpoints" / "LATEST").is_file()
    monkeypatch.setattr(ast_module, "lambda_at", real)

    code, _, err = run_cli([*args, "-o", out, "--ast-resume"], capsys)
    assert code == 0, err
    whole, cut = open_artifact(tmp_path / "whole"), open_artifact(out)
    assert cut.metrics["ast"]["resumed_from"] == 4 and whole.metrics["ast"]["resumed_from"] == 0
    names = sorted(whole.weight_map)
    assert names == sorted(cut.weight_map) and any(n.endswith(".slorb") for n in names)
    for name in names:
        assert torch.equal(whole.get(name), cut.get(name)), name
    assert [json.loads(r)["loss"] for r in (out / "ast_log.jsonl").read_text().splitlines()] == \
        [json.loads(r)["loss"] for r in (tmp_path / "whole" / "ast_log.jsonl").read_text().splitlines()]
    assert not ast_cli.ast_workdir(out).exists()


def test_torchrun_compress_trains_with_fsdp2_and_rank0_writes(tiny_llama, tiny_text, trained, tmp_path):
    """`torchrun -m lowc.cli compress` on 2 CPU processes (gloo): the training of one process (the `trained`
    fixture's recipe), one artifact written by rank 0, the AST work directory removed."""
    import os
    import subprocess

    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(tiny_text, ast=AST_SLORB)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lowc.cli",
           "compress", tiny_llama, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "dist", "-q"]
    result = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "r.yaml"]
    dist, one = open_artifact(tmp_path / "dist"), open_artifact(trained[1])
    assert dist.metrics["ast"]["world_size"] == 2 and one.metrics["ast"]["world_size"] == 1
    losses = [[json.loads(r)["loss"] for r in (p / "ast_log.jsonl").read_text().splitlines()]
              for p in (tmp_path / "dist", trained[1])]
    assert len(losses[0]) == AST["steps"] and losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert sorted(dist.weight_map) == sorted(one.weight_map) and any(n.endswith(".slorb") for n in dist.weight_map)
    for name in dist.weight_map:
        a, b = dist.get(name), one.get(name)
        if a.is_floating_point():
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=1e-2)
        else:
            assert torch.equal(a, b), name

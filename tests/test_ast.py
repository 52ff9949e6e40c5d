"""AST recovery training on a tiny random Llama: loss, exact V:N:M masks, resume, SLoRB, LoRA stages, checkpoints,
the teacher cache and the FSDP2 path (2 CPU processes over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_LLAMA, tiny_llama_tensors  # noqa: E402

from lowc.compress.sparsity import ast_checkpoint  # noqa: E402
from lowc.compress.sparsity.ast import ASTConfig, BatchOrder, is_vnm, run_ast  # noqa: E402
from lowc.compress.sparsity.ast_linear import ASTLinear  # noqa: E402
from lowc.compress.sparsity.ast_teacher import TeacherLogits, distill_kl, teacher_topk  # noqa: E402
from lowc.compress.sparsity.lora_stages import DENSE, FIXED, REPRUNE, merge_lora, stage_at  # noqa: E402
from lowc.compress.sparsity.slorb import SLoRB, group_sums, slorb_init  # noqa: E402
from lowc.compress.sparsity.vnm import VNMSpec, vnm_keep_mask  # noqa: E402
from lowc.models import build_model  # noqa: E402

SPEC = VNMSpec(16, 2, 8)
FAST = dict(batch_size=4, lr=3e-3, mask_interval=3, norm_samples=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    model = build_model(TINY_LLAMA)
    model.load_state_dict({k: v.float() for k, v in tiny_llama_tensors(TINY_LLAMA, seed).items()}, strict=False)
    model.tie_weights()
    return model


def tiny_ids(rows: int = 16, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(3, TINY_LLAMA["vocab_size"], (rows, seqlen), generator=torch.Generator().manual_seed(5))


def sparse_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def train(tmp: Path, resume: bool = False, stop_at: int | None = None, **options) -> tuple[torch.nn.Module, dict]:
    model = tiny_model()
    teacher = tiny_model()

    def stop(record: dict) -> None:
        if stop_at is not None and record["step"] == stop_at:
            raise KeyboardInterrupt

    config = ASTConfig(**{**FAST, **options})
    return model, run_ast(model, teacher, str(SPEC), tiny_ids(), config, tmp, resume=resume, progress=False,
                          on_step=stop)


def test_loss_falls_and_masks_stay_vnm_after_every_step(tmp_path):
    model, teacher = tiny_model(), tiny_model()
    checked = []

    def check(record: dict) -> None:
        for name, m in model.named_modules():
            if isinstance(m, ASTLinear):
                assert is_vnm(m.mask, m.spec), f"{name} after step {record['step']}"
                assert m.mask.float().mean().item() == pytest.approx(2 / SPEC.m)
        checked.append(record["step"])

    stats = run_ast(model, teacher, str(SPEC), tiny_ids(), ASTConfig(steps=24, checkpoint_every=0, **FAST),
                    tmp_path, progress=False, on_step=check)
    assert checked == list(range(1, 25))
    log = [json.loads(line) for line in (tmp_path / "ast" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 24 and {"loss", "kl", "ce", "lr", "flip_rate"} <= log[0].keys()
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < 0.9 * first
    assert stats["flip_rate_curve"] and stats["flip_rate_curve"][0][1] > 0  # masks do adapt
    for name, w in sparse_weights(model).items():  # plain Linears again, pruned exactly to V:N:M
        assert is_vnm(w != 0, SPEC), name
    assert all(isinstance(m, torch.nn.Linear) and not isinstance(m, ASTLinear) for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def test_masked_finetuning_baseline_keeps_its_mask_and_zeros(tmp_path):
    model = tiny_model()
    initial = {n: vnm_keep_mask(m.weight.abs(), SPEC) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}

    def check(record: dict) -> None:
        for name, m in model.named_modules():
            if isinstance(m, ASTLinear):
                assert torch.equal(m.mask, initial[name])
                assert not m.weight[~m.mask].any()  # pruned weights held at exactly zero

    stats = run_ast(model, None, str(SPEC), tiny_ids(),
                    ASTConfig(steps=10, checkpoint_every=0, baseline=True, mask_importance="magnitude", **FAST),
                    tmp_path, progress=False, on_step=check)
    assert stats["flip_rate_curve"] == [] and stats["kl_last"] == 0.0
    assert stats["loss_last"] < stats["loss_first"]


@pytest.mark.parametrize("options", [dict(), dict(lora=True, slorb=True, lora_dense_fraction=0.2,
                                                   lora_reprune_fraction=0.3, lora_rank=4)],
                         ids=["ast", "lora+slorb"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, options):
    steps = dict(steps=12, checkpoint_every=4, **options)
    whole, stats = train(tmp_path / "whole", **steps)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", stop_at=10, **steps)  # dies after step 10: the checkpoint of step 8 survives
    assert ast_checkpoint.latest_checkpoint(tmp_path / "cut" / "ast" / "checkpoints").name == "ckpt-00000008"
    resumed, rstats = train(tmp_path / "cut", resume=True, **steps)
    assert rstats["resumed_from"] == 8
    for (name, a), b in zip(sparse_weights(whole).items(), sparse_weights(resumed).values()):
        assert torch.equal(a, b), name
    for key in ("model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(whole.state_dict()[key], resumed.state_dict()[key])
    for name, t in stats["extra_tensors"].items():
        assert torch.equal(t, rstats["extra_tensors"][name])
    log = lambda d: [json.loads(x) for x in (d / "ast" / "log.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = log(tmp_path / "whole"), log(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [(r["loss"], r["flip_rate"]) for r in a] == [(r["loss"], r["flip_rate"]) for r in b]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    root = tmp_path / "ckpts"
    first = {"student": {"w": torch.arange(6.0)}, "masks": {"w": torch.ones(6, dtype=torch.bool)},
             "optimizer": {}, "extra": {}}
    ast_checkpoint.save_checkpoint(root, 4, first, {"config": {}, "history": []})
    real = ast_checkpoint.save_file
    calls = []

    def dying(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # the student file is on disk, the masks are being written
            raise OSError("disk full")
        real(tensors, path)

    monkeypatch.setattr(ast_checkpoint, "save_file", dying)
    second = {**first, "student": {"w": torch.zeros(6)}}
    with pytest.raises(OSError):
        ast_checkpoint.save_checkpoint(root, 8, second, {"config": {}, "history": []})
    monkeypatch.setattr(ast_checkpoint, "save_file", real)
    latest = ast_checkpoint.latest_checkpoint(root)
    assert latest.name == "ckpt-00000004"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "ckpt-00000004"]  # no half-written directory
    tensors, state = ast_checkpoint.load_checkpoint(latest)
    assert torch.equal(tensors["student"]["w"], torch.arange(6.0)) and state["step"] == 4


def test_slorb_initialisation_and_forward():
    torch.manual_seed(0)
    w = torch.randn(32, 40)
    keep = vnm_keep_mask(w.abs(), SPEC)
    group = 16  # 40 inputs: groups of 16, 16 and a short one of 8
    s = slorb_init(w, keep, group)
    assert s.shape == (32, 3)
    pruned = w * ~keep
    assert torch.allclose(s[:, 0], pruned[:, :16].mean(1)) and torch.allclose(s[:, 2], pruned[:, 32:].mean(1))
    branch = SLoRB.from_pruned(w, keep, group)
    x = torch.randn(5, 7, 40)
    expanded = s.repeat_interleave(group, dim=1)[:, :40]  # the branch as a dense [R, K] matrix
    assert torch.allclose(branch(x), x @ expanded.T, atol=1e-5)
    assert torch.allclose(group_sums(x, group)[..., 2], x[..., 32:].sum(-1), atol=1e-6)
    # least squares: the pruned part minus its group-constant fit has zero mean in every group
    assert (pruned - expanded)[:, :16].mean(1).abs().max() < 1e-6
    # sparse + SLoRB is closer to the dense layer than sparse alone
    assert (x @ (w * keep + expanded).T - x @ w.T).norm() < (x @ (w * keep).T - x @ w.T).norm()


def test_lora_merge_and_stages():
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 32)
    linear.weight.requires_grad_(False)  # LoRA trains the adapters only
    keep = vnm_keep_mask(linear.weight.abs(), SPEC)
    m = ASTLinear(linear, SPEC, keep, ste=False)
    m.add_lora(4, 8.0, torch.Generator().manual_seed(1))
    m.lora_b.data.normal_()
    x = torch.randn(3, 40)
    expected = x @ ((linear.weight + 2.0 * m.lora_b @ m.lora_a) * keep).T + linear.bias
    assert torch.allclose(m(x), expected, atol=1e-5)
    m.sparse = False
    assert torch.allclose(m(x), x @ (linear.weight + 2.0 * m.lora_b @ m.lora_a).T + linear.bias, atol=1e-5)
    m.sparse = True
    merge_lora(m, reinit=torch.Generator().manual_seed(2))  # W absorbs B @ A; fresh A, zero B
    assert not m.lora_b.any() and torch.allclose(m(x), expected, atol=1e-5)
    y = m(x).sum()
    y.backward()
    assert m.weight.grad is None
    assert m.lora_b.grad is not None and m.lora_b.grad.abs().sum() > 0
    assert [stage_at(s, 20, 0.1, 0.2) for s in (0, 1, 2, 5, 6, 19)] == [DENSE, DENSE, REPRUNE, REPRUNE, FIXED, FIXED]


def test_lora_run_merges_into_vnm_weights(tmp_path):
    model, stats = train(tmp_path, steps=10, checkpoint_every=0, lora=True, lora_rank=4,
                         lora_dense_fraction=0.2, lora_reprune_fraction=0.4)
    assert stats["mode"] == "AST +LoRA" and stats["flip_rate_curve"]  # re-pruned in stage 2
    for name, w in sparse_weights(model).items():
        assert is_vnm(w != 0, SPEC), name
    assert not any(".lora_" in n for n, _ in model.named_parameters())


def test_straight_through_gradient_reaches_pruned_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 32)
    keep = vnm_keep_mask(linear.weight.abs(), SPEC)
    x = torch.randn(6, 40)
    for ste in (True, False):
        linear.weight.grad = None
        ASTLinear(linear, SPEC, keep, ste=ste)(x).pow(2).sum().backward()
        assert bool(linear.weight.grad[~keep].abs().sum() > 0) == ste


def test_teacher_topk_kl_and_cache(tmp_path):
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 50), torch.randn(2, 5, 50)
    full = distill_kl(s, t, None, 2.0)
    values, indices = teacher_topk(t, 50)
    assert torch.allclose(distill_kl(s, values, indices, 2.0), full)
    v, i = t.topk(50, dim=-1)
    assert torch.allclose(distill_kl(s, v, i, 2.0), full, atol=1e-6)  # top-k with k = vocab is the full KL
    teacher, ids = tiny_model(), tiny_ids(10, 16)
    resident = TeacherLogits(teacher, ids, 8)
    cached = TeacherLogits(teacher, ids, 8, chunk=4)
    cached.build_cache(tmp_path / "cache", torch.device("cpu"))
    rows = torch.tensor([9, 0, 5])
    (a, ai), (b, bi) = resident(rows, ids[rows]), cached(rows, ids[rows])
    assert torch.equal(ai, bi) and torch.allclose(a, b, rtol=1e-2)  # stored as bf16


def test_batch_order_is_stateless_and_covers_every_window():
    order = BatchOrder(10, 4, seed=3)
    first_epoch = torch.cat([order(s) for s in range(2)]).tolist() + order(2).tolist()[:2]
    assert sorted(first_epoch) == list(range(10))
    assert torch.equal(BatchOrder(10, 4, seed=3)(7), order(7))


def test_is_vnm_rejects_other_masks():
    keep = vnm_keep_mask(torch.randn(32, 40).abs(), SPEC)
    assert is_vnm(keep, SPEC)
    bad = keep.clone()
    bad[0, ~keep[0]] = True
    assert not is_vnm(bad, SPEC)


def test_training_ids_use_the_whole_file(tiny_llama, tiny_text):
    from lowc.compress.sparsity.ast_cli import training_ids
    from lowc.runtime.load import load

    tok = load(tiny_llama).tokenizer
    ids = training_ids(tok, tiny_text, 16)
    words = len(tiny_text.read_text().split()) + len(tiny_text.read_text().splitlines())  # + one EOS per line
    assert ids.shape == (words // 16, 16) and training_ids(tok, tiny_text, 16, max_windows=3).shape == (3, 16)


def test_cli_options_and_pipeline_hook(tmp_path):
    import click
    from click.testing import CliRunner
    from types import SimpleNamespace

    from lowc.compress.sparsity.ast_cli import (add_ast_options, ast_from_pipeline, ast_options_to_dict,
                                                ast_workdir, validate_ast_recipe)
    from lowc.errors import UsageError

    seen = {}

    @click.command()
    @add_ast_options
    def cmd(**kwargs):
        seen["resume"] = kwargs.pop("ast_resume")
        seen["ast"] = ast_options_to_dict(kwargs, base={"lr": 1e-3})
        seen["rest"] = kwargs

    result = CliRunner().invoke(cmd, ["--ast-steps", "5", "--ast-slorb", "--ast-resume", "--ast-lr", "2e-4"])
    assert result.exit_code == 0, result.output
    assert seen == {"resume": True, "ast": {"lr": 2e-4, "steps": 5, "slorb": True}, "rest": {}}
    with pytest.raises(UsageError, match="--calib"):
        validate_ast_recipe({"steps": 5}, "64:2:5", None)
    with pytest.raises(UsageError, match="unknown option"):
        validate_ast_recipe({"stepz": 5}, "64:2:5", "valid.txt")
    with pytest.raises(UsageError, match="--ast-steps"):
        validate_ast_recipe({"steps": 0}, "64:2:5", "valid.txt")
    assert ast_workdir(tmp_path / "out").name == "out.ast"

    model, teacher = tiny_model(), tiny_model()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    plan = SimpleNamespace(schemes={n: SimpleNamespace(vnm=SPEC) for n in names})
    model, metrics, extra, scores = ast_from_pipeline(
        model, teacher, plan, tiny_ids(), {"steps": 4, "slorb": True, "checkpoint_every": 0, **FAST},
        ast_workdir(tmp_path / "out"), progress=False, device="cpu")
    json.dumps(metrics)  # manifest-ready
    assert sorted(extra) == sorted(f"{n}.slorb.weight" for n in names) and metrics["slorb_group"] == 16
    for n in names:  # the new scores make vnm_compress choose exactly the trained mask
        w = model.get_submodule(n).weight
        assert torch.equal(vnm_keep_mask(scores[n], SPEC) & (w != 0), w != 0)


def test_pipeline_pieces_pack_exactly_the_trained_weights(tiny_llama, tiny_text, tmp_path):
    """The wiring pipeline.py uses: plan, dense model, AST, then compress_module with AST's scores."""
    from lowc.checkpoint import Checkpoint
    from lowc.compress.pipeline import compress_module, make_plan
    from lowc.compress.sparsity.ast_cli import ast_from_pipeline, ast_workdir, training_ids
    from lowc.kernels.reference import dense_weight
    from lowc.recipe import Recipe
    from lowc.runtime.load import load

    ckpt = Checkpoint(tiny_llama)
    plan = make_plan(ckpt, Recipe(vnm="16:2:8"))
    model, teacher = load(tiny_llama).requires_grad_(True), load(tiny_llama)
    ids = training_ids(model.tokenizer, tiny_text, 32)
    model, metrics, extra, scores = ast_from_pipeline(
        model, teacher, plan, ids, {"steps": 3, "checkpoint_every": 2, **FAST}, ast_workdir(tmp_path / "out"),
        progress=False, device="cpu")
    assert metrics["resumed_from"] == 0 and not extra
    for name, scheme in plan.schemes.items():
        w = model.get_submodule(name).weight.detach().float()
        packed = compress_module(w, scheme, scores[name])  # values stored in the checkpoint's dtype (bf16)
        assert torch.equal(dense_weight(packed, scheme), w.to(torch.bfloat16).float()), name


# --- FSDP2 over gloo: 2 CPU processes give the same losses as 1 process at the same global batch -------------------

def _dist_worker(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    config = ASTConfig(steps=6, checkpoint_every=2, slorb=True, **FAST)

    def run(work: str, resume: bool = False, stop_at: int | None = None) -> dict:
        def stop(record: dict) -> None:
            if record["step"] == stop_at:
                raise KeyboardInterrupt
        return run_ast(tiny_model(), tiny_model(), str(SPEC), tiny_ids(), config, Path(out).parent / work,
                       progress=False, resume=resume, on_step=stop)

    stats = run("dist")
    try:
        run("cut", stop_at=5)  # dies after step 5 on every rank: the checkpoint of step 4 survives
    except KeyboardInterrupt:
        pass
    resumed = run("cut", resume=True)
    if dist.get_rank() == 0:
        weights = {n: t for n, t in stats["state_dict"].items() if ".layers." in n and n.endswith("proj.weight")}
        ok = all(is_vnm(w != 0, SPEC) for w in weights.values())
        exact = all(torch.equal(t, resumed["state_dict"][n]) for n, t in stats["state_dict"].items()) and all(
            torch.equal(t, resumed["extra_tensors"][n]) for n, t in stats["extra_tensors"].items())
        log = [json.loads(x) for x in Path(stats["log"]).read_text().splitlines()]
        Path(out).write_text(json.dumps({"loss": [r["loss"] for r in log], "vnm": ok, "resume_exact": exact,
                                         "resumed_from": resumed["resumed_from"], "world": stats["world_size"]}))
    dist.destroy_process_group()


def test_fsdp2_two_processes_match_one_and_resume(tmp_path):
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    dist = json.loads(out.read_text())
    _, single = train(tmp_path / "single", steps=6, checkpoint_every=2, slorb=True)
    losses = [json.loads(x)["loss"] for x in Path(single["log"]).read_text().splitlines()]
    assert dist["world"] == 2 and dist["vnm"]
    assert dist["resumed_from"] == 4 and dist["resume_exact"]  # resume under FSDP2 is exact too
    assert dist["loss"] == pytest.approx(losses, rel=1e-4)


if __name__ == "__main__":
    _dist_worker(sys.argv[1])

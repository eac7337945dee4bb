"""DeepSpeed backend on CPU (DS_ACCELERATOR=cpu, gloo): two ranks equal one process with the same
global batch under ZeRO 0/1/2, a killed two-process run resumes to the same weights, a DeepSpeed
config that contradicts the recipe is refused before anything starts.

Tolerances (fp32, CPU): 2 ranks × 16 images and 1 process × 32 draw the same images and crops, so
they differ only in float summation order (two 16-row GEMMs averaged by a gloo all-reduce vs one
32-row GEMM), ~1e-7 per step: after 12 SGD steps weights agree to 1e-5 absolute, losses to 1e-5
relative (measured: 1.2e-7 and 4e-8). bf16 compute (autocast) rounds differently per split:
5e-3 (measured 4e-4 weights, 1e-4 loss). A resumed run is compared
bit for bit with an uninterrupted one.

The first `deepspeed.initialize` on a machine JIT-compiles `deepspeed_shm_comm` (45-60 s idle, a
few minutes on a loaded 2-core box). Every process here uses one TORCH_EXTENSIONS_DIR (the repo's
.cache/, or the caller's), so a test run pays it once, in the `ds_env` warm-up, timed and reported.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distill.artefacts import load_tensors, read_jsonl
from distill.augment import RandomCrops
from distill.distributed import GlobalBatchCrops, ShardedSampler
from distill.errors import ConfigError
from distill.recipe import parse_config

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "torch_extensions"
JIT_BUDGET_S = 900  # first initialize, compile included, on a loaded CI machine
RUN_TIMEOUT_S = 600
EPOCHS = 4  # 96 images / 32 per step: 12 optimiser steps
WEIGHT_ATOL, LOSS_RTOL = 1e-5, 1e-5
BF16_TOL = 5e-3

WARM = """
import time, torch
t = time.perf_counter()
from students.deepspeed_backend import import_deepspeed
ds = import_deepspeed()
m = torch.nn.Linear(2, 2)
ds.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), config={"train_batch_size": 1})
print(f"{time.perf_counter() - t:.1f}")
"""


def _recipe(out_dir: Path, **over) -> dict:
    raw = {"name": "ref", "out_dir": str(out_dir), "seed": 0,
           "data": {"source": "digits", "image_size": 16, "train_limit": 96},
           "student": {"model": "test_vit"}, "optim": {"lr": 0.05},
           "trainer": {"epochs": EPOCHS, "batch_size": 32}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run_dir / "student.safetensors")[0]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _assert_same_training(run_dir: Path, ref_dir: Path, loss_rtol: float, weight_atol: float) -> None:
    got, want = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(ref_dir / "metrics.jsonl")
    assert [r["epoch"] for r in got] == list(range(1, EPOCHS + 1))  # one writer: rank 0
    for g, w in zip(got, want):
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=loss_rtol)
        assert g["test_loss"] == pytest.approx(w["test_loss"], rel=loss_rtol * 10)
        assert abs(g["test_top1"] - w["test_top1"]) <= 100 / 360 + 1e-9  # at most one test image flips
    assert _max_diff(_weights(run_dir), _weights(ref_dir)) <= weight_atol


# ---------------------------------------------------------------- fixtures: JIT cache, runs


@pytest.fixture(scope="session")
def ds_env(request):
    """The environment of every DeepSpeed subprocess; warms the JIT cache once, timed."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(CACHE)),
           "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WARM], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=JIT_BUDGET_S)
    assert r.returncode == 0, r.stderr[-4000:]
    rep = request.config.pluginmanager.getplugin("terminalreporter")
    if rep is not None:
        rep.write_line(f"\n[deepspeed] first initialize in a fresh process: {time.perf_counter() - start:.1f}s "
                       f"(initialize alone {r.stdout.strip().splitlines()[-1]}s; JIT cache {env['TORCH_EXTENSIONS_DIR']})")
    return env


def _run(env: dict, *args: str, timeout: int = RUN_TIMEOUT_S) -> str:
    r = subprocess.run([sys.executable, "-m", "distill.cli", *args], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"distill {' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="module")
def recipe_file(out_dir) -> Path:
    path = out_dir / "tiny.yaml"
    path.write_text(yaml.safe_dump(_recipe(out_dir / "runs")))
    return path


@pytest.fixture(scope="module")
def plain_ref(out_dir):
    """1 process × the global batch, plain backend (in this process); cached per precision."""
    from distill.runner import train

    done: dict[str, Path] = {}

    def get(precision: str = "fp32") -> Path:
        if precision not in done:
            done[precision] = train(parse_config(_recipe(out_dir / "runs", name=f"plain_{precision}",
                                                         precision=precision))).run_dir
        return done[precision]

    return get


@pytest.fixture(scope="module")
def ds_runs(ds_env, recipe_file):
    """2-process `distill launch` runs of the same recipe, cached by (stage, grad_accum, precision)."""
    done: dict[tuple, Path] = {}

    def get(stage: int, grad_accum: int = 1, precision: str = "fp32", launcher: str = "torchrun") -> Path:
        key = (stage, grad_accum, precision)
        if key not in done:
            name = f"zero{stage}_accum{grad_accum}_{precision}"
            _run(ds_env, "launch", "--nproc", "2", "--launcher", launcher, str(recipe_file), f"name={name}",
                 f"precision={precision}",
                 f"trainer.grad_accum={grad_accum}", "trainer.backend=deepspeed",
                 f"trainer.deepspeed=configs/deepspeed/zero{stage}.json")
            done[key] = recipe_file.parent / "runs" / name
        return done[key]

    return get


# ---------------------------------------------------------------- equivalence


def test_channels_last_batches_under_zero2_train_as_without(ds_env, ds_runs, recipe_file):
    """data.loader.channels_last under DeepSpeed: the weights stay contiguous (DeepSpeed's start-up
    broadcast fails on channels_last weights), the batches go channels_last, and the run starts and
    trains as the run without the flag."""
    _run(ds_env, "launch", "--nproc", "2", str(recipe_file), "name=zero2_channels_last", "trainer.backend=deepspeed",
         "trainer.deepspeed=configs/deepspeed/zero2.json", "data.loader.channels_last=true")
    _assert_same_training(recipe_file.parent / "runs" / "zero2_channels_last", ds_runs(2), 1e-4, 1e-4)


@pytest.mark.parametrize("stage,grad_accum,launcher", [(0, 1, "torchrun"), (1, 2, "deepspeed"), (2, 1, "torchrun")])
def test_two_ranks_match_one_process(stage, grad_accum, launcher, ds_runs, plain_ref):
    """2 ranks × 16 (or × 2 micro-steps of 8) = 1 process × 32, same recipe, plain backend."""
    run, ref = ds_runs(stage, grad_accum, launcher=launcher), plain_ref()
    _assert_same_training(run, ref, LOSS_RTOL, WEIGHT_ATOL)
    assert (run / "report.md").is_file() and (run / "config.yaml").is_file()
    tags = [p for p in (run / "checkpoints" / "deepspeed").iterdir() if p.is_dir()]
    assert [t.name for t in tags] == [f"step{EPOCHS * 3}"]  # older tags removed after each commit
    parts = sorted(p.name for p in tags[0].glob("zero_pp_rank_*_optim_states.pt"))
    assert len(parts) == (2 if stage > 0 else 0)  # ZeRO 1/2: one optimizer partition per rank


def test_bf16_two_ranks_close_to_one_process(ds_runs, plain_ref):
    """precision: bf16 → DeepSpeed torch_autocast (fp32 weights, bf16 compute), ZeRO 2."""
    _assert_same_training(ds_runs(2, 1, "bf16"), plain_ref("bf16"), BF16_TOL, BF16_TOL)


def test_plain_grad_accum_matches_full_batch(out_dir, plain_ref):
    """The plain backend accumulates too, drawing the global batch's crops: 2 × 16 = 1 × 32."""
    from distill.runner import train

    run = train(parse_config(_recipe(out_dir / "runs", name="plain_accum2", trainer={"grad_accum": 2}))).run_dir
    _assert_same_training(run, plain_ref(), LOSS_RTOL, WEIGHT_ATOL)


def test_exported_student_reads_with_distill_eval(ds_env, ds_runs):
    run = ds_runs(2)
    out = _run(ds_env, "eval", str(run), "--data", "digits", "--device", "cpu")
    top1 = float(out.split("top1 ")[1].split()[0])
    assert top1 == pytest.approx(read_jsonl(run / "metrics.jsonl")[-1]["test_top1"], abs=0.01)


# ---------------------------------------------------------------- kill and resume


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for k in map(int, kids):
            out += [k, *_descendants(k)]
    return out


def test_killed_two_process_run_resumes(ds_env, ds_runs, recipe_file, out_dir):
    """SIGKILL the launcher and both ranks after the first committed checkpoint; relaunching the
    same command resumes and ends bit-identical to the uninterrupted run."""
    ref = ds_runs(2)
    args = [sys.executable, "-m", "distill.cli", "launch", "--nproc", "2", str(recipe_file), "name=killed",
            "trainer.backend=deepspeed", "trainer.deepspeed=configs/deepspeed/zero2.json"]
    run = recipe_file.parent / "runs" / "killed"
    with open(out_dir / "killed.log", "w") as log:
        proc = subprocess.Popen(args, env=ds_env, cwd=REPO, stdout=log, stderr=log)
        # the first checkpoint is durable once its manifest and the metrics written after it exist
        manifest, deadline = run / "checkpoints" / "last.safetensors", time.monotonic() + RUN_TIMEOUT_S
        metrics = run / "metrics.jsonl"
        while not (manifest.exists() and metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, (out_dir / "killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        pids = [proc.pid, *_descendants(proc.pid)]  # launcher (torchrun, exec'd) and its ranks
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert len(pids) >= 3
    done = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")]
    assert 1 <= len(done) < EPOCHS and not (run / "student.safetensors").exists()

    _run(ds_env, *args[3:])
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, EPOCHS + 1))
    a, b = _weights(run), _weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in read_jsonl(run / "metrics.jsonl")] == \
        [r["train_loss"] for r in read_jsonl(ref / "metrics.jsonl")]


# ---------------------------------------------------------------- the global batch, split


@pytest.mark.parametrize("world,accum", [(2, 1), (2, 2), (4, 1), (1, 4)])
def test_shards_and_crops_reassemble_the_global_batch(world, accum):
    """Whatever the split, each optimiser step sees the images and crops one process would."""
    n, batch = 50, 8  # 50 images: the last partial global batch is dropped, as the trainer does
    images = torch.rand(n, 1, 12, 12)
    crops = RandomCrops((0.3, 1.0), (0.75, 1.33), True)
    one_gen = torch.Generator().manual_seed(7)
    order = list(ShardedSampler(n, 0, 1, one_gen))
    steps = n // batch
    want = [crops(images[order[s * batch:(s + 1) * batch]], one_gen) for s in range(steps)]

    micro = batch // (world * accum)
    gens = [torch.Generator().manual_seed(7) for _ in range(world)]
    shards = [list(ShardedSampler(n, r, world, gens[r])) for r in range(world)]
    cutters = [GlobalBatchCrops(crops, r, world, accum) for r in range(world)]
    for s in range(steps):
        got_idx, got_views = [None] * batch, [None] * batch
        for j in range(accum):
            for r in range(world):
                m = s * accum + j
                idx = shards[r][m * micro:(m + 1) * micro]
                views = cutters[r](images[idx], gens[r])
                for t in range(micro):
                    pos = world * (j * micro + t) + r  # the interleaved position in the global batch
                    got_idx[pos], got_views[pos] = idx[t], views[t]
        assert got_idx == order[s * batch:(s + 1) * batch]
        assert torch.equal(torch.stack(got_views), want[s])


# ---------------------------------------------------------------- clear errors before compute


def _raw(tmp_path, **trainer) -> dict:
    return _recipe(tmp_path, trainer={"backend": "deepspeed", **trainer})


@pytest.mark.parametrize("ds,match", [
    ({"optimizer": {"type": "Lamb"}}, "optimizer.type 'Lamb'"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.8, 0.99]}}}, "optimizer.params.betas"),
    ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "adam_w_mode"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.001}}}, "optimizer.params.lr 0.001 contradicts the recipe's optim.lr 0.05"),
    ({"scheduler": {"type": "WarmupDecayLR"}}, "scheduler.type 'WarmupDecayLR'"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-5}}}, "warmup_min_lr"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both 'bf16' and 'fp16'"),
    ({"amp": {"enabled": True}}, "enables 'amp'"),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, "contradicts the recipe's precision 'fp32'"),
    ({"zero_optimization": {"stage": 3}}, "stage 3 is not supported .*ZeRO 3 partitions"),
    ({"zero_optimization": {"stage": 2}}, "zero_allow_untested_optimizer"),
    ({"train_batch_size": 64}, "train_batch_size 64 contradicts trainer.batch_size 32"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps 4 contradicts trainer.grad_accum 1"),
    ({"train_micro_batch_size_per_gpu": 5}, "train_micro_batch_size_per_gpu 5"),
])
def test_contradicting_deepspeed_config_is_refused(tmp_path, ds, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(_raw(tmp_path, deepspeed=ds))


def _stock_recipe(out_dir: Path, **over) -> dict:
    """The test recipe with no optim section: a stock DeepSpeed config supplies it."""
    raw = _recipe(out_dir, **over)
    raw.pop("optim")
    return raw


def test_stock_deepspeed_config_fills_the_recipe(tmp_path):
    raw = _stock_recipe(tmp_path, trainer={"backend": "deepspeed",
                                           "deepspeed": str(REPO / "configs" / "deepspeed" / "stock_bf16_adamw_warmup.json")})
    cfg = parse_config(raw)
    o = cfg.optim
    assert (o.name, o.lr, o.weight_decay, o.schedule, o.warmup_steps, o.warmup_type) == \
        ("adamw", 0.001, 0.01, "constant", 4, "log")
    assert cfg.precision == "bf16" and cfg.trainer.grad_clip == 1.0
    assert cfg.trainer.from_deepspeed == {
        "optim.name": "optimizer.type", "optim.lr": "optimizer.params.lr",
        "optim.weight_decay": "optimizer.params.weight_decay", "optim.schedule": "scheduler.type WarmupLR",
        "optim.warmup_steps": "scheduler.params.warmup_num_steps", "optim.warmup_type": "scheduler.params.warmup_type",
        "precision": "bf16.enabled", "trainer.grad_clip": "gradient_clipping"}
    assert not {"optimizer", "scheduler", "bf16", "gradient_clipping"} & set(cfg.trainer.deepspeed)
    # where the recipe says the same, nothing contradicts; where it differs, the key is named
    assert parse_config({**raw, "optim": {"name": "adamw", "lr": 0.001}}).optim.warmup_steps == 4
    with pytest.raises(ConfigError, match="optimizer.type 'adamw' contradicts the recipe's optim.name 'sgd'"):
        parse_config({**raw, "optim": {"name": "sgd"}})
    with pytest.raises(ConfigError, match="bf16.enabled 'bf16' contradicts the recipe's precision 'fp32'"):
        parse_config({**raw, "precision": "fp32"})


def test_warmup_matches_deepspeeds_warmup_lr():
    """The trainer's per-step warm-up factor is DeepSpeed's WarmupLR (min lr 0) step for step."""
    from distill.config import OptimConfig
    from students.backends import warmup_factor
    from students.deepspeed_backend import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.lr_schedules import WarmupLR

    for kind in ("log", "linear"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=5, warmup_type=kind)
        cfg = OptimConfig(lr=1.0, warmup_steps=5, warmup_type=kind)
        for step in range(9):
            assert warmup_factor(cfg, step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), (kind, step)
            opt.step()
            sched.step()


def test_stock_config_under_the_deepspeed_launcher(ds_env, out_dir):
    """`deepspeed --num_gpus 2 -m distill.cli train RECIPE` with a stock bf16 + AdamW + WarmupLR
    config: it trains, the lr follows the warm-up, the run's config says what came from DeepSpeed."""
    raw = _stock_recipe(out_dir / "runs", name="stock", trainer={"backend": "deepspeed", "epochs": 2,
                        "deepspeed": str(REPO / "configs" / "deepspeed" / "stock_bf16_adamw_warmup.json")})
    raw["log"] = {"every_steps": 1}
    recipe = out_dir / "stock.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    from distill.distributed import free_port

    r = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                        str(free_port()), "--module", "distill.cli", "train", str(recipe)],
                       env=ds_env, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    run = out_dir / "runs" / "stock"
    steps = read_jsonl(run / "metrics_steps.jsonl")
    lrs = [row["lr"] for row in steps]  # 3 optimiser steps per epoch, one micro-step each per rank
    from distill.config import OptimConfig
    from students.backends import warmup_factor

    want = OptimConfig(lr=0.001, schedule="constant", warmup_steps=4, warmup_type="log")
    assert lrs == pytest.approx([0.001 * warmup_factor(want, k) for k in range(len(lrs))])
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["precision"] == "bf16" and written["trainer"]["from_deepspeed"]["optim.name"] == "optimizer.type"
    assert len(read_jsonl(run / "metrics.jsonl")) == 2 and (run / "student.safetensors").is_file()


def test_config_file_errors_and_plain_backend(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(_raw(tmp_path, deepspeed=str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 2")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_config(_raw(tmp_path, deepspeed=str(bad)))
    with pytest.raises(ConfigError, match="backend is 'plain'"):
        parse_config(_recipe(tmp_path, trainer={"deepspeed": {"zero_optimization": {"stage": 0}}}))
    with pytest.raises(ConfigError, match="not a multiple of grad_accum"):
        parse_config(_recipe(tmp_path, trainer={"grad_accum": 3}))
    cfg = parse_config(_raw(tmp_path, deepspeed=str(REPO / "configs" / "deepspeed" / "zero2.json")))
    assert cfg.trainer.deepspeed["zero_optimization"]["stage"] == 2  # the file's content is the run's record


def test_shipped_configs_parse_with_the_recipes_optimizers(tmp_path):
    for stage in (0, 1, 2):
        path = str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")
        for name in ("sgd", "adamw"):
            parse_config({**_raw(tmp_path, deepspeed=path), "optim": {"name": name}})


def test_launch_plans_and_refusals(tmp_path):
    from distill.launch import plan_launch

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_raw(tmp_path)))
    plan = plan_launch(str(recipe), ["trainer.epochs=1"], 2, gpu=False)
    assert plan.env["DS_ACCELERATOR"] == "cpu"
    assert plan.argv[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    assert plan.argv[-5:] == ["-m", "distill.cli", "train", str(recipe), "trainer.epochs=1"]
    ds = plan_launch(str(recipe), [], 2, launcher="deepspeed", gpu=True)
    assert "DS_ACCELERATOR" not in ds.env and "--no_local_rank" not in ds.argv and "--module" in ds.argv  # ranks get --local_rank
    multi = plan_launch(str(recipe), [], 8, nnodes=2, node_rank=1, master_addr="10.0.0.1", gpu=True)
    assert "--nnodes=2" in multi.argv and "--node_rank=1" in multi.argv and "--master_addr=10.0.0.1" in multi.argv
    with pytest.raises(ConfigError, match="does not divide over 3 rank"):
        plan_launch(str(recipe), [], 3, gpu=False)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu 4 contradicts the recipe on 2"):
        plan_launch(str(recipe), ["trainer.deepspeed={train_micro_batch_size_per_gpu: 4}"], 2, gpu=False)
    with pytest.raises(ConfigError, match="needs trainer.backend=deepspeed"):
        plan_launch(str(recipe), ["trainer.backend=plain"], 2, gpu=False)
    with pytest.raises(ConfigError, match="--master-addr"):
        plan_launch(str(recipe), [], 2, nnodes=2, gpu=True)
    assert subprocess.run([sys.executable, "-m", "distill.cli", "launch", "--nproc", "3", str(recipe)],
                          cwd=REPO, capture_output=True, text=True).returncode == 2

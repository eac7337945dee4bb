"""Faults: a job killed with SIGKILL resumes, when the same command is run again, to exactly what an
uninterrupted run writes (`distill labels`, `distill synth`, an active-distillation `distill train`);
a command refused because its directory holds another recipe's work exits 2 and changes nothing
there (every file and folder as it was, byte for byte).

Each job runs as two subprocesses at once, in working directories of their own with the same recipe
file (relative output paths, shared teacher checkpoints): the reference, left alone, and the victim,
killed (its whole process group) at its first durable progress marker and then run again."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from distill.artefacts import load_state, load_tensors
from distill.cli import main as cli_main
from distill.models import create_model, save_model
from synth.artefact import read_artefact
from teachers.store_replay import LabelStore

REPO = Path(__file__).resolve().parent.parent
DIGITS = tuple(str(i) for i in range(10))
CLOCK_KEYS = ("epoch_seconds", "images_per_second", "teacher_seconds")  # wall-clock entries of an epoch record
STARTED: list[subprocess.Popen] = []


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module", autouse=True)
def no_process_left():
    """A failed test leaves no `distill` process of ours running."""
    yield
    for proc in STARTED:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Untrained teacher checkpoints (weights fixed by a seed, so every process builds the same teachers)."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for model, size in (("test_vit", 16), ("test_resnet", 16), ("test_resnet", 8)):
        torch.manual_seed(0)
        out[f"{model}{size}"] = path = root / f"{model}{size}.safetensors"
        save_model(path, create_model(model, 10, 1, size, DIGITS))
    return out


def start(cwd: Path, *args: str) -> subprocess.Popen:
    """`distill ARGS` in `cwd`, in a process group of its own (so a kill reaches its children too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = open(cwd / "cli.log", "a")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "distill.cli", *args], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen, cwd: Path) -> str:
    """Wait for a run that must succeed; its output."""
    rc = proc.wait(timeout=300)
    out = (cwd / "cli.log").read_text()
    assert rc == 0, f"`distill` exited {rc} in {cwd}:\n{out[-3000:]}"
    return out


def kill_at(proc: subprocess.Popen, marker: Callable[[], bool], cwd: Path) -> None:
    """SIGKILL the run's process group as soon as `marker()` holds (polled every 2 ms)."""
    deadline = time.monotonic() + 240
    while not marker():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before its first progress marker:\n"
                        f"{(cwd / 'cli.log').read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("no progress marker within 240 s")
        time.sleep(0.002)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before the kill landed"


def tree(root: Path) -> dict[str, bytes | None]:
    """Relative path → bytes of every file under `root` (None for a folder), hidden files included."""
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def durable(snapshot: dict[str, bytes | None]) -> dict[str, bytes | None]:
    """Without atomic-write temporaries (`.NAME.XXXX.tmp`, never read by anyone), which a kill landing
    inside a write leaves behind."""
    return {k: v for k, v in snapshot.items() if not re.fullmatch(r"\..+\.tmp", k.rsplit("/", 1)[-1])}


def safetensors_parts(blob: bytes) -> tuple[dict, bytes]:
    """(header as a dict, tensor bytes): equal for two files that differ only in the header's key order."""
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def refused(capsys, argv: list[str], root: Path, message: str) -> None:
    """`distill ARGV` exits 2 with one `error:` line naming `root`, and `root` is as it was."""
    before = tree(root)
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(root) in err[0] and re.search(message, err[0]), err
    assert tree(root) == before


def twin_dirs(tmp_path: Path, recipe: dict) -> tuple[Path, Path]:
    """`ref/` and `run/`, each with the same `recipe.yaml`."""
    dirs = tmp_path / "ref", tmp_path / "run"
    for d in dirs:
        d.mkdir()
        (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return dirs


# -------------------------------------------------------------------------- distill labels


@pytest.fixture(scope="module")
def labels_job(teachers, tmp_path_factory):
    """Reference store, the killed-and-resumed store, and a copy of the store as the kill left it."""
    tmp = tmp_path_factory.mktemp("labels")
    recipe = {"name": "lab", "out_dir": "runs", "seed": 0,
              "data": {"source": "digits", "image_size": 16, "train_limit": 256},
              "student": {"model": "test_vit"}, "trainer": {"epochs": 2, "batch_size": 32},
              "pool": {"teachers": [{"model": "test_resnet", "name": "r", "checkpoint": str(teachers["test_resnet16"])}]},
              "labels": {"store": "store", "generate": {"epochs": 2, "crops_per_image": 32, "shard_images": 8,
                                                        "topk": 3, "batch_size": 256, "selfmix": {"mode": "cutmix"}}}}
    ref, run = twin_dirs(tmp, recipe)  # 32 chunks × 2 epochs = 64 shards
    journal = run / "store" / "parts" / "rank0000.jsonl"
    reference, victim = start(ref, "labels", "recipe.yaml"), start(run, "labels", "recipe.yaml")
    kill_at(victim, lambda: journal.is_file() and "\n" in journal.read_text(), run)
    shards = list((run / "store" / "shards").glob("*.safetensors"))
    assert not (run / "store" / "manifest.json").exists() and 1 <= len(shards) < 64, "not killed mid-job"
    killed = tmp / "killed_store"
    shutil.copytree(run / "store", killed)
    out = finish(start(run, "labels", "recipe.yaml"), run)
    finish(reference, ref)
    queries = int(re.search(r"(\d+) teacher queries", out).group(1))
    return ref / "store", run / "store", killed, queries


def test_killed_label_generation_resumes_to_the_same_store(labels_job):
    ref, resumed, killed, queries = labels_job
    assert queries < 256 * 2 * 32  # the resumed run labelled only the shards the kill left undone
    assert durable(tree(resumed)) == tree(ref)  # store.json, every shard, the journal, the manifest
    LabelStore(resumed).check_files()


def test_labels_into_another_recipes_store_is_refused_unchanged(labels_job, tmp_path, capsys):
    ref, _, killed, _ = labels_job
    recipe = ref.parent / "recipe.yaml"
    for store in (ref, killed):  # a finished store, and one a kill left half-written
        root = tmp_path / store.name
        shutil.copytree(store, root)
        refused(capsys, ["labels", str(recipe), f"labels.store={root}", "labels.generate.topk=5"], root,
                "another recipe or data .*topk")


# ---------------------------------------------------------------------------- distill synth


@pytest.fixture(scope="module")
def synth_job(teachers, tmp_path_factory):
    """Reference artefact, the killed-and-resumed one, and a copy of the artefact folder as the kill left it."""
    tmp = tmp_path_factory.mktemp("synth")
    recipe = {"name": "syn", "out_dir": "synth", "seed": 0,
              "data": {"source": "digits", "image_size": 8, "train_limit": 200},
              "ipc": 2, "method": "distribution_matching",
              "options": {"batch_real": 8, "dsa_ops": ["color", "crop", "cutout", "scale", "rotate"]},
              "iterations": 20, "chunk": {"classes": 1},  # 10 chunks
              "teachers": [{"model": "test_resnet", "checkpoint": str(teachers["test_resnet8"])}],
              "labels": {"mode": "relabel", "relabel": {"epochs": 2, "crops_per_image": 2, "topk": 3}}}
    ref, run = twin_dirs(tmp, recipe)
    work = run / "synth" / "syn" / "work"
    reference, victim = start(ref, "synth", "recipe.yaml"), start(run, "synth", "recipe.yaml")
    kill_at(victim, lambda: any(work.glob("*.safetensors")), run)
    chunks = list(work.glob("*.safetensors"))
    assert not (run / "synth" / "syn" / "manifest.json").exists() and 1 <= len(chunks) < 10, "not killed mid-job"
    killed = tmp / "killed_syn"
    shutil.copytree(run / "synth" / "syn", killed)
    out = finish(start(run, "synth", "recipe.yaml"), run)
    finish(reference, ref)
    chunks_run = int(re.search(r"\((\d+) chunk\(s\) run now", out).group(1))
    return ref / "synth" / "syn", run / "synth" / "syn", killed, len(chunks), chunks_run


def without_clock(manifest: dict) -> dict:
    """The synthesis manifest less its wall-clock seconds (timing), and less the sha256 of
    images.safetensors, whose header key order varies from process to process (see below)."""
    m = json.loads(json.dumps(manifest))
    timing = m.pop("timing")
    m["timing"] = {**{k: v for k, v in timing.items() if not k.startswith("seconds")},
                   "chunks": [{k: v for k, v in c.items() if k != "seconds"} for c in timing["chunks"]]}
    m["files"]["images.safetensors"].pop("sha256")
    return m


def test_killed_synthesis_resumes_to_the_same_artefact(synth_job):
    ref, resumed, _, done, chunks_run = synth_job
    assert chunks_run == 10 - done  # the chunks finished before the kill were not run again
    a, b = tree(ref), durable(tree(resumed))
    assert a.keys() == b.keys() and "labels/manifest.json" in a and "work" not in a
    for rel in a:
        if rel == "manifest.json":  # records wall-clock seconds per chunk: compared without them
            assert without_clock(json.loads(b[rel])) == without_clock(json.loads(a[rel]))
        elif rel == "images.safetensors":
            # safetensors writes a metadata header of several keys in hash-map order, which differs from
            # process to process (distill.artefacts.save_tensors): the same header up to key order,
            # and the same tensor bytes
            assert safetensors_parts(b[rel]) == safetensors_parts(a[rel]), rel
        else:
            assert b[rel] == a[rel], rel
    read_artefact(resumed)  # every checksum of its manifest holds


def test_synth_into_another_recipes_folder_is_refused_unchanged(synth_job, tmp_path, capsys):
    ref, _, killed, _, _ = synth_job
    recipe = ref.parent.parent / "recipe.yaml"
    finished = tmp_path / "finished" / "syn"
    shutil.copytree(ref, finished)
    refused(capsys, ["synth", str(recipe), f"out_dir={finished.parent}", "iterations=10"], finished,
            "holds an artefact of another recipe")
    half = tmp_path / "half" / "syn"
    shutil.copytree(killed, half)
    # a chunk this recipe would also write (same name), and chunks of another plan (ipc 1: other names)
    for change in ("iterations=10", "ipc=1"):
        refused(capsys, ["synth", str(recipe), f"out_dir={half.parent}", change], half, "a chunk of another recipe")


# ------------------------------------------------------------- distill train, active rounds


@pytest.fixture(scope="module")
def active_job(teachers, tmp_path_factory):
    """Reference run directory, the killed-and-resumed one, and a copy of it as the kill left it."""
    tmp = tmp_path_factory.mktemp("active")
    recipe = {"name": "act", "out_dir": "runs", "seed": 0,
              "data": {"source": "digits", "image_size": 16, "train_limit": 96},
              "student": {"model": "test_vit"}, "optim": {"lr": 0.05}, "trainer": {"epochs": 2, "batch_size": 16},
              "pool": {"teachers": [{"model": "test_vit", "name": "a", "checkpoint": str(teachers["test_vit16"])},
                                    {"model": "test_resnet", "name": "b", "checkpoint": str(teachers["test_resnet16"])}]},
              "labels": {"source": "active", "budget": 0.25, "rounds": 3, "strategy": "rad", "labelled": 16,
                         "teacher_error": 0.2, "round_images": 160}}
    ref, run = twin_dirs(tmp, recipe)
    act = run / "runs" / "act"
    reference, victim = start(ref, "train", "recipe.yaml"), start(run, "train", "recipe.yaml")
    # round 1's first epoch is checkpointed: killed inside round 1 (2 epochs) or a later round
    kill_at(victim, lambda: (act / "rounds" / "round1" / "checkpoints" / "last.safetensors").is_file(), run)
    assert (act / "active" / "state.safetensors").is_file() and not (act / "student.safetensors").exists(), \
        "not killed mid-job"
    killed = tmp / "killed_act"
    shutil.copytree(act, killed)
    finish(start(run, "train", "recipe.yaml"), run)
    finish(reference, ref)
    return ref / "runs" / "act", act, killed


def test_killed_active_job_resumes_to_the_same_student(active_job):
    ref, resumed, _ = active_job
    a, b = (load_tensors(r / "student.safetensors")[0] for r in (ref, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def metrics(root: Path) -> list[dict]:
        recs = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in CLOCK_KEYS} for r in recs]

    assert len(metrics(ref)) == 4 * 2 and metrics(resumed) == metrics(ref)  # rounds 0..3 × 2 epochs
    # the books: the same selections, cached teacher labels and query counts (nothing paid twice)
    sa, sb = (load_state(r / "active" / "state.safetensors")[0] for r in (ref, resumed))
    assert sa["selections"].keys() == sb["selections"].keys() == {"1", "2", "3"}
    assert all(torch.equal(sa["selections"][k], sb["selections"][k]) for k in sa["selections"])
    assert torch.equal(sa["source"]["index"], sb["source"]["index"])
    assert torch.equal(sa["source"]["probs"], sb["source"]["probs"])
    assert sa["source"]["rounds"] == sb["source"]["rounds"]
    assert sa["source"]["cost"]["queries"] == sb["source"]["cost"]["queries"]


def test_active_job_in_another_recipes_run_directory_is_refused_unchanged(active_job, tmp_path, capsys):
    ref, _, killed = active_job
    recipe = ref.parent.parent / "recipe.yaml"
    for source in (ref, killed):  # a finished job, and one a kill left mid-round
        root = tmp_path / source.name / "act"
        shutil.copytree(source, root)
        refused(capsys, ["train", str(recipe), f"out_dir={root.parent}", "labels.budget=0.3"], root,
                "written by a different recipe")

"""`distill eval-synth ARTEFACT`: a protocol that cannot flatter a distilled set.

Fresh students (fresh weights per seed: `torch.manual_seed(seed)` before building) train on
1. the distilled set, with its own label source (hard labels, or its stored soft labels);
2. a random real subset at the same IPC (a new subset per seed), with the same label mode (soft
   labels come from the artefact's teachers with the same relabel settings, stored the same way);
3. the full real training set (hard labels, `full_epochs`),
all with the same optimiser, schedule, epochs and augmentation (`EvalConfig`). The table reports
final-epoch top-1 mean ± std over seeds, label mode and label bytes, and the improvement over the
random subset as its own column; best-epoch accuracy only when asked, and labelled so.

Beside it, DD-Ranking's hard-label recovery, improvement over random and label-robust score
(`synth.ddranking`: HLR, IOR, LRS), from the table's means. HLR needs the distilled images trained
with hard labels: for a soft-label artefact (relabel, projector) with full data on, the plan adds
that run as its own set, `distilled_hard` (the hard labeler, the same protocol and epochs).

Training is the engine's `students.trainer.Trainer` on in-memory `ImageSet`s; every run has a
deterministic directory (under the artefact's `eval/`, or `cache_dir`), so an interrupted
evaluation resumes and finished runs are reused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from distill.artefacts import write_text
from distill.augment import RandomCrops
from distill.config import DataConfig, LossConfig, ModelConfig, RunConfig, TrainerConfig, apply_overrides
from distill.data import ImageSet, data_config_for, load_data, subset
from distill.distributed import resolve_device
from distill.errors import ConfigError, DataError
from distill.progress import Progress
from distill.report import markdown_table, text_table
from students.build import create_backend, create_step
from students.trainer import Trainer
from synth.artefact import Artefact, read_artefact
from synth.augment import DSA, DSA_REVISION
from synth.config import EvalConfig, RelabelConfig
from synth.ddranking import LRS_WEIGHT, DDRanking, dd_ranking
from synth.hello import projector_labeler
from synth.init import class_indices, gather, keyed_generator
from synth.methods import data_stats
from synth.relabel import relabel_store, store_labeler, student_loss
from teachers.labeling import LabelContext, create_labeling
from teachers.source import BatchLabeler, Views, as_loaded
from teachers.teacher import Teacher, create_teacher


def protocol_views(protocol: EvalConfig, norm: tuple[torch.Tensor, torch.Tensor]) -> Views:
    """Hard-label views: DSA per image (the DSA/DM evaluation, in the space normalised by `norm`,
    the real data's per-channel mean and std), the spine's random crops, or none."""
    if protocol.augment == "dsa":
        return DSA(mean=norm[0], std=norm[1], ops=protocol.dsa_ops, mode=protocol.dsa_mode)
    if protocol.augment == "crop":
        return RandomCrops(protocol.crop_scale, (3 / 4, 4 / 3), protocol.crop_flip)
    return as_loaded


def hard_labeler(protocol: EvalConfig, data: ImageSet,
                 norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> BatchLabeler:
    """The `hard` label source on the protocol's views; DSA normalises with `norm` (an artefact's
    recorded real-data mean/std), else with `data`'s own."""
    views = protocol_views(protocol, norm or data_stats(data, 0))
    return create_labeling("hard").build(LabelContext(data, torch.device("cpu"), views))


@dataclass
class SetResult:
    """One (training set, student) cell of the table."""

    set_name: str  # distilled | distilled_hard | random | full
    student: str
    label_mode: str
    images: int
    image_bytes: int
    label_bytes: int
    final: list[float] = field(default_factory=list)
    best: list[tuple[float, int]] = field(default_factory=list)  # (top-1, epoch)
    seconds: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.final)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.final) if len(self.final) > 1 else 0.0

    def to_json(self, best_epoch: bool) -> dict[str, Any]:
        out = {"set": self.set_name, "student": self.student, "label_mode": self.label_mode, "images": self.images,
               "image_bytes": self.image_bytes, "label_bytes": self.label_bytes, "final_top1": self.final,
               "final_top1_mean": self.mean, "final_top1_std": self.std, "seconds": self.seconds}
        if best_epoch:  # only when asked, and named as such
            out |= {"best_epoch_top1": [b[0] for b in self.best], "best_epoch": [b[1] for b in self.best]}
        return out


@dataclass
class EvalReport:
    root: Path
    protocol: EvalConfig
    ipc: int
    results: list[SetResult]

    def cell(self, student: str, set_name: str) -> SetResult | None:
        return next((r for r in self.results if r.student == student and r.set_name == set_name), None)

    def improvement(self, student: str) -> float | None:
        d, r = self.cell(student, "distilled"), self.cell(student, "random")
        return None if d is None or r is None else d.mean - r.mean

    def ddranking_sets(self, student: str) -> dict[str, str | None]:
        """Which set gives each DD-Ranking input (None: not run). syn-hard is the distilled set
        itself when its labels are hard, else its `distilled_hard` run."""
        d = self.cell(student, "distilled")
        hard = "distilled" if d is not None and d.label_mode == "hard" else "distilled_hard"
        sets = {"real_hard": "full", "syn_hard": hard, "syn_any": "distilled", "rdm_any": "random"}
        return {k: s if self.cell(student, s) is not None else None for k, s in sets.items()}

    def ddranking(self, student: str) -> DDRanking:
        """DD-Ranking's HLR, IOR and LRS from this table's final-epoch means; a metric whose run the
        protocol switched off is None, with why."""
        sets = self.ddranking_sets(student)
        no_full = "full_data is off: no full-data run with hard labels (real-hard)"
        why = {"real_hard": no_full,
               "syn_hard": no_full if sets["real_hard"] is None  # planned only beside full data
               else "no run of the distilled images with hard labels (syn-hard)",
               "rdm_any": "random_subset is off: no random real subset run (rdm-any)"}
        means = [None if s is None else self.cell(student, s).mean for s in sets.values()]
        return dd_ranking(*means, why=why)

    def ddranking_header(self) -> list[str]:
        return ["student", "HLR (points, lower better)", "IOR (points, higher better)",
                f"LRS (w={LRS_WEIGHT}, 0-100)", "syn-hard run"]

    def ddranking_rows(self) -> list[list[str]]:
        rows = []
        for s in self.protocol.students:
            m = self.ddranking(s)
            rows.append([s, "n/a" if m.hlr is None else f"{m.hlr:.2f}", "n/a" if m.ior is None else f"{m.ior:+.2f}",
                         "n/a" if m.lrs is None else f"{m.lrs:.2f}", self.ddranking_sets(s)["syn_hard"] or "-"])
        return rows

    def ddranking_notes(self) -> list[str]:
        return [f"{s}: {metric.upper()} not available: {why}" for s in self.protocol.students
                for metric, why in self.ddranking(s).missing.items()]

    def rows(self) -> list[list[str]]:
        rows = []
        for r in self.results:
            imp = self.improvement(r.student) if r.set_name == "distilled" else None
            row = [r.student, r.set_name, r.label_mode, f"{r.images}", f"{r.image_bytes:,}", f"{r.label_bytes:,}",
                   f"{r.mean:.2f} ± {r.std:.2f}", "" if imp is None else f"{imp:+.2f}"]
            if self.protocol.best_epoch:
                row.append(f"{statistics.fmean(b[0] for b in r.best):.2f} (best epoch)" if r.best else "")
            rows.append(row)
        return rows

    def header(self) -> list[str]:
        h = ["student", "train set", "labels", "images", "image bytes", "label bytes",
             f"final top-1 (mean ± std, {self.protocol.seeds} seeds)", "Δ vs random subset"]
        return h + (["best-epoch top-1 (mean, labelled)"] if self.protocol.best_epoch else [])

    def text(self) -> str:
        dd = text_table(self.ddranking_header(), self.ddranking_rows())
        return "\n".join([text_table(self.header(), self.rows()), "", "DD-Ranking (final-epoch means above)", dd,
                          *self.ddranking_notes()])

    def to_json(self) -> dict[str, Any]:
        return {"ipc": self.ipc, "protocol": self.protocol.model_dump(mode="json"),
                "results": [r.to_json(self.protocol.best_epoch) for r in self.results],
                "improvement_over_random": {s: self.improvement(s) for s in self.protocol.students},
                "ddranking": {s: self.ddranking(s).to_json() | {"sets": self.ddranking_sets(s)}
                              for s in self.protocol.students}}


def eval_data(art: Artefact, data_spec: str | None, image_size: int | None) -> tuple[DataConfig, ImageSet, ImageSet]:
    """The real data to evaluate on: the artefact's recipe data, or `data_spec`; refused when its
    classes, image size or channels differ from the artefact's."""
    m = art.manifest
    size = image_size or m["image_size"]
    if data_spec is None:
        raw = yaml.safe_load(art.recipe_yaml)["data"]
        raw["image_size"] = size
        dcfg = DataConfig.model_validate(raw)
    else:
        dcfg = data_config_for(data_spec, size, m["channels"])
    train, test = load_data(dcfg)
    where = data_spec or f"the recipe's data ({dcfg.source})"
    if tuple(train.class_names) != tuple(m["class_names"]):
        raise DataError(f"{where}: classes {list(train.class_names)[:10]} ({train.num_classes}) differ from the "
                        f"artefact's {m['class_names'][:10]} ({m['num_classes']}) in {art.root}")
    if train.image_size != m["image_size"] or train.channels != m["channels"]:
        raise DataError(f"{where}: images are {train.channels}×{train.image_size}px, the artefact {art.root} holds "
                        f"{m['channels']}×{m['image_size']}px; evaluate at the artefact's size")
    return dcfg, train, test


def random_subset(train: ImageSet, ipc: int, seed: int) -> ImageSet:
    """IPC random real images per class (class-major, like an artefact), drawn per seed."""
    picks = []
    for c, idx in class_indices(train).items():
        if len(idx) < ipc:
            raise DataError(f"random subset: class {train.class_names[c]!r} has {len(idx)} training images < ipc {ipc}")
        picks.append(idx[torch.randperm(len(idx), generator=keyed_generator(seed, "random-subset", c))[:ipc]])
    idx = torch.cat(picks)
    if hasattr(train, "images"):
        return subset(train, idx)
    return ImageSet(gather(train, idx), train.targets[idx], train.class_names)  # lazy ImageFolder: decode the few


def _protocol_hash(protocol: EvalConfig, *parts: Any) -> str:
    d = protocol.model_dump(mode="json")
    for k in ("students", "seeds", "random_subset", "full_data", "eval_batch_size"):  # best_epoch stays: its runs
        # evaluate every epoch, so a run made without it cannot answer it
        d.pop(k)
    if protocol.augment == "dsa":  # runs trained with an older DSA answer another protocol
        d["dsa_revision"] = DSA_REVISION
    if d["dsa_mode"] == "single":  # the draw every run had before the key existed: their hashes hold
        d.pop("dsa_mode")
    return hashlib.sha256(json.dumps([d, *map(str, parts)], sort_keys=True).encode()).hexdigest()[:12]


def train_student(student: str, seed: int, train: ImageSet, test: ImageSet, labeler: BatchLabeler, epochs: int,
                  protocol: EvalConfig, dcfg: DataConfig, run_dir: Path, device: str,
                  loss: LossConfig = LossConfig()) -> tuple[float, tuple[float, int], float]:
    """One fresh student (the run builder's, weights a function of `seed`); returns (final top-1,
    (best top-1, its epoch), seconds). Tested at the last epoch only, unless best-epoch is asked.
    `loss`: how it learns soft labels (a relabel store's label spec); hard labels are plain CE."""
    cfg = RunConfig(name=run_dir.name, seed=seed, device=device, out_dir=run_dir.parent, data=dcfg,
                    student=ModelConfig(model=student), loss=loss, optim=protocol.optim,
                    trainer=TrainerConfig(epochs=epochs, batch_size=protocol.batch_size,
                                          eval_batch_size=protocol.eval_batch_size,
                                          checkpoint_every=max(1, epochs // 4)))
    step = create_step(cfg, train)
    trainer = Trainer(cfg, step, create_backend(cfg, step, resolve_device(device)), train, test, labeler, run_dir,
                      eval_each_epoch=protocol.best_epoch)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log):
        history = trainer.fit()
    scored = [(r["test_top1"], r["epoch"]) for r in history if not math.isnan(r["test_top1"])]
    best = max(scored, key=lambda t: (t[0], -t[1]))
    return history[-1]["test_top1"], best, time.perf_counter() - start


def _teachers_for_relabel(art: Artefact, train: ImageSet, device: torch.device) -> list[Teacher]:
    teachers = []
    for i, raw in enumerate(yaml.safe_load(art.recipe_yaml).get("teachers") or []):
        try:
            t = ModelConfig.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(f"the random subset is relabelled with the artefact's teachers, but teachers.{i} of "
                              f"{art.root / 'recipe.yaml'} cannot be built: {err}") from None
        teacher = create_teacher(t, train.num_classes, train.channels, train.image_size, train.class_names).to(device)
        precision = yaml.safe_load(art.recipe_yaml).get("precision", "fp32")  # the artefact's own relabel precision
        teachers.append(teacher.configure(precision, channels_last=precision != "fp32"))
    return teachers


def read_protocol(raw_recipe: dict[str, Any], overrides: list[str], students: list[str] | None, seeds: int | None,
                  best_epoch: bool | None) -> EvalConfig:
    """The artefact recipe's `eval` section with the command line's changes, validated."""
    raw_eval = apply_overrides(raw_recipe.get("eval") or {}, list(overrides))
    if students:
        raw_eval["students"] = list(students)
    if seeds is not None:
        raw_eval["seeds"] = seeds
    if best_epoch is not None:
        raw_eval["best_epoch"] = best_epoch
    try:
        return EvalConfig.model_validate(raw_eval)
    except ValidationError as err:
        raise ConfigError(f"eval-synth protocol: {err}") from None


def relabel_config(art: Artefact) -> RelabelConfig:
    """The artefact's `labels.relabel`, its label spec included (an older recipe without one reads
    as soft CE at T = 1, what it was made with)."""
    return RelabelConfig.model_validate(yaml.safe_load(art.recipe_yaml)["labels"]["relabel"])


@dataclass
class Cell:
    """One planned student run: its training set, labels, epochs and where it lives."""

    data: ImageSet
    labeler: BatchLabeler
    label_bytes: int
    image_bytes: int
    epochs: int
    label_mode: str
    run_dir: Path
    loss: LossConfig = LossConfig()


class EvalPlan:
    """Which runs the protocol asks for, and for each its data and labeler. The distilled set and
    the random subset get the same kind of labels (the artefact's label mode); full data is hard.
    A soft-label artefact evaluated beside full data also trains its images with hard labels
    (`distilled_hard`: DD-Ranking's syn-hard, for HLR). Relabel students learn with the artefact's
    label spec (`labels.relabel.loss`/`temperature` of its recipe; older recipes: soft CE at T = 1)."""

    def __init__(self, art: Artefact, protocol: EvalConfig, train: ImageSet, device: torch.device, root: Path):
        raw_recipe = yaml.safe_load(art.recipe_yaml)
        self.art, self.protocol, self.train, self.device, self.root = art, protocol, train, device, root
        self.norm = tuple(torch.tensor(art.manifest["normalisation"][k]) for k in ("mean", "std"))  # DSA's space
        self.mode = art.label_mode
        self.rc = relabel_config(art) if self.mode in ("relabel", "projector") else None
        self.loss = student_loss(self.rc) if self.mode == "relabel" else LossConfig()
        if self.mode == "projector":  # HeLlO: one projector labels the distilled set and the random subset alike
            self.projector = projector_labeler(art, self.rc, device)
            self.tag = "-" + art.manifest["files"]["labels/projector.safetensors"]["sha256"][:12]
        elif self.mode == "relabel":  # random-subset labels depend on the teachers and relabel settings
            self.tag = "-" + hashlib.sha256(json.dumps([art.manifest["teachers"], raw_recipe["labels"]["relabel"]],
                                                       sort_keys=True).encode()).hexdigest()[:12]
        else:
            self.tag = ""
        self.teachers = (_teachers_for_relabel(art, train, device) if self.mode == "relabel" and protocol.random_subset
                         else [])

    def runs(self) -> list[tuple[str, str, int]]:
        """(set, student, seed) in the order they train."""
        p, plan = self.protocol, []
        for s in p.students:
            plan += [("distilled", s, k) for k in range(p.seeds)]
            plan += [("distilled_hard", s, k) for k in range(p.seeds)] if self.mode != "hard" and p.full_data else []
            plan += [("random", s, k) for k in range(p.seeds)] if p.random_subset else []
            plan += [("full", s, k) for k in range(p.seeds)] if p.full_data else []
        return plan

    def cell(self, set_name: str, student: str, seed: int) -> Cell:
        return getattr(self, set_name)(student, seed, _protocol_hash(self.protocol, student))

    def distilled(self, student: str, seed: int, ident: str) -> Cell:
        data, m = self.art.images, self.art.manifest
        run_dir = self.art.root / "eval" / f"distilled-{student}-{ident}" / f"seed{seed}"
        if self.mode == "relabel":
            labeler, lbytes = store_labeler(self.art.labels_root, data, self.rc.decode)
        elif self.mode == "projector":
            labeler, lbytes = self.projector
        else:
            labeler, lbytes = hard_labeler(self.protocol, data, self.norm), _hard_bytes(len(data))
        return Cell(data, labeler, lbytes, m["bytes"]["images"], self.protocol.epochs, self.mode, run_dir, self.loss)

    def distilled_hard(self, student: str, seed: int, ident: str) -> Cell:
        """The distilled images with hard labels under the same protocol (a soft-label artefact's syn-hard)."""
        data = self.art.images
        run_dir = self.art.root / "eval" / f"distilled_hard-{student}-{ident}" / f"seed{seed}"
        return Cell(data, hard_labeler(self.protocol, data, self.norm), _hard_bytes(len(data)),
                    self.art.manifest["bytes"]["images"], self.protocol.epochs, "hard", run_dir)

    def random(self, student: str, seed: int, ident: str) -> Cell:
        data = random_subset(self.train, self.art.ipc, seed)
        base = self.root / f"random-ipc{self.art.ipc}-{self.train.fingerprint()}-{self.mode}"
        run_dir = base / f"{student}-{ident}{self.tag}" / f"seed{seed}"
        if self.mode == "projector":
            labeler, lbytes = self.projector
        elif self.mode == "relabel":
            store_root = base / f"labels{self.tag}-seed{seed}"
            relabel_store(store_root, data, self.teachers, self.rc, seed, f"random{self.tag}-{seed}", self.device,
                          progress=False)
            labeler, lbytes = store_labeler(store_root, data, self.rc.decode)
        else:
            labeler, lbytes = hard_labeler(self.protocol, data, self.norm), _hard_bytes(len(data))
        ibytes = int(data.images.numel() * data.images.element_size())
        return Cell(data, labeler, lbytes, ibytes, self.protocol.epochs, self.mode, run_dir, self.loss)

    def full(self, student: str, seed: int, ident: str) -> Cell:
        """Full data, hard labels; bytes as uint8 pixels (lazy folders are not in memory)."""
        p, data = self.protocol, self.train
        ident_full = _protocol_hash(p, student, "full", p.full_epochs)
        run_dir = self.root / f"full-{data.fingerprint()}" / f"{student}-{ident_full}" / f"seed{seed}"
        return Cell(data, hard_labeler(p, data, self.norm), _hard_bytes(len(data)),
                    len(data) * data.channels * data.image_size ** 2, p.full_epochs, "hard", run_dir)


def _hard_bytes(n: int) -> int:
    return 8 * n  # int64 targets, as stored


def eval_synth(artefact: str | Path, students: list[str] | None = None, seeds: int | None = None,
               data_spec: str | None = None, image_size: int | None = None, best_epoch: bool | None = None,
               overrides: list[str] = (), device: str = "auto", cache_dir: str | Path | None = None,
               progress: bool = True) -> EvalReport:
    """Train the protocol's students on the distilled set, the random subset and the full data."""
    art = read_artefact(artefact)  # verifies every file before any compute
    protocol = read_protocol(yaml.safe_load(art.recipe_yaml), list(overrides), students, seeds, best_epoch)
    dcfg, train, test = eval_data(art, data_spec, image_size)
    plan = EvalPlan(art, protocol, train, resolve_device(device), Path(cache_dir) if cache_dir else art.root / "eval")
    cells: dict[tuple[str, str], SetResult] = {}
    bar = Progress(plan.runs(), desc=f"eval-synth {art.root.name}", unit="student", enabled=progress)
    for set_name, student, seed in bar:
        bar.set_postfix(run=f"{set_name} {student} seed {seed}")
        c = plan.cell(set_name, student, seed)
        result = cells.setdefault((student, set_name), SetResult(set_name, student, c.label_mode, len(c.data),
                                                                 c.image_bytes, c.label_bytes))
        final, best, secs = train_student(student, seed, c.data, test, c.labeler, c.epochs, protocol, dcfg,
                                          c.run_dir, device, c.loss)
        result.final.append(final)
        result.best.append(best)
        result.seconds.append(secs)
    report = EvalReport(art.root, protocol, art.ipc, list(cells.values()))
    write_eval_report(art, report)
    return report


def write_eval_report(art: Artefact, report: EvalReport) -> None:
    m = art.manifest
    out = art.root / "eval"
    write_text(out / "results.json", json.dumps(report.to_json(), indent=1))
    p = report.protocol
    spec = ""
    if m["label_mode"] == "relabel":
        rc = relabel_config(art)
        spec = f" (teachers' softmax at T = {rc.temperature:g}, learnt by `{rc.loss}`)"
    lines = [f"# eval-synth `{art.root.name}`", "",
             f"- method `{m['method']}`{' + FYI flip' if m['flip'] else ''}, init `{m['init']}`, IPC {m['ipc']}, "
             f"{m['num_classes']} classes, {m['storage']} images; labels: **{m['label_mode']}**{spec}",
             f"- protocol: {p.epochs} epochs (full data {p.full_epochs}), batch {p.batch_size}, {p.optim.name} lr "
             f"{p.optim.lr} {p.optim.schedule}, augmentation {p.augment if m['label_mode'] == 'hard' else 'stored crops'}; "
             f"**final-epoch** top-1 over {p.seeds} seeds (fresh weights per seed; a new random subset per seed)",
             "", markdown_table(report.header(), report.rows()), ""]
    for s in p.students:
        imp = report.improvement(s)
        if imp is not None:
            lines.append(f"- {s}: improvement over the random real subset at IPC {m['ipc']}: **{imp:+.2f}** points")
    lines += ["", "## DD-Ranking", "",
              "HLR = full data − distilled images, both with hard labels; IOR = distilled set − random subset, "
              "same labels and protocol; LRS = 100 · (e^α − e^−1) / (e − e^−1), "
              "α = w · IOR/100 − (1 − w) · HLR/100. From the final-epoch means above; definitions from DD-Ranking "
              "(arXiv:2505.13300, `ddranking` 0.2.0 `LabelRobustScoreSoft/Hard.compute_metrics`), "
              "see docs/synth.md.", "",
              markdown_table(report.ddranking_header(), report.ddranking_rows()), ""]
    if any(r.set_name == "distilled_hard" for r in report.results):
        lines.append(f"- syn-hard of these {m['label_mode']} labels: the `distilled_hard` run, the same images "
                     f"with hard labels, augmentation {p.augment}, {p.epochs} epochs")
    lines += [f"- {note}" for note in report.ddranking_notes()]
    write_text(out / "report.md", "\n".join(lines) + "\n")

"""`distill` command line: parse, load a validated recipe, call an importable `run` function.

Errors a user can fix (recipes, data, artefacts) print one clear message and exit 2. Each command
imports its job when it runs (the jobs pull in torch, timm and the registries), so `distill --help`
answers at once.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

from distill.errors import USER_ERRORS, TrainingError

EXIT_USER, EXIT_TRAINING, EXIT_INTERNAL = 2, 3, 1  # docs/errors.md


def cmd_train(args: argparse.Namespace) -> None:
    from distill.distributed import rank
    from distill.recipe import load_config
    from distill.runner import train

    cfg = load_config(args.recipe, args.overrides)
    result = train(cfg)
    if rank() == 0:  # under a launcher, one summary line
        print(f"{cfg.name}: top-1 {result.final['test_top1']:.2f}  top-5 {result.final['test_top5']:.2f}  "
              f"run directory {result.run_dir}")


def cmd_eval(args: argparse.Namespace) -> None:
    from distill.eval_model import evaluate_artefact

    metrics = evaluate_artefact(Path(args.target), args.data, args.split, args.device, args.workers, args.batch_size)
    print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


def cmd_data_pack(args: argparse.Namespace) -> None:
    from distill.pack import pack_imagefolder, parse_size

    m = pack_imagefolder(Path(args.imagefolder), Path(args.out), parse_size(args.shard_size), args.seed)
    for split, info in m["splits"].items():
        print(f"{split}: {info['images']} images in {len(info['shards'])} shard(s), {info['bytes'] / 1e6:.1f} MB")
    print(f"{args.out}: {len(m['class_names'])} classes; data: {{source: webdataset, urls: "
          f"{Path(args.out) / 'train'}-{{000000..{len(m['splits']['train']['shards']) - 1:06d}}}.tar}}")


def cmd_demo(args: argparse.Namespace) -> None:
    from distill.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, recipes=Path(args.recipes) if args.recipes else None, seeds=args.seeds)


def cmd_labels(args: argparse.Namespace) -> None:
    from distill.generate_store import generate_labels
    from distill.label_estimate import estimate_labels
    from distill.recipe import load_config

    cfg = load_config(args.recipe, args.overrides)
    if args.estimate:
        print(estimate_labels(cfg, args.estimate_images, args.world or 1).summary())
        return
    print(generate_labels(cfg, args.rank, args.world).summary())


def cmd_synth(args: argparse.Namespace) -> None:
    from distill.recipe import load_synth_config
    from synth.run import synthesize

    print(synthesize(load_synth_config(args.recipe, args.overrides), args.rank, args.world).summary())


def cmd_eval_synth(args: argparse.Namespace) -> None:
    from synth.eval_synth import eval_synth

    report = eval_synth(args.artefact, args.student, args.seeds, args.data, args.image_size,
                        True if args.best_epoch else None, args.overrides, args.device, args.cache)
    print(report.text())
    print(f"report: {report.root / 'eval' / 'report.md'}")


def cmd_export_peft(args: argparse.Namespace) -> None:
    from synth.peft_export import export_peft_adapter

    print(f"peft adapter: {export_peft_adapter(args.projector, args.out, args.checkpoint, args.overwrite)}")


def cmd_launch(args: argparse.Namespace) -> None:
    from distill.launch import plan_launch, run_launch

    plan = plan_launch(args.recipe, args.overrides, args.nproc, args.launcher, args.nnodes, args.node_rank,
                       args.master_addr, args.master_port)
    run_launch(plan, args.dry_run)


def cmd_validate(args: argparse.Namespace) -> None:
    """Student recipes and synthesis recipes (those with `ipc:`) alike: the job's own preflight
    (data, checkpoint headers, class counts, IPC) unless --structure-only."""
    from distill.recipe import load_recipe
    from distill.runner import preflight
    from synth.config import SynthConfig
    from synth.run import SynthJob

    cfg = load_recipe(args.recipe, args.overrides)
    kind = "synthesis recipe" if isinstance(cfg, SynthConfig) else "recipe"
    if not args.structure_only:
        if isinstance(cfg, SynthConfig):
            SynthJob(cfg, 0, 1, None, progress=False)
        else:
            preflight(cfg)
    print(f"{args.recipe}: valid {kind} {cfg.name!r} (config hash {cfg.hash()})")


def _rank_world(parser: argparse.ArgumentParser, work: str) -> None:
    """--rank/--world for commands that shard their work across processes (torchrun sets the env)."""
    parser.add_argument("--rank", type=int, default=None, help=f"this process's shard of {work} (default $RANK or 0)")
    parser.add_argument("--world", type=int, default=None, help="number of processes (default $WORLD_SIZE or 1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Knowledge distillation and dataset distillation.")
    # DeepSpeed's launcher puts --local_rank=N before the command (`deepspeed -m distill.cli train ...`);
    # each rank reads LOCAL_RANK from the environment, which the launcher sets too
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="teachers label the digits a student has no labels for; 4 students over seeds, with a report")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--quick", action="store_true", help="a reduced budget (seconds, for tests)")
    d.add_argument("--seeds", type=int, default=3, help="student seeds per row (mean ± std; default 3)")
    d.add_argument("--recipes", default=None, help="folder of the demo recipes (default: the repo's configs/demo)")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train a student (or a teacher: no pool = hard labels) from a recipe")
    t.add_argument("recipe", help="YAML recipe")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.epochs=5")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="top-1/top-5 of a run directory or model checkpoint on a dataset")
    e.add_argument("target", help="run directory (uses its student.safetensors) or a .safetensors checkpoint")
    e.add_argument("--data", required=True, help="'digits', a .npz file, an ImageFolder root, or WebDataset "
                                                 "shards: a `distill data pack` folder or DIR/val-{000000..000009}.tar")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--device", default="auto")
    e.add_argument("--workers", type=int, default=0, help="DataLoader worker processes decoding images (default 0)")
    e.add_argument("--batch-size", type=int, default=256)
    e.set_defaults(fn=cmd_eval)

    da = sub.add_parser("data", help="data tools: `data pack` writes WebDataset shards from an ImageFolder tree")
    dsub = da.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    dp = dsub.add_parser("pack", help="an ImageFolder tree (train/, val/) → WebDataset tar shards + manifest (resumable)")
    dp.add_argument("imagefolder", help="ImageFolder root holding train/<class>/* and val/<class>/* (or test/)")
    dp.add_argument("out", help="folder for the shards (train-000000.tar, val-000000.tar, ...) and manifest.json")
    dp.add_argument("--shard-size", default="1GB", help="bytes of images per shard, e.g. 1GB, 256MB (default 1GB)")
    dp.add_argument("--seed", type=int, default=0, help="seed of the training split's shuffled order (default 0)")
    dp.set_defaults(fn=cmd_data_pack)

    v = sub.add_parser("validate", help="check a recipe (and overrides) without running it")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--structure-only", action="store_true",
                   help="check the recipe's structure and names only (no data or checkpoint is read)")
    v.set_defaults(fn=cmd_validate)

    la = sub.add_parser("launch", help="`train` on several processes (torchrun or the deepspeed launcher; backend deepspeed)")
    la.add_argument("recipe", help="YAML recipe (trainer.backend: deepspeed)")
    la.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.deepspeed=configs/deepspeed/zero2.json")
    la.add_argument("--nproc", type=int, required=True, help="processes (GPUs) per node")
    la.add_argument("--launcher", default="torchrun", choices=["torchrun", "deepspeed"])
    la.add_argument("--nnodes", type=int, default=1, help="nodes (torchrun; run the same command on each)")
    la.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    la.add_argument("--master-addr", default=None, help="node 0's address (several nodes)")
    la.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one on one node)")
    la.add_argument("--dry-run", action="store_true", help="print the command line and exit")
    la.set_defaults(fn=cmd_launch)

    lb = sub.add_parser("labels", help="write a region-level soft-label store (FKD/FerKD) with the recipe's teachers")
    lb.add_argument("recipe", help="YAML recipe with pool.teachers and labels.store (+ labels.generate)")
    lb.add_argument("overrides", nargs="*", help="key.path=value overrides")
    _rank_world(lb, "the work")
    lb.add_argument("--estimate", action="store_true",
                    help="time the teachers on a sample and print crops, teacher-hours, bytes and wall time; write nothing")
    lb.add_argument("--estimate-images", type=int, default=64, help="images in the --estimate sample (default 64)")
    lb.set_defaults(fn=cmd_labels)

    sy = sub.add_parser("synth", help="synthesise a distilled dataset (bn_matching / DM / gradient matching, FYI flip)")
    sy.add_argument("recipe", help="YAML synthesis recipe (configs/synth/)")
    sy.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. ipc=10 flip=true")
    _rank_world(sy, "the chunks")
    sy.set_defaults(fn=cmd_synth)

    es = sub.add_parser("eval-synth", help="train fresh students on a distilled set vs a random real subset and full data")
    es.add_argument("artefact", help="distilled-dataset directory written by `distill synth`")
    es.add_argument("overrides", nargs="*", help="overrides of the protocol (the recipe's eval section), e.g. epochs=50")
    es.add_argument("--student", action="append", default=None, help="student model (repeat for cross-architecture)")
    es.add_argument("--seeds", type=int, default=None, help="seeds per training set (default: the recipe's)")
    es.add_argument("--data", default=None, help="'digits', a .npz file or an ImageFolder root (default: the recipe's)")
    es.add_argument("--image-size", type=int, default=None, help="evaluation image size (must match the artefact's)")
    es.add_argument("--best-epoch", action="store_true", help="also report best-epoch accuracy (labelled as such)")
    es.add_argument("--device", default="auto")
    es.add_argument("--cache", default=None, help="folder for random-subset/full-data runs shared across artefacts")
    es.set_defaults(fn=cmd_eval_synth)
    ex = sub.add_parser("export-peft", help="a HeLlO projector as a peft LoRA adapter (PeftModel.from_pretrained loads it)")
    ex.add_argument("projector", help="a distilled-dataset directory, its labels/ directory or projector.safetensors")
    ex.add_argument("out", help="the adapter directory to write (adapter_config.json + adapter_model.safetensors)")
    ex.add_argument("--checkpoint", default=None, help="this machine's copy of the projector's base encoder")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    ex.set_defaults(fn=cmd_export_peft)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also follow the --options (argparse stops the positional list there)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.fn(args)
    except USER_ERRORS as err:
        print(f"error: {one_screen(err)}", file=sys.stderr)
        return EXIT_USER
    except TrainingError as err:
        print(f"stopped: {err}", file=sys.stderr)
        return EXIT_TRAINING
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (a bug of ours: one line here, the traceback in a file)
        print(f"internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
              f"(full traceback in {write_traceback()}); please report it", file=sys.stderr)
        return EXIT_INTERNAL
    return 0


def one_screen(err: Exception) -> str:
    """The error's own message: a DataLoader worker wraps it in its traceback; keep the last line."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def write_traceback() -> Path:
    """The current exception's traceback, written where the user can attach it to a report."""
    fd, path = tempfile.mkstemp(prefix="distill-error-", suffix=".txt")
    with open(fd, "w") as f:
        traceback.print_exc(file=f)
    return Path(path)


if __name__ == "__main__":
    sys.exit(main())

"""Data sets and the demo model: ``demo-data``, ``validate``, ``train-demo``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from ecif.cli.output import _emit, _reporter
from ecif.config import DemoDataConfig
from ecif.data.demo import Corruption, DemoName


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo = DemoDataConfig()
    p = commands.add_parser("demo-data", help="generate a demo data set (offline, deterministic)")
    p.add_argument("name", choices=list(get_args(DemoName)))
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=demo.n)
    p.add_argument("--noise", type=float, default=demo.noise)
    p.add_argument("--corruption", default=demo.corruption, choices=list(get_args(Corruption)))
    p.add_argument("--seed", type=int, default=demo.seed)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_demo_data)

    p = commands.add_parser("validate", help="check a manifest and list every bad row")
    p.add_argument("manifest")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_validate)

    p = commands.add_parser("train-demo", help="train the small demo model from scratch (cached) and report its zero-shot accuracy")
    p.add_argument("--manifest", help="demo manifest (default: shapes, n=3000, 10%% random-caption noise)")
    p.add_argument("--split", default="test")
    p.add_argument("--write-asset", action="store_true", help="store the trained model as the shipped one (assets/models)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_train_demo)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from ecif.data import load_manifest, make_demo_data

    path = make_demo_data(args.name, Path(args.out), n=args.n, noise=args.noise, corruption=args.corruption, seed=args.seed, reporter=_reporter(args))
    frame = load_manifest(path, check_images=False).frame
    train = frame[frame["split"] == "train"]
    payload = {
        "manifest": str(path),
        "rows": len(frame),
        "splits": frame["split"].value_counts().to_dict(),
        "train_corrupted": int(train["corrupted"].astype(bool).sum()),
        "train_rows": len(train),
    }
    _emit(args, payload, f"wrote {path}\n{len(frame)} rows; {payload['train_corrupted']} of {len(train)} train rows corrupted ({args.corruption})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ecif.data import bad_rows_report, load_manifest

    loaded = load_manifest(args.manifest, reporter=_reporter(args))
    payload = {
        "manifest": str(loaded.path),
        "valid_rows": len(loaded.frame),
        "bad_rows": loaded.bad_rows,
        "columns": list(loaded.frame.columns),
        "classes": loaded.classes.names if loaded.classes else None,
    }
    _emit(args, payload, f"{loaded.path}: {len(loaded.frame)} valid rows, {len(loaded.bad_rows)} skipped\n" + bad_rows_report(loaded))
    return 0


def _default_demo_manifest(args: argparse.Namespace) -> Path:
    from ecif.data import make_demo_data
    from ecif.paths import cache_dir

    demo = DemoDataConfig()
    folder = cache_dir() / "demo-data" / f"{demo.name}-{demo.n}-{demo.noise}-{demo.corruption}-{demo.seed}"
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        make_demo_data(demo.name, folder, n=demo.n, noise=demo.noise, corruption=demo.corruption, seed=demo.seed, reporter=_reporter(args))
    return manifest


def cmd_train_demo(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ecif.data import load_manifest
    from ecif.models import load_model, train_demo_model, zero_shot_accuracy
    from ecif.models.demo import shipped_demo_record, write_shipped_demo_model

    if args.write_asset and args.manifest:
        raise SystemExit("--write-asset stores the model of the default demo; leave out --manifest")
    manifest = load_manifest(args.manifest or _default_demo_manifest(args), reporter=_reporter(args))
    if manifest.classes is None:
        raise SystemExit("the manifest has no labels, so zero-shot accuracy cannot be measured")
    # Always trained (or taken from the training cache), never the shipped copy: this is how the
    # shipped model is made and checked.
    checkpoint = train_demo_model(manifest, reporter=_reporter(args), use_shipped=False)
    loaded = load_model("ecif-demo", checkpoint=checkpoint)
    frame = manifest.frame
    test = frame[frame["split"] == args.split].reset_index(drop=True)
    accuracy = zero_shot_accuracy(loaded, test, manifest.classes)
    chance = 1.0 / len(manifest.classes.names)
    payload = {"checkpoint": str(checkpoint), "split": args.split, "zero_shot_accuracy": accuracy, "chance": chance, "items": len(test)}
    text = f"demo model: {checkpoint}\nzero-shot accuracy on {len(test)} {args.split} items: {accuracy:.1%} (chance {chance:.0%})"
    record = shipped_demo_record()
    shipped = (record or {}).get("zero_shot_accuracy", {}).get(args.split)
    if shipped is not None and not args.manifest:
        payload["shipped_zero_shot_accuracy"] = shipped
        text += f"\nthe shipped model: {shipped:.1%}"
    if args.write_asset:
        payload["asset"] = str(write_shipped_demo_model(checkpoint, manifest, asdict(DemoDataConfig()), accuracy={args.split: accuracy}))
        text += f"\nwrote the shipped model {payload['asset']}"
    _emit(args, payload, text)
    return 0

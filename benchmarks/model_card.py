"""Write the card of a bundled model (``itk_gradicon/weights/NAME.json``) from what was measured.

    python benchmarks/model_card.py --model itk_gradicon/weights/gradicon-synthbrain-96.pt \
        --validation RUN/validation.jsonl [--accuracy accuracy.json ...] [--training-log RUN/log.jsonl]
    python benchmarks/model_card.py --model itk_gradicon/weights/gradicon-synthbrain-96.pt \
        --accuracy-only --accuracy all.json --accuracy ours.json    # refresh the figures of an existing card

A model finetuned from the bundled one (its provenance names a ``parent``) keeps the parent card's history:
steps and stages are the parent's plus the finetune's, and ``--finetune-config`` names the finetune's
configuration beside the parent's.

The card records what ``gradicon models info NAME`` shows beside the file's own metadata: architecture,
data (trained on and held out), steps per stage, preprocessing, the pre-alignment it expects, the
machine it was trained on, and the figures measured with it (the validation line of the step the file
holds, and the accuracy benchmark's summary when given). Nothing here is typed by hand: every figure comes
from a file a benchmark wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--validation", type=Path, help="validate_training.py's JSONL log")
    parser.add_argument("--accuracy", type=Path, action="append", default=[],
                        help="bench_accuracy.py --json output; several: a later file's methods replace an "
                             "earlier one's (e.g. a clean rerun of some rows)")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="keep the existing card and replace its accuracy figures only")
    parser.add_argument("--training-log", type=Path, help="the run's log.jsonl (time and pairs per second)")
    parser.add_argument("--machine", default="2-core AMD EPYC (AVX2), no GPU")
    parser.add_argument("--finetune-config", help="a finetuned model's configuration file, for its card")
    args = parser.parse_args()
    out = args.model.with_suffix(".json")
    parent_card = json.loads(out.read_text()) if out.is_file() else None
    if args.accuracy_only:
        card = json.loads(out.read_text())
        card["steps"]["stages"] = steps_run(card["steps"]["stages"], int(card["steps"]["total"]))
        card.setdefault("figures", {})["accuracy"] = accuracy_summary(args.accuracy)
        out.write_text(json.dumps(card, indent=2) + "\n")
        print(out)
        return
    if args.validation is None:
        parser.error("--validation is needed unless --accuracy-only")

    from itk_gradicon.models import load_model
    from itk_gradicon.network import count_parameters

    model = load_model(str(args.model))
    provenance = model.provenance
    step = int(provenance.get("steps", 0))
    rows = [json.loads(line) for line in args.validation.read_text().splitlines() if line.strip()]
    mine = [r for r in rows if int(r.get("step", -1)) == step]
    config = provenance.get("config", {})
    card = {
        "name": model.name,
        "architecture": {**model.architecture.to_dict(), "parameters": count_parameters(model.network)},
        "data": [{k: d.get(k) for k in ("name", "images", "modalities", "region", "pairing", "share", "source")}
                 for d in provenance.get("datasets", [])],
        "held_out": ["SynthSeg label maps 19 and 20 (validation)", "lapirn_oasis (images and labels)",
                     "sct_testing_data"],
        "steps": {"total": step, "stages": steps_run(provenance.get("stages", []), step),
                  "pairs_per_step": provenance.get("pairs_per_step")},
        "objective": config.get("objective"),
        "synthesis": [d.get("synthesis") for d in config.get("datasets", []) if d.get("kind") == "synthetic"],
        "preprocessing": model.preprocessing,
        "prealignment": ("affine: gradicon register runs its elastix affine stage first (--affine auto); "
                         "--affine none turns it off" if model.preprocessing.get("prealignment") == "affine"
                         else "none"),
        "trained_on": args.machine,
        "config": "examples/train_synthbrain.yaml",
        "figures": {"validation": mine[-1] if mine else None},
    }
    if args.training_log:
        log = [json.loads(line) for line in args.training_log.read_text().splitlines() if line.strip()]
        done = [r for r in log if r["step"] <= step]
        if done:
            card["steps"]["training_seconds"] = done[-1].get("elapsed_s")
    if provenance.get("parent") and parent_card is not None and parent_card.get("name") == provenance["parent"]["name"]:
        card = _after_parent(card, parent_card, step, provenance["parent"], args)
    if args.accuracy:
        card["figures"]["accuracy"] = accuracy_summary(args.accuracy)
    out.write_text(json.dumps(card, indent=2) + "\n")
    print(out)


def steps_run(stages, total: int) -> list:
    """The stages with the steps they ran, for a model saved after ``total`` steps: a configuration's
    stages give their planned lengths (the last one is often open-ended), the model holds fewer."""
    out, left = [], int(total)
    for stage in stages:
        ran = min(int(stage["steps"]), left)
        out.append({**stage, "steps": ran})
        left -= ran
    return out


def _after_parent(card: dict, parent: dict, step: int, parent_file: dict, args) -> dict:
    """The card of a model finetuned ``step`` steps from the model ``parent`` describes."""
    card["steps"] = {
        "total": int(parent["steps"]["total"]) + step,
        "stages": [*parent["steps"]["stages"], {"name": "finetune", "steps": step}],
        "pairs_per_step": card["steps"].get("pairs_per_step"),
        "training_seconds": parent["steps"].get("training_seconds"),
        "finetune_from": {"sha256": parent_file.get("sha256"), "steps": int(parent["steps"]["total"])},
    }
    card["config"] = f"{parent.get('config')}, then {args.finetune_config or 'a finetune'} ({step} steps)"
    card["trained_on"] = f"{parent.get('trained_on')}; finetune: {args.machine}"
    return card


def accuracy_summary(paths) -> dict:
    """Per pair and method, from ``bench_accuracy.py --json`` files: mean Dice, mean HD95 (mm), % negative
    Jacobian determinants, seconds; plus the run's machine, IO steps and source file names."""
    pairs: dict = {}
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs.append({"file": Path(path).name, "machine": data.get("machine"), "io_iterations": data.get("io_iterations"),
                     "methods": data.get("methods")})
        for pair, methods in data["results"].items():
            for method, record in methods.items():
                pairs.setdefault(pair, {})[method] = {
                    key: (round(record[key], 4) if isinstance(record.get(key), float) else record.get(key))
                    for key in ("mean_dice", "mean_hd95_mm", "percent_negative_jacobian", "seconds")}
    return {"runs": runs, "pairs": pairs, "details": "benchmarks/ACCURACY.md"}


if __name__ == "__main__":
    main()

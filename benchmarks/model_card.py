"""Write the card of a bundled model (``itk_gradicon/weights/NAME.json``) from what was measured.

    python benchmarks/model_card.py --model itk_gradicon/weights/gradicon-synthbrain-96.pt \
        --validation RUN/validation.jsonl [--accuracy accuracy.json] [--training-log RUN/log.jsonl]

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
    parser.add_argument("--validation", type=Path, required=True, help="validate_training.py's JSONL log")
    parser.add_argument("--accuracy", type=Path, help="bench_accuracy.py --json output")
    parser.add_argument("--training-log", type=Path, help="the run's log.jsonl (time and pairs per second)")
    parser.add_argument("--machine", default="2-core AMD EPYC (AVX2), no GPU")
    args = parser.parse_args()

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
        "steps": {"total": step, "stages": provenance.get("stages", []),
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
    if args.accuracy:
        card["figures"]["accuracy"] = json.loads(args.accuracy.read_text()).get("summary")
    out = args.model.with_suffix(".json")
    out.write_text(json.dumps(card, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()

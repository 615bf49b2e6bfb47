"""Whole-process time of every file command, as a user types it, beside antspyx's ``apply_transforms``.

On the OASIS pair of ``../shared/data/lapirn_oasis`` (160x192x144; moving B, fixed A) this script first
registers B to A once with the bundled model (``gradicon register``, no affine stage), writing an ITK
``.h5`` and ANTs' ``1Warp.nii.gz``; then it times, each in its own process and alternating with the peer:

* ``gradicon apply-transform`` with the ``.h5`` and with the ANTs ``1Warp.nii.gz``;
* ``gradicon warp-labels``, ``gradicon jacobian``, ``gradicon evaluate`` (Dice, HD95, Jacobian);
* the peer: a Python process that imports antspyx, reads both images, runs ``ants.apply_transforms``
  with the same ``1Warp.nii.gz`` and writes the result (what a user's ANTsPy script does);
* ``gradicon --help`` and every subcommand's ``--help``;
* ``gradicon register`` with a model file, split into the registration itself (the ``done in`` line)
  and everything else (start-up, reading, checks, writing), with and without ``--affine elastix``.

The table gives the median over ``--runs`` runs and the ratio to the peer's median from the same run of
the script. Targets (issue 13): apply-transform, warp-labels and jacobian no slower than the peer;
evaluate within 1.5x; register's time outside the registration at most 3 s; every ``--help`` under 0.5 s.

Usage::

    python benchmarks/bench_commands.py [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LAPIRN, busy_cores, executable, loaded_warning, machine, median, run_child, save_json, table  # noqa: E402

PEER = """
import sys
import ants
fixed = ants.image_read(sys.argv[1])
moving = ants.image_read(sys.argv[2])
warped = ants.apply_transforms(fixed, moving, [sys.argv[3]])
ants.image_write(warped, sys.argv[4])
"""

SUBCOMMANDS = ["register", "register-batch", "merge-reports", "apply-transform", "warp-labels", "jacobian",
               "evaluate", "models", "train"]


def _done_seconds(output: str) -> float:
    """The registration's own seconds from ``gradicon register``'s last line (``done in 0.9s ...``)."""
    match = re.search(r"done in ([0-9.]+)s", output)
    return float(match.group(1)) if match else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="gradicon-synthbrain-96", help="model of the register rows")
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args()

    gradicon = executable("gradicon")
    fixed, moving = LAPIRN / "image_A_160x192x144.nii.gz", LAPIRN / "image_B_160x192x144.nii.gz"
    fixed_seg, moving_seg = LAPIRN / "image_A_160x192x144_seg.nii.gz", LAPIRN / "image_B_160x192x144_seg.nii.gz"
    info = machine()
    print(f"machine: {info}")
    with tempfile.TemporaryDirectory(prefix="bench-commands-") as tmp:
        work = Path(tmp)
        (work / "ants").mkdir()
        h5, warp = work / "B_to_A.h5", work / "ants" / "BA_1Warp.nii.gz"
        peer_script = work / "peer.py"
        peer_script.write_text(PEER)
        setup = run_child("setup", [gradicon, "register", "--model", args.model, "--affine", "none",
                                    "--fixed", fixed, "--moving", moving, "--out-transform", h5,
                                    "--out-ants-prefix", work / "ants" / "BA_"])
        if setup.status != 0:
            raise SystemExit(f"gradicon register failed:\n{setup.output}")

        commands = {
            "apply-transform (.h5)": [gradicon, "apply-transform", "-i", moving, "-r", fixed, "-t", h5,
                                      "-o", work / "w1.nii.gz"],
            "apply-transform (ANTs 1Warp.nii.gz)": [gradicon, "apply-transform", "-i", moving, "-r", fixed,
                                                    "-t", warp, "-o", work / "w2.nii.gz"],
            "warp-labels": [gradicon, "warp-labels", "-i", moving_seg, "-r", fixed, "-t", h5,
                            "-o", work / "l.nii.gz"],
            "jacobian": [gradicon, "jacobian", "-r", fixed, "-t", h5, "-o", work / "j.nii.gz"],
            "evaluate (Dice, HD95, Jacobian)": [gradicon, "evaluate", "-t", h5, "--fixed-labels", fixed_seg,
                                                "--moving-labels", moving_seg],
        }
        peer_argv = [sys.executable, peer_script, fixed, moving, warp, work / "peer.nii.gz"]
        register = {
            "register --affine none": [gradicon, "register", "--model", args.model, "--affine", "none",
                                       "--fixed", fixed, "--moving", moving, "--out-transform", work / "r.h5",
                                       "--out-warped", work / "r.nii.gz"],
            "register --affine elastix": [gradicon, "register", "--model", args.model, "--affine", "elastix",
                                          "--fixed", fixed, "--moving", moving, "--out-transform",
                                          work / "re.h5", "--out-warped", work / "re.nii.gz"],
        }
        times = {name: [] for name in [*commands, "peer: antspyx apply_transforms"]}
        register_times = {name: {"total": [], "registration": []} for name in register}
        help_times = {name: [] for name in ["gradicon --help"] + [f"{c} --help" for c in SUBCOMMANDS]}
        floor_times = []  # a Python process that only imports torch: below this no torch command can go
        busy = []
        for _ in range(args.runs):
            for name, argv in commands.items():
                busy.append(busy_cores(1.0))
                peer = run_child("peer", peer_argv)
                ours = run_child(name, argv)
                for run in (peer, ours):
                    if run.status != 0:
                        raise SystemExit(f"{run.label} failed:\n{run.output}")
                times["peer: antspyx apply_transforms"].append(peer.seconds)
                times[name].append(ours.seconds)
            for name, argv in register.items():
                busy.append(busy_cores(1.0))
                run = run_child(name, argv)
                if run.status != 0:
                    raise SystemExit(f"{name} failed:\n{run.output}")
                register_times[name]["total"].append(run.seconds)
                register_times[name]["registration"].append(_done_seconds(run.output))
            floor_times.append(run_child("import torch", [sys.executable, "-c", "import torch"]).seconds)
            help_times["gradicon --help"].append(run_child("help", [gradicon, "--help"]).seconds)
            for sub in SUBCOMMANDS:
                help_times[f"{sub} --help"].append(run_child("help", [gradicon, sub, "--help"]).seconds)

    peer_median = median(times["peer: antspyx apply_transforms"])
    rows = [[name, median(values), median(values) / peer_median] for name, values in times.items()]
    print(f"\nFile commands, whole process, median of {args.runs} (ratio: to antspyx apply_transforms)\n")
    print(table(rows, ["command", "seconds", "ratio to peer"]))
    rows = []
    floor = median(floor_times)
    for name, values in register_times.items():
        total, inside = median(values["total"]), median(values["registration"])
        rows.append([name, total, inside, total - inside, total - inside - floor])
    print(f"\ngradicon register --model {args.model} (OASIS B -> A), median of {args.runs}; "
          f"a bare `python -c 'import torch'` process: {floor:.2f} s\n")
    print(table(rows, ["command", "whole process s", "registration s", "outside s", "outside beyond import torch s"]))
    rows = [[name, max(values)] for name, values in help_times.items()]
    print(f"\n--help, slowest of {args.runs}\n")
    print(table(rows, ["command", "seconds"]))
    warning = loaded_warning(busy)
    if warning:
        print("\n" + warning)
    save_json(args.json, {"machine": info, "runs": args.runs, "times": times, "register": register_times,
                          "help": help_times, "import_torch": floor_times, "busy_cores": busy})


if __name__ == "__main__":
    main()

"""Reproduce the SegGPT paper's tables (Wang et al. 2023, arXiv:2304.03284): our figures beside the paper's.

    python -m benchmarks.paper_tables --fss DATA --pascal DATA --coco DATA --splits HSNET/data/splits \\
        [--davis DAVIS] [--model BAAI/seggpt-vit-large] [--out-dir benchmarks/results]

Every run is the standard protocol as ``seggpt-jax evaluate`` runs it (HSNet's episodes at seed 0,
HSNet's mask reading, absent classes counted 0, each bad sample used as HSNet does and named):

* Table 1, few-shot semantic segmentation (mIoU, %): COCO-20i and PASCAL-5i, folds 0..3, 1-shot and
  5-shot (BAAI's feature ensemble), the mean of the folds; FSS-1000's 240 test classes, 1-shot and
  few-shot (``--fss-few-shot``, default 4, the paper's Table 4a setting) with both the feature and the
  spatial ensemble. The paper states neither the task embedding nor the threshold: each run is done
  with the ``instance`` and the ``semantic`` embedding (``--embedding-types``) and the nearest-colour
  decision (threshold 0.5).
* Table 2, DAVIS-2017 val (semi-supervised): J&F, J and F with the first frame and 8 context frames.
* Table 4a, the ensembles on FSS-1000 (the few-shot rows above); Table 4b, DAVIS J&F with
  K = 1, 4, 8, 12, 16 context frames (``--davis-context``).

It writes ``paper-tables-DATE.json`` (every run's full report and settings, the machine, the command)
and ``paper-tables-DATE.md`` (the tables) into ``--out-dir``, never replacing a file (``-2``, ``-3``, ...
are added), and prints the markdown.

It cannot run on the machine this project is developed on: that has neither the released weights nor
the datasets (no network). ``tests/test_paper_tables.py`` runs it end to end on generated miniatures
of each layout with a tiny random model (``--fss-split all``, ``--episodes-per-fold``: quick checks
whose figures are marked as not the protocol).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

#: The paper's figures (arXiv:2304.03284v1): Table 1 (few-shot mIoU), Table 2 (DAVIS-17 val), Table 4b
#: (DAVIS-17 J&F against the number of context frames). Its few-shot FSS-1000 figure is the spatial
#: ensemble of four examples (Table 4a).
PAPER = {
    ("coco20i", "1-shot"): 56.1, ("coco20i", "few-shot"): 67.9,
    ("pascal5i", "1-shot"): 83.2, ("pascal5i", "few-shot"): 89.8,
    ("fss1000", "1-shot"): 85.6, ("fss1000", "few-shot spatial"): 89.3,
    "davis": {"J&F": 75.6, "J": 72.5, "F": 78.6},
    "davis_context": {1: 70.0, 4: 74.7, 8: 75.6, 12: 74.8, 16: 74.6},
}
NAMES = {"fss1000": "FSS-1000", "pascal5i": "PASCAL-5i", "coco20i": "COCO-20i"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_tables", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--fss", metavar="DIR", help="folder holding FSS-1000/<class>/<n>.jpg|png")
    parser.add_argument("--pascal", metavar="DIR", help="folder holding VOC2012/JPEGImages and SegmentationClassAug")
    parser.add_argument("--coco", metavar="DIR", help="folder holding COCO2014/val2014 and annotations/val2014")
    parser.add_argument("--splits", metavar="DIR", help="a checkout of HSNet's data/splits (PASCAL and COCO lists)")
    parser.add_argument("--davis", metavar="DIR", help="DAVIS-2017 (JPEGImages/480p, Annotations/480p, ImageSets)")
    parser.add_argument("--model", default="BAAI/seggpt-vit-large", help="anything from_pretrained accepts")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward (default: the device's)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--embedding-types", default="instance,semantic", help="comma-separated")
    parser.add_argument("--few-shot", type=int, default=5, help="COCO-20i / PASCAL-5i few-shot column")
    parser.add_argument("--fss-few-shot", type=int, default=4, help="FSS-1000 few-shot column (paper: 4, spatial)")
    parser.add_argument("--folds", default="0,1,2,3", help="PASCAL-5i / COCO-20i folds, comma-separated")
    parser.add_argument("--davis-context", default="1,4,8,12,16", help="Table 4b's K values (8 is Table 2's)")
    parser.add_argument("--fss-split", default="test", choices=["test", "val", "trn", "all"],
                        help="FSS-1000 classes (test: the protocol)")
    parser.add_argument("--episodes-per-fold", type=int, default=1000,
                        help="PASCAL/COCO episodes per fold (1000: the protocol; fewer: a quick check, marked)")
    parser.add_argument("--davis-sequences", default=None, help="comma-separated subset of DAVIS sequences")
    parser.add_argument("--local-files-only", action="store_true", help="never touch the network for the model")
    args = parser.parse_args(argv)
    if not (args.fss or args.pascal or args.coco or args.davis):
        parser.error("give at least one of --fss, --pascal, --coco, --davis")
    if (args.pascal or args.coco) and not args.splits:
        parser.error("--pascal and --coco need --splits (HSNet's data/splits)")
    return args


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def few_shot_plan(args: argparse.Namespace) -> list[dict]:
    """Every few-shot run: benchmark, fold, shots, ensemble, and the table column it fills."""
    plan = []
    if args.fss:
        k = args.fss_few_shot
        plan += [dict(protocol="fss1000", data=args.fss, fold=0, shots=1, ensemble="original", column="1-shot"),
                 dict(protocol="fss1000", data=args.fss, fold=0, shots=k, ensemble="original",
                      column="few-shot feature"),
                 dict(protocol="fss1000", data=args.fss, fold=0, shots=k, ensemble="spatial",
                      column="few-shot spatial")]
    for protocol, data in (("pascal5i", args.pascal), ("coco20i", args.coco)):
        if data:
            for fold in _ints(args.folds):
                plan += [dict(protocol=protocol, data=data, fold=fold, shots=1, ensemble="original", column="1-shot"),
                         dict(protocol=protocol, data=data, fold=fold, shots=args.few_shot, ensemble="original",
                              column="few-shot")]
    return plan


def run(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import jax

    from seggpt_jax import Segmenter
    from seggpt_jax.eval.davis import DavisDataset, evaluate_davis
    from seggpt_jax.eval.protocols import FewShotSettings, prepare_few_shot, run_few_shot

    types = [t.strip() for t in args.embedding_types.split(",") if t.strip()]
    plan = few_shot_plan(args)
    prepared = {}
    for item in plan:  # every episode drawn and every file checked before the model loads
        key = (item["protocol"], item["fold"], item["shots"])
        if key not in prepared:
            settings = FewShotSettings(item["protocol"], item["data"], shots=item["shots"], fold=item["fold"],
                                       splits=args.splits, fss_split=args.fss_split,
                                       episodes_per_fold=args.episodes_per_fold)
            prepared[key] = prepare_few_shot(settings)
    davis = None
    if args.davis:
        sequences = args.davis_sequences.split(",") if args.davis_sequences else None
        davis = DavisDataset(args.davis, sequences=sequences)
    segmenter = Segmenter.from_pretrained(args.model, batch_size=args.batch_size, ensemble_mode="original",
                                          local_files_only=args.local_files_only)
    runs = []
    for embedding in types:
        for item in plan:
            base = prepared[(item["protocol"], item["fold"], item["shots"])]
            this = dataclasses.replace(base, settings=dataclasses.replace(base.settings, ensemble=item["ensemble"],
                                                                          embedding_type=embedding))
            start = time.perf_counter()
            report = run_few_shot(segmenter, this)
            runs.append({**item, "embedding_type": embedding, "mIoU": 100 * report["mIoU"],
                         "FB-IoU": 100 * report["FB-IoU"], "seconds": round(time.perf_counter() - start, 1),
                         "report": report})
            print(f"{item['protocol']} fold {item['fold']} {item['shots']}-shot {item['ensemble']} {embedding}: "
                  f"mIoU {100 * report['mIoU']:.1f}", file=sys.stderr, flush=True)
    video = []
    if davis is not None:
        for k in _ints(args.davis_context):
            report = evaluate_davis(segmenter, davis, context_frames=k)
            video.append({"context_frames": k, "J&F": 100 * report["J&F-Mean"], "J": 100 * report["J-Mean"],
                          "F": 100 * report["F-Mean"], "report": report})
            print(f"davis K={k}: J&F {100 * report['J&F-Mean']:.1f}", file=sys.stderr, flush=True)
    result = {"date": datetime.date.today().isoformat(), "command": " ".join(["python -m benchmarks.paper_tables",
                                                                               *(argv if argv is not None
                                                                                 else sys.argv[1:])]),
              "model": args.model, "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                               "jax": jax.__version__, "backend": jax.default_backend(),
                                               "devices": [str(d) for d in jax.devices()]},
              "protocol_complete": args.fss_split == "test" and args.episodes_per_fold == 1000,
              "few_shot": runs, "davis": video, "paper": {str(k): v for k, v in PAPER.items()}}
    result["markdown"] = markdown(result, types)
    result["files"] = write(result, args.out_dir)
    print(result["markdown"])
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _paper(key) -> str:
    value = PAPER.get(key)
    return f"{value:.1f}" if isinstance(value, float) else "-"


def markdown(result: dict, types: list[str]) -> str:
    lines = [f"# SegGPT paper tables: {result['model']} ({result['date']})", "",
             f"`{result['command']}` on {result['machine']['backend']} ({result['machine']['platform']})", ""]
    if not result["protocol_complete"]:
        lines += ["**Not the protocol** (a subset of FSS-1000's classes or fewer than 1000 episodes per fold): a "
                  "check of the procedure, not figures comparable with the paper.", ""]
    runs = result["few_shot"]
    if runs:
        lines += ["## Table 1: few-shot semantic segmentation (mIoU %)", "",
                  "| benchmark | column | embedding | ours | folds | paper |", "|---|---|---|---|---|---|"]
        seen = []
        for r in runs:
            key = (r["protocol"], r["column"], r["embedding_type"])
            if key in seen:
                continue
            seen.append(key)
            group = [x for x in runs if (x["protocol"], x["column"], x["embedding_type"]) == key]
            folds = " / ".join(f"{x['mIoU']:.1f}" for x in group) if r["protocol"] != "fss1000" else ""
            shots = f"{r['shots']}-shot" + (f", {r['ensemble']}" if r["shots"] > 1 else "")
            lines.append(f"| {NAMES[r['protocol']]} | {r['column']} ({shots}) | {r['embedding_type']} | "
                         f"{_mean([x['mIoU'] for x in group]):.1f} | {folds} | "
                         f"{_paper((r['protocol'], r['column']))} |")
        lines.append("")
        fss = [r for r in runs if r["protocol"] == "fss1000" and r["shots"] > 1]
        if fss:
            lines += ["## Table 4a: ensembles on FSS-1000 (mIoU %)", "",
                      "| examples | ensemble | embedding | ours | paper |", "|---|---|---|---|---|"]
            for r in fss:
                paper = _paper(("fss1000", r["column"])) if r["shots"] == 4 else "-"
                lines.append(f"| {r['shots']} | {r['ensemble']} | {r['embedding_type']} | {r['mIoU']:.1f} | {paper} |")
            lines.append("")
    video = result["davis"]
    if video:
        lines += ["## Table 2: DAVIS-2017 val, semi-supervised (first frame + 8 context frames)", "",
                  "| | J&F | J | F |", "|---|---|---|---|"]
        eight = [v for v in video if v["context_frames"] == 8]
        if eight:
            v = eight[0]
            lines.append(f"| ours | {v['J&F']:.1f} | {v['J']:.1f} | {v['F']:.1f} |")
        p = PAPER["davis"]
        lines += [f"| paper | {p['J&F']:.1f} | {p['J']:.1f} | {p['F']:.1f} |", "",
                  "## Table 4b: DAVIS-2017 J&F against the number of context frames", "",
                  "| K | ours | paper |", "|---|---|---|"]
        for v in video:
            paper = PAPER["davis_context"].get(v["context_frames"])
            lines.append(f"| {v['context_frames']} | {v['J&F']:.1f} | {paper if paper is not None else '-'} |")
        lines.append("")
    return "\n".join(lines)


def write(result: dict, out_dir: str) -> list[str]:
    """``paper-tables-DATE.json`` and ``.md`` in ``out_dir``, atomically, never over an existing file."""
    from seggpt_jax.files import atomic_save

    os.makedirs(out_dir, exist_ok=True)
    stem, number = f"paper-tables-{result['date']}", 1
    while any(os.path.exists(os.path.join(out_dir, f"{stem}{'' if number == 1 else f'-{number}'}{ext}"))
              for ext in (".json", ".md")):
        number += 1
    base = os.path.join(out_dir, f"{stem}{'' if number == 1 else f'-{number}'}")
    text = {k: v for k, v in result.items() if k != "markdown"}
    atomic_save(base + ".json", lambda tmp: _write_text(tmp, json.dumps(text, indent=1, default=str) + "\n"))
    atomic_save(base + ".md", lambda tmp: _write_text(tmp, result["markdown"] + "\n"))
    return [base + ".json", base + ".md"]


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    from seggpt_jax.data import DataError

    try:
        run(argv)
    except (DataError, ValueError, OSError) as e:
        print(f"paper_tables: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Post-processing of painted answers: ours against transformers' ``SegGptImageProcessor``, same inputs.

    python -m benchmarks.post_processing [--repeats 3]

A batch of 2 random painted canvases (``[2, 3, 896, 448]``, as the model returns them) through
``post_process_semantic_segmentation`` with 0 (grey levels), 20 and 103 labels, with and without target
sizes, scores included: for each side the first call and the best of ``--repeats`` more, and whether
the class maps agree; and the peak of our call's numpy allocations (``tracemalloc``, which numpy
reports to) above what the call returns.
Needs the test extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from benchmarks.benchmark import timed


def best_of(fn, repeats: int) -> float:
    return min(timed(fn, repeats))


class _Out:
    def __init__(self, pred_masks):
        self.pred_masks = pred_masks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from transformers.models.seggpt.image_processing_pil_seggpt import SegGptImageProcessorPil

    from seggpt_jax import SegGptImageProcessor

    theirs, ours = SegGptImageProcessorPil(), SegGptImageProcessor()
    pred = torch.randn(2, 3, 896, 448, generator=torch.Generator().manual_seed(0)) * 1.5
    print("| labels | target sizes | ours, first / best (s) | transformers, first / best (s) | class maps equal "
          "| our peak temporaries (MB) |")
    print("|---|---|---|---|---|---|")
    for labels in (None, 20, 103):
        for sizes in (None, [(896, 224), (448, 448)]):
            options = dict(target_sizes=sizes, num_labels=labels, return_segmentation_scores=True)
            start = time.perf_counter()
            a = ours.post_process_semantic_segmentation(_Out(pred.numpy()), **options)
            first_mine = time.perf_counter() - start
            start = time.perf_counter()
            b = theirs.post_process_semantic_segmentation(_Out(pred), **options)
            first_reference = time.perf_counter() - start
            equal = all(np.array_equal(x["segmentation"], y["segmentation"].numpy()) for x, y in zip(a, b))
            mine = best_of(lambda: ours.post_process_semantic_segmentation(_Out(pred.numpy()), **options),
                           args.repeats)
            reference = best_of(lambda: theirs.post_process_semantic_segmentation(_Out(pred), **options),
                                args.repeats)
            tracemalloc.start()
            kept = ours.post_process_semantic_segmentation(_Out(pred.numpy()), **options)
            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            del kept
            print(f"| {labels or 0} | {'yes' if sizes else 'no'} | {first_mine:.2f} / {mine:.2f} | "
                  f"{first_reference:.2f} / {reference:.2f} | {equal} | {(peak - current) / 1e6:.0f} |")


if __name__ == "__main__":
    main()

"""Parity against transformers' ``SegGptForImageSegmentation`` on random inputs (needs torch + transformers).

Used by ``seggpt-jax convert`` to print a report after converting a checkpoint. torch and transformers
are imported inside the functions only; nothing on the inference path imports this module.
"""

from __future__ import annotations

import dataclasses
import tempfile

import numpy as np

from ..nn.inputs import default_bool_masked_pos


def available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def transformers_model_from(model, source_dir: str | None = None):
    """transformers' model (float32) with the same weights: read from ``source_dir`` when it is a
    transformers folder (an independent reading of the checkpoint), else from our weights written in
    transformers' layout (``model.save_pretrained(tmp, layout="transformers")``)."""
    import torch
    from transformers import SegGptForImageSegmentation as HFModel

    _quiet_transformers()
    if source_dir is not None:
        return HFModel.from_pretrained(source_dir, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory(prefix="seggpt-jax-parity-") as tmp:
        model.save_pretrained(tmp, layout="transformers")
        return HFModel.from_pretrained(tmp, dtype=torch.float32).eval()


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@dataclasses.dataclass
class ParityRow:
    case: str
    stage: str
    max_abs_error: float
    scale: float


def compare(model, hf_model, *, batch: int = 2, seed: int = 0) -> list[ParityRow]:
    """Max abs differences on random inputs, per stage and case (plain, ensemble, semantic + labels)."""
    import torch

    _quiet_transformers()
    config = model.config
    rng = np.random.default_rng(seed)
    shape = (batch, config.num_channels, *config.query_size)
    pixel, prompt, mask, labels = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    rows: list[ParityRow] = []
    cases = [("one prompt each", dict(feature_ensemble=False, embedding_type="instance"))]
    if config.grid_size[0] % 2 == 0:  # the ensemble splits the grid into prompt and query halves
        cases.append((f"{batch}-prompt ensemble", dict(feature_ensemble=True, embedding_type="instance")))
    cases.append(("semantic + labels", dict(feature_ensemble=False, embedding_type="semantic", labels=True)))
    for case, kw in cases:
        use_labels = kw.pop("labels", False)
        kw["bool_masked_pos"] = default_bool_masked_pos(config)
        with torch.no_grad():
            torch_kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
            ref = hf_model(torch.from_numpy(pixel), torch.from_numpy(prompt), torch.from_numpy(mask),
                           labels=torch.from_numpy(labels) if use_labels else None, output_hidden_states=True,
                           **torch_kw)
            ref_taps = hf_model.model(torch.from_numpy(pixel), torch.from_numpy(prompt), torch.from_numpy(mask),
                                      labels=torch.from_numpy(labels) if use_labels else None,
                                      **torch_kw).intermediate_hidden_states
        out = model(pixel, prompt, mask, labels=labels if use_labels else None, output_hidden_states=True, **kw)
        groups = [("embeddings", [(out.hidden_states[0], ref.hidden_states[0])]),
                  ("layers", list(zip(out.hidden_states[1:], ref.hidden_states[1:]))),
                  ("taps", list(zip(out.intermediate_hidden_states, ref_taps))),
                  ("pred_masks", [(out.pred_masks, ref.pred_masks)])]
        if use_labels:
            groups.append(("loss", [(out.loss, ref.loss)]))
        for stage, pairs in groups:
            errors = [(float(np.max(np.abs(np.asarray(a, np.float32) - b.numpy()))), float(np.max(np.abs(b.numpy()))))
                      for a, b in pairs]
            worst = max(range(len(errors)), key=lambda i: errors[i][0])
            label = stage if len(pairs) == 1 else f"{stage} (worst: #{worst})"
            rows.append(ParityRow(case, label, errors[worst][0], max(e[1] for e in errors)))
    return rows


def format_rows(rows: list[ParityRow]) -> str:
    lines = [f"{'case':<22} {'stage':<20} {'max abs error':>14} {'max |ref|':>10}"]
    for r in rows:
        lines.append(f"{r.case:<22} {r.stage:<20} {r.max_abs_error:>14.3e} {r.scale:>10.3g}")
    return "\n".join(lines)

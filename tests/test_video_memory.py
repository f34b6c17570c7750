"""``seggpt-jax video`` streams: a clip 5x longer must not raise the process's peak memory by more than 25%.

Measured with the benchmark script (peak RSS of a fresh process per clip). At 360x640 the frames of the
long clip alone are ~100 MB as RGB, twice that with their overlays: holding the clip in memory, as the
command once did, fails this bound.
"""

from __future__ import annotations

import pytest

from benchmarks.video_memory import measure

pytest.importorskip("av")


def test_peak_memory_does_not_grow_with_the_clip(hf_tiny, tmp_path):
    _, model = hf_tiny("nonsquare")
    result = measure(model, 30, (360, 640), str(tmp_path), "--context-frames", "2")
    assert result["ratio"] <= 1.25, result

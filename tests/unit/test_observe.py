"""Observability without process groups: the expert-load heatmap renderer (cells and legend carry
the colours the numbers say), the layer x expert load matrix under pipeline splits, the straggler
maths, and `Observer` writing the PNG and its records in a single-process run."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from model import Transformer
from model.config import ModelConfig, MoEConfig
from model.moe import MoE
from trainer.config import JobConfig, LoggingConfig
from trainer.heatmap import INK, colormap, heatmap_layout, normalize, render_expert_load
from trainer.metrics import MetricsLogger
from trainer.observe import (
    Observer,
    load_fractions,
    local_load_matrix,
    row_labels,
    straggler_report,
)

VIRIDIS_LOW, VIRIDIS_HIGH = (68, 1, 84), (253, 231, 37)


def pixel(image: Image.Image, xy: tuple[float, float]) -> tuple[int, int, int]:
    return image.getpixel((int(xy[0]), int(xy[1])))


# -- renderer ------------------------------------------------------------------------------------


def test_colormap_ends_and_midpoint() -> None:
    assert tuple(colormap(0.0)) == VIRIDIS_LOW and tuple(colormap(1.0)) == VIRIDIS_HIGH
    assert tuple(colormap(0.5)) == (33, 144, 141)  # the middle anchor, exactly
    assert colormap(np.zeros((2, 3))).shape == (2, 3, 3)
    assert list(normalize(np.array([1.0, 2.0]), 2.0, 2.0)) == [0.5, 0.5]  # constant: mid-scale


def test_cells_are_coloured_by_their_value() -> None:
    frac = np.array([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.5, 0.0]])
    labels = ["3", "5", "mtp1"]
    image = render_expert_load(frac, labels, step=42)
    lay = heatmap_layout(labels, 4)
    assert image.mode == "RGB" and image.height == lay.height and image.width >= lay.width
    for r in range(3):
        for e in range(4):
            left, top, right, bottom = lay.cell_box(r, e)
            expected = tuple(colormap(frac[r, e] / 0.7))  # scale: min 0 .. max 0.7
            # Corners: the value annotation sits in the middle of the cell.
            for xy in ((left + 1, top + 1), (right - 2, bottom - 2)):
                assert pixel(image, xy) == expected, (r, e, xy)
    assert pixel(image, lay.cell_box(1, 0)[:2]) == VIRIDIS_HIGH  # the hottest expert is brightest
    assert pixel(image, lay.cell_box(2, 3)[:2]) == VIRIDIS_LOW  # an idle expert is darkest


def test_legend_runs_min_to_max_and_marks_balanced_load() -> None:
    frac = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])  # 1/E = 0.25: the middle
    lay = heatmap_layout(["0", "1"], 4)
    image = render_expert_load(frac, ["0", "1"], step=1)
    x = lay.bar_left + lay.bar_w // 2
    height = max(lay.grid_h, 140)
    assert pixel(image, (x, lay.grid_top)) == VIRIDIS_HIGH  # top: the maximum
    assert pixel(image, (x, lay.grid_top + height - 1)) == VIRIDIS_LOW  # bottom: the minimum
    marker_y = lay.grid_top + 0.5 * (height - 1)
    assert pixel(image, (x, marker_y)) == INK  # the 1/E line crosses the bar
    assert pixel(image, (x, marker_y + 10)) != INK
    title = np.asarray(image.crop((0, 0, image.width, 40)))
    assert (title.sum(axis=2) < 200).sum() > 100  # the title is drawn (dark text pixels)


def test_large_matrix_stays_a_reasonable_size() -> None:
    rng = np.random.default_rng(0)
    counts = rng.random((61, 256))
    frac = counts / counts.sum(axis=1, keepdims=True)
    labels = [str(i) for i in range(3, 64)]
    image = render_expert_load(frac, labels, step=7)
    assert 800 < image.width < 1400 and 400 < image.height < 900
    lay = heatmap_layout(labels, 256)
    r, e = np.unravel_index(frac.argmax(), frac.shape)
    assert pixel(image, lay.cell_box(r, e)[:2]) == VIRIDIS_HIGH


# -- the layer x expert load matrix ----------------------------------------------------------------


def moe_model(**kw) -> Transformer:
    moe = MoEConfig(num_experts=4, top_k=2, moe_ffn_hidden=8)
    base = dict(
        vocab_size=32, dim=16, num_layers=4, num_heads=2, num_kv_heads=1, ffn_hidden=24, max_seq_len=8
    )
    return Transformer(ModelConfig(**base, moe=moe, **kw))


def set_counts(model: Transformer) -> None:
    """Layer i sends 10 tokens to expert i % 4 and 1 to each other expert; MTP depth d: expert 3."""
    for name, moe in ((n, m) for n, m in model.named_modules() if isinstance(m, MoE)):
        hot = 3 if name.startswith("mtp") else int(name.split(".")[1]) % 4
        moe.last_step_counts_E.copy_(torch.tensor([10.0 if e == hot else 1.0 for e in range(4)]))


def test_load_matrix_rows_are_global_layers_and_skip_dense_ones() -> None:
    model = moe_model(first_k_dense=1, mtp_depth=1)
    set_counts(model)
    total = local_load_matrix(SimpleNamespace(transformers=[model]), 4, 1, torch.device("cpu"))
    rows, frac = load_fractions(total)
    assert list(rows) == [1, 2, 3, 4]  # layer 0 is dense; row 4 is the MTP depth
    assert [row_labels(4, 1)[r] for r in rows] == ["1", "2", "3", "mtp1"]
    np.testing.assert_allclose(frac.sum(axis=1), 1.0)
    np.testing.assert_allclose(frac[0], [1 / 13, 10 / 13, 1 / 13, 1 / 13])  # layer 1: expert 1 hot
    np.testing.assert_allclose(frac[3], [1 / 13, 1 / 13, 1 / 13, 10 / 13])


def test_pipeline_stages_sum_to_the_whole_model() -> None:
    """Two pipeline ranks each hold half the layers; their matrices summed (the all_reduce) give the
    whole model's, and a layer held by two data-parallel ranks has its counts added."""
    whole = moe_model()
    set_counts(whole)
    stage0, stage1, replica = copy.deepcopy(whole), copy.deepcopy(whole), copy.deepcopy(whole)
    for i in ("2", "3"):
        del stage0.layers[i]
    for i in ("0", "1"):
        del stage1.layers[i]
    parts = [
        local_load_matrix(SimpleNamespace(transformers=[m]), 4, 0, torch.device("cpu"))
        for m in (stage0, stage1)
    ]
    full = local_load_matrix(SimpleNamespace(transformers=[whole]), 4, 0, torch.device("cpu"))
    torch.testing.assert_close(parts[0] + parts[1], full)
    doubled = full + local_load_matrix(SimpleNamespace(transformers=[replica]), 4, 0, torch.device("cpu"))
    torch.testing.assert_close(doubled[:, :-1], 2 * full[:, :-1])
    np.testing.assert_allclose(load_fractions(doubled)[1], load_fractions(full)[1])


# -- straggler maths --------------------------------------------------------------------------------


def test_straggler_report_names_the_slowest_rank() -> None:
    rep = straggler_report([1.0, 1.2, 3.0, 1.1])
    assert rep.slowest_rank == 2 and rep.slowest_s == 3.0 and rep.min_s == 1.0
    assert rep.median_s == pytest.approx(1.15) and rep.ratio == pytest.approx(3.0 / 1.15)
    assert straggler_report([0.5, 0.5, 0.5]).slowest_rank == 0  # ties: the lowest rank
    assert straggler_report([0.5, 0.5]).ratio == 1.0
    assert straggler_report([0.0, 0.0]).ratio == 1.0  # no division by zero


# -- Observer in one process ------------------------------------------------------------------------


def test_observer_writes_the_heatmap_png_and_records(tmp_path: Path) -> None:
    model = moe_model()
    set_counts(model)
    cfg = JobConfig()
    cfg.model, cfg.run.dir = model.cfg, str(tmp_path)
    cfg.logging.heatmap_every = 2
    metrics = MetricsLogger(
        LoggingConfig(progress=False, wandb_mode="disabled"),
        tmp_path,
        total_steps=4,
        start_step=0,
        run_name="t",
        config={},
    )
    observer = Observer(cfg, SimpleNamespace(transformers=[model]), metrics, torch.device("cpu"))
    observer.after_step(1)
    assert not (tmp_path / "expert_load.png").exists()
    observer.after_step(2)
    metrics.close()
    with Image.open(tmp_path / "expert_load.png") as png:
        assert (
            png.format == "PNG" and png.size == render_expert_load(np.ones((4, 4)) / 4, list("0123"), 2).size
        )
    numbers = json.loads((tmp_path / "expert_load.json").read_text())
    assert numbers["step"] == 2 and numbers["layers"] == ["0", "1", "2", "3"]
    assert numbers["fraction"][2] == pytest.approx([1 / 13, 1 / 13, 10 / 13, 1 / 13], abs=1e-6)
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["kind"] == "expert_load" and record["step"] == 2
    assert record["moe/global_load_imbalance_max"] == pytest.approx(4 * 10 / 13)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writes left no temporaries

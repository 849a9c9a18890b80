"""The figure script (experiments/figures.py): table parsing and the three plots on tiny synthetic inputs."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import figures  # noqa: E402

from repquant_jax._src import quantizers as qz  # noqa: E402

TABLE = """# PTQ table

## vit

Model text.

| method | W4A4 | W6A6 | W8A8 |
|---|---|---|---|
| float | 89.50 | 89.50 | 89.50 |
| minmax | 30.12 ± 5.10 | 85.00 ± 0.40 | 89.20 ± 0.05 |
| repquant | 80.12 ± 0.80 | 88.90 ± 0.10 | 89.40 ± 0.05 |
| qwix static | fails: boom | 88.00 ± 0.00 | 89.40 ± 0.00 |

## minilm

### Spearman ×100

| method | W4A4 | W6A6 |
|---|---|---|
| float | 50.83 | 50.83 |
| repq_vit (unfoldable per channel) | 45.19 ± 1.0 | 47.67 ± 1.0 |

### Pearson ×100

| method | W4A4 | W6A6 |
|---|---|---|
| float | 65.64 | 65.64 |

## llama

| method | W4A4 | W6A6 | W8A8 |
|---|---|---|---|
| float | 5.04 | 5.04 | 5.04 |
| repquant | 6.00 | 5.15 | 5.08 |
"""


def _assert_png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_cell():
    assert figures.parse_cell("88.92 ± 0.12") == (88.92, 0.12)
    assert figures.parse_cell(" 5.04 ") == (5.04, 0.0)
    assert figures.parse_cell("fails: ValueError") is None


def test_parse_ptq_table_takes_the_first_metric():
    tables = figures.parse_ptq_table(TABLE)
    assert list(tables) == ["vit", "minilm", "llama"]
    assert tables["vit"].metric == "top-1 (%)" and tables["vit"].bits == [4, 6, 8]
    assert tables["vit"].rows["minmax"][0] == (30.12, 5.10)
    assert tables["vit"].rows["qwix static"][0] is None
    assert tables["minilm"].metric == "Spearman ×100" and tables["minilm"].bits == [4, 6]
    assert "float" in tables["minilm"].rows and len(tables["minilm"].rows) == 2
    assert tables["llama"].metric == "ppl/byte"


def test_plot_accuracy_vs_bits(tmp_path):
    path = tmp_path / "table.md"
    path.write_text(TABLE)
    out = figures.plot_accuracy_vs_bits(figures.load_ptq_table(path), tmp_path / "acc.png", title="test")
    _assert_png(out)


def test_missing_table_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="ptq_table.py"):
        figures.load_ptq_table(tmp_path / "nope.md")


def test_plot_ln_channel_ranges(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)) * np.r_[np.ones(14), 16.0, 16.0]
    scale = figures.channel_ranges(x) / 15
    folded = x * scale.mean() / scale
    panel = figures.RangePanel(
        label="stress (SYNTHETIC)",
        before=figures.channel_ranges(x),
        after=figures.channel_ranges(folded),
        channel_scale=scale,
        tensor_scale=float(scale.mean()),
        per_tensor_scale=float(np.ptp(x) / 15),
        bits=4,
    )
    assert panel.ratios()["after max/median"] == pytest.approx(1.0)
    _assert_png(figures.plot_ln_channel_ranges([panel, panel], tmp_path / "ln.png", title="test"))


def test_plot_softmax_levels(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 12)) * 3
    values = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    quantizers = {
        "uniform": figures.quantizer_levels(qz.uniform(1 / 15, 0.0, 4), values),
        "log√2": figures.quantizer_levels(qz.log_sqrt2(1.0, 4), values),
    }
    assert len(quantizers["log√2"].levels) == 16  # 15 nonzero levels and the reserved zero
    assert quantizers["log√2"].levels.max() == pytest.approx(1.0)
    _assert_png(figures.plot_softmax_levels(values, quantizers, 4, tmp_path / "sm.png", title="test"))

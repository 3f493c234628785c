"""The analysis report: every figure is written and embedded in report.html (parsed), summary.json holds the
numbers, the page renders in headless Chromium (when installed), `attnpatch analyze` runs end to end, and the
Fashion-MNIST reader."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pytest
import torch

from attnpatch.analysis import analyze_text, analyze_vision
from attnpatch.analysis.report import find_chromium, screenshot

from analysis_fixtures import tiny_vit
from tiny_models import VOCAB, tiny_model

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ["Head importance (pruning)", "Attention distance", "Attention patterns"]


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def check_page(result) -> Page:
    page = Page()
    page.feed(result.html.read_text(encoding="utf-8"))
    assert len(page.images) == len(result.figures)
    embedded = []
    for src in page.images:
        head, _, data = src.partition(",")
        assert head == "data:image/png;base64" and data
        embedded.append(base64.b64decode(data, validate=True))
        assert embedded[-1].startswith(PNG)
    assert embedded == [path.read_bytes() for path in result.figures.values()]  # each figure, in order
    return page


@pytest.fixture(scope="module")
def vision_report(tmp_path_factory):
    model = tiny_vit(seed=0)
    x = torch.randn(24, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model(pixel_values=x).logits.argmax(-1)
    out = tmp_path_factory.mktemp("vision")
    return analyze_vision(model, x, labels, out, clusters=3, ae_steps=100, batch_size=12, name="tiny ViT")


def test_vision_report_embeds_every_figure(vision_report):
    r = vision_report
    assert sorted(r.figures) == ["distance_density", "distance_profiles", "distance_trend", "importance",
                                 "pattern_gallery", "pattern_histogram"]  # fmt: skip
    page = check_page(r)
    assert page.headings == SECTIONS
    summary = json.loads((r.out_dir / "summary.json").read_text())
    assert summary["importance"]["baseline_accuracy"] == 1.0 and len(summary["importance"]["flip_rate"]) == 2
    assert len(summary["distance"]["trend"]["mean"]) == 2 and sum(summary["patterns"]["sizes"]) == 2 * 4 * 24 * 8
    assert set(summary["seconds"]) == {"importance", "distance", "collect_patterns", "summarize_patterns"}


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {("<pad>" if i == 0 else "<bos>" if i == 1 else f"w{i}"): i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w2")), bos_token="<bos>", pad_token="<pad>"
    )


def test_text_report_adds_the_sink_section(tmp_path, word_tokenizer):
    model = tiny_model("gemma3")
    ids = torch.randint(3, VOCAB, (4, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    r = analyze_text(model, word_tokenizer, inputs, tmp_path, score_last=8, queries=4, window=8, clusters=3,
                     ae_steps=100, batch_size=2, max_batch=8, sink_tokens=12, name="tiny Gemma-3")  # fmt: skip
    assert "sinks" in r.figures and r.sinks is not None and r.sinks.input_ids.shape == (4, 12)
    page = check_page(r)
    assert page.headings == [*SECTIONS, "Attention sinks"]
    summary = json.loads((r.out_dir / "summary.json").read_text())
    assert summary["importance"]["task"] == "next-token" and summary["importance"]["items"] == 4 * 8
    assert "hidden_by_class" in summary["sinks"]


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(vision_report, tmp_path):
    from matplotlib.image import imread

    png = screenshot(vision_report.html, tmp_path / "shot.png", width=1000, height=1600)
    pixels = imread(png)
    assert pixels.shape[:2] == (1600, 1000)
    grey = pixels[..., :3].mean(-1)
    rows_with_ink = (grey < 0.9).any(axis=1).mean()
    assert rows_with_ink > 0.5  # text, tables and figures cover the page, not a blank or error page


def test_cli_analyze_on_a_saved_vit_with_fashion_mnist(tmp_path):
    from attnpatch.analysis.data import fashion_mnist_dir

    try:
        fashion_mnist_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from attnpatch.cli import main

    model_dir = tmp_path / "vit28"
    tiny_vit(seed=0, image_size=28, labels=10).save_pretrained(model_dir)
    out = tmp_path / "out"
    args = ["analyze", "--model", str(model_dir), "--limit", "16", "--clusters", "2", "--ae-steps", "50"]
    assert main([*args, "--no-screenshot", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["importance"]["examples"] == 16 and summary["distance"]["geometry"]["kind"] == "image"
    assert summary["distance"]["edges"][-1] == 8.5  # 7x7 patch grid: distances up to hypot(6, 6)
    check_page_files = sorted(p.name for p in out.glob("*.png"))
    assert check_page_files == ["distance_density.png", "distance_profiles.png", "distance_trend.png",
                                "importance.png", "pattern_gallery.png", "pattern_histogram.png"]  # fmt: skip


def test_fashion_mnist_reader():
    from attnpatch.analysis.data import fashion_pixels, load_fashion_mnist

    try:
        images, labels = load_fashion_mnist("test")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and torch.bincount(labels).tolist() == [1000] * 10
    pixels = fashion_pixels(images[:100])
    assert pixels.shape == (100, 1, 28, 28) and abs(float(pixels.mean())) < 0.3
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist("validation")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", path="/nonexistent")

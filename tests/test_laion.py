"""The LAION-like replica's data (distinct captions, a few duplicated pairs) and its vocabulary."""

from __future__ import annotations

import pytest

from diffunlearn.sd import laion as L


def test_laion_data_has_distinct_captions_and_duplicated_pairs():
    d = L.laion_data(n_captions=200, memorised=3, copies=10, evaluate_per=4, seed=0)
    distinct = d.captions[:200]
    assert len(set(distinct)) == 200 and len(d.captions) == 200 + 3 * 10 and len(d.images) == len(d.captions)
    for p, img in zip(d.memorised_prompts, d.memorised_images):  # each duplicated caption always shows its image
        rows = [i for i, c in enumerate(d.captions) if c == p]
        assert len(rows) == 11 and all((d.images[i] == img).all() for i in rows)
    assert not set(d.once_prompts) & set(d.memorised_prompts) and set(d.once_prompts) <= set(distinct)
    assert not set(d.unseen_prompts) & set(d.captions) and len(d.unseen_prompts) == len(d.once_prompts) == 12
    for c in d.captions[:20]:  # a caption's digit word is its image's class: 0, 1, 2, ... in turn
        assert c.split()[-1] in L.DIGIT_WORDS


def test_every_laion_word_is_one_token(tmp_path):
    pytest.importorskip("transformers")
    from diffunlearn.sd.replica import build_text

    tok, _ = build_text(tmp_path, 0, L.laion_words())  # raises if a word is split
    assert all(len(tok.tokenize(w)) == 1 for w in L.laion_words())


"""The offline tasks generated from what Python ships: held out from the demo corpus, built as
documented, and (for the word-order task) carrying signal for a model that knows word order."""

import math
from collections import Counter

import pytest

from megasmol.data.demo_corpus import prose_documents
from megasmol.eval.runner import evaluate
from megasmol.eval.tasks.embedded import COUNT, SEED, word_order_examples
from megasmol.eval.tasks.registry import load_task
from megasmol.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def prose():
    return prose_documents()


def test_word_order_examples_are_held_out_shuffles_of_the_last_sentence(prose):
    examples = word_order_examples(COUNT, SEED)
    assert len(examples) == COUNT and examples == word_order_examples(COUNT, SEED)
    trained = {" ".join(doc.split()) for doc in prose}
    for example in examples:
        doc = example.record["docstring"]
        assert doc not in trained  # never in the demo corpus
        assert doc == f"{example.context} {example.choices[example.gold]}"
        assert len(set(example.choices)) == 4
        assert len({tuple(sorted(c.split())) for c in example.choices}) == 1  # the same words


class _NgramScorer:
    """A count-based language model over token ids (add-one smoothing): ``order`` 1 knows only
    word frequencies, 2 also which token follows which."""

    def __init__(self, tokenizer, documents, order):
        self.tokenizer, self.order = tokenizer, order
        self.unigrams, self.bigrams = Counter(), Counter()
        for ids in documents:
            self.unigrams.update(ids)
            self.bigrams.update(zip(ids, ids[1:]))
        self.total, self.vocab = sum(self.unigrams.values()), len(tokenizer)

    def _logp(self, previous, token):
        if self.order == 1:
            return math.log((self.unigrams[token] + 1) / (self.total + self.vocab))
        return math.log((self.bigrams[previous, token] + 1) / (self.unigrams[previous] + self.vocab))

    def loglikelihoods(self, requests, progress=None):
        out = []
        for r in requests:
            ids = list(r.context + r.continuation)
            start = len(r.context)
            out.append(sum(self._logp(ids[i - 1], ids[i]) for i in range(start, len(ids))))
        return out


@pytest.fixture(scope="module")
def prose_ids(llama_tokenizer_dir, prose):
    tokenizer = load_tokenizer(llama_tokenizer_dir)
    return tokenizer, [tokenizer.encode(doc) for doc in prose[:600]]


@pytest.mark.parametrize("order, low, high", [(1, 0.15, 0.35), (2, 0.6, 1.0)])
def test_word_order_needs_word_order_and_rewards_it(prose_ids, order, low, high):
    """A unigram model (the same words in every choice) is at chance (measured 0.25); a bigram
    model counted on the demo corpus's prose is far above it (measured 0.93)."""
    tokenizer, documents = prose_ids
    scorer = _NgramScorer(tokenizer, documents, order)
    [result] = evaluate([load_task("demo_word_order")], scorer, limit=200, seed=3)
    assert result.chance == 0.25
    assert low <= result.metrics["acc"][0] <= high, result.metrics

"""Chat data: templates equal transformers' rendering and masks, prepare-chat's accounting and
atomic output, first-fit-decreasing packing and the packed samples the loader hands out."""

import json
import os
from datetime import datetime

import numpy as np
import pytest
import torch

from megasmol.config.typed import ConfigError
from megasmol.data.chat.prepare import prepare_chat, read_description
from megasmol.data.loader import TokenIds
from megasmol.data.masked.packing import first_fit_decreasing, plan_packing
from megasmol.data.messages.special_tokens import single_token_id, write_chat_tokenizer
from megasmol.data.messages.template import load_template, token_mask

FIXED = datetime(2025, 7, 8)
TOOLS = [{"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
TOOL_CONVERSATION = [
    {"role": "system", "content": "You check the weather. /no_think"},
    {"role": "user", "content": "Is it raining in Paris?"},
    {"role": "assistant", "content": "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
                                     "{\"city\": \"Paris\"}}\n</tool_call>"},
    {"role": "tool", "content": "{\"rain\": true}"},
    {"role": "assistant", "content": "Yes, it is raining in Paris."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "\nYou're welcome."},
]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    return write_chat_tokenizer(None, tmp_path_factory.mktemp("tok") / "chat")


def test_bundled_tokenizer_gets_smollm3_chat_tokens(chat_tokenizer):
    assert single_token_id(chat_tokenizer, "<|im_start|>") == 128011
    assert single_token_id(chat_tokenizer, "<|im_end|>") == 128012
    assert single_token_id(chat_tokenizer, "<think>") == 128002
    from megasmol.tokenizer import load_tokenizer

    assert len(chat_tokenizer) == len(load_tokenizer())  # renamed reserved ids: nothing is added
    assert chat_tokenizer.eos_token_id == 128001


@pytest.mark.parametrize("name,kwargs", [("smollm3", {}), ("smollm3", {"enable_thinking": False}),
                                         ("smollm3", {"tools": TOOLS}), ("chatml", {})])
def test_template_text_and_mask_equal_transformers(chat_tokenizer, name, kwargs):
    template = load_template(name)  # the real clock, as transformers' strftime_now
    ours = template.render(TOOL_CONVERSATION, **kwargs)
    ref_text = chat_tokenizer.apply_chat_template(TOOL_CONVERSATION, chat_template=template.source,
                                                  tokenize=False, **kwargs)
    ref = chat_tokenizer.apply_chat_template(TOOL_CONVERSATION, chat_template=template.source,
                                             return_dict=True, return_assistant_tokens_mask=True, **kwargs)
    assert ours.text == ref_text
    enc = chat_tokenizer(ours.text, add_special_tokens=False, return_offsets_mapping=True)
    mask = token_mask(enc["offset_mapping"], ours.spans)
    assert enc["input_ids"] == ref["input_ids"]
    assert mask.tolist() == list(ref["assistant_masks"])
    # Exactly the three replies and their end-of-turn tokens are supervised.
    supervised = [t for t, m in zip(enc["input_ids"], mask) if m]
    assert supervised.count(128012) == 3
    assert chat_tokenizer.decode(supervised).count("You're welcome.<|im_end|>") == 1


def test_smollm3_template_renders_the_published_text():
    """Hand-checked against SmolLM3's published template: the system block closes with
    <|im_end|> only when tools are given, no-think replies get the empty think prefill outside
    the supervised span, tool results are user turns."""
    template = load_template("smollm3", now=lambda: FIXED)
    rendered = template.render(TOOL_CONVERSATION[:5])
    assert rendered.text == (
        "<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\nToday Date: 08 July 2025\n"
        "Reasoning Mode: /no_think\n\n## Custom Instructions\n\nYou check the weather.\n\n"
        "<|im_start|>user\nIs it raining in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n<tool_call>\n{\"name\": \"get_weather\", "
        "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n{\"rain\": true}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\nYes, it is raining in Paris.<|im_end|>\n")
    assert [rendered.text[a:b] for a, b in rendered.spans] == [
        TOOL_CONVERSATION[2]["content"] + "<|im_end|>", "Yes, it is raining in Paris.<|im_end|>"]
    think = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                            enable_thinking=True).text
    assert "Reasoning Mode: /think" in think and think.endswith("<|im_start|>assistant\n")
    override = template.render([{"role": "system", "content": "Only this. /system_override"},
                                {"role": "user", "content": "Hi"}]).text
    assert override.startswith("<|im_start|>system\nOnly this.<|im_end|>\n<|im_start|>user\nHi")


def _write(path, records, extra=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra:
            f.write(line + "\n")
    return str(path)


GOOD = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(6)]


def test_prepare_chat_counts_bad_records_and_writes_aligned_masks(tmp_path):
    bad = [{"messages": []}, {"messages": "text"}, {"messages": [{"role": "wizard", "content": "x"},
                                                                {"role": "assistant", "content": "y"}]},
           {"messages": [{"role": "user", "content": "only a question"}]}, {"text": "no messages"}]
    src = _write(tmp_path / "c.jsonl", GOOD + bad, extra=["{not json"])
    summary = prepare_chat([src], str(tmp_path / "out"), template="chatml", show_progress=False)
    assert summary.conversations == 6
    assert summary.rejected == {"empty_conversation": 1, "malformed_messages": 1, "unknown_role": 1,
                                "no_assistant_turn": 1, "missing_messages": 1, "malformed_json": 1}
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, masks = IndexedDataset(str(tmp_path / "out")), IndexedDataset(str(tmp_path / "out_lossmask"))
    assert np.array_equal(tokens.sequence_lengths, masks.sequence_lengths)
    ids, mask = tokens[0], masks[0]
    assert ids[-1] == 128001 and mask[-1] == 0  # EOS closes each conversation, unsupervised
    # Supervised: the reply "0" and its <|im_end|>, nothing else.
    assert ids[mask.astype(bool)].tolist() == [15, 128012]
    description = read_description(tmp_path / "out")
    assert description["supervised_tokens"] == 12 and description["template"] == "chatml"
    assert (tmp_path / "out.tokenizer" / "tokenizer.json").is_file()


def test_prepare_chat_length_policies_and_loss_on_all(tmp_path):
    long = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]}
    src = _write(tmp_path / "c.jsonl", GOOD[:2] + [long])
    kept = prepare_chat([src], str(tmp_path / "err"), template="chatml", max_length=40, show_progress=False)
    assert kept.conversations == 2 and kept.rejected == {"too_long": 1}
    dropped = prepare_chat([src], str(tmp_path / "drop"), template="chatml", max_length=40,
                           on_overflow="drop", show_progress=False)
    assert dropped.rejected == {"dropped_too_long": 1}
    # Cut inside the user turn: the reply is gone, so nothing is left to supervise.
    cut = prepare_chat([src], str(tmp_path / "cut"), template="chatml", max_length=40,
                       on_overflow="truncate", show_progress=False)
    assert cut.truncated == 1 and cut.rejected == {"no_assistant_tokens": 1}
    every = prepare_chat([src], str(tmp_path / "all"), template="chatml", loss_on="all", show_progress=False)
    assert every.supervised_tokens == every.tokens


def test_prepare_chat_refuses_unmarked_templates_and_leaves_nothing_on_failure(tmp_path):
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                     "{% endfor %}")
    src = _write(tmp_path / "c.jsonl", GOOD)
    with pytest.raises(ConfigError, match="marks no assistant text"):
        prepare_chat([src], str(tmp_path / "out"), template=str(plain), show_progress=False)
    # Loss on every token needs no markers.
    assert prepare_chat([src], str(tmp_path / "all"), template=str(plain), loss_on="all",
                        show_progress=False).conversations == 6
    only_bad = _write(tmp_path / "bad.jsonl", [{"messages": []}], extra=["{oops"])
    with pytest.raises(ConfigError, match="no usable conversation.*empty_conversation=1"):
        prepare_chat([only_bad], str(tmp_path / "bad"), show_progress=False)
    assert not list(tmp_path.glob("bad.*[!l]"))  # no .bin/.idx/.tokenizer/.partial left behind
    with pytest.raises(ConfigError, match="not a template name"):
        prepare_chat([src], str(tmp_path / "x"), template="nonexistent", show_progress=False)


def test_prepare_chat_reads_parquet_and_saved_datasets(tmp_path):
    import datasets

    rows = [{"messages": r["messages"]} for r in GOOD]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    a = prepare_chat([str(tmp_path / "c.parquet")], str(tmp_path / "a"), show_progress=False)
    b = prepare_chat([str(tmp_path / "saved")], str(tmp_path / "b"), show_progress=False)
    assert a.conversations == b.conversations == 6 and a.tokens == b.tokens


def test_first_fit_decreasing_never_splits_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=500)
    bins = first_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(lengths[b].sum() <= 64 for b in bins)
    assert bins == first_fit_decreasing(lengths, 64)
    plan = plan_packing(lengths, 64, "ffd")
    assert plan.efficiency > 0.9 and plan.num_sequences == len(bins)
    # FFD's classic example: each item goes to the first bin with room.
    assert first_fit_decreasing(np.array([4, 8, 1, 4, 2, 1]), 10) == [[1, 4], [0, 3, 2, 5]]
    assert plan_packing(lengths, 64, "none").num_sequences == 500


def test_packed_samples_keep_conversations_whole(tmp_path):
    from megasmol.data.masked.dataset import open_chat_dataset

    src = _write(tmp_path / "c.jsonl", GOOD)
    prepare_chat([src], str(tmp_path / "d"), template="chatml", show_progress=False)
    ids = TokenIds(128256, 128001, 128004)
    packed = open_chat_dataset(tmp_path / "d", 48, ids, cache_dir=tmp_path / "cache")
    single = open_chat_dataset(tmp_path / "d", 48, ids, packing="none", cache_dir=tmp_path / "cache")
    assert single.plan.num_sequences == 6 and packed.plan.num_sequences < 6
    sample = packed.packed_sample(0)
    tokens, labels, mask, pos = (sample[k] for k in ("tokens", "labels", "loss_mask", "position_ids"))
    starts = torch.nonzero(pos == 0).flatten().tolist()
    eos = torch.nonzero(tokens == 128001).flatten().tolist()
    assert starts[0] == 0 and [e + 1 for e in eos] == starts[1:len(eos) + 1]  # positions restart
    assert mask[tokens == 128001].sum() == 0  # nothing predicted across a boundary
    assert labels[mask.bool()].tolist().count(128012) == len(eos)  # each reply's <|im_end|>
    # Same tokens supervised whether packed or not.
    total = sum(packed.packed_sample(i)["loss_mask"].sum() for i in range(packed.plan.num_sequences))
    assert total == sum(single.packed_sample(i)["loss_mask"].sum() for i in range(6)) == 12
    # The plan is cached: a second open reads it back unchanged; built afresh (another cache,
    # as on a resumed job's new node) it is the same plan and the same sample order.
    again = open_chat_dataset(tmp_path / "d", 48, ids, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.plan.order, packed.plan.order)
    fresh = open_chat_dataset(tmp_path / "d", 48, ids, cache_dir=tmp_path / "other")
    assert np.array_equal(fresh.plan.order, packed.plan.order)
    assert np.array_equal(fresh.sample_order, packed.sample_order)
    reseeded = open_chat_dataset(tmp_path / "d", 48, ids, cache_dir=tmp_path / "third", seed=99)
    assert np.array_equal(reseeded.plan.order, packed.plan.order)  # packing does not depend on it
    with pytest.raises(ConfigError, match="longer than a sequence"):
        open_chat_dataset(tmp_path / "d", 8, ids, cache_dir=tmp_path / "cache")


def test_a_packing_plan_is_never_seen_half_written(tmp_path, monkeypatch):
    """Every rank builds the plan at once (the reference pass opens the dataset on each): a write
    cut short must leave no file under the final name, or another rank maps a short array."""
    from megasmol.data.masked.dataset import open_chat_dataset

    src = _write(tmp_path / "c.jsonl", GOOD)
    prepare_chat([src], str(tmp_path / "d"), template="chatml", show_progress=False)
    ids = TokenIds(128256, 128001, 128004)
    original = np.save

    def cut_short(file, arr, *args, **kwargs):
        handle = open(file, "wb") if isinstance(file, (str, os.PathLike)) else file
        handle.write(b"\x93NUMPY")
        handle.flush()
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "save", cut_short)
    with pytest.raises(OSError, match="No space"):
        open_chat_dataset(tmp_path / "d", 48, ids, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # neither a short .npy nor a temporary
    monkeypatch.setattr(np, "save", original)
    plan = open_chat_dataset(tmp_path / "d", 48, ids, cache_dir=tmp_path / "cache").plan
    assert plan.num_sequences > 0 and len(list((tmp_path / "cache").glob("*.npy"))) == 3


def test_a_recipe_blends_chat_and_plain_token_data(megatron_runtime, tmp_path):
    """A mid-training mixture: chat prefixes and prepare-data prefixes in one stage."""
    from megasmol.data.loader import TrainingBatches, build_stage_data
    from megasmol.data.recipe import plan_stages
    from tests.data_fixtures import random_documents, recipe_at, write_dataset

    src = _write(tmp_path / "c.jsonl", GOOD * 4)
    prepare_chat([src], str(tmp_path / "chat"), template="chatml", show_progress=False)
    write_dataset(tmp_path / "plain", random_documents(60, 3, 1000, 5, 40, seed=1))
    recipe = recipe_at(tmp_path, [{"name": "mid", "start_step": 1, "datasets": [
        {"path": "chat", "weight": 0.5}, {"path": "plain", "weight": 0.5}]}])
    plans = plan_stages(recipe, 6, 4, 48)
    ids = TokenIds(128256, 128001, 128004)
    stages = build_stage_data(recipe, plans, ids, seed=5, cache_dir=tmp_path / "cache")
    batches = TrainingBatches(stages, 4)
    seen = {0: 0, 1: 0}
    for step in range(1, 7):
        [batch] = batches.micro_batches(step)
        for row in range(4):
            source = int(batch["dataset_id"][row])
            seen[source] += 1
            tokens, mask = batch["tokens"][row], batch["loss_mask"][row]
            if source == 0:  # chat: only the replies' targets, positions restarting
                assert 0 < mask.sum() < 48 and (batch["position_ids"][row] == 0).sum() > 1
            else:  # token data: every target
                assert mask.sum() == 48 and (tokens < 1000).all()
    assert seen[0] > 0 and seen[1] > 0
    with pytest.raises(ConfigError, match="document_masking"):
        build_stage_data(recipe, plans, ids, seed=5, cache_dir=tmp_path / "cache2", document_masking=False)


def test_chat_with_a_tokenizer_larger_than_the_model_is_one_line(chat_tokenizer):
    """``generate`` refused this already; ``chat`` used to crash in the embedding lookup."""
    from megasmol.chat.session import ChatSession
    from tests.specs import tiny_llama

    session = ChatSession(None, tiny_llama(), chat_tokenizer, load_template("chatml", chat_tokenizer),
                          max_new_tokens=4)
    session.messages.append({"role": "user", "content": "hello there"})
    with pytest.raises(ConfigError, match="beyond the model's vocabulary of 512: wrong tokenizer"):
        session.prompt_ids()

"""Staged mixtures through Megatron's dataset builders: stage switches, resume, DP split, shuffling."""

import numpy as np
import pytest

from megasmol.config.typed import ConfigError
from megasmol.data.loader import TokenIds, TrainingBatches, build_stage_data
from megasmol.data.recipe import REPO_RECIPES, BatchSchedule, load_recipe, plan_stages
from tests.data_fixtures import EOS, random_documents, recipe_at, write_dataset

TOKEN_IDS = TokenIds(vocab_size=4096, eod=EOS, pad=0)
WIDE_TOKEN_IDS = TokenIds(vocab_size=131072, eod=EOS, pad=0)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    write_dataset(root / "low", random_documents(300, 10, 1000, 5, 60, seed=1))
    write_dataset(root / "high", random_documents(300, 2000, 3000, 5, 60, seed=2))
    return root


def _stages(start2=6):
    return [
        {"name": "one", "start_step": 1, "datasets": [{"path": "low", "weight": 0.8},
                                                      {"path": "high", "weight": 0.2}]},
        {"name": "two", "start_step": start2, "datasets": [{"path": "low", "weight": 0.2},
                                                           {"path": "high", "weight": 0.8}]},
    ]


def _batches(root, recipe, steps=10, gb=8, mb=2, dp_rank=0, dp=1, token_ids=TOKEN_IDS):
    plans = plan_stages(recipe, steps, gb, 32)
    stages = build_stage_data(recipe, plans, token_ids, seed=5, cache_dir=root / "cache")
    return TrainingBatches(stages, mb, dp_rank, dp)


def _source_share(micro_batches):
    tokens = np.concatenate([b["tokens"].numpy().ravel() for b in micro_batches])
    tokens = tokens[tokens != EOS]
    return float((tokens >= 2000).mean())


def test_stage_switch_resume_and_dp_split(megatron_runtime, two_sources):
    batches = _batches(two_sources, recipe_at(two_sources, _stages()))
    assert [batches.stage_at(s).stage.name for s in (1, 5, 6, 10)] == ["one", "one", "two", "two"]
    first = np.mean([_source_share(batches.micro_batches(s)) for s in range(1, 6)])
    second = np.mean([_source_share(batches.micro_batches(s)) for s in range(6, 11)])
    assert first < 0.4 < 0.6 < second, (first, second)
    # A resumed run (new objects, indices loaded from the cache) sees the same batches mid-stage.
    resumed = _batches(two_sources, recipe_at(two_sources, _stages()))
    for step in (3, 7):
        for a, b in zip(batches.micro_batches(step), resumed.micro_batches(step)):
            assert all(np.array_equal(a[k], b[k]) for k in a)
    # Two DP ranks together hold exactly the DP=1 global batch.
    ranks = [_batches(two_sources, recipe_at(two_sources, _stages()), dp_rank=r, dp=2) for r in (0, 1)]
    whole = sorted(batches.sample_indices(7).ravel().tolist())
    split = sorted(np.concatenate([r.sample_indices(7).ravel() for r in ranks]).tolist())
    assert whole == split == list(range(8, 16))
    prefetched = list(batches.iterate(9, prefetch=2))
    assert [step for step, _, _ in prefetched] == [9, 10]
    assert np.array_equal(prefetched[0][2][0]["tokens"], batches.micro_batches(9)[0]["tokens"])


def test_batch_rampup_draws_every_sample_once_across_a_stage_switch(megatron_runtime, two_sources):
    schedule = BatchSchedule(8, rampup_start=2, rampup_increment=2, rampup_steps=6)
    assert [schedule.at(s) for s in range(1, 9)] == [2, 2, 4, 4, 6, 6, 8, 8]
    assert schedule.samples_through(8) == 2 + 2 + 4 + 4 + 6 + 6 + 8 + 8
    recipe = recipe_at(two_sources, _stages(start2=5))
    plans = plan_stages(recipe, 10, schedule, 32)
    assert [p.samples for p in plans] == [2 + 2 + 4 + 4, 6 + 6 + 8 * 4]
    stages = build_stage_data(recipe, plans, TOKEN_IDS, seed=5, cache_dir=two_sources / "cache")
    batches = TrainingBatches(stages, 2, 0, 1)
    assert [len(batches.micro_batches(s)) for s in (1, 3, 5, 7, 10)] == [1, 2, 3, 4, 4]
    for plan in plans:  # within each stage, steps draw consecutive, non-overlapping samples
        drawn = np.concatenate([batches.sample_indices(s).ravel()
                                for s in range(plan.first_step, plan.last_step + 1)])
        assert drawn.tolist() == list(range(plan.samples))
    with pytest.raises(ConfigError, match="batch_rampup level"):
        TrainingBatches(stages, 4, 0, 1)  # level 2 or 6 does not split into micro-batches of 4
    # Stages given in tokens move with the ramp: steps 1-6 draw the first 20 sequences (24).
    by_tokens = recipe_at(two_sources, [_stages()[0], {**_stages()[1], "start_step": None,
                                                       "start_tokens": 20 * 32}])
    assert [p.first_step for p in plan_stages(by_tokens, 10, schedule, 32)] == [1, 7]


def test_sequence_level_shuffling_spreads_a_long_document(megatron_runtime, tmp_path):
    # One document of 32k tokens next to 3000 short ones (~96k tokens together). Its token ids
    # (>= 10000) encode their position, so a sample tells where in the document it was read.
    long_doc = (10_000 + np.arange(32_000)).tolist()
    short = random_documents(3000, 10, 1000, 16, 48, seed=3)
    write_dataset(tmp_path / "corpus", short[:1500] + [long_doc] + short[1500:])
    only = [{"name": "s", "start_step": 1, "datasets": [{"path": "corpus", "weight": 1}]}]
    recipe = recipe_at(tmp_path, only)
    batches = _batches(tmp_path, recipe, steps=40, gb=32, mb=32, token_ids=WIDE_TOKEN_IDS)
    shares = []
    for step in range(1, 41):
        (micro,) = batches.micro_batches(step)
        from_long = ((micro["tokens"] >= 10_000).float().mean(dim=1) > 0.5).numpy()
        shares.append(from_long.mean())
        # Windows of the long document in one batch are not consecutive reads of it.
        starts = sorted(int(row[-1]) for row, hit in zip(micro["tokens"].numpy(), from_long) if hit)
        adjacent = sum(b - a == 32 for a, b in zip(starts, starts[1:]))
        assert adjacent <= 1, starts
    shares = np.array(shares)
    assert 0.15 < shares.mean() < 0.35, shares.mean()  # its share of the tokens, on average
    # No global batch is dominated by it (read sequentially, its batches would be all of it).
    assert shares.max() <= 0.5, shares


def test_recipes_plan_and_validation(tmp_path, monkeypatch):
    recipe = load_recipe("smollm3-pretraining")
    plans = plan_stages(recipe, 4_720_000, 576, 4096)
    assert [(p.first_step, p.last_step) for p in plans] == [(1, 3_450_000), (3_450_001, 4_198_000),
                                                           (4_198_001, 4_720_000)]
    assert abs(plans[0].tokens / 1e12 - 8.14) < 0.01
    for name in ("smollm3-long-context-32k", "smollm3-long-context-64k", "demo"):
        assert load_recipe(name).stages
    assert load_recipe("smollm3-long-context-64k").stages[0].seq_length == 65536
    monkeypatch.delenv("SMOLLM3_DATA", raising=False)
    with pytest.raises(ConfigError, match="unset environment variable.*SMOLLM3_DATA"):
        recipe.resolved_root()
    monkeypatch.setenv("SMOLLM3_DATA", str(tmp_path))
    assert recipe.dataset_prefix(recipe.stages[0].datasets[0]) == tmp_path / "fineweb-edu"
    # Token-based starts become steps at the previous stage's tokens per step.
    by_tokens = recipe_at(tmp_path, [
        {"name": "a", "start_tokens": 0, "datasets": [{"path": "x", "weight": 1}]},
        {"name": "b", "start_tokens": 1000, "seq_length": 64, "datasets": [{"path": "x", "weight": 1}]}])
    assert [p.first_step for p in plan_stages(by_tokens, 100, 4, 32)] == [1, 9]
    bad = [
        ([{"name": "a", "start_step": 2, "datasets": [{"path": "x", "weight": 1}]}], "must start at step 1"),
        ([{"name": "a", "start_step": 1, "datasets": [{"path": "x", "weight": -1}]}], "weight must be"),
        ([{"name": "a", "start_step": 1, "datasets": []}], "datasets is empty"),
        ([{"name": "a", "start_step": 1, "datasets": [{"path": "x", "weight": 1}]},
          {"name": "b", "start_step": 1, "datasets": [{"path": "x", "weight": 1}]}], "not after stage a"),
        ([{"name": "a", "start_step": 1, "wieght": 1, "datasets": []}], "unknown field"),
    ]
    for stages, message in bad:
        with pytest.raises(ConfigError, match=message):
            recipe_at(tmp_path, stages)
    assert (REPO_RECIPES / "demo.yaml").is_file()


def test_missing_dataset_named(megatron_runtime, tmp_path):
    gone = [{"name": "s", "start_step": 1, "datasets": [{"path": "gone", "weight": 1}]}]
    recipe = recipe_at(tmp_path, gone)
    with pytest.raises(ConfigError, match="gone.bin.*stage s"):
        _batches(tmp_path, recipe)


def test_a_damaged_index_cache_is_rebuilt_not_fatal(megatron_runtime, tmp_path):
    """A kill while Megatron wrote its index cache used to leave a short .npy that every restart
    mapped and failed on; saves are now atomic, and a damaged file is dropped and rebuilt."""
    write_dataset(tmp_path / "low", random_documents(200, 10, 1000, 5, 60, seed=1))
    recipe = recipe_at(tmp_path, [{"name": "one", "start_step": 1,
                                   "datasets": [{"path": "low", "weight": 1.0}]}])
    first = _batches(tmp_path, recipe).micro_batches(3)
    cache = sorted((tmp_path / "cache").glob("*.npy"))
    assert cache and not list((tmp_path / "cache").glob("*.tmp-*"))  # nothing half-written
    victim = next(p for p in cache if p.name.endswith("shuffle_index.npy"))
    victim.write_bytes(victim.read_bytes()[:-16])  # as a kill mid-write left it
    again = _batches(tmp_path, recipe).micro_batches(3)
    assert all((a["tokens"] == b["tokens"]).all() for a, b in zip(first, again))
    np.load(victim, mmap_mode="r")  # rebuilt whole

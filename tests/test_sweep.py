"""The sweep's variants: a grid's product, or an ablation of one key at a time (end to end in
tests/refine/test_fingerprints.py)."""
import pytest

from selfrefine_dist.config import ConfigError
from selfrefine_dist.sweep import parse_grid, variants

GRID = ["dpo.lr=[1.0e-6,5.0e-6]", "refine.pair_strategy=[cot_vs_direct]", "sampler.temperature_schedule=[[0.7,1.0]]"]


def test_the_product_of_the_grid_times_the_seeds():
    runs = variants(parse_grid(GRID), seeds=[0, 1])
    assert len(runs) == 2 * 1 * 1 * 2
    assert runs[0].name == "lr=1e-06_pair_strategy=cot_vs_direct_temperature_schedule=0.7-1.0_seed=0"
    assert runs[0].overrides == ["dpo.lr=1e-06", "refine.pair_strategy=cot_vs_direct",
                                 "sampler.temperature_schedule=[0.7, 1.0]", "run.seed=0", "sampler.seed=0"]


def test_one_at_a_time_is_the_base_then_each_value_alone():
    runs = variants(parse_grid(GRID), one_at_a_time=True)
    assert [r.name for r in runs] == ["base", "lr=1e-06", "lr=5e-06", "pair_strategy=cot_vs_direct",
                                      "temperature_schedule=0.7-1.0"]
    assert runs[0].overrides == [] and runs[3].overrides == ["refine.pair_strategy=cot_vs_direct"]
    assert len({r.name for r in variants(parse_grid(GRID), [3, 4], one_at_a_time=True)}) == 10


def test_a_grid_item_that_is_not_a_list_is_refused():
    with pytest.raises(ConfigError, match="expected a non-empty list"):
        parse_grid(["dpo.lr=1e-6"])

import pytest

from qstar import ObjectiveConfig, QuietStarConfig
from qstar.config import OBJECTIVE_KEYS
from qstar.run_config import load_run_config


@pytest.mark.parametrize(
    "field, value",
    [
        ("thought_len", 0),
        ("thought_len", 2.5),
        ("n_true", 0),
        ("n_thoughts", -1),
        ("mixing", "sigmoid"),
        ("policy_logprob", "whole"),
        ("attention", "flash"),
        ("policy_temperature", 0),
        ("base_loss_weight", -0.1),
        ("baseline", "moving_average"),
        ("reward_filter", "top"),
        ("start_token", ""),
    ],
)
def test_invalid_values_name_the_field(field, value):
    cls = ObjectiveConfig if field in OBJECTIVE_KEYS else QuietStarConfig
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})
    with pytest.raises(ValueError, match=f"quiet_star.{field}"):  # as a config key
        load_run_config(None, [f"quiet_star.{field}={value}"])


def test_training_settings_are_not_saved_with_the_model():
    """The objective (loss weights, estimator) is a training setting: a model's config has no
    such field, and configs saved before the split still load."""
    assert not set(OBJECTIVE_KEYS) & set(QuietStarConfig().to_dict())
    cfg = load_run_config(None, ["quiet_star.policy_weight=100", "quiet_star.thought_len=3"])
    assert cfg.quiet_star.model_config() == QuietStarConfig(thought_len=3)
    assert cfg.quiet_star.objective() == ObjectiveConfig(policy_weight=100.0)


def test_unknown_keys_are_listed():
    with pytest.raises(ValueError, match="thougth_len"):
        QuietStarConfig.from_dict({"thougth_len": 3})


def test_authors_counts_map_to_sampled_tokens():
    cfg = QuietStarConfig.from_authors(n_ahead=12, n_ahead_talk=4, n_passes=2)
    assert (cfg.thought_len, cfg.n_true, cfg.n_thoughts) == (9, 4, 2)
    assert cfg == QuietStarConfig()  # the defaults are the authors' training settings
    assert cfg.passes == 12 + 4 - 1  # the code's n_ahead + n_ahead_talk - 1


def test_round_trip():
    cfg = QuietStarConfig(thought_len=5, mixing="logprob")
    assert QuietStarConfig.from_dict(cfg.to_dict()) == cfg


def test_eval_and_bench_take_the_train_override_grammar():
    from qstar.config import quiet_star_overrides

    assert quiet_star_overrides(["quiet_star.thought_len=5", "quiet_star.attention=dense"]) == {
        "thought_len": 5,
        "attention": "dense",
    }
    with pytest.raises(ValueError, match="did you mean 'thought_len'"):
        quiet_star_overrides(["quiet_star.thought_lne=5"])
    with pytest.raises(ValueError, match="only quiet_star.KEY=VALUE"):
        quiet_star_overrides(["optim.lr=1e-3"])
    with pytest.raises(ValueError, match="thought_len must be"):
        quiet_star_overrides(["quiet_star.thought_len=0"])

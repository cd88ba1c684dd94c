"""params.yaml: schema validation, errors that name the field and allowed values, overrides."""
import pytest
import yaml

from chronomerge.config import Config, ConfigError, load_config, validate
from flows.cli import main


def test_the_repository_params_file_states_exactly_the_defaults():
    assert load_config("params.yaml") == Config()


@pytest.mark.parametrize(
    "raw,needle",
    [
        (
            {"strategy": {"deploy": {"mode": "latest"}}},
            "strategy.deploy.mode: 'latest' is not allowed; expected one of 'zs', 'ft', 'ema', 'all' or 'continual'",
        ),
        (
            {"strategy": {"deploy": {"mode": "continual", "merger": "opcm", "hparams": {"keep": 0.2}}}},
            "strategy.deploy: opcm: unknown hyperparameter(s) ['keep'];"
            " allowed: ['alpha', 'matrices', 'norm', 'projection', 'rank_rule', 'scaling', 'zero_diagonal']",
        ),
        (
            {"strategy": {"deploy": {"merger": "ewc"}}},
            "strategy.deploy.merger: 'ewc' is not allowed; expected one of ['continual_average'",
        ),
        ({"strategy": {"deploy": {"mode": "all", "align": "l1"}}}, "align needs a merged model to carry forward"),
        (
            {"strategy": {"init": {"mode": "best"}}},
            "strategy.init.mode: 'best' is not allowed; expected one of 'zs', 'ft', 'ema' or 'all'",
        ),
        (
            {"strategy": {"init": {"technique": "mean"}}},
            "strategy.init.technique: 'mean' is not allowed; expected one of ['average'",
        ),
        (
            {"strategy": {"deploy": {"technique": "ties", "hparams": {"keep": 0}}}},
            "keep=0 is not allowed; expected a real number in (0, 1]",
        ),
        (
            {"strategy": {"deploy": {"recency": "newest"}}},
            "strategy.deploy.recency: 'newest' is not allowed; expected one of ['cubic'",
        ),
        ({"train": {"lr": 0}}, "train.lr: Input should be greater than 0 (got 0)"),
        ({"train": {"steps": 2.5}}, "train.steps"),
        ({"train": {"replay_pretrain": 0.6, "replay_previous": 0.5}}, "replay_pretrain + replay_previous must be < 1"),
        (
            {"stream": {"kind": "class-incremental"}},
            "stream.kind: 'class-incremental' is not allowed;"
            " expected one of 'dataset-incremental', 'random', 'custom', 'experts' or 'arrivals'",
        ),
        ({"stream": {"length": 0}}, "stream.length: Input should be greater than or equal to 1 (got 0)"),
        ({"device": "tpu"}, "device: 'tpu' is not allowed; expected one of 'auto', 'cpu' or 'cuda'"),
        ({"trian": {}}, "trian: unknown field; allowed fields here: ['data', 'device', 'eval', 'model'"),
        ({"train": {"learning_rate": 1}}, "train.learning_rate: unknown field; allowed fields here: ['batch_size'"),
    ],
)
def test_a_bad_field_is_named_with_its_allowed_values(raw, needle):
    with pytest.raises(ConfigError) as e:
        validate(raw, "params.yaml")
    assert needle in str(e.value)
    assert str(e.value).startswith("params.yaml: ")


def test_overrides_reach_any_field_and_are_validated(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.01}}))
    cfg = load_config(tmp_path / "p.yaml", ["train.lr=1e-3", "strategy.deploy.hparams={keep: 0.5}",
                                            "strategy.deploy.technique=ties", "stream.length=50"])
    assert cfg.train.lr == 1e-3 and cfg.stream.length == 50
    assert cfg.strategy.deploy.technique == "ties" and cfg.strategy.deploy.hparams == {"keep": 0.5}
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(tmp_path / "p.yaml", ["train.steps=many"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(tmp_path / "p.yaml", ["train.lr"])


def test_unreadable_params_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_the_command_line_reports_a_bad_field_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--set", "strategy.deploy.mode=latest"]) == 2
    err = capsys.readouterr().err
    assert (
        "strategy.deploy.mode: 'latest' is not allowed; expected one of 'zs', 'ft', 'ema', 'all' or 'continual'" in err
    )
    assert not (tmp_path / "store").exists(), "nothing runs before the config is valid"


def test_resume_without_a_previous_run_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err

import re
from pathlib import Path

import pytest
import yaml

from etl.config import ConfigError
from trainer.config import load_train_config
from trainer.topology import Topology

RECIPES = sorted((Path(__file__).parents[2] / "configs" / "train").glob("*.yaml"))
MINIMAL = {
    "data": {"root": "data", "resolution": 64},
    "train": {"total_steps": 10, "batch_size": 2},
    "checkpoint": {"dir": "runs/x", "every": 5},
}


def _write(tmp_path, data) -> Path:
    path = tmp_path / "configs" / "train.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_recipe_loads_validates_and_maps_8_ranks():
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "reference-256.yaml", "reference-512.yaml", "reference-1024.yaml"} <= names
    for path in RECIPES:
        cfg = load_train_config(path)
        assert cfg.data.root.is_absolute()
        world = 4 if path.name == "demo.yaml" else 8
        topology = Topology.from_config(cfg.topology, world)
        assert len(topology.model_ranks) == 3 * len(topology.loader_ranks)


def test_reference_recipes_carry_the_seed_readme_parameters():
    r256, r512, r1024 = (load_train_config(RECIPES[0].parent / f"reference-{r}.yaml") for r in (256, 512, 1024))
    assert (r256.train.batch_size, r512.train.batch_size, r1024.train.batch_size) == (140, 40, 15)
    assert (r256.train.total_steps, r512.train.total_steps) == (300_000, 400_000)
    for cfg in (r256, r512, r1024):
        assert cfg.train.accumulation_steps == 2 and cfg.train.lr == 1e-4 and cfg.train.warmup_steps == 1000
        assert cfg.train.lr_schedule == "constant" and cfg.train.null_prob_text == [0.316, 0.316]
        assert (cfg.ema.every, cfg.ema.decay, cfg.checkpoint.every, cfg.log.every) == (100, 0.99, 1000, 10)
        assert cfg.topology.loader_to_model == {0: [2, 3, 4], 1: [5, 6, 7]}
        model = cfg.model.mmdit_config()
        assert (model.num_blocks, model.dim, model.max_res_orig) == (19, 64 * 19, 256)
        assert model.checkpoint_attn and model.checkpoint_mlp
    assert r256.checkpoint.init_from is None
    assert r512.model.mmdit_config().max_res == 512 and r512.checkpoint.init_from.name == "reference-256"
    assert r512.checkpoint.reset_optimizer and r512.checkpoint.reset_logger
    assert r1024.model.mmdit_config().max_res == 1024 and r1024.checkpoint.init_from.name == "reference-512"


def test_defaults_and_paths_relative_to_the_file(tmp_path):
    cfg = load_train_config(_write(tmp_path, MINIMAL))
    assert cfg.data.root == tmp_path / "configs" / "data"
    assert cfg.checkpoint.dir == tmp_path / "configs" / "runs" / "x"
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.betas, cfg.train.grad_clip) == (1e-4, 1000, [0.9, 0.999], 1)
    assert (cfg.topology.models_per_loader, cfg.topology.prefetch) == (3, 2)
    assert (cfg.model.preset, cfg.encoders.preset, cfg.log.wandb_mode) == ("tiny", "tiny", "disabled")
    assert (cfg.ema.every, cfg.ema.decay, cfg.data.detailed_caption_prob) == (100, 0.99, 0.5)


def test_dotted_overrides_parse_yaml_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(
        _write(tmp_path, MINIMAL),
        [
            "train.total_steps=40",
            "train.betas=[0.9, 0.95]",
            "topology.loader_to_model={0: [1, 2, 3]}",
            "model.overrides.max_res=512",
            "encoders.text_len=16",
            "model.overrides.text_len_per_encoder=16",
            "checkpoint.dir=elsewhere",
            "log.wandb_mode=offline",
            "train.lr=3e-4",  # YAML 1.1 reads it as a string (no dot): still a number here, as the seed writes it
            "train.min_lr=1E-6",
        ],
    )
    assert cfg.train.total_steps == 40 and cfg.train.betas == [0.9, 0.95]
    assert (cfg.train.lr, cfg.train.min_lr) == (3e-4, 1e-6)
    assert cfg.topology.loader_to_model == {0: [1, 2, 3]}
    assert cfg.model.mmdit_config().max_res == 512 and cfg.encoders.text_len == 16
    assert cfg.checkpoint.dir == tmp_path / "elsewhere"  # typed on the command line: relative to the cwd
    assert cfg.log.wandb_mode == "offline"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.totl_steps=4", "train.totl_steps"),
        ("trian.total_steps=4", "trian"),
        ("model.overrides.max_resolution=512", "model.overrides.max_resolution"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=two", "train.batch_size"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("data.resolution=100", "data.resolution"),
        ("data.vae_memo_mb=-1", "data.vae_memo_mb: must be at least 0"),
        ("train.lr_schedule=linear", "train.lr_schedule"),
        ("log.wandb_mode=on", "as true/false: quote the word"),
        ("ema.decay=1.5", "ema.decay"),
        ("train.null_prob_text=[0.3]", "train.null_prob_text"),
        ("log.sample_every=10", "log.sample_prompts"),
        ("encoders.text_dim=32", "encoders.text_dim"),
        ("encoders.preset=huge", "encoders.preset: unknown encoder preset"),
        ("encoders.text_batch_tokens=0", "encoders.text_batch_tokens: must be positive"),
        ("model.overrides.num_heads=3", "num_heads"),
        ("topology.prefetch=0", "topology.prefetch"),
        ("train.grad_clip=.nan", "train.grad_clip: expected a finite number"),
        ("train.t_shift=0", "train.t_shift: must be positive"),
        ("train.t_shift=resolutions", "train.t_shift"),
        ("topology.timeout_s=.inf", "topology.timeout_s: expected a finite number"),
        ("train.lr=1e999", "train.lr: expected a finite number"),
        ("train.total_steps", "section.key=value"),
        ("train.total_steps.x=1", "train.total_steps"),
    ],
)
def test_bad_values_and_unknown_keys_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")) as err:
        load_train_config(_write(tmp_path, MINIMAL), [override])
    assert not re.search(r"\b(\w+)\.\1\.", str(err.value)), err.value  # a section named once, not twice


def test_a_loader_map_and_a_models_per_loader_are_not_both_taken(tmp_path):
    recipe = Path(__file__).parents[2] / "configs" / "train" / "reference-256.yaml"
    with pytest.raises(ConfigError, match="topology.models_per_loader: 2 and loader_to_model .* give one"):
        load_train_config(recipe, ["topology.models_per_loader=2"])
    derived = load_train_config(recipe, ["topology.loader_to_model=null", "topology.models_per_loader=2"])
    assert (derived.topology.loader_to_model, derived.topology.models_per_loader) == (None, 2)
    assert load_train_config(_write(tmp_path, MINIMAL)).topology.models_per_loader == 3


def test_missing_required_key_and_missing_file_are_named(tmp_path):
    data = {**MINIMAL, "train": {"batch_size": 2}}
    with pytest.raises(ConfigError, match="train.total_steps"):
        load_train_config(_write(tmp_path, data))
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_train_config(tmp_path / "nope.yaml")


def test_command_line_overrides_may_surround_the_flags():
    from trainer.train import parse_args

    args = parse_args(["train.lr=1e-4", "--config", "demo.yaml", "log.every=5", "--resume", "train.seed=3"])
    assert (args.config, args.resume) == (Path("demo.yaml"), True)
    assert args.overrides == ["train.lr=1e-4", "log.every=5", "train.seed=3"]


def test_legal_but_doubtful_settings_are_named(tmp_path):
    doubts = load_train_config(_write(tmp_path, MINIMAL)).doubtful_settings()  # warmup 1000, EMA every 100
    assert [d.split(" ")[0] for d in doubts] == ["train.warmup_steps", "ema.every"]
    assert "never reaches train.lr" in doubts[0] and "never updated" in doubts[1]
    fine = load_train_config(_write(tmp_path, MINIMAL), ["train.warmup_steps=2", "ema.every=5"])
    assert fine.doubtful_settings() == []
    for recipe in RECIPES:
        assert load_train_config(recipe).doubtful_settings() == [], recipe.name


def test_paths_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = {**MINIMAL, "data": {"root": "~/data", "resolution": 64}}
    cfg = load_train_config(_write(tmp_path, data), ["checkpoint.dir=~/runs/x"])
    assert (cfg.data.root, cfg.checkpoint.dir) == (tmp_path / "home" / "data", tmp_path / "home" / "runs" / "x")

import io
import json
import subprocess
import sys
from pathlib import Path
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from etl.config import ConfigError
from etl.images import ImageRejected
from etl.storage import CorruptShardError, write_parquet_atomic
from orchestration.cli import main as sd3
from trainer.checkpoint import save_weights, step_folder
from trainer.config import load_train_config
from trainer.encoders import EncodersConfig
from trainer import eval_cli, evaluation
from trainer.evaluation import (
    DEFAULT_REFERENCE_IMAGES,
    FEATURE_BATCH,
    ClipScorer,
    EvalSetupError,
    Evaluator,
    GenerationSettings,
    build_fid,
    iter_reference,
    read_prompts,
    spread,
    to_batch,
)
from trainer.loop import TrainingEvaluation, TrainingPipelines
from trainer.model import MMDiT
from trainer.pipeline import Pipeline
from trainer.tokenizer import build_tokenizer

FEATURE_SIZE = 32
SETTINGS = GenerationSettings(steps=2, cfg=2.0, width=32, height=32, seed=3, batch_size=2)
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


class TinyFeatures(torch.nn.Module):
    """A random-weight stand-in for Inception with the same contract: uint8 (N, 3, S, S) -> (N, features)."""

    num_features = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 5, stride=4), torch.nn.Tanh(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 127.5 - 1)


def gaussian_samples(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> torch.Tensor:
    """n samples whose sample mean and (n - 1)-normalised covariance are exactly ``mean`` and ``cov``."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return torch.from_numpy(mean + z @ np.linalg.cholesky(cov).T)


def frechet_of_samples(real: torch.Tensor, fake: torch.Tensor) -> float:
    # Feature vectors as (N, d, 1, 1) "images" through a flatten: the metric sees exactly these features.
    flatten = torch.nn.Flatten()
    flatten.num_features = real.shape[1]
    fid = build_fid(None, "--inception", feature_extractor=flatten)
    fid.update(real[:, :, None, None], real=True)
    fid.update(fake[:, :, None, None], real=False)
    return float(fid.compute())


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 3.0, -2.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    # ||mu_a - mu_b||^2 + sum_i (sqrt(var_a_i) - sqrt(var_b_i))^2 = (1 + 4) + (1 + 1 + 1)
    expected = 8.0
    got = frechet_of_samples(gaussian_samples(mean_a, np.diag(var_a), 50, 0), gaussian_samples(mean_b, np.diag(var_b), 40, 1))
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_isotropic_against_rotated_gaussian_is_the_closed_form():
    # cov_a = c^2 I commutes with any cov_b = Q diag(l) Q^T: Tr(cov_a + cov_b - 2 sqrt(cov_a cov_b)) = d c^2 + sum l - 2 c sum sqrt(l)
    c, eigenvalues = 2.0, np.array([1.0, 9.0, 0.25, 4.0])
    q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((4, 4)))
    cov_b = q @ np.diag(eigenvalues) @ q.T
    mean_a, mean_b = np.zeros(4), np.array([0.5, 0.0, -0.5, 1.0])
    expected = 1.5 + 4 * c**2 + eigenvalues.sum() - 2 * c * np.sqrt(eigenvalues).sum()
    got = frechet_of_samples(gaussian_samples(mean_a, c**2 * np.eye(4), 64, 2), gaussian_samples(mean_b, cov_b, 64, 3))
    assert got == pytest.approx(expected, rel=1e-6)
    assert frechet_of_samples(gaussian_samples(mean_b, cov_b, 64, 3), gaussian_samples(mean_b, cov_b, 30, 4)) == pytest.approx(0, abs=1e-6)


def test_missing_inception_weights_is_an_error_naming_the_setting(tmp_path):
    with pytest.raises(EvalSetupError, match=r"--inception: FID needs the FID Inception-v3 weights"):
        build_fid(None, "--inception")
    with pytest.raises(EvalSetupError, match=r"log\.eval_inception: Inception weights file .*nowhere\.pth does not exist"):
        build_fid(tmp_path / "nowhere.pth", "log.eval_inception")
    pickled = tmp_path / "objects.pth"
    torch.save({"weight": Fraction(1, 2)}, pickled)  # more than tensors: refused before any unrestricted load
    with pytest.raises(EvalSetupError, match="not a plain tensor state dict"):
        build_fid(pickled, "--inception")


def shape_image(colour: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, colour)
    x, y = rng.integers(0, min(size) // 2, 2)
    image.paste("white", (int(x), int(y), int(x) + 8, int(y) + 8))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    for i, colour in enumerate(["red", "blue", "green", "yellow", "red", "blue"]):
        shape_image(colour, (48, 32) if i % 2 else (32, 64), i).save(folder / f"{i}.png")
    (folder / "truncated.png").write_bytes(png_bytes(shape_image("red", (32, 32), 9))[:40])
    (folder / "notes.txt").write_text("not an image, not counted")
    return folder


def test_reference_folder_decodes_every_image_and_rejects_the_broken_one(reference_folder):
    items = list(iter_reference(reference_folder))
    assert len(items) == 7
    rejected = [item for item in items if isinstance(item, ImageRejected)]
    assert [r.reason for r in rejected] == ["undecodable"]
    assert {item.size for item in items if isinstance(item, Image.Image)} == {(48, 32), (32, 64)}


def test_reference_parquet_shard_and_folder(tmp_path):
    images = [png_bytes(shape_image(c, (32, 48), i)) for i, c in enumerate(["red", "grey", "black"])]
    table = pa.table({"key": ["a", "b", "c", "d", "e"], "image": images + [b"<html>", None]})
    write_parquet_atomic(table, tmp_path / "buckets" / "256" / "shard-0.parquet")
    write_parquet_atomic(table.slice(0, 2), tmp_path / "buckets" / "256" / "shard-1.parquet")

    one = list(iter_reference(tmp_path / "buckets" / "256" / "shard-0.parquet"))
    assert [isinstance(i, ImageRejected) for i in one] == [False, False, False, True, True]
    assert np.asarray(one[1]).tolist() == np.asarray(shape_image("grey", (32, 48), 1)).tolist()
    assert len([i for i in iter_reference(tmp_path / "buckets") if isinstance(i, Image.Image)]) == 5

    write_parquet_atomic(pa.table({"key": ["a"]}), tmp_path / "no_image" / "s.parquet")
    with pytest.raises(EvalSetupError, match="no 'image' column"):
        list(iter_reference(tmp_path / "no_image"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalSetupError, match="--reference: .* holds no parquet shard and no image file"):
        list(iter_reference(tmp_path / "empty"))


def test_to_batch_takes_the_centre_square_of_any_aspect_ratio_as_uint8():
    wide = Image.new("RGB", (96, 32), "red")
    wide.paste("blue", (32, 0, 64, 32))
    tall = Image.new("L", (16, 80), 128)
    tall.paste(0, (0, 0, 16, 32))
    batch = to_batch([wide, tall, shape_image("red", (48, 48), 0)], FEATURE_SIZE)
    assert batch.shape == (3, 3, FEATURE_SIZE, FEATURE_SIZE) and batch.dtype == torch.uint8
    # Only the blue middle third of the wide image and the grey lower part of the tall one remain.
    assert batch[0].flatten(1).unique(dim=1).tolist() == [[0], [0], [255]]
    assert batch[1].unique().tolist() == [128]


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \n")
    assert read_prompts(tmp_path / "p.txt", "--prompts") == ["a red circle", "a blue square"]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(EvalSetupError, match="--prompts: .* holds no prompt"):
        read_prompts(tmp_path / "blank.txt", "--prompts")
    with pytest.raises(EvalSetupError, match="log.eval_prompts_file: prompts file .* does not exist"):
        read_prompts(tmp_path / "missing.txt", "log.eval_prompts_file")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random-weight CLIP with the project's tokenizer, saved like a downloaded one."""
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_is_a_floored_scaled_cosine_that_depends_on_the_prompt(clip_folder):
    scorer = ClipScorer(clip_folder, "--clip")
    images = [shape_image("red", (32, 48), 0)] * 3
    scores = scorer.scores(images, ["a red circle", "a blue square", "a red circle"])
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 100)).all())
    assert scores[0] == pytest.approx(scores[2].item(), abs=1e-4)
    assert scores[0] != pytest.approx(scores[1].item(), abs=1e-4)
    with pytest.raises(EvalSetupError, match="--clip: CLIP folder .* does not exist"):
        ClipScorer(clip_folder / "missing", "--clip")


def random_tiny_mmdit(seed: int) -> MMDiT:
    torch.manual_seed(seed)
    model = MMDiT.from_preset("tiny", num_blocks=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    save_weights(step_folder(root, 5), random_tiny_mmdit(0), random_tiny_mmdit(1), EncodersConfig(preset="tiny"), {"step": 5})
    return root


def test_evaluator_scores_generated_images_and_reuses_the_reference_features(checkpoint, reference_folder, clip_folder,
                                                                             monkeypatch):
    evaluator = Evaluator(PROMPTS, reference_folder, clip=clip_folder, settings=SETTINGS,
                          feature_extractor=TinyFeatures(), feature_size=FEATURE_SIZE)
    pipeline = Pipeline.from_checkpoint(checkpoint)
    report = evaluator.evaluate(pipeline)
    assert report["generated"] == 4 and report["prompts"] == 2
    assert report["reference"] == {"source": str(reference_folder), "used": 6, "rejected": {"undecodable": 1},
                                   "limit": DEFAULT_REFERENCE_IMAGES}
    assert report["settings"]["steps"] == 2 and report["clip_model"] == str(clip_folder)
    assert np.isfinite(report["fid"]) and report["fid"] > 0
    assert 0 <= report["clip_score"] <= 100

    # Same seed, same images; the reference features are kept, not added a second time. Generated a prompt
    # at a time (as 10,000 prompts are, in chunks), the images are the same too.
    monkeypatch.setattr(evaluation, "GENERATE_PROMPTS", 1)
    again = evaluator.evaluate(pipeline)
    assert again["fid"] == pytest.approx(report["fid"], rel=1e-5)
    assert again["clip_score"] == pytest.approx(report["clip_score"], rel=1e-5) and again["generated"] == 4
    assert int(evaluator.fid.real_features_num_samples) == 6

    # The reference against itself is at distance ~0: the generated side is what moves the score.
    references = [i for i in iter_reference(reference_folder) if isinstance(i, Image.Image)]
    evaluator.fid.reset()
    evaluator.fid.update(to_batch(references, FEATURE_SIZE), real=False)
    assert float(evaluator.fid.compute()) == pytest.approx(0, abs=1e-4)


def test_evaluator_checks_its_settings_before_generating(reference_folder, tmp_path):
    with pytest.raises(EvalSetupError, match="at least 2 generated images"):
        Evaluator(PROMPTS[:1], reference_folder, settings=GenerationSettings(batch_size=1), feature_extractor=TinyFeatures())
    with pytest.raises(EvalSetupError, match="log.eval_reference: .* does not exist"):
        Evaluator(PROMPTS, tmp_path / "missing", feature_extractor=TinyFeatures(), setting_prefix="log.eval_")
    with pytest.raises(EvalSetupError, match="log.eval_inception: FID needs"):
        Evaluator(PROMPTS, reference_folder, setting_prefix="log.eval_")
    only_one = tmp_path / "one"
    only_one.mkdir()
    shape_image("red", (32, 32), 0).save(only_one / "0.png")
    evaluator = Evaluator(PROMPTS, only_one, feature_extractor=TinyFeatures(), feature_size=FEATURE_SIZE, settings=SETTINGS)
    with pytest.raises(EvalSetupError, match="at least 2 usable reference images"):
        evaluator.evaluate(pipeline=None)  # fails on the reference, before any generation


def test_sd3_eval_without_inception_weights_fails_naming_the_flag(checkpoint, reference_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "report.json"
    args = ["eval", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--reference", str(reference_folder),
            "--out", str(out), "--steps", "2", "--width", "32", "--height", "32"]
    assert sd3(args) == 1
    assert "sd3 eval: --inception: FID needs the FID Inception-v3 weights" in capsys.readouterr().err
    assert not out.exists()
    assert sd3([*args[:-4], "--width", "40", "--height", "32"]) == 1
    assert "width 40 is not a positive multiple of 16" in capsys.readouterr().err
    assert sd3([*args, "--inception", str(tmp_path / "nowhere.pth")]) == 1
    assert "--inception: Inception weights file" in capsys.readouterr().err


def write_train_config(tmp_path, log: dict) -> Path:
    data = {
        "data": {"root": "data", "resolution": 32},
        "train": {"total_steps": 10, "batch_size": 2},
        "checkpoint": {"dir": "runs/x", "every": 5},
        "model": {"preset": "tiny", "overrides": {"num_blocks": 2}},
        "log": log,
    }
    path = tmp_path / "configs" / "train.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_training_config_checks_the_evaluation_settings_before_training(tmp_path, reference_folder):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "prompts.txt").write_text("\n".join(PROMPTS))
    torch.save({"weight": torch.zeros(1)}, tmp_path / "inception.pth")
    log = {"eval_every": 4, "eval_prompts_file": "prompts.txt", "eval_reference": str(reference_folder),
           "eval_inception": "../inception.pth"}
    cfg = load_train_config(write_train_config(tmp_path, log))
    assert cfg.log.eval_prompts_file == tmp_path / "configs" / "prompts.txt"  # relative to the config file
    assert cfg.log.eval_inception == tmp_path / "inception.pth"
    assert load_train_config(write_train_config(tmp_path, {})).log.eval_every == 0

    with pytest.raises(ConfigError, match=r"log\.eval_inception: not set \(needed when eval_every > 0\)"):
        load_train_config(write_train_config(tmp_path, {k: v for k, v in log.items() if k != "eval_inception"}))
    with pytest.raises(ConfigError, match=r"log\.eval_reference: .*missing does not exist"):
        load_train_config(write_train_config(tmp_path, log), [f"log.eval_reference={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match=r"log\.eval_every"):
        load_train_config(write_train_config(tmp_path, log), ["log.eval_every=-1"])


def test_training_evaluation_logs_scores_and_writes_the_report(tmp_path, reference_folder, clip_folder):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "prompts.txt").write_text("\n".join(PROMPTS))
    torch.save({"weight": torch.zeros(1)}, tmp_path / "inception.pth")
    log = {"eval_every": 4, "eval_prompts_file": "prompts.txt", "eval_reference": str(reference_folder),
           "eval_inception": "../inception.pth", "eval_clip": str(clip_folder), "eval_steps": 2}
    cfg = load_train_config(write_train_config(tmp_path, log))
    evaluation = TrainingEvaluation(cfg, TrainingPipelines(cfg, torch.device("cpu")), TinyFeatures(), FEATURE_SIZE)
    ema_model = random_tiny_mmdit(1)

    scores = evaluation.run(ema_model, step=4)
    assert set(scores) == {"eval_fid", "eval_clip_score"} and scores["eval_fid"] > 0
    report = json.loads((cfg.checkpoint.dir / "eval" / "step_0000004.json").read_text())
    assert report["step"] == 4 and report["fid"] == scores["eval_fid"]
    assert report["generated"] == 2 and report["settings"]["width"] == 32 and report["settings"]["seed"] == 0
    assert report["reference"]["used"] == 6


def _corrupt_row_group(path: Path, group: int) -> None:
    """Zero the middle of one row group's image column: the footer still reads, that group does not."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 24 : start + column.total_compressed_size - 8] = bytes(column.total_compressed_size - 32)
    path.write_bytes(bytes(data))


def test_a_retry_after_a_failed_reference_pass_counts_each_reference_image_once(checkpoint, tmp_path):
    shard = tmp_path / "buckets" / "32" / "shard-0.parquet"
    shard.parent.mkdir(parents=True)
    images = pa.table({"image": [png_bytes(shape_image(["red", "blue", "grey"][i % 3], (32, 32), i)) for i in range(35)]})
    pq.write_table(images, shard, row_group_size=FEATURE_BATCH)  # a feature batch is in before the bad group
    _corrupt_row_group(shard, 1)
    evaluator = Evaluator(PROMPTS, shard.parent, feature_extractor=TinyFeatures(), feature_size=FEATURE_SIZE,
                          settings=SETTINGS)
    with pytest.raises(CorruptShardError, match="shard-0.parquet"):
        evaluator.evaluate(pipeline=None)

    pq.write_table(images, shard, row_group_size=FEATURE_BATCH)  # the shard copied again, whole
    report = evaluator.evaluate(Pipeline.from_checkpoint(checkpoint))
    assert report["reference"]["used"] == 35 and int(evaluator.fid.real_features_num_samples) == 35


def _colours(images) -> list[str]:
    # The background's colour: the corner pixel (the white square starts inside).
    return ["red" if np.asarray(im)[-1, -1, 0] > 128 else "blue" for im in images if isinstance(im, Image.Image)]


def test_a_reference_limit_reads_whole_row_groups_spread_over_every_shard(tmp_path):
    folder = tmp_path / "buckets"
    folder.mkdir()
    for name, colour in (("shard-0", "red"), ("shard-1", "blue")):  # bucketed shards: one kind of image each
        table = pa.table({"image": [png_bytes(shape_image(colour, (32, 32), i)) for i in range(12)]})
        pq.write_table(table, folder / f"{name}.parquet", row_group_size=4)
    assert _colours(iter_reference(folder, limit=8)) == ["red"] * 4 + ["blue"] * 4
    assert len(_colours(iter_reference(folder, limit=100))) == 24
    assert spread(10, 4) == [0, 2, 5, 7] and spread(3, 5) == [0, 1, 2]


def test_an_evaluation_reads_at_most_its_reference_images(checkpoint, reference_folder):
    evaluator = Evaluator(PROMPTS, reference_folder, feature_extractor=TinyFeatures(), feature_size=FEATURE_SIZE,
                          settings=SETTINGS, reference_images=3)
    report = evaluator.evaluate(Pipeline.from_checkpoint(checkpoint))
    assert report["reference"]["used"] == 3 and report["reference"]["limit"] == 3
    assert int(evaluator.fid.real_features_num_samples) == 3
    assert eval_cli.DEFAULT_REFERENCE_IMAGES == DEFAULT_REFERENCE_IMAGES
    with pytest.raises(EvalSetupError, match="reference_images: FID needs at least 2, got 1"):
        Evaluator(PROMPTS, reference_folder, feature_extractor=TinyFeatures(), reference_images=1)


# Model rank 0 evaluates while the loader ranks feed batches and the other model ranks wait in the next
# step's all-reduce: none of them joins a WORLD collective, so the metric must not start one.
ONE_RANK_EVALUATES = """
import sys, time
from datetime import timedelta
from pathlib import Path
import torch, torch.distributed as dist
from trainer.evaluation import build_fid

rank, store, done = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=20))
if rank == 1:
    features = torch.nn.Flatten()
    features.num_features = 4
    fid = build_fid(None, "--inception", feature_extractor=features)
    generator = torch.Generator().manual_seed(0)
    fid.update(torch.randn(50, 4, 1, 1, generator=generator), real=True)
    fid.update(torch.randn(50, 4, 1, 1, generator=generator) + 1, real=False)
    done.write_text(f"{float(fid.compute()):.6f}")
else:
    deadline = time.monotonic() + 60
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
"""


def test_fid_computes_on_one_rank_of_a_process_group(tmp_path):
    done = tmp_path / "fid.txt"
    ranks = [subprocess.Popen([sys.executable, "-c", ONE_RANK_EVALUATES, str(rank), str(tmp_path / "store"), str(done)],
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], errors
    assert float(done.read_text()) > 0

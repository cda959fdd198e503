"""The trainer loop's building blocks on their own: lr schedule, EMA, metrics file, resumable checkpoint state."""

import json
import math
import re

import pytest
import torch

from trainer.checkpoint import (
    CheckpointWriteError,
    checkpoint_metadata,
    clean_stale_writes,
    load_model,
    load_rank_state,
    load_trainer_state,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    save_rank_state,
    staging_folder,
    step_folder,
    wait_for_rank_states,
)
from trainer.ema import EMA
from trainer.encoders import EncodersConfig
from trainer.feeder import is_checkpoint_step
from trainer.loop import timestep_shift
from trainer.lr_schedule import WarmupSchedule, apply_optimizer_settings, build_scheduler, continue_schedule
from trainer.metrics import KEYS, MetricsLogger, WandbWindow, read_metrics
from trainer.model import MMDiT


def tiny_model(seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    return MMDiT.from_preset("tiny", num_blocks=1)


def test_warmup_then_cosine_reaches_min_lr():
    schedule = WarmupSchedule(warmup_steps=4, total_steps=14, kind="cosine", min_factor=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # update 4 (step 3) has the full lr
    assert schedule(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(13) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)  # the last update: min_lr
    assert 0.1 < schedule(12) < schedule(4) < 1.0
    constant = WarmupSchedule(warmup_steps=2, total_steps=10, kind="constant")
    assert [constant(s) for s in (0, 1, 2, 9, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lr_schedule"):
        WarmupSchedule(1, 10, kind="linear")


def test_scheduler_state_round_trips_with_weights_only(tmp_path):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = build_scheduler(optimizer, 1e-3, 1e-4, warmup_steps=3, total_steps=10, kind="cosine")
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    fresh_optimizer = torch.optim.AdamW([param], lr=1e-3)
    fresh = build_scheduler(fresh_optimizer, 1e-3, 1e-4, warmup_steps=3, total_steps=10, kind="cosine")
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for _ in range(3):
        optimizer.step(), scheduler.step(), fresh_optimizer.step(), fresh.step()
        assert fresh.get_last_lr() == scheduler.get_last_lr()


def test_a_resumed_schedule_follows_changed_settings_and_keeps_unchanged_ones_to_the_bit():
    def run(steps, resume_from=None, **settings):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
        scheduler = build_scheduler(optimizer, 1e-3, 1e-4, warmup_steps=2, total_steps=10, kind="cosine")
        changes = []
        if resume_from is not None:
            optimizer.load_state_dict(resume_from[0])
            scheduler.load_state_dict(resume_from[1])
            betas = settings.pop("betas", (0.9, 0.999))
            new = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "total_steps": 10, "kind": "cosine", **settings}
            changes = continue_schedule(scheduler, **new) + apply_optimizer_settings(optimizer, betas, 0.01)
        lrs = []
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step(), scheduler.step()
        return lrs, (optimizer.state_dict(), scheduler.state_dict()), changes

    whole, _, _ = run(10)
    first, saved, _ = run(4)
    rest, _, changes = run(6, resume_from=saved)
    assert first + rest == whole and changes == []
    longer, _, changes = run(16, resume_from=saved, total_steps=20, lr=5e-4, betas=(0.9, 0.95))
    assert changes == ["lr 0.001 -> 0.0005", "total_steps 10 -> 20", "betas (0.9, 0.999) -> (0.9, 0.95)"]
    assert longer[0] == pytest.approx(5e-4 * WarmupSchedule(2, 20, "cosine", 1e-4 / 5e-4)(4))
    assert longer[-1] == pytest.approx(1e-4)


def test_the_timestep_shift_is_the_number_given_or_sd3s_for_the_batchs_pixels():
    assert timestep_shift(3.0, torch.Size([2, 16, 32, 32])) == 3.0
    assert timestep_shift("resolution", torch.Size([2, 16, 32, 32])) == 1.0  # 256 x 256 px: the base
    assert timestep_shift("resolution", torch.Size([2, 16, 64, 64])) == 2.0
    assert timestep_shift("resolution", torch.Size([2, 16, 32, 64])) == pytest.approx(math.sqrt(2))


def test_ema_moves_only_every_n_steps():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5, every=2, device="cpu")
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not ema.maybe_update(model, step=1)
    assert torch.equal(ema.model.weight, start)
    assert ema.maybe_update(model, step=2)
    assert torch.allclose(ema.model.weight, start + 0.5)
    assert not ema.model.weight.requires_grad


def test_checkpoint_steps_include_the_last():
    assert [s for s in range(1, 8) if is_checkpoint_step(s, every=3, total_steps=7)] == [3, 6, 7]


def test_metrics_truncated_to_the_resumed_step(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=4, start_step=0, wandb_mode="disabled", wandb_project="p",
                           wandb_run_id=None, run_config={}, progress=False, every=1)
    for step in range(1, 5):
        logger.log_step({key: float(step) for key in KEYS} | {"step": step})
    logger.close()
    with pytest.raises(KeyError, match="grad_norm"):
        MetricsLogger(tmp_path, 4, 4, "disabled", "p", None, {}, False, 1).log_step({"step": 5, "loss": 1.0})
    resumed = MetricsLogger(tmp_path, 4, start_step=2, wandb_mode="disabled", wandb_project="p", wandb_run_id=None,
                            run_config={}, progress=False, every=1)
    resumed.close()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]


def test_wandb_gets_a_point_every_log_every_steps_summing_up_its_window():
    window = WandbWindow(every=3, last_step=8)
    step_seconds = {1: 1.0, 2: 1.0, 3: 2.0, 4: 1.0, 5: 1.0, 6: 1.0, 7: 1.0, 8: 1.0}
    points = {}
    for step, seconds in step_seconds.items():
        values = {"step": step, "loss": float(step), "lr": step / 100, "grad_norm": 2.0 * step,
                  "images_per_s": 8 / seconds, "data_wait_frac": 0.5 if step == 3 else 0.0}
        if step == 5:
            values["val_loss"] = 0.25
        point = window.add(values)
        if point is not None:
            points[step] = point
    assert sorted(points) == [3, 5, 6, 8]  # the cadence, the step with a validation loss, the last step
    assert points[3] == pytest.approx({"loss": 2.0, "lr": 0.03, "grad_norm": 4.0, "images_per_s": 24 / 4.0,
                                       "data_wait_frac": 0.5 * 2.0 / 4.0})
    assert points[5] == pytest.approx({"loss": 4.5, "lr": 0.05, "grad_norm": 9.0, "images_per_s": 8.0,
                                       "data_wait_frac": 0.0, "val_loss": 0.25})
    assert points[6]["loss"] == 6.0 and points[8]["loss"] == 7.5


def test_wandb_offline_run_gets_an_id(tmp_path):
    logger = MetricsLogger(tmp_path, 1, 0, "offline", "test", None, {"a": 1}, False, 1)
    logger.log_step({key: 1.0 for key in KEYS} | {"step": 1})
    logger.close()
    assert logger.run_id and list((tmp_path / "wandb").glob(f"offline-run-*-{logger.run_id}"))


def test_wandb_records_a_run_that_ends_on_an_error_as_failed(tmp_path):
    # A failing rank leaves through os._exit, so wandb's own exit hooks never see the error.
    exit_codes = {}
    for failed in (False, True):
        logger = MetricsLogger(tmp_path / str(failed), 1, 0, "offline", "test", None, {}, False, 1)
        logger.close(failed=failed)
        [log_file] = (tmp_path / str(failed)).glob(f"wandb/offline-run-*-{logger.run_id}/logs/debug.log")
        exit_codes[failed] = re.findall(r"got exitcode: (\d+)", log_file.read_text())
    assert exit_codes == {False: ["0"], True: ["1"]}


def test_a_metrics_line_cut_short_by_a_crash_is_left_out_on_resume(tmp_path):
    lines = [json.dumps({key: 1.0 for key in KEYS} | {"step": step}) for step in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "lo')
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
    MetricsLogger(tmp_path, 4, start_step=2, wandb_mode="disabled", wandb_project="p", wandb_run_id=None,
                  run_config={}, progress=False, every=1).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines) + "\n"


def _save(tmp_path, step, model, world_size=2):
    for rank in range(world_size):
        save_rank_state(tmp_path, step, rank, {"generator": torch.Generator().manual_seed(rank).get_state(),
                                               "sampler": {"epoch": rank, "batches_used": step}})
    files = wait_for_rank_states(tmp_path, step, world_size, timeout_s=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 16, 4, 4), torch.rand(1), torch.zeros(1, 154, 64), torch.zeros(1, 64)).sum().backward()
    optimizer.step()
    return save_checkpoint(tmp_path, step, model, model, EncodersConfig(preset="tiny"),
                           {"loss": 0.5 / step, "dataset_version": "v1", "resolution": 256},
                           {"optimizer": optimizer.state_dict(), "wandb_run_id": "abc"}, files, keep=2)


def test_resumable_state_round_trips_and_old_steps_are_pruned(tmp_path):
    model = tiny_model()
    for step in (2, 4, 6):
        _save(tmp_path, step, model)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000004", "step_0000006"]
    assert resolve_checkpoint(tmp_path) == step_folder(tmp_path, 6)
    assert not staging_folder(tmp_path, 6).exists()
    state = load_trainer_state(tmp_path)
    assert state["step"] == 6 and state["wandb_run_id"] == "abc"
    assert state["optimizer"]["state"][0]["exp_avg"].shape == next(model.parameters()).shape
    rank1 = load_rank_state(tmp_path, 1)
    assert rank1["sampler"] == {"epoch": 1, "batches_used": 6}
    assert torch.equal(rank1["generator"], torch.Generator().manual_seed(1).get_state())
    assert checkpoint_metadata(tmp_path) == {"step": 6, "loss": 0.5 / 6, "dataset_version": "v1", "resolution": 256}
    loaded = load_model(tmp_path, prefer_ema=False)
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_missing_rank_state_names_the_rank(tmp_path):
    save_rank_state(tmp_path, 3, 0, {})
    with pytest.raises(CheckpointWriteError, match=r"ranks \[1, 2\] did not write"):
        wait_for_rank_states(tmp_path, 3, world_size=3, timeout_s=0.2)


def test_clean_stale_writes_keeps_complete_checkpoints(tmp_path):
    model = tiny_model()
    _save(tmp_path, 2, model)
    save_rank_state(tmp_path, 4, 0, {})  # a run killed while staging step 4
    (tmp_path / ".step_0000004.x1y2.tmp").mkdir()  # ... or while writing its folder
    clean_stale_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000002"]
    assert json.loads((tmp_path / "step_0000002" / "meta.json").read_text())["step"] == 2


def test_a_step_moved_aside_by_a_run_killed_while_saving_it_again_goes_back_in_place(tmp_path):
    model = tiny_model()
    _save(tmp_path, 2, model)
    (tmp_path / "step_0000002").rename(tmp_path / ".step_0000002.ab12.tmp.old")  # the old copy, aside
    (tmp_path / ".step_0000002.cd34.tmp" / "model").mkdir(parents=True)  # the new one, never moved in
    clean_stale_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000002"]
    assert json.loads((tmp_path / "step_0000002" / "meta.json").read_text())["step"] == 2


def test_prune_never_deletes_latest(tmp_path):
    for name in ("step_0000001", "step_0000002", "step_0000003"):
        (tmp_path / name / "model").mkdir(parents=True)
    (tmp_path / "latest").write_text("step_0000001\n")
    deleted = prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in deleted] == ["step_0000002"]


def test_prune_keeps_the_newest_up_to_the_saved_step_and_leaves_later_ones(tmp_path):
    """A run rolled back to step 2000 (``latest`` edited) saves 2100..2400 beside the abandoned 3000..5000:
    its own checkpoints are the ones kept, by step number, not by name among all of them."""
    for step in (3000, 4000, 5000, 2000, 2100, 2200, 2300, 2400, 12_345_678):
        (tmp_path / f"step_{step:07d}" / "model").mkdir(parents=True)
    (tmp_path / "step_notes").mkdir()  # not a step folder: never touched
    (tmp_path / "latest").write_text("step_0002400\n")
    deleted = prune_checkpoints(tmp_path, keep=3, saved_step=2400)
    assert [p.name for p in deleted] == ["step_0002000", "step_0002100"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "step_0002200", "step_0002300", "step_0002400", "step_0003000", "step_0004000", "step_0005000",
        "step_12345678", "step_notes"]

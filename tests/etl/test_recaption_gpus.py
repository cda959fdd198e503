"""One GPU per recaption step: the slots are exclusive, freed when a step ends, and name the device."""

from __future__ import annotations

import os
import threading
import time

from etl.config import RecaptionConfig
from etl.recaption.gpus import claim_gpu, on_a_free_gpu, on_gpu


def test_concurrent_steps_get_different_gpus_and_wait_for_a_free_one(tmp_path):
    taken = []
    with claim_gpu(2, tmp_path) as first, claim_gpu(2, tmp_path) as second:
        assert {first, second} == {0, 1}
        waiter = threading.Thread(target=lambda: taken.extend(_claim_once(tmp_path)))
        waiter.start()
        time.sleep(1.5)
        assert taken == []  # both slots held: the third step waits
    waiter.join(timeout=10)
    assert taken in ([0], [1])


def _claim_once(folder):
    with claim_gpu(2, folder) as slot:
        return [slot]


def test_the_slot_names_the_device_of_each_backend(monkeypatch):
    assert on_gpu(RecaptionConfig(backend="transformers"), 3).device == "cuda:3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert on_gpu(RecaptionConfig(backend="vllm"), 1).device == "cuda"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


def test_cpu_and_smoke_captioning_claim_nothing():
    for cfg in (RecaptionConfig(backend="alt-text"), RecaptionConfig(backend="transformers", device="cpu")):
        with on_a_free_gpu(cfg) as used:
            assert used is cfg

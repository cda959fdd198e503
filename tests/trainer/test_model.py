import argparse
import math
import re

import pytest
import torch
import torch.nn.functional as F

from trainer.model import MMDiT, MMDiTConfig, PRESETS, apply_rope, patch_positions, rope2d_angles

SMALL = dict(dim=64, num_blocks=2, num_heads=2, text_dim=24, pooled_dim=16, text_len_per_encoder=5, in_channels=4)


def small_model(seed=0, **overrides) -> MMDiT:
    """A small MMDiT whose zero-initialised gates and output layer are given random values, so every
    input reaches the output (at init the model is exactly v = 0)."""
    torch.manual_seed(seed)
    model = MMDiT.from_preset("tiny", **{**SMALL, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(model: MMDiT, batch=2, height=8, width=8, seed=1):
    cfg = model.mmdit_config
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.in_channels, height, width, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g), torch.randn(batch, cfg.pooled_dim, generator=g))


@pytest.mark.parametrize("positional_encoding", ["rope2d", "absolute", "nope"])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("height,width", [(8, 8), (4, 12), (10, 6)])
def test_shapes_square_and_non_square(positional_encoding, mlp, height, width):
    model = small_model(positional_encoding=positional_encoding, mlp=mlp)
    x, t, text, pooled = inputs(model, batch=3, height=height, width=width)
    v = model(x, t, text, pooled)
    assert v.shape == x.shape
    assert torch.isfinite(v).all()


def test_tiny_preset_starts_at_zero_velocity_and_keeps_the_reference_structure():
    model = MMDiT.from_preset("tiny")
    cfg = model.mmdit_config
    assert (cfg.num_text_encoders, cfg.text_len_per_encoder, cfg.positional_encoding) == (2, 77, "rope2d")
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000
    x, t, text, pooled = inputs(model)
    assert torch.equal(model(x, t, text, pooled), torch.zeros_like(x))
    assert model.time_embed.scale.item() == 1000.0


@pytest.mark.parametrize("preset, depth, count", [("reference-1.2b", 19, 1_223_339_521), ("mid-300m", 12, 307_946_497)])
def test_large_preset_parameter_counts_on_meta_device(preset, depth, count):
    with torch.device("meta"):
        model = MMDiT.from_preset(preset)
    cfg = model.mmdit_config
    assert (cfg.num_blocks, cfg.dim, cfg.num_heads, cfg.patch_size, cfg.in_channels) == (depth, 64 * depth, depth, 2, 16)
    assert (cfg.text_dim, cfg.pooled_dim, cfg.text_len) == (2304, 768, 154)  # the reference encoders' widths
    assert sum(p.numel() for p in model.parameters()) == count


def test_joint_attention_equals_attention_over_concatenated_tokens_by_hand():
    model = small_model(positional_encoding="nope")
    block = model.blocks[0]
    g = torch.Generator().manual_seed(3)
    x, c, cond = torch.randn(2, 16, 64, generator=g), torch.randn(2, 10, 64, generator=g), torch.randn(2, 64, generator=g)
    mx = block.image.modulation(cond)[:, None].chunk(6, dim=-1)
    mc = block.text.modulation(cond)[:, None].chunk(6, dim=-1)
    out_x, out_c = block.joint_attention(x, c, mx[0], mx[1], mc[0], mc[1], None)

    def heads(stream, h, shift, scale):
        h = F.layer_norm(h, (64,), eps=1e-6) * (1 + scale) + shift
        q, k, v = (h @ stream.qkv.weight.T + stream.qkv.bias).split(64, dim=-1)
        split = lambda a: a.view(2, -1, 2, 32).transpose(1, 2)  # (B, heads, L, head_dim)
        rms = lambda a, w: a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        return rms(split(q), stream.q_norm.weight), rms(split(k), stream.k_norm.weight), split(v)

    qx, kx, vx = heads(block.image, x, mx[0], mx[1])
    qc, kc, vc = heads(block.text, c, mc[0], mc[1])
    q, k, v = torch.cat([qx, qc], 2), torch.cat([kx, kc], 2), torch.cat([vx, vc], 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)
    mixed = (weights @ v).transpose(1, 2).reshape(2, 26, 64)
    expected_x = mixed[:, :16] @ block.image.proj.weight.T + block.image.proj.bias
    expected_c = mixed[:, 16:] @ block.text.proj.weight.T + block.text.proj.bias
    torch.testing.assert_close(out_x, expected_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_c, expected_c, rtol=1e-5, atol=1e-5)


def _rope_logits(grid_h, grid_w, rescale, q, k):
    rows, cols = patch_positions(grid_h, grid_w, rescale, "cpu")
    angles = rope2d_angles(rows, cols, q.shape[-1], 10000.0)
    n = grid_h * grid_w
    qr = apply_rope(q.expand(1, 1, n, -1), angles.cos(), angles.sin())[0, 0]
    kr = apply_rope(k.expand(1, 1, n, -1), angles.cos(), angles.sin())[0, 0]
    return (qr @ kr.T).double(), rows, cols


def test_rope2d_logits_depend_only_on_relative_row_and_column_offsets():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(32, generator=g), torch.randn(32, generator=g)
    logits, rows, cols = _rope_logits(4, 5, 1.0, q, k)
    by_offset: dict[tuple[int, int], list[float]] = {}
    for i in range(20):
        for j in range(20):
            by_offset.setdefault((int(rows[i] - rows[j]), int(cols[i] - cols[j])), []).append(logits[i, j].item())
    assert len(by_offset) == 7 * 9
    for values in by_offset.values():
        assert max(values) - min(values) < 1e-4
    distinct = sorted(v[0] for v in by_offset.values())
    assert distinct[-1] - distinct[0] > 1.0  # offsets do change the logits: positions are encoded


def test_rope2d_rescale_maps_a_finetuning_grid_onto_the_original_positions():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(32, generator=g), torch.randn(32, generator=g)
    original, _, _ = _rope_logits(4, 4, 1.0, q, k)
    finetune, _, _ = _rope_logits(8, 8, 256 / 512, q, k)
    # token (2r, 2c) of the 8x8 grid at max_res 512 sits where token (r, c) sat at max_res_orig 256
    even = [(2 * r) * 8 + 2 * c for r in range(4) for c in range(4)]
    torch.testing.assert_close(finetune[even][:, even], original, rtol=1e-5, atol=1e-5)


def test_text_tokens_carry_no_position():
    # permuting one encoder's text rows permutes nothing in the image output: text has no position
    model = small_model()
    x, t, text, pooled = inputs(model)
    perm = torch.cat([torch.randperm(5), 5 + torch.randperm(5)])
    torch.testing.assert_close(model(x, t, text[:, perm], pooled), model(x, t, text, pooled), rtol=1e-5, atol=1e-5)


def test_drop_masks_zero_exactly_the_intended_conditions():
    model = small_model()
    x, t, text, pooled = inputs(model, batch=3)
    drop_text = torch.tensor([[True, False], [False, True], [False, False]])
    drop_pooled = torch.tensor([False, False, True])
    dropped_text, dropped_pooled = model.drop_conditions(text, pooled, drop_text, drop_pooled)
    expected_text, expected_pooled = text.clone(), pooled.clone()
    expected_text[0, :5] = 0
    expected_text[1, 5:] = 0
    expected_pooled[2] = 0
    assert torch.equal(dropped_text, expected_text)
    assert torch.equal(dropped_pooled, expected_pooled)

    with torch.no_grad():
        plain = model(x, t, text, pooled)
        masked = model(x, t, text, pooled, drop_text=drop_text, drop_pooled=drop_pooled)
        by_hand = model(x, t, expected_text, expected_pooled)
    assert torch.equal(masked, by_hand)
    for i in range(3):  # every sample lost one condition, and it mattered
        assert not torch.allclose(masked[i], plain[i])


def test_a_per_sample_text_mask_drops_every_encoder():
    model = small_model()
    x, t, text, pooled = inputs(model)
    with torch.no_grad():
        all_text = model(x, t, text, pooled, drop_text=torch.tensor([True, False]))
        by_hand = model(x, t, torch.cat([torch.zeros_like(text[:1]), text[1:]]), pooled)
    assert torch.equal(all_text, by_hand)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = small_model(mlp="gelu", positional_encoding="absolute")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = MMDiT.from_pretrained(tmp_path, low_cpu_mem_usage=False).eval()
    assert loaded.mmdit_config == model.mmdit_config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[key], restored[key]) for key in original)
    x, t, text, pooled = inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text, pooled), model(x, t, text, pooled))


def test_cast_to_bf16_for_sampling_the_time_embedding_stays_fp32_and_the_model_runs(tmp_path):
    model = small_model()
    with torch.no_grad():
        model.time_embed.scale.fill_(1001.5)  # a trained scale that bf16 cannot hold (it would read 1000 or 1002)
    model.save_pretrained(tmp_path)
    loaded = MMDiT.from_pretrained(tmp_path, low_cpu_mem_usage=False).to_inference_dtype(torch.bfloat16).eval()
    assert loaded.time_embed.scale.dtype == torch.float32 and loaded.time_embed.scale.item() == 1001.5
    assert loaded.patch_embed.weight.dtype == torch.bfloat16
    x, t, text, pooled = inputs(model)
    with torch.no_grad():
        reference = model.time_embed(t)
        assert torch.equal(loaded.time_embed(t), reference)
        v = loaded(x.bfloat16(), t.bfloat16(), text.bfloat16(), pooled.bfloat16())
        expected = model(x, t, text, pooled)
    assert v.dtype == torch.bfloat16
    torch.testing.assert_close(v.float(), expected, rtol=0.1, atol=0.1)


def test_activation_checkpointing_gives_the_same_gradients():
    plain = small_model().train()
    checkpointed = small_model(checkpoint_attn=True, checkpoint_mlp=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x, t, text, pooled = inputs(plain)
    for model in (plain, checkpointed):
        model(x, t, text, pooled).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_blocks_match_eager_over_bucket_sizes_in_four_graphs():
    """compile_blocks: the same outputs and gradients as eager for several image sizes and a no-grad pass,
    from one graph for the blocks and one for the last block, each with and without grad; a new bucket size
    compiles nothing more."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = small_model().train()
    compiled = small_model().train()
    compiled.compile_blocks()
    for height, width in [(8, 8), (4, 12), (10, 6), (6, 6)]:
        batch = inputs(eager, height=height, width=width)
        for model in (eager, compiled):
            model.zero_grad()
            model(*batch).square().mean().backward()
        for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=f"{name} at {height}x{width}")
        with torch.no_grad():
            torch.testing.assert_close(compiled(*batch), eager(*batch), rtol=1e-4, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4


def test_last_block_has_no_unused_text_output_parameters():
    model = small_model().train()
    x, t, text, pooled = inputs(model)
    model(x, t, text, pooled).square().mean().backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert unused == []  # DDP without find_unused_parameters needs every parameter to get a gradient


@pytest.mark.parametrize("bad,message", [
    (lambda x, t, text, pooled: (x[:, :, :7], t, text, pooled), "multiples of patch_size"),
    (lambda x, t, text, pooled: (x, t, text[:, :9], pooled), "2 encoders x 5 tokens"),
    (lambda x, t, text, pooled: (x, t[:1], text, pooled), "t must be"),
    (lambda x, t, text, pooled: (x, t, text, pooled[:, :3]), "pooled must be"),
    (lambda x, t, text, pooled: (x[:, :3], t, text, pooled), "x must be"),
])
def test_bad_inputs_get_clear_errors(bad, message):
    model = small_model()
    with pytest.raises(ValueError, match=message):
        model(*bad(*inputs(model)))


def test_bad_configs_and_presets_get_clear_errors():
    with pytest.raises(ValueError, match="num_heads"):
        MMDiTConfig(dim=100, num_heads=3)
    with pytest.raises(ValueError, match="positional_encoding"):
        MMDiTConfig(positional_encoding="rope")
    with pytest.raises(ValueError, match="unknown MMDiT preset"):
        MMDiT.from_preset("huge")
    assert set(PRESETS) >= {"tiny", "reference-1.2b"}


def test_flash_attention_request_without_flash_attn_on_cuda_is_a_clear_error():
    model = small_model(attention="flash")
    with pytest.raises(RuntimeError, match="flash-attn"):
        model(*inputs(model))


def _gpu_benchmark():
    """benchmarks/gpu/model_step.py, a script outside any package, imported by path."""
    import importlib.util
    import sys
    from pathlib import Path

    if "benchmark_gpu_model_step" not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "model_step.py"
        spec = importlib.util.spec_from_file_location("benchmark_gpu_model_step", path)
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["benchmark_gpu_model_step"]


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_gpu_benchmark_flop_formula_matches_torch_flop_counter(mlp):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    forward_flops = _gpu_benchmark().forward_flops
    model = MMDiT.from_preset("tiny", mlp=mlp)
    cfg = model.mmdit_config
    x = torch.randn(2, cfg.in_channels, 6, 10)  # 48 x 80 px, 3 x 5 patches
    counter = FlopCounterMode(display=False)
    # the math backend runs attention as matmuls the counter sees (it has no rule for the CPU flash kernel)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, torch.rand(2), torch.randn(2, cfg.text_len, cfg.text_dim), torch.randn(2, cfg.pooled_dim))
    assert 2 * forward_flops(cfg, 48, 80) == counter.get_total_flops()


@pytest.mark.parametrize("pixels", [256, 512])
def test_gpu_benchmark_flop_formula_counts_the_reference_model_the_counter_does(pixels):
    """On the meta device: shapes and FLOPs without the memory or the time of 1.2B parameters."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = MMDiT.from_preset("reference-1.2b")
        cfg = model.mmdit_config
        inputs = (torch.randn(1, cfg.in_channels, pixels // 8, pixels // 8), torch.rand(1),
                  torch.randn(1, cfg.text_len, cfg.text_dim), torch.randn(1, cfg.pooled_dim))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(*inputs)
    assert _gpu_benchmark().forward_flops(cfg, pixels, pixels) == counter.get_total_flops()  # one image


def test_gpu_benchmark_smoke_run_prints_a_table_and_exits_zero(capsys):
    assert _gpu_benchmark().main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "training step on CPU" in out and "forward FLOPs per image" in out
    rows = [line for line in out.splitlines() if line.startswith("| 64 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["sdpa", "sdpa + ckpt"]
    assert not any("failed" in row for row in rows)
    # the profiled row's time by category: the matmuls of a tiny model are a large share, never all of it
    shares = dict(re.findall(r"^\| (matmul|attention|other) \| ([\d.]+)%", out, re.M))
    assert "64:2:sdpa: Profile of 3 steps" in out and set(shares) == {"matmul", "attention", "other"}
    assert 10 < float(shares["matmul"]) < 90


def test_gpu_benchmark_lists_the_rows_past_its_deadline_as_skipped(capsys):
    assert _gpu_benchmark().main(["--smoke", "--deadline-s", "0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 2 and all("| skipped: 0 s left of --deadline-s 0 |" in row for row in rows)


def test_gpu_benchmark_rows_parse_from_their_spec():
    run_cls = _gpu_benchmark().Run
    run = run_cls.parse("512:32:cudnn+ckpt+compile")
    assert (run.resolution, run.batch, run.attention, run.checkpointing, run.compiled) == (512, 32, "cudnn", True, True)
    assert run.spec == "512:32:cudnn+ckpt+compile" and run.name == "cudnn + ckpt + compile" and not run.static
    static = run_cls.parse("512:32:sdpa+compile+static")
    assert static.static and static.spec == "512:32:sdpa+compile+static" and static.name == "sdpa + compile (static)"
    for bad in ("512:32", "512:x:sdpa", "512:32:xformers", "512:32:sdpa+fast", "512:32:sdpa+static"):
        with pytest.raises(argparse.ArgumentTypeError):
            run_cls.parse(bad)

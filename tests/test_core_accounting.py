"""cat_core.accounting: MAC formulas against a hand count and against torch's FlopCounterMode."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cat_core import CATSettings
from cat_core.accounting import JointBlockLayout, MacLedger, MMDiTShape, joint_block_macs, mmdit_outer_macs
from cat_core.blocks import mmdit as mmdit_blocks
from cat_core.blocks.hooks import CALL_KEY
from cat_core.runtime import CallMode
from tests import cat_harness, reference_mmdit

LAYOUTS = ["sd3", "sd35_large", "sd35_medium"]


def _matmul_attention(q, k, v, heads):
    """Attention written as two explicit batched matmuls, so FlopCounterMode sees them on any device
    (the fused CPU SDPA kernel is not in the counter's registry)."""
    b, _, d = q.shape
    q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / (d // heads) ** 0.5, dim=-1)
    return torch.matmul(w, v).transpose(1, 2).reshape(b, -1, d)


@pytest.fixture
def countable_attention(monkeypatch):
    monkeypatch.setattr(reference_mmdit, "attention", _matmul_attention)


def _macs(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2


# ------------------------------------------------------------------------------ hand count
def _mm(m, k, n):
    """MACs of an [m, k] x [k, n] product."""
    return m * k * n


def _hand_block(rows, txt, img_q, img_kv, d, pre_only=False, x_attn=False, img_proj=None):
    """One joint block, matrix product by matrix product (mlp hidden 4d, heads * head_dim = d).

    img_proj: image tokens whose qkv projections run (the first block refreshing all keys/values).
    """
    h = 4 * d
    img_proj = img_q if img_proj is None else img_proj
    total = 0
    # context stream
    total += _mm(rows, d, (2 if pre_only else 6) * d)  # adaLN modulation of the pooled vector
    total += _mm(rows * txt, d, 3 * d)  # qkv
    if not pre_only:
        total += _mm(rows * txt, d, d)  # attention output projection
        total += _mm(rows * txt, d, h) + _mm(rows * txt, h, d)  # MLP
    # image stream (only the recomputed queries)
    total += _mm(rows, d, (9 if x_attn else 6) * d)
    total += _mm(rows * img_proj, d, 3 * d)
    total += _mm(rows * img_q, d, d)
    total += _mm(rows * img_q, d, h) + _mm(rows * img_q, h, d)
    # joint attention: QK^T and AV, all heads together
    nq, nk = txt + img_q, txt + img_kv
    total += _mm(rows * nq, d, nk) + _mm(rows * nq, nk, d)
    if x_attn:  # MMDiT-X second, image-only attention: qkv2, QK^T, AV, proj2
        total += _mm(rows * img_proj, d, 3 * d)
        total += _mm(rows * img_q, d, img_kv) + _mm(rows * img_q, img_kv, d)
        total += _mm(rows * img_q, d, d)
    return total


@pytest.mark.parametrize("pre_only,x_attn", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("rows,txt,img_q,img_kv,d", [(1, 0, 4, 4, 64), (2, 3, 5, 7, 64), (3, 16, 30, 100, 128), (2, 77, 1, 4096, 192)])
def test_joint_block_macs_matches_hand_count(pre_only, x_attn, rows, txt, img_q, img_kv, d):
    layout = JointBlockLayout(context_pre_only=pre_only, image_self_attention=x_attn)
    assert joint_block_macs(layout, rows, txt, img_q, img_kv, d) == _hand_block(rows, txt, img_q, img_kv, d, pre_only, x_attn)


@pytest.mark.parametrize("pre_only,x_attn", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("rows,txt,img_q,img_kv,d", [(1, 0, 4, 4, 64), (2, 3, 5, 7, 64), (2, 77, 1, 4096, 192)])
def test_joint_block_macs_with_every_key_projected(pre_only, x_attn, rows, txt, img_q, img_kv, d):
    layout = JointBlockLayout(context_pre_only=pre_only, image_self_attention=x_attn)
    got = joint_block_macs(layout, rows, txt, img_q, img_kv, d, img_proj=img_kv)
    assert got == _hand_block(rows, txt, img_q, img_kv, d, pre_only, x_attn, img_proj=img_kv)
    # Only the qkv projections of the unselected tokens are added: 3 d^2 each (6 d^2 with MMDiT-X).
    extra = rows * (img_kv - img_q) * 3 * d * d * (2 if x_attn else 1)
    assert got - joint_block_macs(layout, rows, txt, img_q, img_kv, d) == extra


def test_joint_block_macs_numbers():
    # d=64, 1 row, 2 text tokens, 3 image tokens, dense, plain block, written out in full:
    # adaLN 2*64*384, qkv 5*64*192, proj 5*64*64, mlp 5*2*64*256, attention 2*5*5*64
    expected = 2 * 64 * 384 + 5 * 64 * 192 + 5 * 64 * 64 + 5 * 2 * 64 * 256 + 2 * 5 * 5 * 64
    assert joint_block_macs(JointBlockLayout(), 1, 2, 3, 3, 64) == expected
    # Pruning the queries is linear in the image-query count; the keys keep their length.
    full = joint_block_macs(JointBlockLayout(), 2, 8, 40, 40, 64)
    part = joint_block_macs(JointBlockLayout(), 2, 8, 10, 40, 64)
    assert part < full
    assert joint_block_macs(JointBlockLayout(), 4, 8, 40, 40, 64) == 2 * full  # linear in rows


def test_outer_macs_matches_hand_count():
    shape = MMDiTShape(dim=128, in_channels=16, out_channels=16, patch=2, adm_dim=64, context_dim=96)
    rows, txt, img = 3, 11, 35
    expected = (
        _mm(rows * img, 16 * 4, 128)  # patch conv
        + _mm(rows, 256, 128) + _mm(rows, 128, 128)  # timestep MLP
        + _mm(rows, 64, 128) + _mm(rows, 128, 128)  # pooled-vector MLP
        + _mm(rows * txt, 96, 128)  # context embedder
        + _mm(rows, 128, 256)  # final adaLN
        + _mm(rows * img, 128, 4 * 16)  # final linear
    )
    assert mmdit_outer_macs(shape, rows, txt, img) == expected
    bare = MMDiTShape(dim=128, in_channels=16, out_channels=16, patch=2, adm_dim=0, context_dim=0)
    assert mmdit_outer_macs(bare, rows, txt, img) == expected - _mm(rows, 64, 128) - _mm(rows, 128, 128) - _mm(rows * txt, 96, 128)


# ------------------------------------------------------------------------------ ledger
def test_mac_ledger_totals_and_saved_fraction():
    led = MacLedger()
    assert led.saved_fraction() == 0.0 and led.total_dense == 0
    led.add("a", 30, 100)
    led.add("b", 50, 50)
    led.add("a", 20, 100)
    assert led.computed == {"a": 50, "b": 50} and led.dense == {"a": 200, "b": 50}
    assert led.total_computed == 100 and led.total_dense == 250
    assert led.saved_fraction() == pytest.approx(1 - 100 / 250)
    other = MacLedger()
    other.add("b", 10, 50)
    other.add("c", 0, 25)
    led.merge(other)
    assert led.computed == {"a": 50, "b": 60, "c": 0} and led.dense == {"a": 200, "b": 100, "c": 25}
    assert led.saved_fraction() == pytest.approx(1 - 110 / 325)
    dense_only = MacLedger()
    dense_only.add("x", 7, 7)
    assert dense_only.saved_fraction() == 0.0


# ------------------------------------------------------------------------------ describe
def _hand_layouts(arch, depth):
    """Block layouts of cat_harness.tiny_model: the last block is pre-only; sd35_medium has an
    MMDiT-X (image self-attention) block 0."""
    return [JointBlockLayout(context_pre_only=i == depth - 1, image_self_attention=arch == "sd35_medium" and i == 0)
            for i in range(depth)]


def _hand_shape(model):
    return MMDiTShape(dim=model.hidden_size, in_channels=16, out_channels=16, patch=2, adm_dim=64, context_dim=64)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_describe_reads_the_model(layout):
    model = cat_harness.tiny_model(layout, depth=3)
    info = mmdit_blocks.describe(model)
    assert info.arch == "mmdit" and info.patch == 2 and info.num_blocks == 3
    shape = MMDiTShape(dim=192, in_channels=16, out_channels=16, patch=2, adm_dim=64, context_dim=64)
    for rows, txt, img in ((1, 16, 64), (4, 77, 35)):
        assert info.outer_macs(rows, txt, img) == mmdit_outer_macs(shape, rows, txt, img)


def test_describe_rejects_other_models():
    with pytest.raises(TypeError):
        mmdit_blocks.describe(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------ vs FlopCounterMode
def _inputs(batch, hw, txt=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *hw, generator=g)
    ctx = torch.randn(batch, txt, 64, generator=g)
    y = torch.randn(batch, 64, generator=g)
    return x, ctx, y


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dense_forward_matches_flop_counter(layout, countable_attention):
    model = cat_harness.tiny_model(layout, depth=3)
    batch, hw, txt = 2, (10, 13), 16  # odd width: 5 x 7 = 35 tokens
    x, ctx, y = _inputs(batch, hw, txt)
    t = torch.full((batch,), 700.0)
    with torch.no_grad():
        counted = _macs(lambda: model(x, t, context=ctx, y=y))
    n_img = 5 * 7
    formula = sum(joint_block_macs(bl, batch, txt, n_img, n_img, model.hidden_size) for bl in _hand_layouts(layout, 3))
    formula += mmdit_outer_macs(_hand_shape(model), batch, txt, n_img)
    assert formula == pytest.approx(counted, rel=0.02)


@pytest.mark.parametrize("refresh_first_block", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ledger_of_dense_capture_and_pruned_calls_matches_flop_counter(layout, refresh_first_block, countable_attention):
    """Drive a run through warm-up by hand; count each call's forward; compare with the ledger."""
    model = cat_harness.tiny_model(layout, depth=3)
    settings = CATSettings(keep_ratio=0.3, warmup_steps=2, num_clusters=4, refresh_first_block=refresh_first_block)
    options, run = cat_harness.patch_options(model, settings)
    batch, hw, txt = 2, (12, 10), 16  # 6 x 5 = 30 tokens, budget 9
    x, ctx, y = _inputs(batch, hw, txt, seed=1)
    keys = ("uncond", "cond")
    seen = {}
    dense_counted = None
    with torch.no_grad():
        for step in range(4):
            call = run.begin_call(x.shape, keys, x.device)
            opts = dict(options)
            opts[CALL_KEY] = call
            t = torch.full((batch,), 1000.0 * (1 - step / 4))
            before_c, before_d = run.stats.ledger.total_computed, run.stats.ledger.total_dense
            out = {}
            counted = _macs(lambda: out.setdefault("v", model(x, t, context=ctx, y=y, transformer_options=opts)))
            merged, _ = run.end_call(call, out["v"])
            computed = run.stats.ledger.total_computed - before_c
            dense = run.stats.ledger.total_dense - before_d
            assert computed == pytest.approx(counted, rel=0.005), (step, call.mode)
            if call.mode is CallMode.DENSE:
                dense_counted = counted
            else:
                assert dense == pytest.approx(dense_counted, rel=0.02)
            seen[call.mode] = (computed, dense, counted)
            x = x - 0.2 * merged
            run.on_step_end(step)
    assert set(seen) == {CallMode.DENSE, CallMode.CAPTURE, CallMode.PRUNED}
    computed, dense, counted = seen[CallMode.PRUNED]
    assert counted < 0.75 * dense_counted  # the pruned forward really did less work
    run.finish()


@pytest.mark.parametrize("steps,warmup,cooldown,keep,refresh", [(12, 4, 1, 0.3, True), (10, 3, 0, 0.5, False), (6, 8, 1, 0.3, True)])
def test_projected_saving_is_what_a_run_counts(steps, warmup, cooldown, keep, refresh):
    """The projection used for SD3-medium figures equals the ledger of a real run at the same scale."""
    from cat_core.accounting import projected_saving
    from tests import cat_harness

    model = cat_harness.tiny_model("sd3", depth=2)
    settings = CATSettings(keep_ratio=keep, warmup_steps=warmup, cooldown_steps=cooldown, refresh_first_block=refresh)
    cond, uncond = cat_harness.random_cond(1, 1), cat_harness.random_cond(1, 2)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    _, stats = cat_harness.sample(model, cond=cond, uncond=uncond, noise=noise, steps=steps, settings=settings)
    scale = dict(depth=2, dim=128, rows=2, txt=16, img=64, adm_dim=64, context_dim=64)
    assert projected_saving(settings, steps, scale) == pytest.approx(stats.ledger.saved_fraction(), abs=1e-12)
    if warmup >= steps:
        assert stats.ledger.saved_fraction() == 0.0


def test_projected_saving_at_sd3_medium_scale():
    from cat_core.accounting import projected_saving

    defaults = CATSettings()
    assert 0.4 < projected_saving(defaults, 28) < projected_saving(defaults, 50) < 0.7
    assert projected_saving(CATSettings(cooldown_steps=0), 28) > projected_saving(defaults, 28)
    assert projected_saving(defaults, 8) == 0.0  # warm-up 8 of 8 steps: nothing pruned

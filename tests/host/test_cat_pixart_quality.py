"""Quality on a trained PixArt-Σ-layout model: the tiny fixture sampled through ComfyUI, patched vs unpatched.

tests/fixtures/tiny_pixart_t2i.safetensors is ComfyUI's PixArtMS (EPS, ComfyUI's PixArt schedule)
trained on the SD3 fixture's synthetic task; its output cache holds noise predictions, so this
checks the EPS merge where random weights cannot (they say nothing about which tokens matter).
"""
from __future__ import annotations

import pytest
import torch

from tests.host.locate import skip_for_missing
from tests.host import comfy_env as ce
from tests.host import comfy_env_pixart as cp

pytestmark = pytest.mark.host

STEPS, CFG, KEEP = 28, 4.5, 0.3
LATENT_HW = (64, 64)  # 512 x 512, the fixture's training size


@pytest.fixture(scope="module")
def setup(comfy):
    from tests.fixtures import tiny_pixart, tiny_t2i

    if not __import__("os").path.isfile(tiny_pixart.FIXTURE_PATH):
        skip_for_missing("tiny_pixart_t2i.safetensors not present")
    return ce.import_pack(), cp.load_pixart_file(tiny_pixart.FIXTURE_PATH), tiny_pixart, tiny_t2i


def images(model, tiny_pixart, prompts, seed=0):
    out = []
    for i, prompt in enumerate(prompts):
        latent = ce.sample(model, seed=seed + i, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal",
                           positive=cp.pixart_cond(prompt), negative=cp.pixart_cond(""),
                           latent_image=cp.empty_latent(1, LATENT_HW))
        out.append(tiny_pixart.latent_to_rgb(latent))
    return torch.cat(out)


@pytest.fixture(scope="module")
def reference(setup):
    _, model, tiny_pixart, tiny_t2i = setup
    return images(model, tiny_pixart, tiny_t2i.EVAL_PROMPTS)


def patched_run(setup, **kw):
    pack, model, tiny_pixart, tiny_t2i = setup
    patched = pack.nodes.patch.apply_cat(model, pack.cat_core.CATSettings(keep_ratio=KEEP, **kw))
    return images(patched, tiny_pixart, tiny_t2i.EVAL_PROMPTS), pack.nodes.patch.holder_of(patched).last_stats


def psnr(pack, a, b):
    return __import__(pack.__name__ + ".cat_core.metrics", fromlist=["psnr"]).psnr(a, b)


def test_fixture_samples_show_the_prompt(setup, reference):
    """Sanity of the fixture: most samples are closer to their own prompt's render than to any other's."""
    _, _, _, tiny_t2i = setup
    prompts = list(tiny_t2i.EVAL_PROMPTS)
    errors = torch.stack([tiny_t2i.render_error(reference, [p] * len(prompts)) for p in prompts], dim=1)
    assert (errors.argmin(dim=1) == torch.arange(len(prompts))).float().mean() >= 0.75, errors


def test_keep_03_with_the_defaults_stays_close_and_beats_random(setup, reference):
    pack = setup[0]
    cat_images, stats = patched_run(setup)
    random_images, _ = patched_run(setup, selection="random")
    assert stats.fallback_reason is None and "pruned" in {c.mode for c in stats.calls}
    cat_db, random_db = psnr(pack, cat_images, reference), psnr(pack, random_images, reference)
    print(f"PixArt fixture keep 0.3: CAT {float(cat_db.mean()):.2f} dB (worst {float(cat_db.min()):.2f}), "
          f"random {float(random_db.mean()):.2f} dB (worst {float(random_db.min()):.2f}); MACs saved {stats.ledger.saved_fraction():.3f}")
    # floors under today's measurement (README), so a regression fails
    assert float(cat_db.mean()) >= CAT_FLOOR_DB, cat_db.tolist()
    assert float(cat_db.mean()) >= float(random_db.mean()) + MARGIN_OVER_RANDOM_DB, (cat_db.tolist(), random_db.tolist())
    assert float(cat_db.min()) >= float(random_db.min()) + MARGIN_OVER_RANDOM_DB, (cat_db.tolist(), random_db.tolist())
    assert stats.ledger.saved_fraction() > 0.3


# Measured here (seed i for prompt i), with cond and uncond paired across their separate calls and
# tokens ranked by predicted error: CAT 40.9 dB mean, random 37.2 dB. The issue asks 3 dB over
# random (24 images, README: 3.2 dB); floors under today's figures, so a regression fails.
CAT_FLOOR_DB = 38.0
MARGIN_OVER_RANDOM_DB = 3.0


def test_quality_script_runs_on_the_pixart_fixture(setup, tmp_path):
    from tests.host.test_bench_scripts import run_script

    rows = run_script("quality.py", "--model", "pixart", "--prompts", "1", "--steps", "6", "--warmup", "2",
                      "--keep", "1.0", "0.3", "--out", str(tmp_path / "grid.png"))
    cat = {r["keep_ratio"]: r for r in rows if r.get("method") == "cat"}
    assert cat[1.0]["psnr_mean"] == 100.0 and cat[1.0]["res"] == 512 and cat[1.0]["cfg"] == 4.5
    assert cat[0.3]["macs_saved"] > 0

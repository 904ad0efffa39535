"""The CAT nodes (settings, model patch, stats, compare) and the extension that registers them."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from ..cat_core import CATSettings, SettingsError
from ..cat_core.config import EXECUTIONS
from ..cat_core.report import (
    CompareError,
    cluster_map,
    compare_images,
    format_report,
    refresh_heatmap,
    selection_strip,
    staleness_map,
    stats_summary,
)
from .patch import UnsupportedModelError, apply_cat, holder_of

CATSettingsType = io.Custom("CAT_SETTINGS")
CATEGORY = "model_patches/CAT"
_DEFAULTS = CATSettings()


class CATPruningSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CATPruningSettings",
            display_name="CAT Pruning Settings",
            category=CATEGORY,
            description="Settings for CAT Model Patch (cluster-aware token pruning with caching).",
            inputs=[
                io.Float.Input("keep_ratio", default=_DEFAULTS.keep_ratio, min=0.01, max=1.0, step=0.01,
                               tooltip="Share of image tokens recomputed at each pruned step. Lower is faster and drifts further from the unpatched image; 1.0 reproduces the unpatched image exactly. Change this first."),
                io.Int.Input("warmup_steps", default=_DEFAULTS.warmup_steps, min=0, max=1000,
                             tooltip="Full steps before pruning starts. 0 = automatic: about a third of the steps, at most 8, and runs too short to prune well (the README says which) stay exactly unpatched. With fewer sampler steps than a fixed value the patch does nothing."),
                io.Int.Input("num_clusters", default=_DEFAULTS.num_clusters, min=1, max=256,
                             tooltip="Spatial clusters (k-means, once per run) used to spread each step's budget across image regions."),
                io.Float.Input("stale_share", default=_DEFAULTS.stale_share, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of each step's budget given to the tokens refreshed least recently, so every region is revisited. The rest goes to the tokens whose cached output is predicted to be furthest off."),
                io.Int.Input("cluster_iters", default=_DEFAULTS.cluster_iters, min=0, max=100, advanced=True,
                             tooltip="k-means iterations."),
                io.Float.Input("feature_scale", default=_DEFAULTS.feature_scale, min=0.0, max=100.0, step=0.01, advanced=True,
                               tooltip="Weight of the model's output features against token position in k-means (smaller = more spatial clusters)."),
                io.Int.Input("seed", default=_DEFAULTS.seed, min=0, max=2**63 - 1, advanced=True, control_after_generate=False,
                             tooltip="Seed of k-means initialisation."),
                io.Boolean.Input("pair_cfg", default=_DEFAULTS.pair_cfg, optional=True, advanced=True,
                                 tooltip="Recompute the same tokens in the cond and uncond halves of each image. Guidance multiplies any mismatch between the halves, so this keeps images closer to the unpatched ones."),
                # Last so that workflows saved before it existed keep their widget positions.
                io.Boolean.Input("refresh_first_block", default=_DEFAULTS.refresh_first_block, optional=True, advanced=True,
                                 tooltip="Recompute the first block's keys/values for every image token at each pruned step. That block's input is exact for every token, so for a small share of a step the recomputed tokens attend to current context instead of cached keys/values, which keeps the image closer to the unpatched one."),
                io.Int.Input("cooldown_steps", default=_DEFAULTS.cooldown_steps, min=0, max=1000, optional=True,
                             tooltip="Full steps at the end of sampling. The last steps set fine detail, where a stale token shows directly, so a full final step gives up a little of the savings and brings the image much closer to the unpatched one. Raise it for dpmpp_2m. 0 = prune to the end (the paper's schedule)."),
                io.Boolean.Input("prune_any_sampler", default=_DEFAULTS.prune_any_sampler, optional=True,
                                 tooltip="Off: with samplers whose images token pruning cannot keep close to the unpatched ones yet (ancestral and SDE samplers, multistep samplers such as dpmpp_2m and uni_pc, CFG++; the README lists them), the run reuses whole steps instead where that keeps them close, else it is not pruned, and CAT Stats says which and why. On: prune tokens with any sampler."),
                io.Float.Input("reuse_threshold", default=_DEFAULTS.reuse_threshold, min=0.0, max=1.0, step=0.01, optional=True, advanced=True,
                               tooltip="Step reuse: after warm-up, skip a model call entirely when its output is predicted to change by less than this share since the last computed call, and take its output from the cache. Above 0 it replaces token pruning (keep_ratio is then not used): the two compound. It also speeds up the samplers CAT does not prune tokens with. 0 = off, except with the samplers for which CAT reuses steps by default (dpmpp_2m, euler_ancestral, uni_pc and others; CAT Stats says so)."),
                io.Combo.Input("execution", options=list(EXECUTIONS), default=_DEFAULTS.execution, optional=True, advanced=True,
                               tooltip="How pruned steps are launched on the GPU. auto: CUDA graphs where they are safe (CUDA, weights fully loaded, no ControlNet or other model patch), else eager. graph: always try CUDA graphs; each one is checked against eager at its first replay and any problem turns them off with a note in CAT Stats. eager: never. Graphs keep the pruned step's intermediate memory allocated."),
                io.Float.Input("extrapolation", default=_DEFAULTS.extrapolation, min=0.0, max=1.0, step=0.05, optional=True, advanced=True,
                               tooltip="A token that a pruned step does not recompute gets its cached output moved on by this share of the change per step it showed between its last two computations. 0 = the cached output as is (the paper's method, and the images of versions before 0.5.1). Lower it if a run with few pruned steps drifts in fine detail; the README has the measurements."),
            ],
            outputs=[CATSettingsType.Output(display_name="settings", tooltip="Connect to the settings input of CAT Model Patch.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        try:
            return io.NodeOutput(CATSettings(**values))
        except SettingsError as error:
            raise ValueError(f"CAT Pruning Settings: {error}") from None


class CATModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CATModelPatch",
            display_name="CAT Model Patch",
            category=CATEGORY,
            description="Speeds up SD3 / SD3.5 / Flux / Flux.2 / Chroma / Qwen-Image / HunyuanImage 2.1 / PixArt sampling: after warm-up, each step recomputes only a chosen share of image tokens and reuses cached keys/values and outputs for the rest.",
            inputs=[
                io.Model.Input("model", tooltip="An SD3 / SD3.5 / Flux / Flux.2 / Chroma / Qwen-Image / HunyuanImage 2.1 / PixArt model (put LoRA loaders before this node)."),
                CATSettingsType.Input("settings", optional=True, tooltip="From CAT Pruning Settings; defaults when unconnected."),
            ],
            outputs=[io.Model.Output(tooltip="The model with CAT Pruning; the input model is not modified.")],
        )

    @classmethod
    def execute(cls, model, settings: CATSettings | None = None) -> io.NodeOutput:
        try:
            return io.NodeOutput(apply_cat(model, _as_settings(settings)))
        except (UnsupportedModelError, ValueError, TypeError) as error:
            raise ValueError(f"CAT Model Patch: {error}") from None


def _as_settings(settings) -> CATSettings:
    """Settings from the socket; an API prompt may also pass a plain dict of setting values."""
    if settings is None:
        return CATSettings()
    if isinstance(settings, CATSettings):
        return settings
    if isinstance(settings, dict):
        try:
            return CATSettings.from_dict(settings)
        except (SettingsError, TypeError) as error:
            raise ValueError(f"settings: {error}") from None
    raise ValueError(f"settings must come from a CAT Pruning Settings node (or be a dict of its values), got {type(settings).__name__}")


class CATStats(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CATStats",
            display_name="CAT Stats",
            category=CATEGORY,
            description="What the last run of a CAT-patched model computed: tokens per step, MACs saved, cache memory, time, and maps of which tokens were recomputed.",
            inputs=[
                io.Model.Input("model", tooltip="The model from CAT Model Patch."),
                io.Latent.Input("samples", tooltip="The sampler's output, so this node runs after sampling."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="The run as text: steps full and pruned, tokens recomputed, MACs saved, cache memory, time. Also shown in this node."),
                io.Image.Output(display_name="heatmap", tooltip="How often each image token was recomputed (yellow = every step), one image per model row."),
                io.Image.Output(display_name="staleness", tooltip="At the end of the run: how many pruned steps ago each token was last recomputed (yellow = longest ago)."),
                io.Image.Output(display_name="clusters", tooltip="The k-means clusters of image tokens (one colour per cluster) that spread each step's budget."),
                io.Image.Output(display_name="selections", tooltip="One tile per pruned step, left to right then top to bottom: white = recomputed, dark = reused from the cache."),
            ],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        holder = holder_of(model)
        if holder is None:
            raise ValueError("CAT Stats: this model has no CAT Model Patch; connect the MODEL output of CAT Model Patch.")
        stats = holder.last_stats
        latent = samples["samples"]
        scale = _pixels_per_latent(model)
        height, width = latent.shape[-2] * scale, latent.shape[-1] * scale
        patch = getattr(getattr(holder, "info", None), "patch", None)
        token_px = scale * patch if isinstance(patch, int) and patch > 0 else None  # one token in image pixels
        report = format_report(stats)
        return io.NodeOutput(
            report,
            refresh_heatmap(stats, height, width, token_px),
            staleness_map(stats, height, width, token_px),
            cluster_map(stats, height, width, token_px),
            selection_strip(stats),
            ui={"text": [report], "cat_stats": [stats_summary(stats)]},
        )


def _pixels_per_latent(model) -> int:
    """Image pixels per latent pixel (8 for SD3 / Flux, 16 for Flux.2), so the maps match the image."""
    ratio = getattr(getattr(getattr(model, "model", None), "latent_format", None), "spacial_downscale_ratio", None)
    return ratio if isinstance(ratio, int) and ratio > 0 else 8


class CATCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CATCompare",
            display_name="CAT Compare",
            category=CATEGORY,
            description="How close the CAT-patched images are to the unpatched ones of the same seed: PSNR and SSIM per image and mean, and an amplified difference image.",
            inputs=[
                io.Image.Input("patched", tooltip="Decoded images of the sampler that uses CAT Model Patch."),
                io.Image.Input("unpatched", tooltip="Decoded images of a sampler with the original model, same seed, size and settings."),
                io.Float.Input("amplify", default=8.0, min=1.0, max=100.0, step=0.5,
                               tooltip="The difference image shows |patched - unpatched| times this."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="PSNR and SSIM of each image and their mean, as text. Also shown in this node."),
                io.Image.Output(display_name="difference", tooltip="|patched - unpatched| x amplify (black = identical)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, patched, unpatched, amplify: float = 8.0) -> io.NodeOutput:
        try:
            report, difference, summary = compare_images(patched, unpatched, amplify)
        except CompareError as error:
            raise ValueError(f"CAT Compare: {error}") from None
        return io.NodeOutput(report, difference, ui={"text": [report], "cat_compare": [summary]})


class CATExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [CATPruningSettings, CATModelPatch, CATStats, CATCompare]


async def comfy_entrypoint() -> CATExtension:
    return CATExtension()

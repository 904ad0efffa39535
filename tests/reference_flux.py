"""Plain-torch reference Flux (Flux.1 dev / schnell / Kontext layout) for host-free tests.

It reproduces ComfyUI's ``comfy/ldm/flux/model.py`` ``Flux`` (and ``comfy/ldm/flux/layers.py``)
closely enough that:

* ``state_dict()`` keys are identical, so one random or trained state dict can be loaded both
  here and into ComfyUI (``comfy.sd.load_diffusion_model_state_dict``);
* the blocks have the submodules and attributes CAT's Flux adapter (``cat_core/blocks/flux.py``)
  reads (``img_mod``, ``img_norm1``, ``img_attn.qkv`` / ``.norm`` / ``.proj``, ``img_mlp``,
  ``linear1`` / ``linear2``, ``pre_norm``, ``modulation``, ``num_heads``, ``mlp_hidden_dim_first``
  ...), with ComfyUI's return conventions (``Modulation`` returns (shift, scale, gate) records,
  ``QKNorm(q, k, v)``), so the adapter's capture and pruned block math runs unchanged here;
* ``forward`` honours the same ``transformer_options["patches_replace"]["dit"]``
  ``("double_block", i)`` / ``("single_block", i)`` protocol with the args ComfyUI's
  ``Flux.forward_orig`` passes, and does the same arithmetic in the same order (fp32 CPU outputs
  match ComfyUI's bit for bit with its PyTorch attention).

Not covered: Flux.2 (global modulation, SiLU-gated MLP), Chroma, ``index_timestep_zero``,
ControlNet residuals, ``rope_options`` and attention patches. Attention and RoPE are the
module-level functions below, looked up at call time so tests can swap them.
"""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference_mmdit import strip_prefix

FLUX1_AXES_DIM = (16, 56, 56)  # what ComfyUI's model detection assumes for Flux.1: head dim 128


# ---------------------------------------------------------------------------------------------
# the functions ComfyUI's flux.math / flux.layers use (swappable)
# ---------------------------------------------------------------------------------------------
def apply_rope1(x, freqs_cis):
    """RoPE on [B, H, L, Dh] with pe rows [B, 1, L, Dh/2, 2, 2] (ComfyUI's _apply_rope1 arithmetic)."""
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if x_.shape[2] != 1 and freqs_cis.shape[2] != 1 and x_.shape[2] != freqs_cis.shape[2]:
        freqs_cis = freqs_cis[:, :, :x_.shape[2]]
    x_out = freqs_cis[..., 0] * x_[..., 0]
    x_out.addcmul_(freqs_cis[..., 1], x_[..., 1])
    return x_out.reshape(*x.shape).type_as(x)


def apply_rope(q, k, pe):
    return apply_rope1(q, pe), apply_rope1(k, pe)


def attention(q, k, v, heads, mask=None):
    """SDPA on already-roped [B, H, L, Dh] q/k/v, returning [B, L, H*Dh] (ComfyUI's attention_pytorch)."""
    b, _, _, dim_head = q.shape
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


def flux_attention(q, k, v, pe, mask=None):
    """What the blocks call: RoPE (when pe is given), then attention; both looked up at call time."""
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    return attention(q, k, v, q.shape[1], mask)


def apply_mod(tensor, m_mult, m_add=None, modulation_dims=None):
    """ComfyUI's flux.layers.apply_mod: tensor * m_mult (+ m_add), per token range with modulation_dims."""
    if modulation_dims is None:
        if m_add is not None:
            return torch.addcmul(m_add, tensor, m_mult)
        return tensor * m_mult
    for d in modulation_dims:
        tensor[:, d[0]:d[1]] *= m_mult[:, d[2]:d[2] + 1]
        if m_add is not None:
            tensor[:, d[0]:d[1]] += m_add[:, d[2]:d[2] + 1]
    return tensor


def rope(pos, dim, theta):
    """[B, L, dim/2, 2, 2] rotation matrices of positions `pos` [B, L] (float64 frequencies, as ComfyUI)."""
    assert dim % 2 == 0
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / (theta ** scale)
    out = torch.einsum("...n,d->...nd", pos.to(dtype=torch.float32), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    out = out.reshape(*out.shape[:-1], 2, 2)
    return out.to(dtype=torch.float32, device=pos.device)


def timestep_embedding(t, dim, max_period=10000, time_factor=1000.0):
    """Sinusoidal embedding [N, dim] of t * 1000 (Flux passes sigma as the timestep), cos half first."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        embedding = embedding.to(t)
    return embedding


# ---------------------------------------------------------------------------------------------
# layers (comfy/ldm/flux/layers.py names)
# ---------------------------------------------------------------------------------------------
class EmbedND(nn.Module):
    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids):
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim, bias=True):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = nn.RMSNorm(dim)  # eps None: the dtype's epsilon, as ComfyUI's ops.RMSNorm
        self.key_norm = nn.RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """qkv projection, per-head qk norm and output projection; attention itself is external."""

    def __init__(self, dim, num_heads, qkv_bias=False, proj_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    def __init__(self, dim, double, bias=True):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec):
        """(ModulationOut, ModulationOut or None), each field [B, 1, dim]."""
        if vec.ndim == 2:
            vec = vec[:, None, :]
        out = self.lin(F.silu(vec)).chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def build_mlp(hidden_size, mlp_hidden_dim):
    return nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim, bias=True), nn.GELU(approximate="tanh"),
                         nn.Linear(mlp_hidden_dim, hidden_size, bias=True))


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, one joint attention over [text ‖ image]; adds in place."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias=False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.modulation = True
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = build_mlp(hidden_size, mlp_hidden_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = build_mlp(hidden_size, mlp_hidden_dim)

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options=None):
        """Return (img, txt); img and txt are updated in place as in ComfyUI."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_modulated = apply_mod(self.img_norm1(img), (1 + img_mod1.scale), img_mod1.shift)
        img_qkv = self.img_attn.qkv(img_modulated)
        img_q, img_k, img_v = img_qkv.view(img_qkv.shape[0], img_qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)

        txt_modulated = apply_mod(self.txt_norm1(txt), (1 + txt_mod1.scale), txt_mod1.shift)
        txt_qkv = self.txt_attn.qkv(txt_modulated)
        txt_q, txt_k, txt_v = txt_qkv.view(txt_qkv.shape[0], txt_qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = flux_attention(q, k, v, pe, attn_mask)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]

        img += apply_mod(self.img_attn.proj(img_attn), img_mod1.gate)
        img += apply_mod(self.img_mlp(apply_mod(self.img_norm2(img), (1 + img_mod2.scale), img_mod2.shift)), img_mod2.gate)
        txt += apply_mod(self.txt_attn.proj(txt_attn), txt_mod1.gate)
        txt += apply_mod(self.txt_mlp(apply_mod(self.txt_norm2(txt), (1 + txt_mod2.scale), txt_mod2.shift)), txt_mod2.gate)
        if txt.dtype == torch.float16:
            txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text ‖ image]: qkv and MLP input in one linear, attention and MLP output in another."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.hidden_dim = hidden_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.scale = head_dim ** -0.5
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.mlp_hidden_dim_first = self.mlp_hidden_dim
        self.yak_mlp = False
        self.mlp_act = nn.GELU(approximate="tanh")
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim_first)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(head_dim)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x, vec, pe, attn_mask=None, transformer_options=None):
        """Return x, updated in place as in ComfyUI."""
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(apply_mod(self.pre_norm(x), (1 + mod.scale), mod.shift)),
                               [3 * self.hidden_size, self.mlp_hidden_dim_first], dim=-1)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        attn = flux_attention(q, k, v, pe, attn_mask)
        output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))
        x += apply_mod(output, mod.gate)
        if x.dtype == torch.float16:
            x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
        return x


class LastLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, vec):
        if vec.ndim == 2:
            vec = vec[:, None, :]
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(apply_mod(self.norm_final(x), (1 + scale), shift))


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
@dataclass
class FluxParams:
    """The subset of ComfyUI's FluxParams a Flux.1 model uses (cat_core reads ``guidance_embed``)."""

    in_channels: int = 16
    out_channels: int = 16
    vec_in_dim: int | None = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list = field(default_factory=lambda: list(FLUX1_AXES_DIM))
    theta: int = 10000
    patch_size: int = 2
    qkv_bias: bool = True
    guidance_embed: bool = True
    default_ref_method: str = "offset"
    ref_index_scale: float = 1.0


class ReferenceFlux(nn.Module):
    """Flux.1 with ComfyUI's parameter names and ``Flux.forward`` / ``forward_orig``."""

    def __init__(self, **kwargs):
        super().__init__()
        params = self.params = FluxParams(**kwargs)
        params.axes_dim = list(params.axes_dim)
        self.config = asdict(params)
        p = self.patch_size = params.patch_size
        self.in_channels = params.in_channels * p * p
        self.out_channels = params.out_channels * p * p
        if params.hidden_size % params.num_heads:
            raise ValueError(f"hidden size {params.hidden_size} is not divisible by {params.num_heads} heads")
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"axes_dim {params.axes_dim} does not sum to the head dim {pe_dim}")
        h = self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(params.vec_in_dim, h) if params.vec_in_dim is not None else None
        self.guidance_in = MLPEmbedder(256, h) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, h)
        self.double_blocks = nn.ModuleList([
            DoubleStreamBlock(h, self.num_heads, params.mlp_ratio, qkv_bias=params.qkv_bias) for _ in range(params.depth)])
        self.single_blocks = nn.ModuleList([
            SingleStreamBlock(h, self.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks)])
        self.final_layer = LastLayer(h, 1, self.out_channels)

    @classmethod
    def config_from_state_dict(cls, sd):
        """Detect the constructor kwargs the way ComfyUI's ``model_detection`` does for Flux.1."""
        sd = strip_prefix(sd)
        unsupported = [k for k in ("double_stream_modulation_img.lin.weight", "txt_norm.weight",
                                   "double_blocks.0.img_mlp.gate_proj.weight", "distilled_guidance_layer.in_proj.weight")
                       if k in sd]
        if unsupported:
            raise ValueError(f"not a Flux.1 state dict (has {unsupported[0]}); Flux.2 / Chroma / Ovis are not covered")
        patch = 2
        hidden = sd["img_in.weight"].shape[0]

        def count(prefix):
            return len({k.split(".")[1] for k in sd if k.startswith(prefix)})

        return dict(
            in_channels=sd["img_in.weight"].shape[1] // patch ** 2,
            out_channels=sd["final_layer.linear.weight"].shape[0] // patch ** 2,
            vec_in_dim=sd["vector_in.in_layer.weight"].shape[1] if "vector_in.in_layer.weight" in sd else None,
            context_in_dim=sd["txt_in.weight"].shape[1],
            hidden_size=hidden,
            mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden if "double_blocks.0.img_mlp.0.weight" in sd else 4.0,
            num_heads=hidden // sum(FLUX1_AXES_DIM),
            depth=count("double_blocks."),
            depth_single_blocks=count("single_blocks."),
            axes_dim=list(FLUX1_AXES_DIM),
            patch_size=patch,
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd or count("double_blocks.") == 0,
            guidance_embed="guidance_in.in_layer.weight" in sd,
        )

    @classmethod
    def from_state_dict(cls, sd, dtype=torch.float32):
        """Build and load a model from a ComfyUI-style state dict (bare or ``model.diffusion_model.`` keys)."""
        sd = strip_prefix(sd)
        model = cls(**cls.config_from_state_dict(sd))
        model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
        return model.to(dtype)

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, transformer_options=None, attn_mask=None):
        """Tokens in, tokens out: ComfyUI's ``Flux.forward_orig`` without ControlNet / post_input / t=0 refs."""
        transformer_options = dict(transformer_options or {})
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.params.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        if self.vector_in is not None:
            if y is None:
                y = torch.zeros((img.shape[0], self.params.vec_in_dim), device=img.device, dtype=img.dtype)
            vec = vec + self.vector_in(y[:, :self.params.vec_in_dim])
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)) if img_ids is not None else None

        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        transformer_options["total_blocks"] = len(self.double_blocks)
        transformer_options["block_type"] = "double"
        for i, block in enumerate(self.double_blocks):
            transformer_options["block_index"] = i
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    out = {}
                    out["img"], out["txt"] = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                                   attn_mask=args.get("attn_mask"),
                                                   transformer_options=args.get("transformer_options"))
                    return out

                out = blocks_replace[("double_block", i)](
                    {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                     "transformer_options": transformer_options},
                    {"original_block": block_wrap})
                txt, img = out["txt"], out["img"]
            else:
                img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask,
                                 transformer_options=transformer_options)

        if img.dtype == torch.float16:
            img = torch.nan_to_num(img, nan=0.0, posinf=65504, neginf=-65504)
        img = torch.cat((txt, img), 1)

        transformer_options["total_blocks"] = len(self.single_blocks)
        transformer_options["block_type"] = "single"
        transformer_options["img_slice"] = [txt.shape[1], img.shape[1]]
        for i, block in enumerate(self.single_blocks):
            transformer_options["block_index"] = i
            if ("single_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    return {"img": block(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                                         transformer_options=args.get("transformer_options"))}

                out = blocks_replace[("single_block", i)](
                    {"img": img, "vec": vec, "pe": pe, "attn_mask": attn_mask, "transformer_options": transformer_options},
                    {"original_block": block_wrap})
                img = out["img"]
            else:
                img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)

        img = img[:, txt.shape[1]:, ...]
        return self.final_layer(img, vec)

    def process_img(self, x, index=0, h_offset=0, w_offset=0):
        """Patchify [B, C, H, W] (circular padding to the patch size) -> (tokens, position ids)."""
        bs, c, h, w = x.shape
        p = self.patch_size
        pad_h, pad_w = (p - h % p) % p, (p - w % p) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
        hp, wp = x.shape[-2] // p, x.shape[-1] // p
        img = x.reshape(bs, c, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5).reshape(bs, hp * wp, c * p * p)
        h_len, w_len = (h + p // 2) // p, (w + p // 2) // p
        h_offset, w_offset = (h_offset + p // 2) // p, (w_offset + p // 2) // p
        img_ids = torch.zeros((h_len, w_len, len(self.params.axes_dim)), device=x.device, dtype=torch.float32)
        img_ids[:, :, 0] = img_ids[:, :, 1] + index
        img_ids[:, :, 1] = img_ids[:, :, 1] + torch.linspace(
            h_offset, h_len - 1 + h_offset, steps=h_len, device=x.device, dtype=torch.float32).unsqueeze(1)
        img_ids[:, :, 2] = img_ids[:, :, 2] + torch.linspace(
            w_offset, w_len - 1 + w_offset, steps=w_len, device=x.device, dtype=torch.float32).unsqueeze(0)
        return img, img_ids.reshape(1, h_len * w_len, -1).expand(bs, -1, -1)

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options=None, **kwargs):
        """Flow velocity for latent x [B, C, H, W] at timestep = sigma (ComfyUI's ``Flux._forward``).

        ref_latents: Kontext reference latents (methods "offset", "index", "uxo"), never pruned.
        """
        if control is not None:
            raise NotImplementedError("the reference Flux has no ControlNet path")
        transformer_options = {} if transformer_options is None else transformer_options
        bs, _, h_orig, w_orig = x.shape
        p = self.patch_size
        h_len, w_len = (h_orig + p // 2) // p, (w_orig + p // 2) // p
        img, img_ids = self.process_img(x)
        img_tokens = img.shape[1]
        if ref_latents is not None:
            method = kwargs.get("ref_latents_method", self.params.default_ref_method)
            if method not in ("offset", "index", "uxo"):
                raise NotImplementedError(f"reference latent method {method!r}")
            ref_num_tokens, h, w, index = [], 0, 0, 0
            for ref in ref_latents:
                if method == "index":
                    index += self.params.ref_index_scale
                    h_offset = w_offset = 0
                elif method == "uxo":
                    index, h_offset, w_offset = 0, h_len * p + h, w_len * p + w
                    h += ref.shape[-2]
                    w += ref.shape[-1]
                else:
                    index, h_offset, w_offset = 1, 0, 0
                    if ref.shape[-2] + h > ref.shape[-1] + w:
                        w_offset = w
                    else:
                        h_offset = h
                    h = max(h, ref.shape[-2] + h_offset)
                    w = max(w, ref.shape[-1] + w_offset)
                kontext, kontext_ids = self.process_img(ref, index=index, h_offset=h_offset, w_offset=w_offset)
                img = torch.cat([img, kontext], dim=1)
                img_ids = torch.cat([img_ids, kontext_ids], dim=1)
                ref_num_tokens.append(kontext.shape[1])
            transformer_options = dict(transformer_options)
            transformer_options["reference_image_num_tokens"] = ref_num_tokens
        txt_ids = torch.zeros((bs, context.shape[1], len(self.params.axes_dim)), device=x.device, dtype=torch.float32)
        out = self.forward_orig(img, img_ids, context, txt_ids, timestep, y, guidance,
                                transformer_options=transformer_options, attn_mask=kwargs.get("attention_mask"))
        out = out[:, :img_tokens]
        c = out.shape[-1] // (p * p)
        out = out.reshape(bs, h_len, w_len, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(bs, c, h_len * p, w_len * p)
        return out[:, :, :h_orig, :w_orig]


@torch.no_grad()
def random_init_(model, seed, std_scale=1.0):
    """Deterministically fill every parameter so outputs are finite and non-trivial.

    Weights get N(0, std_scale/sqrt(fan_in)), biases N(0, 0.02) and RMSNorm weights
    1 + N(0, 0.1). Returns the model.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith(("query_norm.weight", "key_norm.weight")):
            value = 1.0 + 0.1 * noise
        elif p.ndim == 1:
            value = 0.02 * noise
        else:
            value = noise * (std_scale / math.sqrt(p[0].numel()))
        p.copy_(value.to(p.dtype))
    return model


def tiny_flux(seed=0, *, hidden=256, depth=2, depth_single=2, context_dim=64, vec_dim=64, guidance_embed=True):
    """A random Flux.1 small enough for CPU tests, in the layout ComfyUI detects (head dim 128)."""
    model = ReferenceFlux(vec_in_dim=vec_dim, context_in_dim=context_dim, hidden_size=hidden,
                          num_heads=hidden // sum(FLUX1_AXES_DIM), depth=depth, depth_single_blocks=depth_single,
                          guidance_embed=guidance_embed)
    return random_init_(model, seed).eval()

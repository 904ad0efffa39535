"""Plain-torch reference MMDiT (SD3 / SD3.5 layout) for host-free tests.

It reproduces ComfyUI's ``comfy/ldm/modules/diffusionmodules/mmdit.py``
(``OpenAISignatureMMDITWrapper``) closely enough that:

* ``state_dict()`` keys are identical, so one random or trained state dict can
  be loaded both here and into ComfyUI (``comfy.sd.load_diffusion_model_state_dict``);
* the submodule methods (``pre_attention``, ``pre_attention_x``,
  ``post_attention``, ``post_attention_x``, ``attn.pre_attention`` ...) have the
  same signatures and return values, so pruning code written against ComfyUI's
  ``_block_mixing`` runs unchanged on this model;
* ``forward`` honours the same ``transformer_options["patches_replace"]["dit"]``
  ``("double_block", i)`` block-replace protocol.

Supported layouts: SD3-medium (no qk norm), SD3.5-large (``qk_norm="rms"``) and
SD3.5-medium MMDiT-X (``x_block_self_attn_layers``). Head dim is always 64,
hidden size ``64 * depth`` and ``depth`` heads, as in ComfyUI.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64
DIFFUSION_MODEL_PREFIX = "model.diffusion_model."


def attention(q, k, v, heads):
    """Multi-head SDPA on [B, L, heads*64] tensors, returning [B, L, heads*64].

    Module-level so tests and pruning code can swap it (every block looks it up
    through this module at call time).
    """
    b, _, d = q.shape
    q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, d)


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding [N, dim] of (fractional) timesteps, cos half first as in ComfyUI."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def modulate(x, shift, scale):
    """adaLN modulation: x * (1 + scale) + shift, broadcast over tokens."""
    return shift.unsqueeze(1) + x * (1 + scale.unsqueeze(1))


def sincos_pos_embed_2d(dim, grid_size):
    """[grid_size**2, dim] fixed 2D sin-cos table (row-major), used by random_init_."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv patchifier; circularly pads odd sizes up to a multiple of the patch size."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        p = self.patch_size[0]
        pad_h = (p - x.shape[-2] % p) % p
        pad_w = (p - x.shape[-1] % p) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t, dtype):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class VectorEmbedder(nn.Module):
    def __init__(self, input_dim, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x):
        return self.mlp(x)


class RMSNorm(nn.Module):
    """Per-head RMSNorm with a learned weight (SD3.5 qk norm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, weight=self.weight.to(x.dtype), eps=self.eps)


class Mlp(nn.Module):
    def __init__(self, hidden_size, mlp_hidden):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """qkv projection (+ optional per-head qk norm) and output projection; attention itself is external."""

    def __init__(self, dim, num_heads, pre_only=False, qk_norm=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.pre_only = pre_only
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        if qk_norm == "rms":
            self.ln_q = RMSNorm(self.head_dim)
            self.ln_k = RMSNorm(self.head_dim)
        elif qk_norm is None:
            self.ln_q = nn.Identity()
            self.ln_k = nn.Identity()
        else:
            raise ValueError(f"unsupported qk_norm {qk_norm!r}")

    def pre_attention(self, x):
        """Return (q, k, v), each [B, L, D]; q and k already normed per head."""
        b, l, _ = x.shape
        qkv = self.qkv(x).reshape(b, l, 3, -1, self.head_dim)
        q, k, v = qkv.unbind(2)
        q = self.ln_q(q).reshape(b, l, -1)
        k = self.ln_k(k).reshape(b, l, -1)
        return q, k, v.reshape(b, l, -1)

    def post_attention(self, x):
        assert not self.pre_only
        return self.proj(x)

    def forward(self, x):
        q, k, v = self.pre_attention(x)
        return self.post_attention(attention(q, k, v, self.num_heads))


class DismantledBlock(nn.Module):
    """One stream (context or image) of a joint block with gated adaLN conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, pre_only=False, qk_norm=None, x_block_self_attn=False):
        super().__init__()
        assert not (pre_only and x_block_self_attn)
        self.pre_only = pre_only
        self.x_block_self_attn = x_block_self_attn
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, pre_only=pre_only, qk_norm=qk_norm)
        if x_block_self_attn:
            self.attn2 = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        n_mods = 9 if x_block_self_attn else (2 if pre_only else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mods * hidden_size))

    def pre_attention(self, x, c):
        """Return ((q, k, v), intermediates); intermediates is None for a pre-only block."""
        if self.pre_only:
            shift_msa, scale_msa = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa)), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa))
        return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def post_attention(self, attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp):
        assert not self.pre_only
        x = x + gate_msa.unsqueeze(1) * self.attn.post_attention(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def pre_attention_x(self, x, c):
        """MMDiT-X image stream: qkv for the joint attention and qkv2 for image-only attn2."""
        assert self.x_block_self_attn
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_msa2, scale_msa2, gate_msa2) = self.adaLN_modulation(c).chunk(9, dim=1)
        x_norm = self.norm1(x)
        qkv = self.attn.pre_attention(modulate(x_norm, shift_msa, scale_msa))
        qkv2 = self.attn2.pre_attention(modulate(x_norm, shift_msa2, scale_msa2))
        return qkv, qkv2, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2)

    def post_attention_x(self, attn, attn2, x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2):
        assert not self.pre_only
        x = x + gate_msa.unsqueeze(1) * self.attn.post_attention(attn) + gate_msa2.unsqueeze(1) * self.attn2.post_attention(attn2)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def block_mixing(context, x, context_block, x_block, c):
    """Joint attention over [context tokens, image tokens]; mirrors ComfyUI's ``_block_mixing``."""
    context_qkv, context_intermediates = context_block.pre_attention(context, c)
    if x_block.x_block_self_attn:
        x_qkv, x_qkv2, x_intermediates = x_block.pre_attention_x(x, c)
    else:
        x_qkv, x_intermediates = x_block.pre_attention(x, c)

    q, k, v = (torch.cat((context_qkv[i], x_qkv[i]), dim=1) for i in range(3))
    attn = attention(q, k, v, x_block.attn.num_heads)
    n_ctx = context_qkv[0].shape[1]
    context_attn, x_attn = attn[:, :n_ctx], attn[:, n_ctx:]

    context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_intermediates)
    if x_block.x_block_self_attn:
        attn2 = attention(*x_qkv2, x_block.attn2.num_heads)
        x = x_block.post_attention_x(x_attn, attn2, *x_intermediates)
    else:
        x = x_block.post_attention(x_attn, *x_intermediates)
    return context, x


class JointBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, pre_only=False, qk_norm=None, x_block_self_attn=False):
        super().__init__()
        self.context_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, pre_only=pre_only, qk_norm=qk_norm)
        self.x_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm,
                                       x_block_self_attn=x_block_self_attn)

    def forward(self, context, x, c, transformer_options=None):
        """Return (context, x); context is None after the last (pre-only) block."""
        return block_mixing(context, x, self.context_block, self.x_block, c)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class ReferenceMMDiT(nn.Module):
    """SD3-family MMDiT with ComfyUI's parameter names and ``OpenAISignatureMMDITWrapper.forward``."""

    def __init__(self, depth, in_channels=16, adm_in_channels=None, context_dim=4096, pos_embed_max_size=96,
                 qk_norm=None, x_block_self_attn_layers=(), patch_size=2, out_channels=None, mlp_ratio=4.0):
        super().__init__()
        self.depth = depth
        self.hidden_size = HEAD_DIM * depth
        self.num_heads = depth
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.qk_norm = qk_norm
        self.x_block_self_attn_layers = sorted(x_block_self_attn_layers)
        self.config = dict(depth=depth, in_channels=in_channels, adm_in_channels=adm_in_channels,
                           context_dim=context_dim, pos_embed_max_size=pos_embed_max_size, qk_norm=qk_norm,
                           x_block_self_attn_layers=list(self.x_block_self_attn_layers), patch_size=patch_size,
                           out_channels=self.out_channels, mlp_ratio=mlp_ratio)

        h = self.hidden_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, h)
        self.t_embedder = TimestepEmbedder(h)
        self.y_embedder = VectorEmbedder(adm_in_channels, h) if adm_in_channels is not None else None
        self.context_embedder = nn.Linear(context_dim, h)
        self.register_buffer("pos_embed", torch.zeros(1, pos_embed_max_size ** 2, h))
        self.joint_blocks = nn.ModuleList([
            JointBlock(h, depth, mlp_ratio=mlp_ratio, pre_only=(i == depth - 1), qk_norm=qk_norm,
                       x_block_self_attn=i in self.x_block_self_attn_layers)
            for i in range(depth)
        ])
        self.final_layer = FinalLayer(h, patch_size, self.out_channels)

    @classmethod
    def config_from_state_dict(cls, sd):
        """Detect the constructor kwargs the way ComfyUI's ``model_detection.detect_unet_config`` does."""
        sd = strip_prefix(sd)
        w = sd["x_embedder.proj.weight"]
        patch_size = w.shape[2]
        layers = sorted(
            int(k[len("joint_blocks."):-len(".x_block.attn2.qkv.weight")])
            for k in sd if k.startswith("joint_blocks.") and k.endswith(".x_block.attn2.qkv.weight")
        )
        return dict(
            depth=w.shape[0] // HEAD_DIM,
            in_channels=w.shape[1],
            patch_size=patch_size,
            out_channels=sd["final_layer.linear.weight"].shape[0] // patch_size ** 2,
            adm_in_channels=sd["y_embedder.mlp.0.weight"].shape[1] if "y_embedder.mlp.0.weight" in sd else None,
            context_dim=sd["context_embedder.weight"].shape[1],
            pos_embed_max_size=round(math.sqrt(sd["pos_embed"].shape[1])),
            qk_norm="rms" if "joint_blocks.0.context_block.attn.ln_q.weight" in sd else None,
            x_block_self_attn_layers=layers,
        )

    @classmethod
    def from_state_dict(cls, sd, dtype=torch.float32):
        """Build and load a model from a ComfyUI-style state dict (bare or ``model.diffusion_model.`` keys)."""
        sd = strip_prefix(sd)
        model = cls(**cls.config_from_state_dict(sd))
        model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
        return model.to(dtype)

    def cropped_pos_embed(self, hw):
        """Centre crop of the pos_embed grid to the patch grid of a latent of size hw."""
        p = self.patch_size
        h, w = -(-hw[0] // p), -(-hw[1] // p)
        m = self.pos_embed_max_size
        assert h <= m and w <= m, (h, w, m)
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.reshape(1, m, m, -1)[:, top:top + h, left:left + w, :]
        return grid.reshape(1, h * w, -1)

    def unpatchify(self, x, hw):
        """[B, h*w, p*p*C] tokens -> [B, C, h*p, w*p] latent."""
        p, c = self.patch_size, self.out_channels
        h, w = -(-hw[0] // p), -(-hw[1] // p)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, timesteps, context=None, y=None, transformer_options=None):
        """Predict the flow velocity for latent x [B, C, H, W] at timesteps (= sigma * 1000)."""
        transformer_options = {} if transformer_options is None else transformer_options
        hw = x.shape[-2:]
        x = self.x_embedder(x) + self.cropped_pos_embed(hw).to(x.dtype)
        c = self.t_embedder(timesteps, dtype=x.dtype)
        if y is not None and self.y_embedder is not None:
            c = c + self.y_embedder(y)
        context = self.context_embedder(context)

        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.joint_blocks):
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    txt, img = block(args["txt"], args["img"], c=args["vec"],
                                     transformer_options=args["transformer_options"])
                    return {"txt": txt, "img": img}

                out = blocks_replace[("double_block", i)](
                    {"img": x, "txt": context, "vec": c, "transformer_options": transformer_options},
                    {"original_block": block_wrap},
                )
                context, x = out["txt"], out["img"]
            else:
                context, x = block(context, x, c=c, transformer_options=transformer_options)

        x = self.unpatchify(self.final_layer(x, c), hw)
        return x[:, :, :hw[0], :hw[1]]


def strip_prefix(sd):
    """Drop ComfyUI's ``model.diffusion_model.`` checkpoint prefix if every key has it."""
    if sd and all(k.startswith(DIFFUSION_MODEL_PREFIX) for k in sd):
        return {k[len(DIFFUSION_MODEL_PREFIX):]: v for k, v in sd.items()}
    return dict(sd)


@torch.no_grad()
def random_init_(model, seed, std_scale=1.0):
    """Deterministically fill every tensor so outputs are finite and non-trivial.

    Weights get N(0, std_scale/sqrt(fan_in)), biases N(0, 0.02), RMSNorm weights
    1 + N(0, 0.1) and pos_embed a 2D sin-cos table. Returns the model.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith(("ln_q.weight", "ln_k.weight")):
            value = 1.0 + 0.1 * noise
        elif p.ndim == 1:
            value = 0.02 * noise
        else:
            value = noise * (std_scale / math.sqrt(p[0].numel()))
        p.copy_(value.to(p.dtype))
    m = model.pos_embed_max_size
    model.pos_embed.copy_(sincos_pos_embed_2d(model.hidden_size, m)[None].to(model.pos_embed.dtype))
    return model

"""The masked autoencoder of segmentation tiles (Sauer et al. 2024; MAE of He et al. 2022).

A tile of class labels is cut into p x p patches; the encoder (a ViT) sees only the visible
patches, the decoder sees the encoded visible tokens plus one learnable mask token per removed
patch and predicts p*p class logits for every patch. Classes enter as one-hot vectors through a
linear patch embedding — not as one float intensity, which would pretend class ids are ordered.

Shapes::

    labels (N, H, W) int   -> patchify -> one-hot tokens (N, L, p*p*C), L = (H/p)*(W/p)
    mask   (N, L) bool     True = removed (to reconstruct)
    forward_encoder  -> (N, Lv, D)  visible tokens only (Lv = most visible in the batch; padded)
    forward_decoder  -> (N, L, p*p*C) logits for every patch
    forward_loss     -> class-weighted cross-entropy on removed patches' kept pixels

Tiles in a batch may have different numbers of removed patches: visible tokens are packed to the
front and padded, and attention ignores the padding (a boolean key mask through
``scaled_dot_product_attention``).

Positional embeddings are fixed 2-D sine-cosine on a ``grid x grid`` lattice, unscaled as in
He et al. (``pos_scale`` = 1; the paper's reference code scales them by 0.08, which leaves the
position signal ~5x below the one-hot token content — in volref's CPU runs that variant learned
no faster, and reconstruction at high masking was worse); a smaller tile can sit at any offset of it
(``offset``), which lets training use 64x64 crops and inference 128x128 tiles with the same
embeddings.

**MAE+X** (the paper's baseline, ``image_depth > 0``): a second ViT encodes the image's p x p
patches — all of them, removed or not, at decoder width — and its tokens are added to the
decoder's input tokens, so the decoder sees the image under the removed patches as well as the
visible segmentation around them. Its last projection starts at zero: a MAE+X trained from a MAE
starts as exactly that MAE. It is called with ``image=`` (N, H, W) normalised intensities.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from volref.models import kernels
from volref.models.config import check_fields, check_tiles


@dataclass(frozen=True)
class MAEConfig:
    tile: int = 128
    patch: int = 4
    n_classes: int = 4
    width: int = 128
    depth: int = 14
    heads: int = 4
    decoder_width: int = 64
    decoder_depth: int = 7
    decoder_heads: int = 2
    mlp_ratio: float = 2.0
    pos_scale: float = 1.0
    image_depth: int = 0  # > 0: MAE+X, with an image encoder of this many blocks (see below)

    #: ranges a config read from a card must respect (sizes beyond these are no trained model)
    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "tile": (4, 1024), "patch": (1, 64), "n_classes": (1, 64), "width": (4, 2048),
        "depth": (1, 64), "heads": (1, 64), "decoder_width": (4, 2048), "decoder_depth": (0, 64),
        "decoder_heads": (1, 64), "mlp_ratio": (0.25, 16), "pos_scale": (0, 100),
        "image_depth": (0, 64)}

    def __post_init__(self) -> None:
        check_fields(self, self.LIMITS)
        check_tiles(self.tile, self.patch)
        if self.grid > 128:
            raise ValueError(f"tile/patch = {self.grid} patches per side; at most 128")
        for name, heads in (("width", self.heads), ("decoder_width", self.decoder_heads)):
            value = getattr(self, name)
            if value % 4 or value % heads:
                raise ValueError(f"{name} {value} must be a multiple of 4 and of its {heads} "
                                 "heads")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MAEConfig:
        return cls(**d)

    @property
    def grid(self) -> int:
        return self.tile // self.patch


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine embeddings ``(grid*grid, width)``, row-major (y, x)."""
    if width % 4:
        raise ValueError("width must be a multiple of 4 for 2-D sin-cos embeddings")
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = []
    for coord in (ys.ravel(), xs.ravel()):
        angle = coord[:, None] * omega[None, :]
        parts += [np.sin(angle), np.cos(angle)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, h, T, d/h)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled():
            y = chunked_attention(q, k, v, key_mask)
        else:
            mask = None if key_mask is None else key_mask[:, None, None, :]  # (N, 1, 1, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, h, T, d/h)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


QUERY_CHUNK = 512  # with PyTorch's softmax
FUSED_QUERY_CHUNK = 1024  # with volref's kernel (in place, no second score matrix)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, ``QUERY_CHUNK`` queries at a time: CPU inference in bf16.

    On the CPU, ``scaled_dot_product_attention`` runs a flash kernel that is slow for heads this
    narrow (width 32) and gains nothing from bf16; plain bf16 matrix products are 4-9x faster
    than fp32 ones here, but a whole (heads, T, T) score matrix (8 MB for 4 heads x 1024 tokens)
    falls out of the cache between the product, the softmax and the second product. Chunks of
    512 queries keep it in cache. The softmax itself — ~45 % of a tile's time in PyTorch's
    kernel — runs in place in volref's compiled kernel where it can (``volref.models.kernels``);
    then no second score matrix is made and chunks of 1024 queries are fastest (60 vs 63 ms a
    tile; benchmarks.mae_throughput, BENCHMARKS.md)."""
    scale = q.shape[-1] ** -0.5
    kt = k.transpose(-1, -2)
    bias = None
    if key_mask is not None:  # (N, T) True = attend -> additive (N, 1, 1, T)
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :]
    fused = kernels.native_softmax() is not None
    chunk = FUSED_QUERY_CHUNK if fused else QUERY_CHUNK
    out = []
    for i in range(0, q.shape[-2], chunk):
        scores = (q[..., i:i + chunk, :] * scale) @ kt
        if bias is not None:
            scores += bias
        if not (fused and kernels.softmax_bf16_(scores)):
            scores = scores.softmax(dim=-1)
        out.append(scores @ v)
    return out[0] if len(out) == 1 else torch.cat(out, dim=-2)


class Block(nn.Module):
    """Pre-norm transformer block: attention and an MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoder(nn.Module):
    pos: torch.Tensor  # (L, D) fixed sin-cos positions, a buffer
    decoder_pos: torch.Tensor  # (L, Dd)

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = c = config
        token = c.patch * c.patch * c.n_classes
        self.embed = nn.Linear(token, c.width)
        self.register_buffer("pos", sincos_2d(c.width, c.grid) * c.pos_scale, persistent=False)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.decoder_embed = nn.Linear(c.width, c.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_width))
        self.register_buffer("decoder_pos", sincos_2d(c.decoder_width, c.grid) * c.pos_scale,
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_width, c.decoder_heads, c.mlp_ratio) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_width)
        self.head = nn.Linear(c.decoder_width, token)
        if c.image_depth:
            self.image_embed = nn.Linear(c.patch * c.patch, c.decoder_width)
            self.image_blocks = nn.ModuleList(Block(c.decoder_width, c.decoder_heads, c.mlp_ratio)
                                              for _ in range(c.image_depth))
            self.image_norm = nn.LayerNorm(c.decoder_width)
            self.image_proj = nn.Linear(c.decoder_width, c.decoder_width)
        self.apply(self._init)
        nn.init.normal_(self.mask_token, std=0.02)
        if c.image_depth:
            nn.init.zeros_(self.image_proj.weight)

    @property
    def needs_image(self) -> bool:
        return self.config.image_depth > 0

    replaces = "removed"  # refinement replaces only the removed patches

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------ patches

    def patchify(self, labels: torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` class ids -> one-hot tokens ``(N, L, p*p*C)``."""
        n, h, w = labels.shape
        p, c = self.config.patch, self.config.n_classes
        onehot = F.one_hot(labels.long().clamp(0, c - 1), c).to(self.embed.weight.dtype)
        x = onehot.reshape(n, h // p, p, w // p, p, c)  # (N, gh, p, gw, p, C)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Logit tokens ``(N, L, p*p*C)`` -> ``(N, C, H, W)``."""
        n = tokens.shape[0]
        p, c = self.config.patch, self.config.n_classes
        x = tokens.reshape(n, h // p, w // p, p, p, c)  # (N, gh, gw, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)

    def _positions(self, table: torch.Tensor, gh: int, gw: int,
                   offset: tuple[int, int]) -> torch.Tensor:
        g = self.config.grid
        oy, ox = offset
        if oy + gh > g or ox + gw > g:
            raise ValueError(f"a {gh}x{gw} patch grid at {offset} exceeds the {g}x{g} lattice")
        return table.reshape(g, g, -1)[oy:oy + gh, ox:ox + gw].reshape(gh * gw, -1)

    # ------------------------------------------------------------ the model

    def forward_encoder(self, labels: torch.Tensor, mask: torch.Tensor,
                        offset: tuple[int, int] = (0, 0), pad_to: int | None = None):
        """Encode the visible patches. Returns tokens ``(N, Lv, D)``, their patch indices
        ``(N, Lv)`` and a validity mask ``(N, Lv)`` (False = padding).

        ``pad_to`` fixes Lv (default: the most visible patches in the batch): with fixed shapes
        a tile's result does not depend on the other tiles of its batch, bit for bit."""
        n, h, w = labels.shape
        p = self.config.patch
        gh, gw = h // p, w // p
        x = self.embed(self.patchify(labels)) + self._positions(self.pos, gh, gw, offset)
        visible = ~mask  # (N, L)
        counts = visible.sum(dim=1)
        lv = pad_to if pad_to is not None else max(int(counts.max()), 1)
        # stable sort: visible patches first, in patch order
        order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)[:, :lv]  # (N, Lv)
        valid = torch.arange(lv, device=labels.device)[None, :] < counts[:, None]  # (N, Lv)
        x = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))  # (N, Lv, D)
        # with fixed shapes always pass the mask: the attention kernel must not depend on batch-mates
        key_mask = valid if pad_to is not None or not bool(valid.all()) else None
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x), order, valid

    def forward_image(self, image: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """MAE+X: image tokens ``(N, L, Dd)`` of every patch of ``image (N, H, W)``."""
        n, h, w = image.shape
        p = self.config.patch
        gh, gw = h // p, w // p
        x = image.to(self.image_embed.weight.dtype).reshape(n, gh, p, gw, p)
        x = x.permute(0, 1, 3, 2, 4).reshape(n, gh * gw, p * p)
        x = self.image_embed(x) + self._positions(self.decoder_pos, gh, gw, offset)
        for block in self.image_blocks:
            x = block(x)
        return self.image_proj(self.image_norm(x))

    def forward_decoder(self, encoded: torch.Tensor, order: torch.Tensor, valid: torch.Tensor,
                        n_patches: int, gh: int, gw: int, offset: tuple[int, int] = (0, 0),
                        image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logit tokens ``(N, L, p*p*C)`` for every patch of the tile."""
        n = encoded.shape[0]
        x = self.decoder_embed(encoded)  # (N, Lv, Dd)
        full = self.mask_token.to(x.dtype).expand(n, n_patches, -1).clone()  # (N, L, Dd)
        idx = torch.where(valid, order, torch.full_like(order, n_patches))  # padding -> dummy
        full = torch.cat([full, full[:, :1]], dim=1)  # one dummy slot for padded tokens
        full.scatter_(1, idx[..., None].expand(-1, -1, x.shape[-1]), x)
        x = full[:, :n_patches] + self._positions(self.decoder_pos, gh, gw, offset)
        if image_tokens is not None:
            x = x + image_tokens.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.head(self.decoder_norm(x))

    def forward(self, labels: torch.Tensor, mask: torch.Tensor,
                offset: tuple[int, int] = (0, 0), pad_to: int | None = None,
                image: torch.Tensor | None = None) -> torch.Tensor:
        """``labels (N, H, W)``, ``mask (N, L)`` -> logits ``(N, C, H, W)`` for every pixel
        (MAE+X: with ``image (N, H, W)``)."""
        n, h, w = labels.shape
        p = self.config.patch
        if self.needs_image and image is None:
            raise ValueError("MAE+X needs the image tiles (image=)")
        encoded, order, valid = self.forward_encoder(labels, mask, offset, pad_to)
        image_tokens = (self.forward_image(image, offset)
                        if self.needs_image and image is not None else None)
        tokens = self.forward_decoder(encoded, order, valid, mask.shape[1], h // p, w // p, offset,
                                      image_tokens)
        return self.unpatchify(tokens, h, w)

    def forward_loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     keep: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on pixels of removed patches that ``keep`` allows (certain, near a
        mitochondrion). ``logits (N, C, H, W)``, ``labels/keep (N, H, W)``, ``mask (N, L)``."""
        n, h, w = labels.shape
        p = self.config.patch
        pix = mask.reshape(n, h // p, 1, w // p, 1).expand(n, h // p, p, w // p, p)
        pix = pix.reshape(n, h, w) & keep
        target = torch.where(pix, labels.long(), torch.full_like(labels.long(), -100))
        return F.cross_entropy(logits.float(), target, weight=class_weights, ignore_index=-100)


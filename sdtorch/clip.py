"""The CLIP text transformer that conditions Stable Diffusion.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision":
a causal pre-LayerNorm transformer over 77 BPE tokens. Parameter names are those SD 1.x files
store under `cond_stage_model.transformer.text_model.` (transformers 4's CLIPTextModel); SD 2.x's
and SDXL's OpenCLIP towers are renamed to them on load (`sdtorch.loading.openclip`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.config import CLIPTextConfig
from sdtorch.errors import SdtorchError
from sdtorch.layers import attention
from sdtorch.linear import Linear


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T), or token vectors (B, T, C) already looked up (textual inversion puts its
        own vectors among them), plus the position embeddings."""
        tokens = self.token_embedding(ids) if tokens is None else tokens
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return tokens + self.position_embedding(positions)  # (B, T, C)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = Linear(cfg.width, cfg.width)
        self.k_proj = Linear(cfg.width, cfg.width)
        self.v_proj = Linear(cfg.width, cfg.width)
        self.out_proj = Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = Linear(cfg.width, cfg.mlp_width)
        self.fc2 = Linear(cfg.mlp_width, cfg.width)
        self.activation = quick_gelu if cfg.activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers))


class CLIPTextModel(nn.Module):
    """Token ids (B, T) -> context (B, T, width) for the UNet's cross-attention."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        if cfg.projection_dim:  # OpenCLIP's contrastive head, which SDXL's pooled embedding comes out of
            self.text_projection = Linear(cfg.width, cfg.projection_dim, bias=False)

    def hidden_states(
        self, ids: torch.Tensor | None = None, upto: int | None = None, *, tokens: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The embeddings followed by each layer's output (no final norm), as transformers'
        `output_hidden_states`; stops after layer `upto` when given. Takes ids (B, T) or, as
        `tokens`, token vectors (B, T, width)."""
        x = self.embeddings(ids, tokens)
        states = [x]
        for layer in self.encoder.layers[:upto]:
            x = layer(x)
            states.append(x)
        return states

    def forward(
        self, ids: torch.Tensor | None = None, clip_skip: int = 1, *, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The context SD conditions on: the final layer's output (clip_skip=1) or, as A1111's
        "Clip skip" N, the output of the N-th layer from the end; either through the final norm.
        Input: ids (B, T), or token vectors (B, T, width) as `tokens` (see `CLIPEmbeddings`)."""
        if not 1 <= clip_skip <= self.config.layers:
            raise SdtorchError(f"clip skip must be between 1 and {self.config.layers}, got {clip_skip}")
        if (ids is None) == (tokens is None):
            raise ValueError("give the text encoder either token ids or token vectors")
        x = self.hidden_states(ids, upto=self.config.layers - clip_skip + 1, tokens=tokens)[-1]
        return self.final_layer_norm(x)  # (B, T, width)

    def penultimate(
        self, ids: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SDXL's use of a tower (sgm's FrozenCLIPEmbedder `layer: hidden, layer_idx: 11` and
        FrozenOpenCLIPEmbedder2 `layer: penultimate`): the next-to-last layer's output, without the final
        norm, (B, T, width); and, where the tower has a projection, the pooled embedding (B, projection):
        the last layer through the final norm at each row's EOS (its highest id), projected."""
        projected = hasattr(self, "text_projection")
        states = self.hidden_states(None if tokens is not None else ids, tokens=tokens,
                                    upto=None if projected else self.config.layers - 1)
        if not projected:
            return states[-1], None
        last = self.final_layer_norm(states[-1])
        eos = last[torch.arange(last.shape[0], device=last.device), ids.to(last.device).argmax(dim=-1)]
        return states[-2], self.text_projection(eos)

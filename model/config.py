"""The model as data: one dataclass, two presets (the paper's and a tiny CPU twin)."""
from __future__ import annotations

from dataclasses import dataclass


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    name: str = "tiny"
    n_layers: int = 2  # decoder blocks, each one attention + one FFN
    hidden: int = 64  # model width
    n_heads: int = 4  # attention heads; head_dim = hidden // n_heads
    ffn_hidden: int = 256  # FFN inner width (GELU between up and down projection)
    vocab_size: int = 512  # embedding and LM head; decode feeds generated tokens back
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_base: float = 10000.0  # rotary position embedding (no parameters)
    seed: int = 0  # weights are drawn from this seed, identically on every rank
    init_std: float = 0.02  # std of the normal weight init

    def __post_init__(self):
        """Each field's valid range, checked where the field is defined (the harness reports the message)."""
        for name in ("n_layers", "hidden", "n_heads", "ffn_hidden"):
            _need(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
        _need(self.vocab_size >= 2, f"model.vocab_size={self.vocab_size} must be >= 2")
        for name in ("norm_eps", "rope_base", "init_std"):
            _need(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be > 0")
        _need(self.seed >= 0, f"model.seed={self.seed} must be >= 0")
        _need(self.hidden % self.n_heads == 0, f"model.hidden={self.hidden} is not divisible by model.n_heads={self.n_heads}")
        _need(self.head_dim % 2 == 0, f"model head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def param_count(self) -> int:
        """Parameters of the model, computed from the shapes (no biases, untied head)."""
        per_layer = (
            self.hidden  # attention RMSNorm
            + 3 * self.hidden * self.hidden  # fused QKV projection
            + self.hidden * self.hidden  # output projection
            + self.hidden  # FFN RMSNorm
            + 2 * self.hidden * self.ffn_hidden  # FFN up and down
        )
        embeddings = 2 * self.vocab_size * self.hidden  # token embedding + LM head
        return self.n_layers * per_layer + embeddings + self.hidden  # + final norm

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache bytes one token of one sequence takes over all layers."""
        return 2 * self.n_layers * self.hidden * dtype_bytes


# The paper (section 4.1) says "~13B parameters"; these shapes hold 1.07B:
# 0.81B in the 4 blocks and 0.26B in embedding + LM head at vocab 32000 (README, "The model").
PRESETS = {
    "paper": ModelConfig(name="paper", n_layers=4, hidden=4096, n_heads=32, ffn_hidden=16384, vocab_size=32000),
    "tiny": ModelConfig(),
}

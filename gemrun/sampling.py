"""Sampling parameters and pure logits processors; randomness comes only from an explicit torch.Generator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError

SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes (64 bits, either sign)


@dataclass
class SamplingParams:
    """What the user asks of one generation. Defaults follow Gemma 3's generation_config (temperature 1.0,
    top-k 64, top-p 0.95); no penalty is applied unless asked for."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 64  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off (HF/CTRL style: logits of seen tokens divided or multiplied)
    presence_penalty: float = 0.0  # OpenAI style: subtracted once from every seen token
    frequency_penalty: float = 0.0  # OpenAI style: subtracted per occurrence
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # added to the model's own stop tokens
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> InputError:
            return InputError(f"{name} = {getattr(self, name)!r}: must be {rule}")

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "a finite number")
            return v

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if not 0 <= number("temperature") <= 100:
            raise bad("temperature", "between 0 and 100")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0")
        if not 0 < number("top_p") <= 1:
            raise bad("top_p", "in (0, 1]")
        if not 0 <= number("min_p") <= 1:
            raise bad("min_p", "in [0, 1]")
        if not 0 < number("repetition_penalty") <= 10:
            raise bad("repetition_penalty", "in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise bad(name, "between -2 and 2")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise bad("seed", f"an integer in [{SEED_MIN}, {SEED_MAX}]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop) or len(self.stop) > 16:
            raise bad("stop", "at most 16 non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "non-negative integers")
        if not all(isinstance(t, int) and t >= 0 and isinstance(b, (int, float)) and -100 <= b <= 100
                   for t, b in self.logit_bias.items()):
            raise bad("logit_bias", "token ids >= 0 mapped to numbers in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether any penalty reads the counts of tokens seen."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """This request's own generator: seeded, or from the system's entropy (not `torch.seed()`, which reseeds
        the process's default generators on every device type, ~1 ms a request)."""
        g = torch.Generator(device=device)
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor | None, p: SamplingParams) -> torch.Tensor:
    """logits (V,), counts (V,) of tokens seen so far (prompt and output). Only the seen entries change, so the
    cost follows the number of distinct tokens seen, not the 262k vocabulary."""
    if not p.penalized:
        return logits
    seen = counts.nonzero().squeeze(-1)
    x, n = logits[seen], counts[seen]
    if p.repetition_penalty != 1.0:
        x = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
    x = x - p.presence_penalty - p.frequency_penalty * n
    return logits.index_copy(0, seen, x)


BLOCK = 512  # top_k over a long vector: the k best lie in the k blocks of BLOCK with the largest maxima


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(logits, k) of a 1-D vector (values, indices), for a 262k vocabulary ~5x faster: the k largest
    values lie in the k blocks whose maxima are largest (any other block has k larger values outside it), so
    only those blocks are searched. Equal values may come in another order."""
    n = logits.shape[-1]
    if logits.dim() != 1 or k > BLOCK or n < 16 * k * BLOCK:
        return torch.topk(logits, k)
    rows = n // BLOCK
    blocks = logits[:rows * BLOCK].view(rows, BLOCK)
    best = torch.topk(blocks.amax(1), k).indices  # (k,)
    ids = torch.cat([(best[:, None] * BLOCK + torch.arange(BLOCK, device=logits.device)).flatten(),
                     torch.arange(rows * BLOCK, n, device=logits.device)])  # candidates, with the tail
    values, at = torch.topk(logits[ids], k)
    return values, ids[at]


def argmax(logits: torch.Tensor) -> int:
    """torch.argmax of a 1-D vector (the first maximum; NaN counts as the largest), NumPy's SIMD loop on the CPU
    (~10x faster than PyTorch's for a 262k vocabulary)."""
    if logits.device.type == "cpu" and logits.dim() == 1 and logits.dtype == torch.float32:
        return int(np.argmax(logits.numpy()))
    return int(torch.argmax(logits))


def has_finite(logits: torch.Tensor) -> bool:
    """Whether any logit is finite; the whole-vector check only runs when the maximum is not (NaN or inf)."""
    cpu = logits.device.type == "cpu" and logits.dtype == torch.float32
    top = float(np.max(logits.numpy())) if cpu else float(logits.max())
    return math.isfinite(top) or bool(torch.isfinite(logits).any())


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (the top token always)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative <= 1 - top_p
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))


def sample(logits: torch.Tensor, counts: torch.Tensor | None, p: SamplingParams, gen: torch.Generator) -> int:
    """One token id from float32 logits (V,). Order as in HF: penalties, temperature, top-k, top-p, min-p.
    With top-k on, top-p and min-p run over the k survivors only (the same distribution, without sorting the
    whole vocabulary every token)."""
    if not has_finite(logits):
        raise InputError("the model produced no finite logits (numerical overflow)")
    logits = apply_penalties(logits, counts, p)
    if p.greedy:
        return argmax(logits)
    logits = logits / p.temperature
    ids = None
    if 0 < p.top_k < logits.shape[-1]:
        logits, ids = top_k(logits, p.top_k)
    logits = min_p_filter(top_p_filter(logits, p.top_p), p.min_p)
    choice = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
    return choice if ids is None else int(ids[choice])


def probabilities(logits: torch.Tensor, counts: torch.Tensor | None, p: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from, as a full (V,) float32 vector (speculative sampling compares the
    target's and the drafter's)."""
    logits = apply_penalties(logits, counts, p)
    if p.greedy:
        return torch.nn.functional.one_hot(torch.argmax(logits), logits.shape[-1]).float()
    logits = top_k_filter(logits / p.temperature, p.top_k)
    return min_p_filter(top_p_filter(logits, p.top_p), p.min_p).softmax(-1)


def speculative_choice(p: torch.Tensor, q: torch.Tensor, draft: int, gen: torch.Generator) -> int:
    """The standard speculative-sampling rule: keep `draft` (drawn from q) with probability min(1, p/q), else
    draw from max(p - q, 0) renormalised. The result is distributed exactly as p."""
    u = float(torch.rand((), generator=gen, device=p.device))
    if u * float(q[draft]) < float(p[draft]):
        return draft
    residual = (p - q).clamp(min=0)
    residual = residual if float(residual.sum()) > 0 else p
    return int(torch.multinomial(residual / residual.sum(), 1, generator=gen))

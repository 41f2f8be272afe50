"""What a format costs: perplexity of a model on a text, and its next-token distributions against a reference's
(mean and max KL divergence, top-1 agreement), teacher-forced over windows that each start with <bos>."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .errors import GemrunError


@dataclass
class Quality:
    tokens: int
    perplexity: float
    ref_perplexity: float | None = None
    kl_mean: float | None = None  # KL(ref || model) in nats, averaged over positions
    kl_max: float | None = None
    top1_agreement: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


ROWS = 32  # positions whose KL is computed together


def _step(m, ids: list[int], caches) -> torch.Tensor:
    x = torch.tensor([ids], device=m.device)
    with torch.no_grad():
        return torch.log_softmax(m.model(x, caches)[0].float(), dim=-1)


def evaluate(model, token_ids: Sequence[int], ref=None, context: int = 1024, chunk: int = 256) -> Quality:
    """Score `model` (and `ref`, a model with the same tokenizer) on `token_ids`. Windows of `context` tokens
    each start with <bos>; within one, `chunk` tokens go through the model per forward (with the CPU's packed
    kernels, chunks under 64 rows take the integer kernels, longer ones the dequantized dense path)."""
    ids = list(token_ids)
    if not ids:
        raise GemrunError("no tokens to evaluate")
    if chunk < 1:
        raise GemrunError(f"chunk must be at least 1, got {chunk}")
    models = [model] if ref is None else [model, ref]
    if ref is not None and model.tokenizer.vocab_size != ref.tokenizer.vocab_size:
        raise GemrunError(f"the models have different vocabularies ({model.tokenizer.vocab_size} vs "
                          f"{ref.tokenizer.vocab_size} tokens): they cannot be compared token by token")
    window = max(2, min(context, *(m.max_context for m in models))) - 1
    nll = [0.0 for _ in models]
    kl_sum, kl_max, agree, count = 0.0, 0.0, 0, 0
    for start in range(0, len(ids), window):
        seq = [model.tokenizer.bos_id, *ids[start:start + window]]
        caches = [m.model.make_caches(capacity=len(seq)) for m in models]
        for s in range(0, len(seq) - 1, chunk):
            end = min(s + chunk, len(seq) - 1)  # the last token is only a target
            inputs, target = seq[s:end], torch.tensor(seq[s + 1:end + 1])
            logp = [_step(m, inputs, c) for m, c in zip(models, caches, strict=True)]
            for i, lp in enumerate(logp):
                nll[i] -= float(lp.gather(1, target[:, None].to(lp.device)).sum())
            if ref is not None:
                got, want = logp[0], logp[1].to(logp[0].device)
                for r in range(0, len(got), ROWS):  # a block of rows at a time: a 262k vocabulary is 1 MB a row
                    g, w = got[r:r + ROWS], want[r:r + ROWS]
                    kl = (w.exp() * (w - g)).sum(-1)
                    kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
                    agree += int((g.argmax(-1) == w.argmax(-1)).sum())
            count += len(target)
    ppl = [math.exp(n / count) for n in nll]
    if ref is None:
        return Quality(count, ppl[0])
    return Quality(count, ppl[0], ppl[1], kl_sum / count, kl_max, agree / count)

"""Speculative decoding with Gemma 4's multi-token-prediction drafter: draft, verify in one forward, rewind.

A round: the drafter proposes k tokens from the target's K/V and its last hidden state (every draft step at the
position of the last accepted token); the target scores [last token, drafts] in one forward; tokens are chosen
left to right by the standard rule (`Sequence.choose_draft`) until one differs from its draft; the caches are
trimmed back to what was accepted. Greedy output is identical to plain decoding; sampled output follows the
target's distribution.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .generate import Prompt, Sequence, Stats
from .sampling import SamplingParams, probabilities


class Speculator:
    """A drafter (`model.gemma4.Drafter`) and the number of tokens it drafts per round."""

    def __init__(self, drafter, tokens: int = 4):
        self.drafter, self.k = drafter, self.check_tokens(tokens)

    @staticmethod
    def check_tokens(tokens: int) -> int:
        if not 1 <= tokens <= 32:
            raise ValueError(f"draft tokens must be in 1..32, got {tokens}")
        return tokens

    @staticmethod
    def target_kv(model, caches: list) -> dict[bool, tuple]:
        """K/V of the target's last sliding and last global layer, keyed by `sliding` (what the drafter reads)."""
        last = {spec.sliding: i for i, spec in enumerate(model.specs) if spec.kv_source is None}
        return {sliding: caches[i].view() for sliding, i in last.items()}

    @torch.inference_mode()
    def draft(self, model, seq: Sequence, hidden: torch.Tensor, k: int) -> tuple[list[int], list]:
        """k draft tokens after seq's last token, and for sampling the distribution each was drawn from."""
        kv = self.target_kv(model, seq.caches)
        position, token = seq.position, seq.tokens[-1].id  # the last token is not in the target's cache yet
        drafts, dists = [], []
        for _ in range(k):
            embed = model.embed(torch.tensor([[token]], device=hidden.device))
            logits, hidden = self.drafter.step(embed.to(hidden.dtype), hidden, position, kv)
            logits = logits[0, -1].float()
            logits[seq.vocab_limit:] = float("-inf")
            logits[list(model.config.suppress_token_ids)] = float("-inf")  # the target never takes them
            if seq.params.greedy:
                token, q = int(torch.argmax(logits)), None
            else:
                q = probabilities(logits, seq.counts, seq.params)
                token = int(torch.multinomial(q, 1, generator=seq.gen))
            drafts.append(token)
            dists.append(q)
        return drafts, dists

    def generate(self, model, prompt: Prompt | list[int], params: SamplingParams, stop_ids: set[int],
                 max_context: int, vocab_limit: int, stats: Stats, chunk: int = 256) -> Iterator[int]:
        # the sliding rings keep k + 2 extra positions: k to rewind a rejected round, and the drafter reads W + 1
        seq = Sequence(model, prompt, params, stop_ids, max_context, vocab_limit, chunk=chunk, stats=stats,
                       spare=self.k + 2, keep_hidden=True)
        while not seq.prefilled:
            seq.prefill_step()
        hidden = seq.hidden
        yield seq.choose(seq.logits).id
        while not seq.finished:
            room = min(max_context - seq.position - 2, params.max_tokens - len(seq.tokens) - 1)
            k = min(self.k, room)
            with torch.inference_mode():
                if k < 1:  # too close to the end for a round: one plain step
                    hidden = model.hidden(torch.tensor([[seq.tokens[-1].id]], device=model.device), seq.caches)
                    yield seq.choose(model.project(hidden)[0, -1].float()).id
                    continue
                drafts, dists = self.draft(model, seq, hidden, k)
                ids = torch.tensor([[seq.tokens[-1].id, *drafts]], device=model.device)
                states = model.hidden(ids, seq.caches)  # (1, k + 1, E): the target verifies every draft at once
                logits = model.project(states)[0].float()
                accepted = 0
                for i in range(k + 1):
                    token = seq.choose_draft(logits[i], drafts[i], dists[i]) if i < k else seq.choose(logits[i])
                    yield token.id
                    if seq.finished or i == k or token.id != drafts[i]:
                        break
                    accepted += 1
                stats.drafted_tokens += k
                stats.accepted_tokens += accepted
                for cache in seq.caches:  # forget the rejected drafts' K/V
                    cache.trim(k - accepted)
                hidden = states[:, accepted:accepted + 1]

"""schemathesis hooks for benchmarks/server_hardening.py: most generated bodies name the served model (else the
fuzz stops at 404) and large token budgets are cut to 64 (else each example generates for a minute)."""

import os
import random

import schemathesis

LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict")


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if not isinstance(body, dict):
        return
    if random.random() < 0.8:
        body["model"] = os.environ["GEMRUN_FUZZ_MODEL"]
    for where in (body, body.get("options")):
        if isinstance(where, dict):
            for key in LIMITS:
                v = where.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > 64:
                    where[key] = 64

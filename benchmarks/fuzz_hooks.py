"""schemathesis hooks for benchmarks/server_hardening.py and benchmarks/hardening_pass.py: most generated bodies
name the served model (else the fuzz stops at 404) and large token budgets are cut to GEMRUN_FUZZ_MAX_TOKENS (64
unless set; else each example generates for a minute). With GEMRUN_FUZZ_LOG, a JSON line per call goes to that file
before the request ({"op"}) and after its response ({"op", "status", "negative"}, and the body of a schema-violating
request answered 2xx): a request with no line after it got no response."""

import json
import os
import random

import schemathesis
from schemathesis.core.parameters import ParameterLocation

CHANGED: set[int] = set()
LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict")


@schemathesis.hook
def before_call(context, case, kwargs):
    _log({"op": _label(case)})
    body = case.body
    if not isinstance(body, dict):
        return
    cap = int(os.environ.get("GEMRUN_FUZZ_MAX_TOKENS", "64"))
    before = json.dumps(body, sort_keys=True, default=str)
    if random.random() < 0.8:
        body["model"] = os.environ["GEMRUN_FUZZ_MODEL"]
    for where in (body, body.get("options")):
        if isinstance(where, dict):
            for key in LIMITS:
                v = where.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > cap:
                    where[key] = cap
    if json.dumps(body, sort_keys=True, default=str) != before:
        CHANGED.add(id(case))  # a negative case edited here may have become valid: not judged as one


@schemathesis.hook
def after_call(context, case, response):
    meta = getattr(case, "meta", None)
    # judged only where the body was generated to break the schema and the hooks left it as generated (no route
    # reads query or header parameters: extra ones are ignored, as HTTP servers do)
    negative = bool(meta is not None and meta.is_negative_at(ParameterLocation.BODY)) and id(case) not in CHANGED
    CHANGED.discard(id(case))
    line = {"op": _label(case), "status": response.status_code, "negative": negative}
    if negative and response.status_code < 300:  # what was accepted, to judge
        line["body"] = json.dumps(case.body, default=str)[:400]
    _log(line)


def _label(case) -> str:
    return f"{case.operation.method.upper()} {case.operation.path}"


def _log(line: dict) -> None:
    path = os.environ.get("GEMRUN_FUZZ_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")

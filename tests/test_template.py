"""Chat template rendering: Gemma 3 format, checkpoint templates, sandbox limits, message validation."""

from __future__ import annotations

import pytest

from gemrun.errors import InputError, TemplateError
from gemrun.formats import ChatTemplate, normalize_messages, render_prompt


def test_roles_must_alternate(model_270m):
    with pytest.raises(TemplateError, match="alternate"):
        render_prompt(model_270m.tokenizer, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_content_is_trimmed_and_system_folded(model_270m):
    text = render_prompt(model_270m.tokenizer, [{"role": "system", "content": "S"},
                                                {"role": "user", "content": "  hi \n"},
                                                {"role": "model", "content": "yo"},
                                                {"role": "user", "content": "again"}], add_generation_prompt=False)
    assert text == ("<bos><start_of_turn>user\nS\n\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>\n"
                    "<start_of_turn>user\nagain<end_of_turn>\n")


def test_checkpoint_template_is_used(model_270m):
    t = ChatTemplate("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert render_prompt(model_270m.tokenizer, [{"role": "user", "content": "x"}], template=t) == "<bos>[user]x"


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = i %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{{ 'a' * 1000000 * 1000 }}",
    "{{ [1] * 10**9 }}",
    "{{ ().__class__.__bases__[0].__subclasses__() }}",
    "{% macro r(n) %}{{ r(n) }}{% endmacro %}{{ r(1) }}",
    "{{ 'a' | center(1000000000) }}",
    "{{ '%1000000000s' | format('x') }}",
    "{{ '{:>1000000000}'.format('x') }}",
    "{{ [1] | batch(1000000000, 'x') | list | length }}",
    "{% set a = 'a' * 4000000 %}{% set b = a ~ a %}{% set c = b ~ b %}{% set d = c ~ c %}{% set e = d ~ d %}"
    "{% set f = e ~ e %}{% set g = f ~ f %}{{ (g ~ g) | length }}",
    "{{ ('x' * 4000000).join(['a'] * 100000) | length }}",
    "{{ lipsum(1000000000) }}",
])
def test_hostile_templates_fail_cleanly_and_quickly(source):
    """Time, output and memory are bounded; the memory a template asks for is never this process's."""
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with pytest.raises(TemplateError):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert time.monotonic() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB: this process grew < 100 MB


def test_template_worker_survives_a_failure():
    with pytest.raises(TemplateError):
        ChatTemplate("{{ 'a' | center(1000000000) }}").render([])
    assert ChatTemplate("{{ messages[0].content }}!").render([{"role": "user", "content": "fine"}]) == "fine!"


def test_remembered_attribute_verdicts_stay_per_type_and_name():
    """The sandbox decides an attribute once per (type, name): what is safe on one type or under one name never
    makes another safe, the second render (from remembered verdicts) included."""
    from gemrun.formats import sandbox

    context = {"messages": [{"content": "a,b"}], "items": [3, 1]}
    for _ in range(2):
        assert sandbox.render("{{ messages[0].get('content').split(',') | length }}{{ items.index(1) }}",
                              context) == "21"
        for source in ("{{ messages[0].pop('content') }}", "{{ items.pop() }}", "{{ items.sort() }}"):
            with pytest.raises(sandbox.SandboxError, match="unsafe"):
                sandbox.render(source, context)
        for source in ("{{ messages[0].get.__self__ }}", "{{ items.index.__func__ }}", "{{ items.__class__ }}"):
            assert sandbox.render(source, context) == ""  # undefined
    assert context == {"messages": [{"content": "a,b"}], "items": [3, 1]}


def test_bad_messages(model_270m):
    tok = model_270m.tokenizer
    for bad in ([], "hi", [{"role": "root", "content": "x"}], [{"role": "user", "content": 3}],
                [{"role": "user", "content": [{"type": "video"}]}], ["x"]):
        with pytest.raises(InputError):
            normalize_messages(bad, tok)
    with pytest.raises(InputError, match="text-only"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], tok)
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


@pytest.mark.parametrize("where", ["main", "thread"])
def test_time_limit_stops_a_render_in_and_out_of_the_main_thread(where, monkeypatch):
    """The sandbox's clock: an interval timer in the main thread (no trace hook slowing every render), a trace
    hook elsewhere; a loop that prints nothing is stopped either way and the timer does not outlive the render."""
    import signal
    import threading

    from gemrun.formats import sandbox

    monkeypatch.setattr(sandbox, "TIME_LIMIT", 0.2)
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = i %}{% endfor %}{% endfor %}"
    errors = []

    def run():
        try:
            sandbox.render(loop, {})
        except sandbox.SandboxError as e:
            errors.append(str(e))
        assert sandbox.render("{{ 1 + 1 }}", {}) == "2"

    if where == "main":
        run()
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    else:
        t = threading.Thread(target=run)
        t.start()
        t.join(20)
    assert errors and "ran longer" in errors[0]


def test_worker_reply_is_read_to_its_newline_or_given_up():
    """The worker's pipe is read without a thread: a line split over several writes comes back whole; a worker
    that says nothing is given up after the timeout, and one that closes mid-line gives nothing."""
    import os
    import threading
    import time

    from gemrun.formats.template import _read_line

    r, w = os.pipe()
    try:
        writer = threading.Timer(0.05, lambda: (os.write(w, b'{"text": "a'), os.write(w, b'b"}\n')))
        writer.start()
        assert _read_line(r, 5) == b'{"text": "ab"}\n'
        writer.join()
        t0 = time.monotonic()
        assert _read_line(r, 0.2) == b"" and 0.2 <= time.monotonic() - t0 < 2
        os.write(w, b'{"text": "cut')
        os.close(w)
        w = None
        assert _read_line(r, 5) == b""
    finally:
        os.close(r)
        if w is not None:
            os.close(w)

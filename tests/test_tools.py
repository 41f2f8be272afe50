"""Function calling for Gemma 3: tool validation, prompt rewriting, parsing (one-shot and streamed), grammar."""

from __future__ import annotations

import json
import random
import re
import time

import pytest

from gemrun.errors import InputError
from gemrun.formats import GEMMA3_TEMPLATE, ChatTemplate, normalize_tool_choice, validate_tools
from gemrun.formats.gemma3 import apply_tools
from gemrun.formats.pycall import ToolStreamParser, parse_tool_calls, tool_grammar
from gemrun.formats.stream import MAX_BLOCK


def fn(name, props=None, description=""):
    params = {"type": "object", "properties": props or {}}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


WEATHER = fn("get_weather", {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius"]}},
             "Current weather in a city")
TOOLS = [WEATHER, fn("get_time", {"zone": {"type": "string"}}), fn("odd", {"from": {}, "my-key": {}, "ok": {}})]


# ---- validation ----

@pytest.mark.parametrize("tools, field", [
    ("nope", "tools must be a list"),
    ([fn("a")] * 2, r"tools\[1\].function.name 'a' is declared twice"),
    ([fn("ok"), fn("ok"), fn("bad-name")], r"tools\[1\].function.name"),
    ([fn("ok"), fn("ok2"), fn("9lives")], r"tools\[2\].function.name"),
    ([fn("x" * 65)], r"tools\[0\].function.name"),
    ([{"type": "retrieval"}], r'tools\[0\].type must be "function"'),
    ([{"type": "function"}], r"tools\[0\].function must be an object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
     r"tools\[0\].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": []}}}],
     r"tools\[0\].function.parameters.properties"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], r"tools\[0\].function.description"),
    ([fn(f"f{i}") for i in range(129)], "at most 128"),
])
def test_validate_tools_names_the_field(tools, field):
    with pytest.raises(InputError, match=field):
        validate_tools(tools)


def test_validate_tools_normalizes():
    out = validate_tools([{"type": "function", "function": {"name": "f", "extra": 1}}, WEATHER])
    assert out[0] == {"type": "function", "function": {"name": "f", "description": "",
                                                       "parameters": {"type": "object", "properties": {}}}}
    assert out[1] == WEATHER and validate_tools(None) == [] and len(validate_tools([fn(f"f{i}") for i in range(128)]))


def test_tool_choice():
    assert normalize_tool_choice(None, TOOLS) == "auto"
    assert normalize_tool_choice("none", None) == "none"
    assert normalize_tool_choice("required", TOOLS) == "required"
    named = {"type": "function", "function": {"name": "get_time"}}
    assert normalize_tool_choice(named, TOOLS) == named
    with pytest.raises(InputError, match="tool_choice.function.name 'nope'"):
        normalize_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    with pytest.raises(InputError, match="required"):
        normalize_tool_choice("required", [])
    with pytest.raises(InputError, match="tool_choice must be"):
        normalize_tool_choice("always", TOOLS)


# ---- prompt rewriting ----

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris \\"FR\\"", "unit": "celsius"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_time", "arguments": json.dumps({"zone": None, "x": [True, 1.5, {"k": "v"}]})}},
        {"id": "call_3", "type": "function", "function": {"name": "odd", "arguments": '{"from": 1, "ok": 2}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "12:00"}]},
    {"role": "tool", "tool_call_id": "call_3", "content": "ok"},
    {"role": "assistant", "content": "21 degrees at noon."},
    {"role": "user", "content": "Thanks"},
]


def test_round_trip_renders_with_alternating_roles():
    msgs = apply_tools(CONVERSATION, TOOLS, "auto")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0] == CONVERSATION[0]
    first = msgs[1]["content"]
    assert first.endswith("\n\nWeather and time in Paris?") and "```tool_code" in first
    assert json.loads(first[first.index("["):first.rindex("]") + 1]) == [t["function"] for t in TOOLS]
    assert msgs[2]["content"] == ('```tool_code\nget_weather(city="Paris \\"FR\\"", unit="celsius")\n'
                                  'get_time(zone=None, x=[True, 1.5, {"k": "v"}])\nodd(ok=2, **{"from": 1})\n```')
    assert msgs[3]["content"] == ('```tool_output\n{"temperature": 21}\n```\n\n```tool_output\n12:00\n```\n\n'
                                  "```tool_output\nok\n```")
    text = ChatTemplate(GEMMA3_TEMPLATE).render(msgs)
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\nYou have access to the functions")
    assert text.count("<start_of_turn>model") == 3  # two answers and the generation prompt
    # what the model wrote is read back as the same calls
    _, calls = parse_tool_calls(msgs[2]["content"], TOOLS)
    sent = [json.loads(c["function"]["arguments"]) for c in CONVERSATION[2]["tool_calls"]]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == sent


def test_tool_results_merge_with_the_next_user_turn():
    msgs = apply_tools([{"role": "user", "content": "hi"}, CONVERSATION[2], CONVERSATION[3],
                        {"role": "user", "content": [{"type": "text", "text": "and now?"}, {"type": "image"}]}],
                       TOOLS, "none")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0] == {"role": "user", "content": "hi"}  # "none": no declarations
    assert msgs[2]["content"] == [{"type": "text", "text": '```tool_output\n{"temperature": 21}\n```\n\nand now?'},
                                  {"type": "image"}]
    ChatTemplate(GEMMA3_TEMPLATE).render(msgs)


def test_passthrough_and_parts():
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert apply_tools(plain, None, None) == plain
    assert apply_tools(plain, TOOLS, "none") == plain
    parts = apply_tools([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
                        TOOLS, "auto")[0]["content"]
    assert parts[0]["type"] == "text" and "get_weather" in parts[0]["text"] and parts[1:] == [
        {"type": "image"}, {"type": "text", "text": "what?"}]
    parts = apply_tools([{"role": "user", "content": [{"type": "text", "text": "what?"}]}], TOOLS)[0]["content"]
    assert len(parts) == 1 and parts[0]["text"].endswith("\n\nwhat?")
    only_system = apply_tools([{"role": "system", "content": "S"}], TOOLS)
    assert [m["role"] for m in only_system] == ["system", "user"]


def test_required_and_named_choice_add_a_line():
    user = [{"role": "user", "content": "x"}]
    assert "must" not in apply_tools(user, TOOLS, "auto")[0]["content"].split("]")[-1]
    assert "You must call at least one" in apply_tools(user, TOOLS, "required")[0]["content"]
    named = apply_tools(user, TOOLS, {"type": "function", "function": {"name": "get_time"}})[0]["content"]
    assert "You must call the function get_time" in named


def test_bad_history_is_an_input_error():
    bad = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}
    with pytest.raises(InputError, match=r"messages\[1\].tool_calls\[0\].function.arguments"):
        apply_tools([{"role": "user", "content": "x"}, bad], TOOLS)


# ---- parsing ----

def test_parse_single_call():
    content, calls = parse_tool_calls('```tool_code\nget_weather(city="Paris", unit="celsius")\n```', TOOLS)
    assert content == "" and len(calls) == 1
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0]["id"]) and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}


def test_parse_multiple_nested_and_surrounding_text():
    text = ("Let me check.\n```tool_code\nget_weather(city='Köln', unit=None)\n"
            "[get_time(zone=\"UTC\"), get_time(zone=\"CET\")]\nprint(odd(ok={'a': [1, -2.5e3, (True, False)]}, "
            "**{'from': 'x', 'my-key': {}}))\n```\nDone.\n```tool_code\nget_time()\n```  ")
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Let me check.\n\nDone."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Köln", "unit": None}), ("get_time", {"zone": "UTC"}), ("get_time", {"zone": "CET"}),
        ("odd", {"ok": {"a": [1, -2500.0, [True, False]]}, "from": "x", "my-key": {}}), ("get_time", {})]
    assert len({c["id"] for c in calls}) == 5


@pytest.mark.parametrize("block", [
    "get_weather('Paris')",  # positional
    "nope(city='x')",  # undeclared
    "get_weather(city=x)",  # a name, not a literal
    "get_weather(city=__import__('os').system('touch /tmp/pwned'))",
    "get_weather(city=__import__('os'))",
    "os.system('ls')",
    "get_weather(city=1 + 2)",
    "get_weather(city={1, 2})",  # a set has no JSON
    "get_weather(city=b'x')",
    "get_weather(city=1e999)",  # inf
    "get_weather(city={1: 2})",  # non-string key
    "get_weather(city='a', city='b')",
    "get_weather(**{'city': 1}, city=2)",
    "get_weather(**kw)",
    "x = get_weather(city='a')",
    "get_weather(city='a'",
    "get_weather(city='a')\nimport os",
    "lambda: 1",
    "",
    "[" * 500 + "]" * 500,
])
def test_malformed_blocks_stay_content(block):
    text = f"Hi ```tool_code\n{block}\n``` there"
    assert parse_tool_calls(text, TOOLS) == (text.strip(), [])


def test_unknown_names_only_refused_with_a_tool_list():
    assert parse_tool_calls("```tool_code\nanything(a=1)\n```")[1][0]["function"]["name"] == "anything"
    assert parse_tool_calls("```tool_code\nanything(a=1)\n```", TOOLS)[1] == []


def test_one_bad_block_does_not_spoil_the_others():
    text = "```tool_code\nget_time(zone=1)\n```\n```tool_code\nget_time(zone=f())\n```"
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "```tool_code\nget_time(zone=f())\n```" and len(calls) == 1


def test_hostile_sizes_are_fast():
    start = time.monotonic()
    huge = "```tool_code\nget_time(zone='" + "a" * (MAX_BLOCK + 10) + "')\n```"
    assert parse_tool_calls(huge, TOOLS) == (huge, [])
    unclosed = "```tool_code\n" * 20000
    assert parse_tool_calls(unclosed, TOOLS) == (unclosed.strip(), [])
    ticks = "`" * 200000 + "tool_code"
    assert parse_tool_calls(ticks, TOOLS)[1] == []
    deep = "```tool_code\nget_time(zone=" + "[" * 5000 + "]" * 5000 + ")\n```"
    assert parse_tool_calls(deep, TOOLS)[1] == []
    digits = "```tool_code\nget_time(zone=" + "9" * 50000 + ")\n```"
    assert parse_tool_calls(digits, TOOLS)[1] == []
    assert time.monotonic() - start < 5


# ---- streaming ----

STREAM_TEXTS = [
    "",
    "   \n ",
    "plain text, no calls ` `` ``` ```tool ```tool_cod",
    "  Let me check.\n```tool_code\nget_weather(city=\"Paris\")\n```\n\nDone ``` and `` more.\n",
    "```tool_code\nget_time(zone='a```')\n```",  # the fence closes inside the string: a bad block
    "```tool_code\nget_time(zone=1)\n```\n```tool_code\nbad(\n```tail```tool_code\nget_time()\n```",
    "text ```tool_code\nget_time(zone=1)\n",  # unclosed
    "a```tool_code``````tool_code\n[get_time(), odd(ok=None)]\n``` b ```",
    "x ```tool_code\nget_time(zone='" + "y" * (MAX_BLOCK + 50) + "')\n``` after ```tool_code\nget_time()\n```",
    "x ```tool_code\n" + "z" * (MAX_BLOCK + 50) + "``",
]


def stream(text, cuts, tools=TOOLS):
    parser, events, prev = ToolStreamParser(tools), [], 0
    for cut in [*cuts, len(text)]:
        events += parser.push(text[prev:cut])
        prev = cut
    events += parser.finish()
    content = "".join(v for k, v in events if k == "content")
    return content, [c["function"] for k, c in events if k == "tool_call"], events


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streaming_matches_one_shot(text):
    rng = random.Random(len(text))
    content, calls = parse_tool_calls(text, TOOLS)
    calls = [c["function"] for c in calls]
    splits = [list(range(1, len(text)))] if len(text) < 400 else []  # every character a delta
    splits += [sorted(rng.sample(range(len(text) + 1), min(len(text), rng.randint(0, 30)))) for _ in range(200)]
    for cuts in splits:
        got_content, got_calls, events = stream(text, cuts)
        assert (got_content, got_calls) == (content, calls), cuts
        assert all(v for k, v in events if k == "content")  # no empty deltas


def test_streaming_passes_text_through_at_once():
    parser = ToolStreamParser(TOOLS)
    assert parser.push("Hello") == [("content", "Hello")]
    assert parser.push(" wor``") == [("content", " wor")]  # "``" may open a block
    assert parser.push("`tool_code\nget_time(") == []
    assert parser.push(")\n``") == []
    events = parser.push("`\nbye")
    assert events[0][0] == "tool_call" and events[0][1]["function"] == {"name": "get_time", "arguments": "{}"}
    assert events[1:] == [("content", "\nbye")]
    assert parser.finish() == []


def test_streaming_random_mixtures():
    rng = random.Random(0)
    pieces = ["hi ", "\n", "`", "``", "```", "```tool_code\n", "get_time(zone='z')", "odd(ok=1)", "bad(", "\n```",
              " ", "tool_code", "x" * 50]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        content, calls = parse_tool_calls(text, TOOLS)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), rng.randint(0, 10))))
        got_content, got_calls, _ = stream(text, cuts)
        assert (got_content, got_calls) == (content, [c["function"] for c in calls]), (text, cuts)


# ---- grammar ----

@pytest.fixture(scope="module")
def compiler():
    xgr = pytest.importorskip("xgrammar")
    info = xgr.TokenizerInfo(["a", "(", ")", "<eos>"], stop_token_ids=[3])
    return xgr, xgr.GrammarCompiler(info)


def accepts(compiler, ebnf, text):
    xgr, comp = compiler
    matcher = xgr.GrammarMatcher(comp.compile_grammar(ebnf))
    return matcher.accept_string(text) and matcher.accept_token(3) and matcher.is_terminated()


GOOD = [
    '```tool_code\nget_weather(city="Paris", unit="celsius")\n```',
    '```tool_code\nget_weather()\n```',
    '```tool_code\nget_weather(city="a\\"b\\\\c\\u00e9 ü", unit="celsius")\n```',
    '```tool_code\nfree(zone=[1, None, True, False, {"k": [0, {}]}, []], x=-12.5e-3)\n```',
    '```tool_code\nget_time(zone="UTC")\n```',
    '```tool_code\nodd(ok=1, **{"from": "x", "my-key": 2})\n```',
    '```tool_code\nodd(**{"from": "x"})\n```',
    '```tool_code\nfree(anything_1=0)\n```',
]
BAD = [
    'get_weather(city="Paris")',  # no fence
    '```tool_code\nget_weather(town="Paris")\n```',  # not a parameter
    '```tool_code\nget_weather("Paris")\n```',
    '```tool_code\nget_weather(city=Paris)\n```',
    '```tool_code\nget_weather(city=__import__("os"))\n```',
    '```tool_code\nget_weather(city="Paris")\n```\nextra',
    '```tool_code\nget_weather(city="Paris")\nget_time()\n```',  # one call only
    '```tool_code\nget_weather(city="a\nb")\n```',
    '```tool_code\nget_weather(city=01)\n```',
    '```tool_code\nget_weather(city={1: 2})\n```',
    '```tool_code\nodd(**{"to": "x"})\n```',
    '```tool_code\nnope()\n```',
    '```tool_code\nget_weather(city="x",      unit="celsius")\n```',  # unbounded whitespace
    '```tool_code\nget_weather(city="x", city="y")\n```',  # a keyword twice
    '```tool_code\nget_weather(unit="kelvin")\n```',  # not in the enum
    '```tool_code\nget_time(zone=1)\n```',  # not a string
    '```tool_code\nodd(**{"from": "x", "from": "y"})\n```',
]
FREE = fn("free")


@pytest.mark.parametrize("text", GOOD)
def test_grammar_accepts_calls_the_parser_reads(compiler, text):
    ebnf = tool_grammar([*TOOLS, FREE], "required")
    assert accepts(compiler, ebnf, text)
    assert len(parse_tool_calls(text, [*TOOLS, FREE])[1]) == 1


@pytest.mark.parametrize("text", BAD)
def test_grammar_rejects(compiler, text):
    assert not accepts(compiler, tool_grammar([*TOOLS, FREE], "required"), text)


def test_named_grammar_allows_only_that_function(compiler):
    ebnf = tool_grammar(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert accepts(compiler, ebnf, '```tool_code\nget_time(zone="UTC")\n```')
    assert not accepts(compiler, ebnf, '```tool_code\nget_weather(city="Paris")\n```')
    with pytest.raises(InputError):
        tool_grammar(TOOLS, "auto")


def test_grammar_requires_required_parameters_with_their_types(compiler):
    tool = fn("book", {"day": {"type": "integer"}, "note": {"type": "string"}, "vip": {"type": "boolean"}})
    tool["function"]["parameters"]["required"] = ["vip", "day"]
    ebnf = tool_grammar([tool], "required")
    assert accepts(compiler, ebnf, '```tool_code\nbook(day=3, vip=True)\n```')
    assert accepts(compiler, ebnf, '```tool_code\nbook(day=-1, vip=False, note="x")\n```')
    for text in ['book(vip=True)', 'book(day=3)', 'book(day=3.5, vip=True)', 'book(day=3, vip="yes")',
                 'book(note="x", day=3, vip=True)']:
        assert not accepts(compiler, ebnf, f"```tool_code\n{text}\n```"), text

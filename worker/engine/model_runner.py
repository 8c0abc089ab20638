"""Device side of the engine: owns the model and the KV cache, turns a scheduled `Batch` into tensors,
runs the forward pass, and returns the logits of the sequences that sample this step.

Decode-only steps on CUDA replay a CUDA graph captured per batch-size bucket (static input buffers,
padded rows write to a reserved dummy slot); steps with prefill run eagerly.
"""

from __future__ import annotations

import array
import bisect
import itertools
import logging
from dataclasses import dataclass

import torch

from worker.engine.attention import AttentionMetadata, ContextBatch
from worker.engine.model import LlamaConfig, LlamaModel
from worker.engine.request import Sequence
from worker.engine.scheduler import Batch, ScheduledSeq

log = logging.getLogger(__name__)


def int_tensor(values: list[int] | itertools.chain, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A 1-D CPU tensor from Python ints via array.array: ~10x faster than torch.tensor() on lists."""
    buf = array.array("q" if dtype == torch.long else "i", values)
    if not buf:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype)


def is_decode(item: ScheduledSeq) -> bool:
    """Feeds one generated token (decode attention). A prompt's own last token, left alone by a prefix-cache
    hit, is prefill: prompts attend through the prefill paths, whatever the cache held of them, so a cached
    prompt is answered as an uncached one (on CPU the decode path's bf16 scores changed greedy answers)."""
    return item.num_tokens == 1 and item.samples and item.seq.num_computed_tokens >= item.seq.num_prompt_tokens


def slot_of(block_table: list[int], pos: int, block_size: int) -> int:
    """Flat cache slot of token position pos of a sequence."""
    return block_table[pos // block_size] * block_size + pos % block_size


def padded_tables(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one [B, width] int32 tensor, rows padded with block 0 (never read: lengths bound)."""
    width = max(len(t) for t in tables)
    flat = itertools.chain.from_iterable(itertools.chain(t, itertools.repeat(0, width - len(t))) for t in tables)
    return int_tensor(flat, torch.int32).view(len(tables), width)


KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int = 0  # 0: size from memory
    gpu_memory_utilization: float = 0.90
    cpu_cache_tokens: int = 32768
    dtype: str = "auto"  # auto: the model's dtype; fp8: e4m3, half the bytes per token (unscaled, as vLLM's default)

    def __post_init__(self) -> None:
        if self.dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)} (got {self.dtype!r})")


@dataclass(slots=True)
class PromptScores:
    """Logprobs of prompt tokens, each from the logits at the position before it, computed in the step that
    prefilled them (no second forward pass), for every item of a step that asked: item i scores tokens
    `first + 1 .. first + count` of its sequence, rows `offset .. offset + count` of the tensors. On the
    device until the engine reads them back: chosen [R], rank [R] (1 = the model's top choice), top
    values / ids [R, k] (k: the largest any item asked for)."""

    items: list[tuple[Sequence, int, int, int]]  # (seq, first, offset, count)
    chosen: torch.Tensor
    rank: torch.Tensor
    top_vals: torch.Tensor
    top_ids: torch.Tensor


# rows of [rows, vocab] fp32 logits scored at once: bounded memory (128 MB at a 32k vocab), as the KV cache
# leaves little free; 4,096 rows a slice cost a third more time on an H200 (the allocator at its limit)
SCORE_ROWS = 1024


class ModelRunner:
    device_tokens = True  # a step can take input tokens still on the device from the previous step's sampling
    scores_prompts = True  # computes prompt logprobs in the prefill pass (`last_scores`)

    def __init__(self, model: LlamaModel, cache: CacheConfig, max_num_seqs: int, max_model_len: int,
                 use_cuda_graphs: bool = True):
        self.model = model.eval().requires_grad_(False)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cpu_threads = torch.get_num_threads()
        self.kv_dtype = torch.float8_e4m3fn if cache.dtype == "fp8" else self.dtype
        if p.is_cuda:
            # cuDNN's SDPA builds a graph per new shape (~1.4 ms of CPU each): with variable-length prefills
            # every call is a new shape, so use FlashAttention-2 / memory-efficient kernels instead.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.cfg: LlamaConfig = model.cfg
        self.block_size = cache.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.num_blocks = cache.num_blocks or self._blocks_from_memory(cache)
        self._cache_sized(cache, max_num_seqs, max_model_len, use_cuda_graphs)
        # one extra block at the end: padded rows of graph replays write there
        slots = (self.num_blocks + 1) * self.block_size
        shape = (slots, self.cfg.num_kv_heads, self.cfg.head_dim)
        # per layer: k, v [slots, kv_heads, head_dim]
        self.kv_caches = [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
                          for _ in range(self.cfg.num_layers)]
        self.dummy_slot = self.num_blocks * self.block_size
        if self.device.type == "cuda":
            log.info("KV cache allocated: %d blocks (%s); GPU memory allocated now %.1f GiB", self.num_blocks,
                     str(self.kv_dtype).removeprefix("torch."), torch.cuda.memory_allocated(self.device) / 2**30)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_sizes: list[int] = []
        self.last_scores: PromptScores | None = None  # the last step's prompt logprobs
        if use_cuda_graphs and self.device.type == "cuda":
            self._capture_graphs(max_num_seqs)

    def _cpu_threads(self, decode_only: bool) -> None:
        """On a CPU the worker's HTTP front end (event loop, tokenizer, SSE) shares the cores with the forward
        pass. Decode steps leave it one core: every thread of a parallel op waits for its slowest, so a front
        end that takes a compute thread's core mid-op stalls the whole step (2 cores, 8 streaming users: 20%
        more tokens/s with one decode thread than with two). Steps that prefill use every core, for the time
        to first token."""
        want = max(1, self.cpu_threads - 1) if decode_only else self.cpu_threads
        if want != torch.get_num_threads():
            torch.set_num_threads(want)

    def _cache_sized(self, cache: CacheConfig, max_num_seqs: int, max_model_len: int, graphs: bool) -> None:
        """Hook: the KV cache's size is known, nothing is allocated or captured yet (tensor parallelism
        tells its other ranks here, so they allocate the same blocks and capture graphs alongside)."""

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _blocks_from_memory(self, cache: CacheConfig) -> int:
        per_block = self.cfg.kv_bytes_per_token(self.kv_dtype) * self.block_size
        if self.device.type == "cuda":
            import gc

            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free - torch.cuda.memory_reserved(self.device)
            # vLLM-style: this process may use `utilization` of the card, minus what it holds already
            # (weights), minus a reserve for activations, CUDA graphs and sampler workspace.
            reserve = 3 * 1024**3
            budget = cache.gpu_memory_utilization * total - torch.cuda.memory_allocated(self.device) \
                - max(0, used_by_others) - reserve
            log.info("GPU memory: total %.1f GiB, free %.1f GiB, allocated %.1f GiB, KV budget %.1f GiB",
                     total / 2**30, free / 2**30, torch.cuda.memory_allocated(self.device) / 2**30, budget / 2**30)
            return max(16, int(budget // per_block))
        return max(16, cache.cpu_cache_tokens // self.block_size)

    # --- input preparation --------------------------------------------------------------------------

    def _prepare(self, batch: Batch, prev_tokens: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Decode items first, then prefill chunks. Returns ids, positions, metadata, sample row indices."""
        decode = [it for it in batch.items if is_decode(it)]
        prefill = [it for it in batch.items if not is_decode(it)]
        batch.items = decode + prefill
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        for it in batch.items:
            seq, start = it.seq, it.seq.num_computed_tokens
            end = start + it.num_tokens
            ids.extend(seq.token_ids[start:end])  # PLACEHOLDER (-1) for a token on the device: replaced below
            if seq.pending_row >= 0:
                ids[-1] = 0
            pos.extend(range(start, end))
            slots.extend(slot_of(seq.block_table, p, bs) for p in range(start, end))
            if it.samples:
                sample_rows.append(len(ids) - 1)
        if decode:
            tables = padded_tables([it.seq.block_table for it in decode])
            # int64, as the graphs' static buffer: an int32 pointer is another Triton signature, compiled
            # mid-serving (a 0.5-1 s stall of every stream) for each split count the first time it is seen
            lens = int_tensor([it.seq.num_computed_tokens + 1 for it in decode])
            dec_tables, dec_lens = self._to_device(tables), self._to_device(lens)
        else:
            dec_tables = dec_lens = None
        meta = AttentionMetadata(
            slot_mapping=self._to_device(int_tensor(slots)),
            num_decode=len(decode),
            decode_block_tables=dec_tables,
            decode_context_lens=dec_lens,
            prefill_query_lens=[it.num_tokens for it in prefill],
            prefill_context_lens=[it.seq.num_computed_tokens + it.num_tokens for it in prefill],
            block_size=bs,
            ctx_batch=self._context_batch(prefill, len(decode)),
        )
        ids_dev = self._to_device(int_tensor(ids))
        self._take_device_tokens(ids_dev, decode, prev_tokens)  # decode items are the first rows
        return ids_dev, self._to_device(int_tensor(pos)), meta, sample_rows

    def _take_device_tokens(self, ids: torch.Tensor, items: list[ScheduledSeq], prev: torch.Tensor | None) -> None:
        """Rows of `ids` (item i: row i) whose token is still on the device take it from `prev`, the
        previous step's sampled tokens (engine.py, running ahead). The host put 0 there."""
        moves = [(i, it.seq.pending_row) for i, it in enumerate(items) if it.seq.pending_row >= 0]
        if not moves:
            return
        if prev is None:
            raise RuntimeError("a step reads a token still on the device, but no previous step was given")
        n = len(moves)
        if all(d == s_ == i for i, (d, s_) in enumerate(moves)):  # steady decode: same sequences, same order
            ids[:n].copy_(prev[:n])
            return
        idx = self._to_device(int_tensor(itertools.chain((d for d, _ in moves), (s_ for _, s_ in moves))))
        ids.index_copy_(0, idx[:n], prev.index_select(0, idx[n:]))

    def _context_batch(self, prefill: list, first_row: int) -> ContextBatch | None:
        """The prefill chunks that attend over cached keys before them, as one padded batch."""
        starts, qlens, ctxs, tables = [], [], [], []
        row = first_row
        for it in prefill:
            ctx = it.seq.num_computed_tokens + it.num_tokens
            if ctx != it.num_tokens:
                starts.append(row)
                qlens.append(it.num_tokens)
                ctxs.append(ctx)
                tables.append(it.seq.block_table[: -(-ctx // self.block_size)])
            row += it.num_tokens
        if not qlens:
            return None
        return ContextBatch.build(starts, qlens, ctxs, padded_tables(tables).long(), self.block_size, self.device)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    # --- execution ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: Batch, prev_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step. Returns logits [N, vocab] (float32) and the N sequences that sample. prev_tokens:
        the previous step's sampled tokens, where some sequences' last token is still only there."""
        if self.graph_sizes and batch.is_decode_only and len(batch.items) <= self.graph_sizes[-1] \
                and all(is_decode(it) for it in batch.items):
            return self._replay_decode(batch, prev_tokens), [it.seq for it in batch.items]
        if self.device.type == "cpu":
            self._cpu_threads(batch.is_decode_only)
        ids, pos, meta, rows = self._prepare(batch, prev_tokens)  # decode items first: rows follow that order
        seqs = [it.seq for it in batch.items if it.samples]
        hidden = self.model.hidden(ids, pos, self.kv_caches, meta)
        self.last_scores = self._score_prompts(batch, hidden) if self.scores_prompts else None
        if not rows:
            return torch.empty((0, self.cfg.vocab_size), device=self.device), seqs
        return self.model.logits(hidden[self._to_device(int_tensor(rows))]), seqs

    def _score_prompts(self, batch: Batch, hidden: torch.Tensor) -> PromptScores | None:
        """Prompt logprobs of the items that ask for them (`params.prompt_logprobs`): the hidden state at
        position p scores prompt token p + 1. All of a step's scored rows go through the LM head together,
        SCORE_ROWS at a time. hidden: [T, dim], the items' rows in batch order."""
        items, rows, targets = [], [], []
        row = k = 0
        for it in batch.items:
            seq, start = it.seq, it.seq.num_computed_tokens
            first_row, row = row, row + it.num_tokens
            end = min(start + it.num_tokens, seq.num_prompt_tokens - 1)  # the last prompt position samples
            if seq.params.prompt_logprobs is None or start >= end:
                continue
            items.append((seq, start, len(targets), end - start))
            rows.extend(range(first_row, first_row + end - start))
            targets.extend(seq.token_ids[start + 1 : end + 1])
            k = max(k, seq.params.prompt_logprobs)
        if not items:
            return None
        rows_t, targets_t = self._to_device(int_tensor(rows)), self._to_device(int_tensor(targets))
        parts = []
        for a in range(0, len(rows), SCORE_ROWS):
            idx, tgt = rows_t[a : a + SCORE_ROWS], targets_t[a : a + SCORE_ROWS]
            lp = self.model.logits(hidden.index_select(0, idx)).log_softmax(dim=-1)
            chosen = lp.gather(1, tgt[:, None]).squeeze(1)
            rank = (lp > chosen[:, None]).sum(dim=1) + 1
            vals, top = lp.topk(k, dim=-1) if k else (lp[:, :0], tgt[:, None][:, :0])
            parts.append((chosen, rank, vals, top))
        cat = [torch.cat(t) if len(parts) > 1 else t[0] for t in zip(*parts)]
        return PromptScores(items, *cat)

    @torch.inference_mode()
    def embed(self, inputs: list[list[int]], max_batch_tokens: int = 8192) -> list[torch.Tensor]:
        """Mean-pooled, L2-normalised final hidden states (fp32, on the CPU), one per input, in order.
        Inputs are sorted by length and run in padded batches of at most `max_batch_tokens`."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out: list[torch.Tensor | None] = [None] * len(inputs)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end + 1 - start) * len(inputs[order[end]]) <= max_batch_tokens:
                end += 1
            group = order[start:end]
            width = len(inputs[group[-1]])
            ids = torch.zeros(len(group), width, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
            lengths = torch.tensor([len(inputs[i]) for i in group], device=self.device)
            mask = (torch.arange(width, device=self.device) < lengths[:, None]).unsqueeze(-1)
            hidden = self.model.dense_hidden(ids.to(self.device)).float()
            # pooled on the device: only [B, dim] comes back, not every token's hidden state
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / lengths[:, None], dim=-1).cpu()
            for row, i in enumerate(group):
                out[i] = pooled[row]
            start = end
        return out  # type: ignore[return-value]

    def _capture_graphs(self, max_num_seqs: int) -> None:
        sizes = [s for s in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
                 if s <= max(1, max_num_seqs)]
        n, dev = sizes[-1], self.device
        # static inputs: a graph of batch size s reads ids, positions, slots and context lengths from the
        # first 4*s entries, [ids | positions | slots | lengths], so one contiguous copy fills them each step
        self.g_packed = torch.zeros(4 * n, dtype=torch.long, device=dev)
        self.g_tables = torch.zeros((n, self.max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.g_logits: dict[int, torch.Tensor] = {}
        self.g_ids: dict[int, torch.Tensor] = {}
        pool = None
        for size in reversed(sizes):
            ids, pos, slots, lens = self.g_packed[: 4 * size].view(4, size).unbind(0)
            slots.fill_(self.dummy_slot)
            lens.fill_(1)
            meta = AttentionMetadata(slots, size, self.g_tables[:size], lens, [], [], self.block_size)
            for _ in range(2):  # warm up (Triton compile, cuBLAS handles) outside capture
                self.model.logits(self.model.hidden(ids, pos, self.kv_caches, meta))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model.logits(self.model.hidden(ids, pos, self.kv_caches, meta))
            pool = graph.pool()
            self.graphs[size], self.g_logits[size], self.g_ids[size] = graph, out, ids
        self.graph_sizes = sizes
        log.info("captured CUDA graphs for decode batch sizes %s", sizes)

    def _replay_decode(self, batch: Batch, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """Decode-only step: two host-to-device copies into the static buffers (and tokens still on the
        device moved there, where the engine runs ahead), then one graph replay."""
        b = len(batch.items)
        size = self.graph_sizes[bisect.bisect_left(self.graph_sizes, b)]
        bs = self.block_size
        ids, pos, slots, lens = [], [], [], []
        for it in batch.items:
            seq = it.seq
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p] if seq.pending_row < 0 else 0)
            pos.append(p)
            slots.append(slot_of(seq.block_table, p, bs))
            lens.append(p + 1)
        pad = size - b  # padded rows write to the dummy slot and read one cached token
        packed = int_tensor(itertools.chain(ids, [0] * pad, pos, [0] * pad, slots, [self.dummy_slot] * pad,
                                            lens, [1] * pad))
        tables = padded_tables([it.seq.block_table for it in batch.items])
        width = tables.shape[1]
        self.g_packed[: 4 * size].copy_(packed.pin_memory(), non_blocking=True)
        self.g_tables[:b, :width].copy_(tables.pin_memory(), non_blocking=True)  # past width: never read
        self._take_device_tokens(self.g_ids[size], batch.items, prev_tokens)
        self.graphs[size].replay()
        return self.g_logits[size][:b]

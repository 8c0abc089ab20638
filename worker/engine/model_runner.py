"""Device side of the engine: owns the model and the KV cache, turns a scheduled `Batch` into tensors,
runs the forward pass, and returns the logits of the sequences that sample this step.

Decode-only steps on CUDA replay a CUDA graph captured per batch-size bucket (static input buffers,
padded rows write to a reserved dummy slot); steps with prefill run eagerly.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

from worker.engine.attention import AttentionMetadata
from worker.engine.model import LlamaConfig, LlamaModel
from worker.engine.request import Sequence
from worker.engine.scheduler import Batch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int = 0  # 0: size from memory
    gpu_memory_utilization: float = 0.90
    cpu_cache_tokens: int = 32768


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: CacheConfig, max_num_seqs: int, max_model_len: int,
                 use_cuda_graphs: bool = True):
        self.model = model.eval()
        self.cfg: LlamaConfig = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = cache.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.num_blocks = cache.num_blocks or self._blocks_from_memory(cache)
        # one extra block at the end: padded rows of graph replays write there
        slots = (self.num_blocks + 1) * self.block_size
        shape = (slots, self.cfg.num_kv_heads, self.cfg.head_dim)
        # per layer: k, v [slots, kv_heads, head_dim]
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(self.cfg.num_layers)]
        self.dummy_slot = self.num_blocks * self.block_size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_sizes: list[int] = []
        if use_cuda_graphs and self.device.type == "cuda":
            self._capture_graphs(max_num_seqs)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _blocks_from_memory(self, cache: CacheConfig) -> int:
        per_block = self.cfg.kv_bytes_per_token(self.dtype) * self.block_size
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - cache.gpu_memory_utilization) * total
            budget -= 2 * 1024**3  # activations, graphs and sampler workspace
            return max(16, int(budget // per_block))
        return max(16, cache.cpu_cache_tokens // self.block_size)

    # --- input preparation --------------------------------------------------------------------------

    def _prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Decode items first, then prefill chunks. Returns ids, positions, metadata, sample row indices."""
        decode = [it for it in batch.items if it.num_tokens == 1 and it.samples and it.seq.num_computed_tokens > 0]
        prefill = [it for it in batch.items if not (it.num_tokens == 1 and it.samples and it.seq.num_computed_tokens > 0)]
        batch.items = decode + prefill
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        for it in batch.items:
            seq, start = it.seq, it.seq.num_computed_tokens
            end = start + it.num_tokens
            ids.extend(seq.token_ids[start:end])
            pos.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if it.samples:
                sample_rows.append(len(ids) - 1)
        dev = self.device
        if decode:
            tables = torch.zeros((len(decode), self.max_blocks_per_seq), dtype=torch.int32)
            for i, it in enumerate(decode):
                tables[i, : len(it.seq.block_table)] = torch.tensor(it.seq.block_table, dtype=torch.int32)
            lens = torch.tensor([it.seq.num_computed_tokens + 1 for it in decode], dtype=torch.int32)
            dec_tables, dec_lens = tables.to(dev, non_blocking=True), lens.to(dev, non_blocking=True)
        else:
            dec_tables = dec_lens = None
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            num_decode=len(decode),
            decode_block_tables=dec_tables,
            decode_context_lens=dec_lens,
            prefill_query_lens=[it.num_tokens for it in prefill],
            prefill_context_lens=[it.seq.num_computed_tokens + it.num_tokens for it in prefill],
            prefill_block_tables=[torch.tensor(it.seq.block_table, dtype=torch.long).to(dev, non_blocking=True)
                                  for it in prefill],
            block_size=bs,
        )
        return (torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True),
                torch.tensor(pos, dtype=torch.long).to(dev, non_blocking=True), meta, sample_rows)

    # --- execution ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: Batch) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step. Returns logits [N, vocab] (float32) and the N sequences that sample."""
        ids, pos, meta, rows = self._prepare(batch)
        seqs = [it.seq for it in batch.items if it.samples]
        if meta.num_decode == len(ids) and self.graph_sizes and len(ids) <= self.graph_sizes[-1]:
            return self._replay(ids, pos, meta), seqs
        hidden = self.model.hidden(ids, pos, self.kv_caches, meta)
        if not rows:
            return torch.empty((0, self.cfg.vocab_size), device=self.device), seqs
        return self.model.logits(hidden[torch.tensor(rows, device=self.device)]), seqs

    def _capture_graphs(self, max_num_seqs: int) -> None:
        sizes = [s for s in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
                 if s <= max(1, max_num_seqs)]
        n, dev = sizes[-1], self.device
        self.g_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.g_pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.g_slots = torch.full((n,), self.dummy_slot, dtype=torch.long, device=dev)
        self.g_tables = torch.zeros((n, self.max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.g_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.g_logits: dict[int, torch.Tensor] = {}
        pool = None
        for size in reversed(sizes):
            meta = AttentionMetadata(self.g_slots[:size], size, self.g_tables[:size], self.g_lens[:size],
                                     [], [], [], self.block_size)
            for _ in range(2):  # warm up (Triton compile, cuBLAS handles) outside capture
                self.model.logits(self.model.hidden(self.g_ids[:size], self.g_pos[:size], self.kv_caches, meta))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model.logits(self.model.hidden(self.g_ids[:size], self.g_pos[:size], self.kv_caches, meta))
            pool = graph.pool()
            self.graphs[size], self.g_logits[size] = graph, out
        self.graph_sizes = sizes
        log.info("captured CUDA graphs for decode batch sizes %s", sizes)

    def _replay(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b = ids.shape[0]
        size = self.graph_sizes[bisect.bisect_left(self.graph_sizes, b)]
        self.g_ids[:b] = ids
        self.g_pos[:b] = pos
        self.g_slots[:b] = meta.slot_mapping
        self.g_slots[b:size] = self.dummy_slot
        self.g_lens[:b] = meta.decode_context_lens
        self.g_lens[b:size] = 1
        assert meta.decode_block_tables is not None
        self.g_tables[:b] = meta.decode_block_tables
        self.graphs[size].replay()
        return self.g_logits[size][:b]

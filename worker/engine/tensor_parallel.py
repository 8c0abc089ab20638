"""Tensor parallelism over the GPUs of one host (Megatron-style, as ColossalAI and vLLM do it): every rank
holds a slice of the attention heads (q/k/v rows, o_proj columns) and of the MLP's intermediate size
(gate/up rows, down columns); embeddings, norms and the LM head are replicated. Each layer ends in two
all-reduces (after o_proj and after down_proj). The KV cache is sharded by heads: a rank caches only its
own heads, so N cards hold N times the tokens of one.

Rank 0 lives in the worker process and runs the scheduler and the sampler; ranks 1..N-1 are spawned
processes that receive every step's batch over a pipe (token ids, positions and block tables only) and run
the same forward pass, meeting rank 0 in the all-reduces. NCCL on CUDA, gloo on CPU (CI tests it there).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing.connection
import os
import pickle
import socket
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from worker.engine.model import LlamaConfig, LlamaModel, rope_inv_freq
from worker.engine.model_runner import CacheConfig, ModelRunner
from worker.engine.quant import DEFAULT_INT4_GROUP, quantize_model
from worker.engine.scheduler import Batch

log = logging.getLogger(__name__)


def shard_config(cfg: LlamaConfig, world: int) -> LlamaConfig:
    for what, n in (("attention heads", cfg.num_heads), ("key/value heads", cfg.num_kv_heads),
                    ("intermediate size", cfg.intermediate_size)):
        if n % world:
            raise ValueError(f"--tensor-parallel {world} must divide the model's {what} ({n})")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                               intermediate_size=cfg.intermediate_size // world)


def shard_of(name: str, t: Any, cfg: LlamaConfig, world: int, rank: int) -> torch.Tensor:
    """This rank's slice of the tensor called `name` (transformers' names): rows of q/k/v and gate/up, columns
    of o_proj and down_proj, the rest whole. `t`: a tensor or a safetensors slice (read lazily: only the
    rank's part comes off the disk)."""
    d = cfg.head_dim
    rows = {"q_proj": cfg.num_heads // world * d, "k_proj": cfg.num_kv_heads // world * d,
            "v_proj": cfg.num_kv_heads // world * d, "gate_proj": cfg.intermediate_size // world,
            "up_proj": cfg.intermediate_size // world}
    cols = {"o_proj": cfg.num_heads // world * d, "down_proj": cfg.intermediate_size // world}
    kind = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    if kind in rows:
        n = rows[kind]
        return t[rank * n:(rank + 1) * n].contiguous()
    if kind in cols:
        n = cols[kind]
        return t[:, rank * n:(rank + 1) * n].contiguous()
    return t if isinstance(t, torch.Tensor) else t[:]


def shard_state(state: dict[str, torch.Tensor], cfg: LlamaConfig, world: int, rank: int) -> dict[str, torch.Tensor]:
    """This rank's slice of a full state dict with transformers' names."""
    return {name: shard_of(name, t, cfg, world, rank) for name, t in state.items()}


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """A weight of a random model, the same on every device and in every rank (seeded by its name)."""
    if "norm" in name:
        return torch.ones(shape, dtype=dtype, device=device)
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, hid, inter = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, hid), "model.norm.weight": (hid,),
              "lm_head.weight": (cfg.vocab_size, hid)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (cfg.num_heads * d, hid),
                   p + "self_attn.k_proj.weight": (cfg.num_kv_heads * d, hid),
                   p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, hid),
                   p + "self_attn.o_proj.weight": (hid, cfg.num_heads * d),
                   p + "mlp.gate_proj.weight": (inter, hid), p + "mlp.up_proj.weight": (inter, hid),
                   p + "mlp.down_proj.weight": (hid, inter),
                   p + "input_layernorm.weight": (hid,), p + "post_attention_layernorm.weight": (hid,)}
    return shapes


@dataclass
class ShardSource:
    """How a rank gets its weights: its slices read straight from an HF folder's safetensors files (each
    rank reads only its part: a 65B checkpoint is never whole in memory), a full state dict to slice (the
    formats that convert on load: .bin, GGUF, Meta, LoRA merges), or a random model (benchmarks),
    generated one tensor at a time on the rank's device and sliced at once."""

    cfg: LlamaConfig
    dtype: torch.dtype
    state: dict[str, torch.Tensor] | None = None
    seed: int = 0
    files: list[str] | None = None  # safetensors files with transformers' tensor names
    quantize: str = ""  # int8 / int4: each rank quantizes its own slices after loading them
    int4_group: int = DEFAULT_INT4_GROUP

    def build(self, world: int, rank: int, device: torch.device) -> LlamaModel:
        local = shard_config(self.cfg, world)
        with torch.device("meta"):
            model = LlamaModel(local)
        model = model.to_empty(device=device).to(self.dtype)
        model.tie_weights()
        model.inv_freq = rope_inv_freq(local).to(device)
        if self.files:
            model.load_hf_state_dict(self._read_slices(world, rank))
        elif self.state is not None:
            model.load_hf_state_dict(shard_state(self.state, self.cfg, world, rank))
        else:
            self._load_random(model, world, rank, device)
        if self.quantize:  # per-rank: row-parallel layers get scales over their own input slice
            quantize_model(model, self.quantize, self.int4_group)
        group = dist.group.WORLD if world > 1 else None
        for layer in model.layers:
            layer.self_attn.tp_group = group
            layer.mlp.tp_group = group
        return model.eval()

    def check_files(self) -> None:
        """Every weight the model needs is in the files with the model's shape (checked from the files'
        headers, before any rank starts): a wrong checkpoint is refused with the tensor's name."""
        from safetensors import safe_open

        found: dict[str, tuple[int, ...]] = {}
        for path in self.files or []:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    found[name] = tuple(f.get_slice(name).get_shape())
        for name, shape in hf_shapes(self.cfg).items():
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            if name not in found:
                raise ValueError(f"weight {name!r} not found in {len(self.files or [])} safetensors file(s)")
            if found[name] != shape:
                raise ValueError(f"shape mismatch for {name}: checkpoint {found[name]}, model {shape}")

    def _read_slices(self, world: int, rank: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for path in self.files or []:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    out[name] = shard_of(name, f.get_slice(name), self.cfg, world, rank).to(self.dtype)
        return out

    @torch.no_grad()
    def _load_random(self, model: LlamaModel, world: int, rank: int, device: torch.device) -> None:
        shapes = hf_shapes(self.cfg)

        def part(name: str) -> torch.Tensor:
            full = random_tensor(name, shapes[name], self.dtype, device, self.seed)
            return shard_of(name, full, self.cfg, world, rank)

        model.embed_tokens.weight.copy_(part("model.embed_tokens.weight"))
        model.norm.weight.copy_(part("model.norm.weight"))
        if not self.cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(part("lm_head.weight"))
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            layer.self_attn.qkv_proj.weight.copy_(torch.cat([part(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
            layer.self_attn.o_proj.weight.copy_(part(p + "self_attn.o_proj.weight"))
            layer.mlp.gate_up_proj.weight.copy_(torch.cat([part(p + "mlp.gate_proj.weight"),
                                                           part(p + "mlp.up_proj.weight")]))
            layer.mlp.down_proj.weight.copy_(part(p + "mlp.down_proj.weight"))
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)


def _device(rank: int) -> torch.device:
    return torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")


def _init(rank: int, world: int, port: int) -> torch.device:
    device = _device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, device_id=device if device.type == "cuda" else None)
    # a first collective sets up NCCL's buffers now, so the KV cache is sized around them
    dist.all_reduce(torch.ones(1, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return device


# --- what a step looks like to the other ranks --------------------------------------------------------------


class _Window:
    """The slice of a sequence's token ids a step reads, indexable with the sequence's own positions."""

    __slots__ = ("start", "ids")

    def __init__(self, start: int, ids: list[int]):
        self.start, self.ids = start, ids

    def __getitem__(self, k: int | slice) -> Any:
        if isinstance(k, slice):
            return self.ids[k.start - self.start:k.stop - self.start]
        return self.ids[k - self.start]


@dataclass(slots=True)
class _Seq:
    token_ids: _Window
    num_computed_tokens: int
    block_table: list[int]
    num_prompt_tokens: int
    pending_row: int = -1  # never on the device here: rank 0 reads each step back before the next


@dataclass(slots=True)
class _Item:
    seq: _Seq
    num_tokens: int
    samples: bool


def snapshot(batch: Batch) -> list[tuple]:
    out = []
    for it in batch.items:
        s = it.seq
        start = s.num_computed_tokens
        out.append((start, s.token_ids[start:start + it.num_tokens], list(s.block_table), it.num_tokens, it.samples,
                    s.num_prompt_tokens))
    return out


def restore(items: list[tuple]) -> Batch:
    """A Batch whose items carry just what the model runner reads (duck-typed ScheduledSeq / Sequence)."""
    return Batch([_Item(_Seq(_Window(start, ids), start, table, prompt), n, samples)  # type: ignore[misc]
                  for start, ids, table, n, samples, prompt in items])


def _peer_main(rank: int, world: int, port: int, source: ShardSource, conn: multiprocessing.connection.Connection) -> None:
    device = _init(rank, world, port)
    model = source.build(world, rank, device)
    cache, max_num_seqs, max_model_len, graphs = conn.recv()
    runner = ModelRunner(model, cache, max_num_seqs, max_model_len, use_cuda_graphs=graphs)
    runner.scores_prompts = False  # rank 0 refuses prompt logprobs with tensor parallelism (worker/app.py)
    while True:
        msg = pickle.loads(conn.recv_bytes())
        if msg[0] == "step":
            runner.execute(restore(msg[1]))
        elif msg[0] == "embed":
            runner.embed(msg[1])
        else:
            break
    dist.destroy_process_group()


class TensorParallelRunner(ModelRunner):
    """Rank 0's model runner: tells the other ranks each step, then runs its own slice of it."""

    scores_prompts = False  # prompt logprobs are not gathered across ranks yet: refused with a 400

    def __init__(self, model: LlamaModel, cache: CacheConfig, max_num_seqs: int, max_model_len: int,
                 use_cuda_graphs: bool, peers: list[multiprocessing.connection.Connection], procs: list[Any]):
        self.peers, self.procs = peers, procs
        super().__init__(model, cache, max_num_seqs, max_model_len, use_cuda_graphs)
        atexit.register(self.close)

    def _cache_sized(self, cache: CacheConfig, max_num_seqs: int, max_model_len: int, graphs: bool) -> None:
        sized = dataclasses.replace(cache, num_blocks=self.num_blocks)  # every rank: the same blocks
        for conn in self.peers:
            conn.send((sized, max_num_seqs, max_model_len, graphs))

    def _tell(self, msg: tuple) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)  # once, for every rank
        for conn in self.peers:
            conn.send_bytes(data)

    device_tokens = False  # the other ranks get each step's token ids from the host

    def execute(self, batch: Batch, prev_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Any]]:
        self._tell(("step", snapshot(batch)))
        return super().execute(batch, prev_tokens)

    def embed(self, inputs: list[list[int]], max_batch_tokens: int = 8192) -> list[torch.Tensor]:
        self._tell(("embed", inputs))
        return super().embed(inputs, max_batch_tokens)

    def close(self) -> None:
        try:
            self._tell(("stop",))
        except (OSError, BrokenPipeError):
            pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        self.peers, self.procs = [], []
        if dist.is_initialized():
            dist.destroy_process_group()


def start(world: int, source: ShardSource, cache: CacheConfig, max_num_seqs: int, max_model_len: int,
          use_cuda_graphs: bool = True) -> TensorParallelRunner:
    """Spawn ranks 1..world-1, join them as rank 0, and return rank 0's runner."""
    import torch.multiprocessing as mp

    shard_config(source.cfg, world)  # refuse an uneven split before spawning anything
    # NVLink multicast (NVLS) can take a shared host's GPUs out of service: off unless asked for
    for var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(var, "0" if var == "NCCL_NVLS_ENABLE" else "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    peers, procs = [], []
    for rank in range(1, world):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_peer_main, args=(rank, world, port, source, child), daemon=True)
        p.start()
        peers.append(parent)
        procs.append(p)
    device = _init(0, world, port)
    model = source.build(world, 0, device)
    log.info("tensor parallel over %d ranks: %d heads and %d intermediate per rank", world,
             model.cfg.num_heads, model.cfg.intermediate_size)
    return TensorParallelRunner(model, cache, max_num_seqs, max_model_len, use_cuda_graphs, peers, procs)

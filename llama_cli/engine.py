"""The decode engine: owns the KV cache and runs the model's steps on it, as fast as the device allows.

It offers the few verbs that `Llama.generate` and the continuous scheduler need, and nothing
else touches the model or its cache rows:

- `prefill(rows, prompts)`: whole prompts from position 0 into the given cache rows, together
  in one padded batch (prompts of different lengths are right-padded; each row's padding sits
  after its own end, where later steps overwrite or mask it);
- `decode(tokens, positions)`: one token for each of rows 0..n-1, each at its own position;
- `move_row(src, dst)`: copy a cache row (the scheduler packs live rows down).

A decode step's cost follows the live tokens, not `max_seq_len`: it attends over the first
`kv_len` cache positions, where kv_len is just past the furthest live row (eager and compiled
CPU steps: exactly that; CUDA graphs, which need static shapes: the next length bucket, a power
of two). The ways to run the step, chosen per device (`--compile`, `--cuda_graphs`):

- eager PyTorch;
- on the CPU, where every linear layer is on our kernels (fp32): each layer as one native call (two
  under torchrun; cpu_step.py), each row attending over its own positions only; in one process faster
  than compiled;
- CUDA graphs captured straight from the step (one per padded row count and length bucket,
  captured on first use in well under a second each), so a token costs one graph replay; prefills of
  one or two prompts (the continuous schedule's refills), padded to a power-of-two length, replay graphs
  too from the second prefill of a shape on (an eager prefill is launch-bound on a GPU);
- torch.compile of one layer (`model.run_block`, the same graph serves every layer, its cache
  length dynamic) and of the output layer: seconds to compile instead of minutes for the whole
  model, and kept in a persistent cache (compiled.py) so later runs start at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
import types
from typing import Optional, Sequence

import torch

from . import compiled as compile_cache
from .cpu_share import ThreadGovernor
from .devices import is_cuda
from .errors import UserError
from .model import Transformer, run_block, run_head
from .parallel import GEMV_MAX_ROWS

log = logging.getLogger("llama_cli")

WARM_TOKENS, COLD_TOKENS = 128, 1024  # --compile auto on the CPU: job sizes that repay loading / compiling
# the same for quantized weights, whose eager step dequantizes every weight per call (~4.5 tokens/s for
# SmolLM2-135M int4 against ~40 compiled): loading a kept step (2.4 s) repays from ~12 tokens, a first
# compile (~17 s) from ~90
WARM_TOKENS_QUANTIZED, COLD_TOKENS_QUANTIZED = 16, 128
# the same where the linear layers run on our CPU kernels (native.py), whose uncompiled step is fast too:
# SmolLM2-135M Q4_1 57.8 tokens/s eager against 81.3 compiled (~5 ms saved a token), fp32 35-36 against 45-59
# (~7-10 ms): a kept step repays from ~250-500 tokens, a first compile from ~2,000-4,000
WARM_TOKENS_KERNELS, COLD_TOKENS_KERNELS = 512, 4096
# (Where every layer runs as one native call instead (cpu_step.py: one process, fp32), auto never compiles: that
# step is faster than the compiled one, SmolLM2-135M Q4_1 146 tokens/s against 100, fp32 53-71 against 48.)
# CUDA, int8 weights (no library kernel: the captured eager step dequantizes every weight per call): 38 tok/s
# against 234-252 compiled for the 7B shape at batch 1 on an H100, a first compile 55-65 s: it repays from
# ~2,500 tokens; a kept one from a few
COLD_TOKENS_CUDA_DEQUANTIZING = 2048
# inductor's options for a CUDA compile. As gpt-fast: with coordinate-descent tuning inductor writes a one-row
# product as a tuned multiply-and-sum (its matrix-vector kernels reach full bandwidth only so tuned; int8's
# conversion fuses into it); without it the product goes to cuBLAS. Measured on an H100, 7B shape: batch 1
# 182.3 tok/s against 160.7, for ~30 s of compiling against 6.5 (kept on disk for later runs).
CUDA_COMPILE_OPTIONS = {"coordinate_descent_tuning": True}
MIN_BUCKET = 256  # the shortest cache length a CUDA graph attends over
# Prefill graphs (_PrefillGraph): for refills of at most this many prompts, padded to a power-of-two length of
# at least PREFILL_MIN tokens, captured at a shape's PREFILL_REUSE-th use (a one-prompt run captures none).
# An eager prefill launches ~20 kernels a layer from Python: 21 ms for a 100-token prompt at the 7B shape on
# an H100 (docs/benchmarks.md), where reading the weights once takes ~5 ms.
PREFILL_GRAPH_ROWS, PREFILL_MIN, PREFILL_REUSE = 2, 16, 2
ALIGN = 64  # cache lengths are whole multiples of this: attention kernels want aligned key lengths


def cache_length(max_seq_len: int) -> int:
    """The KV cache's length: max_seq_len rounded up to ALIGN (positions beyond max_seq_len are never
    written by a prompt; they only let the last length bucket stay aligned)."""
    return -(-max_seq_len // ALIGN) * ALIGN


def length_buckets(max_seq_len: int) -> list[int]:
    """Cache lengths CUDA graphs are captured for: powers of two from MIN_BUCKET, and the whole cache."""
    full = cache_length(max_seq_len)
    out, n = [], MIN_BUCKET
    while n < full:
        out.append(n)
        n *= 2
    return out + [full]


def _mode(name: str, value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in ("auto", "on", "off"):
        raise UserError(f"{name} must be auto, on or off, got {value!r}")
    return value


def decide_compile(compile, device: torch.device, max_batch_size: int, key: Optional[str] = None,
                   expected_tokens: Optional[int] = None, quantized: bool = False, kernels: bool = False,
                   native_step: bool = False) -> bool:
    """--compile on/off/auto. auto (measured, docs/benchmarks.md): on the CPU the compiled step wins
    for 1-2 rows (a fused matrix-vector product, about 2.7x eager for SmolLM2-135M, ~37 ms saved a token).
    Loading a step compiled before (kept on disk, see `llama-cli compile`) takes about 3 s, so it is used
    for jobs of WARM_TOKENS+ tokens; a first compile (about 15 s) only for jobs of COLD_TOKENS+, so a
    short job is never slower end to end than eager (quantized weights: WARM_TOKENS_QUANTIZED and
    COLD_TOKENS_QUANTIZED, their eager step being much slower). `quantized`: weights whose eager step
    dequantizes them per call; `kernels`: linear layers on our CPU kernels, whose eager step is fast too
    (WARM_TOKENS_KERNELS, COLD_TOKENS_KERNELS); `native_step`: the uncompiled step runs each layer as one
    native call (cpu_step.py), faster than compiled: auto leaves compiling off. On CUDA the captured eager
    step needs no compiling, so auto leaves compiling off there, except for such weights at 1-2 rows (int8
    where Triton is missing, quant.cuda_forms: compiled, the dequantizing fuses into the product), where a kept
    step is used from WARM_TOKENS_QUANTIZED tokens and a first compile from COLD_TOKENS_CUDA_DEQUANTIZING."""
    compile = _mode("--compile", compile)
    if compile == "off" or (compile == "auto" and not _auto_compiles(device, max_batch_size, key, expected_tokens,
                                                                     quantized, kernels, native_step)):
        return False
    why = compile_cache.compile_room_problem()  # where inductor keeps what it compiles
    if why is None:
        return True
    if compile == "on":
        raise _no_room(why)
    log.warning("not compiling the decode step: %s (make room there, or set LLAMA_CLI_CACHE to another folder)", why)
    return False


def precheck_compile(compile) -> None:
    """--compile on where inductor's cache has no room (or a bad --compile value): said before the minutes a
    load can take; decide_compile asks again after it."""
    if _mode("--compile", compile) == "on":
        why = compile_cache.compile_room_problem()
        if why is not None:
            raise _no_room(why)


def _no_room(why: str) -> UserError:
    return UserError(f"cannot compile the decode step: {why}; make room there, set LLAMA_CLI_CACHE to another "
                     "folder, or pass --compile off")


def _auto_compiles(device, max_batch_size, key, expected_tokens, quantized, kernels, native_step) -> bool:
    """--compile auto's choice (decide_compile)."""
    if max_batch_size > GEMV_MAX_ROWS or (device.type != "cpu" and not (is_cuda(device) and quantized)):
        return False
    if native_step and device.type == "cpu":
        return False
    tokens = expected_tokens or 0
    warm, cold = (WARM_TOKENS_QUANTIZED, COLD_TOKENS_QUANTIZED) if quantized else (WARM_TOKENS, COLD_TOKENS)
    if kernels:
        warm, cold = WARM_TOKENS_KERNELS, COLD_TOKENS_KERNELS
    if device.type != "cpu":
        cold = COLD_TOKENS_CUDA_DEQUANTIZING
    return tokens >= cold or (tokens >= warm and key is not None and compile_cache.is_warm(key))


def decide_graphs(cuda_graphs, device: torch.device) -> bool:
    """--cuda_graphs on/off/auto: auto (and on) capture the decode step on CUDA GPUs."""
    cuda_graphs = _mode("--cuda_graphs", cuda_graphs)
    if cuda_graphs == "on" and not is_cuda(device):
        raise UserError(f"--cuda_graphs on needs a CUDA GPU; this run is on {device} (use --cuda_graphs auto)")
    return cuda_graphs != "off" and is_cuda(device)


def _capture(device: torch.device, pool, fn):
    """(CUDA graph, its output) of fn, captured after two warm-up runs on a side stream (which really run)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class _Graph:
    """One decode step for `size` rows attending over `kv_len` positions, with static input and output
    buffers: captured as a CUDA graph on CUDA GPUs (one replay per token). Elsewhere the same buffers
    and warm-up run eagerly, which is how the CPU tests check this logic."""

    def __init__(self, model: Transformer, size: int, kv_len: int, pool=None):
        device = model.device
        self.model, self.kv_len = model, kv_len
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        # Warm-up runs really execute: they write at position kv_len - 1, where no live row has anything
        # yet (a row at that position is this very step's, and its own write comes first).
        self.positions = torch.full((size,), kv_len - 1, dtype=torch.long, device=device)
        self.graph = None
        if not is_cuda(device):
            self.logits = model.decode(self.tokens, self.positions, kv_len)
            return
        self.graph, self.logits = _capture(device, pool, lambda: model.decode(self.tokens, self.positions, kv_len))

    def run(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.positions[n:].zero_()  # padding rows: cache rows >= n, which no live prompt uses
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self.model.decode(self.tokens, self.positions, self.kv_len)
        return self.logits[:n].clone()  # the next replay overwrites the output


class _PrefillGraph:
    """Prefill of `size` prompts right-padded to `length` tokens into given cache rows, returning each one's
    last real token's logits, with static input and output buffers: captured as a CUDA graph on CUDA GPUs.
    Its warm-up and capture runs really write: into the rows of the call that creates it, which that call
    then overwrites. Elsewhere the same buffers run eagerly, which is how the CPU tests check this logic."""

    def __init__(self, model: Transformer, size: int, length: int, rows: torch.Tensor, pool=None):
        device = model.device
        self.model = model
        self.tokens = torch.zeros(size, length, dtype=torch.long, device=device)
        self.rows, self.last = rows.clone(), torch.zeros(size, dtype=torch.long, device=device)
        self.graph = None
        if is_cuda(device):
            self.graph, self.logits = _capture(device, pool,
                                               lambda: model.prefill(self.tokens, self.rows, last=self.last))

    def run(self, tokens: torch.Tensor, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.rows.copy_(rows)
        self.last.copy_(last)
        if self.graph is None:
            return self.model.prefill(self.tokens, self.rows, last=self.last)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the output


class Engine:
    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, *, compile: bool = False,
                 cuda_graphs: bool = False, compile_key: Optional[str] = None, kv_dtype: Optional[torch.dtype] = None,
                 adapt_threads: bool = False):
        self.model = model
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.device = model.device
        self.cache_len = cache_length(max_seq_len)
        model.allocate_cache(max_batch_size, self.cache_len, kv_dtype)  # None: the activations' dtype
        self.cuda_graphs = cuda_graphs
        self.compiled = compile
        self.compile_key = compile_key
        self.warmup_s = 0.0  # seconds spent compiling and capturing (reported apart from generation)
        self.steps = self.prefills = 0  # decode steps and prefill calls run (for benchmarks)
        # prompts of different lengths prefilled together are packed into one row, none padded to the longest:
        # on the CPU a prefill costs per token (scripts/bench_batching.py: 1,314 of the continuous schedule's 5,425
        # prefill tokens were padding, most in the first fill of 16 prompts); elsewhere not yet measured
        self.pack_prefills = self.device.type == "cpu"
        # prompts may start from another row's keys and values (prefill_after) where the cache holds them exactly:
        # a half-width cache's rounded keys would part such a prompt from what it gives alone
        self.shares_prefixes = model.layers[0].attention.cache_k.dtype == model.norm.weight.dtype
        self.buckets = length_buckets(max_seq_len)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._prefill_graphs: dict[tuple[int, int], _PrefillGraph] = {}
        self._prefill_uses: dict[tuple[int, int], int] = {}
        self._pool = None
        self._compiled_sizes: set[int] = set()
        # attention kernels: on CUDA not cuDNN's, which builds a plan for every new shape (every prompt
        # length a prefill meets, every cache length an eager step reads; hundreds of ms each, measured on an
        # H100 as the continuous schedule's refills); flash and memory-efficient attention need no plan
        self._attention = _no_cudnn_attention if is_cuda(self.device) else contextlib.nullcontext
        if compile:
            # one graph per distinct row count; several models in one process are fine
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compile_cache.setup()
            for layer in model.layers:  # one compiled layer for any cache size
                for buf in (layer.attention.cache_k, layer.attention.cache_v):
                    torch._dynamo.maybe_mark_dynamic(buf, 0)
                    torch._dynamo.maybe_mark_dynamic(buf, 2)
            # on the CPU, inductor's C++ wrapper instead of its Python one: a layer's call no longer checks
            # and allocates its ~30 buffers in Python (measured 5-15% more tokens/s for SmolLM2-135M); one
            # process only (the wrapper cannot call the collectives model parallelism adds)
            cpp = self.device.type == "cpu" and model.mp.world_size == 1
            opts = {"cpp_wrapper": True} if cpp else None
            if is_cuda(self.device):
                opts = dict(CUDA_COMPILE_OPTIONS)
            block_fn, head_fn = run_block, run_head
            skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
            if self.device.type == "cpu" and skip is not None and uniform_layers(model):
                # On the CPU every decode step calls the compiled layer once per layer, and dynamo checks its
                # guards on every call, most of them on the layer's modules (measured: 6-17% more tokens/s
                # for the Q4_1 SmolLM2 without them). Those guards are skipped where that is safe: every
                # layer has the same structure (uniform_layers), and this model's compiled functions are
                # its own (fresh code objects: dynamo keeps compiled code per code object), so no other
                # model's layers, which the skipped guards would not tell apart, ever reach them.
                opts = {**(opts or {}), "guard_filter_fn": skip}
                block_fn, head_fn = _own_copy(run_block), _own_copy(run_head)
            model.decode_block_fn = torch.compile(block_fn, fullgraph=True, options=opts)
            model.decode_head_fn = torch.compile(head_fn, fullgraph=True, options=opts)
        else:  # a model an earlier engine compiled runs its plain step again
            model.decode_block_fn, model.decode_head_fn = run_block, run_head
        # steps not compiled on the CPU: a layer in one native call where the weights are on our kernels
        # (cpu_step.py); compiled steps are for 1-2 rows only
        self.native = None
        if self.device.type == "cpu":
            from .cpu_step import NativeStep

            self.native = NativeStep.prepare(model)
        # fewer threads while other work keeps the CPUs busy (cpu_share.py): where the count is ours to choose
        self.governor = None
        if adapt_threads and self.device.type == "cpu" and not compile and model.mp.world_size == 1:
            if torch.get_num_threads() > 1:
                self.governor = ThreadGovernor(torch.get_num_threads())

    # -- the verbs ---------------------------------------------------------------------------------

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], all_logits: bool = False):
        """Write whole prompts (each at least one token) into cache rows `rows`, in one batch.
        Returns the logits of each prompt's last token (n, vocab), or with all_logits a list of
        (len_i, vocab) logits for every position of each prompt."""
        self.prefills += 1
        with self._attention(), self._governed():
            return self._prefill(rows, prompts, all_logits)

    def decode(self, tokens: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Logits (n, vocab) for one new token in each of cache rows 0..n-1: tokens (n,) on the device,
        written at the host-side `positions` (one per row)."""
        self.steps += 1
        with self._attention(), self._governed():
            return self._decode(tokens, positions)

    def move_row(self, src: int, dst: int) -> None:
        self.model.move_cache_row(src, dst)

    def prefill_after(self, rows: Sequence[int], starts: Sequence[tuple[int, int]], prompts: Sequence[Sequence[int]]):
        """Write prompts whose beginnings other rows hold: starts[i] = (source row, n) copies that row's first n
        cache positions into rows[i], and prompts[i] (the rest, at least one token) goes after them, all in one
        packed prefill. Returns the logits of each prompt's last token (n, vocab)."""
        self.prefills += 1
        for row, (src, n) in zip(rows, starts):
            self.model.move_cache_row(src, row, n)
        with self._attention(), self._governed():
            return self.model.prefill_packed(list(prompts), [int(r) for r in rows], [n for _, n in starts])

    @contextlib.contextmanager
    def _governed(self):
        """A prefill or decode step, its CPU share told to the thread governor (cpu_share.py) where there is one."""
        if self.governor is None:
            yield
            return
        started = self.governor.start()
        yield
        self.governor.stop(started)

    # -- the ways to run a step ----------------------------------------------------------------------

    def _prefill(self, rows, prompts, all_logits):
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        if longest > self.max_seq_len:
            raise UserError(f"a prompt of {longest} tokens does not fit max_seq_len {self.max_seq_len}")
        shape = None if all_logits else self._prefill_shape(len(prompts), longest)
        if shape is None and not all_logits and len(set(lengths)) > 1 and self.pack_prefills:
            return self.model.prefill_packed(prompts, [int(r) for r in rows])
        tokens = torch.zeros((len(prompts), shape[1] if shape else longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        tokens = tokens.to(self.device)
        row_t = torch.as_tensor(list(rows), dtype=torch.long).to(self.device)
        if all_logits:
            logits = self.model.prefill(tokens, row_t)  # (n, longest, vocab)
            return [logits[i, :n] for i, n in enumerate(lengths)]
        last = torch.as_tensor([n - 1 for n in lengths], dtype=torch.long).to(self.device)
        if shape is not None:
            return self._prefill_graph(shape, row_t).run(tokens, row_t, last)
        return self.model.prefill(tokens, row_t, last=last)

    def _prefill_shape(self, n: int, longest: int) -> Optional[tuple[int, int]]:
        """(prompts, padded length) of the prefill graph this prefill replays, or None: eager."""
        if not self.cuda_graphs or n > PREFILL_GRAPH_ROWS:
            return None
        shape = (n, min(self.cache_len, max(PREFILL_MIN, 1 << (longest - 1).bit_length())))
        self._prefill_uses[shape] = self._prefill_uses.get(shape, 0) + 1
        return shape if shape in self._prefill_graphs or self._prefill_uses[shape] >= PREFILL_REUSE else None

    def _prefill_graph(self, shape: tuple[int, int], rows: torch.Tensor) -> _PrefillGraph:
        graph = self._prefill_graphs.get(shape)
        if graph is None:
            graph = self._prefill_graphs[shape] = self._captured(
                lambda pool: _PrefillGraph(self.model, *shape, rows, pool),
                "the prefill of %d prompt(s) of up to %d tokens" % shape)
        return graph

    def _captured(self, make, what: str):
        """make(pool): a new graph in the engine's one memory pool (CUDA), its time counted as warm-up."""
        start = time.perf_counter()
        if self._pool is None and is_cuda(self.device):
            self._pool = torch.cuda.graph_pool_handle()
        graph = make(self._pool)
        spent = time.perf_counter() - start
        self.warmup_s += spent
        log.debug("captured %s in %.2f s", what, spent)
        return graph

    def _decode(self, tokens, positions):
        n = tokens.shape[0]
        need = max(positions) + 1  # the furthest live row decides how much of the cache is read
        if min(positions) == need - 1:  # every row at one position (static batches): no copy from the host,
            pos_t = torch.full((n,), need - 1, dtype=torch.long, device=self.device)  # which may wait for the GPU
        else:
            pos_t = torch.as_tensor(list(positions), dtype=torch.long).to(self.device, non_blocking=True)
        if self.cuda_graphs:
            return self._graph_for(n, need).run(tokens, pos_t)
        if self.compiled and n <= GEMV_MAX_ROWS:
            return self._run_compiled(tokens, pos_t, need)
        if self.native is not None:
            return self.native(tokens, pos_t)
        masked = any(p != need - 1 for p in positions)
        return self.model.decode(tokens, pos_t, need, masked=masked, eager=True)

    def _run_compiled(self, tokens, positions, kv_len):
        n = tokens.shape[0]
        # fresh standard strides: a view (even a "contiguous" one) fails the compiled graph's guards
        tokens = tokens.clone(memory_format=torch.contiguous_format)
        start = time.perf_counter()
        out = self.model.decode(tokens, positions, kv_len)
        if n not in self._compiled_sizes:  # the first call for a row count compiles (or loads) it
            self._compiled_sizes.add(n)
            spent = time.perf_counter() - start
            self.warmup_s += spent
            if self.compile_key is not None:
                compile_cache.mark_warm(self.compile_key)
            log.info("compiled the decode step for %d row(s) in %.1f s (kept on disk for later runs)", n, spent)
        return out

    def _graph_for(self, n: int, need: int) -> _Graph:
        size = min(self.max_batch_size, 1 << (n - 1).bit_length())  # rows padded to a power of two
        kv_len = next(b for b in self.buckets if b >= need)
        graph = self._graphs.get((size, kv_len))
        if graph is None:
            graph = self._graphs[(size, kv_len)] = self._captured(
                lambda pool: _Graph(self.model, size, kv_len, pool),
                f"the decode step for {size} rows over {kv_len} positions")
        return graph


def uniform_layers(model: Transformer) -> bool:
    """Whether all layers have one structure: the same parameters and buffers (names, shapes, dtypes) and
    the same kernels (quant.py) in the same places. (A GGUF file may mix quantized forms across layers.)"""
    def structure(layer):
        tensors = [(n, tuple(t.shape), t.dtype) for n, t in [*layer.named_parameters(), *layer.named_buffers()]]
        return tensors, [(n, getattr(m, "kernel", None)) for n, m in layer.named_modules()]

    first = structure(model.layers[0])
    return all(structure(layer) == first for layer in model.layers[1:])


def _own_copy(fn):
    """fn with a code object of its own (same code): what dynamo compiles for it is kept apart."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _no_cudnn_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

"""`Llama`: Meta's public API (build / generate / text_completion), on any device and world size."""

from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional, TypedDict, Union

import torch
import torch.nn.functional as F

from . import checkpoint, distributed, memory
from .errors import UserError
from .model import Transformer, check_parallel
from .parallel import GEMV_MAX_ROWS
from .sampling import sample, sample_rows
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("llama_cli")

PAD = -1  # internal padding id; never fed to the model


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # decoded pieces, present when logprobs=True
    logprobs: List[float]  # present when logprobs=True


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_sampling(temperature, top_p, top_k=None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise UserError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UserError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise UserError(f"top_k must be a non-negative integer (0 or unset: no limit), got {top_k!r}")


def decide_compile(compile: Union[str, bool], device: torch.device, max_batch_size: int,
                   expected_tokens: Optional[int] = None) -> bool:
    """--compile: on, off, or auto. Measured (docs/benchmarks.md): on GPUs the compiled step (one
    CUDA-graph replay) wins; on the CPU it wins only for 1-2 rows (the fused matrix-vector product,
    about 2.8x eager for SmolLM2-135M) and costs ~30 s to compile, so auto compiles there only for
    max_batch_size <= 2 and jobs of 4096+ tokens."""
    if isinstance(compile, bool):
        return compile
    if compile not in ("auto", "on", "off"):
        raise UserError(f"compile must be auto, on or off, got {compile!r}")
    if compile == "auto":
        if device.type != "cpu":
            return distributed.is_cuda(device)
        return max_batch_size <= GEMV_MAX_ROWS and (expected_tokens or 0) >= 4096
    return compile == "on"


class Llama:
    @staticmethod
    def build(ckpt_dir: str, tokenizer_path: str, max_seq_len: int, max_batch_size: int,
              model_parallel_size: Optional[int] = None, seed: int = 1,
              device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype, None] = None,
              compile: Union[str, bool] = "auto", expected_tokens: Optional[int] = None) -> "Llama":
        """Load a Meta-layout checkpoint folder and its tokenizer, ready to generate.

        Works on CPU or GPU, in one process or under torchrun with any number of processes
        that the model's heads divide into. device/dtype default to this rank's GPU in bf16
        (fp16 where bf16 is unsupported), else CPU in fp32. compile: "on", "off" or "auto" (see
        decide_compile; expected_tokens, the job's total tokens to generate, informs it on CPU).
        """
        start = time.perf_counter()
        _positive_int("max_seq_len", max_seq_len)
        _positive_int("max_batch_size", max_batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"seed must be an integer, got {seed!r}")
        world_size, rank, local_rank = distributed.world()
        device = distributed.pick_device(device, local_rank)
        dtype = distributed.pick_dtype(device, dtype)
        compiled = decide_compile(compile, device, max_batch_size, expected_tokens)

        files, params_path = checkpoint.find_checkpoint(ckpt_dir)
        args = checkpoint.load_args(params_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        tokenizer = load_tokenizer(tokenizer_path)
        if args.vocab_size == -1:
            args.vocab_size = tokenizer.n_words
        elif args.vocab_size != tokenizer.n_words:
            raise UserError(f"params.json says vocab_size={args.vocab_size} but {tokenizer_path} has "
                            f"{tokenizer.n_words} tokens; use the tokenizer that came with this checkpoint")
        check_parallel(args, world_size)
        memory.preflight(args, world_size, device, dtype, max_batch_size, max_seq_len)
        mp = distributed.setup(device, model_parallel_size)

        reader = checkpoint.CheckpointReader(files, args)
        state = reader.rank_state_dict(mp.world_size, mp.rank, dtype, device)
        reader.close()
        with torch.device("meta"):
            model = Transformer(args, mp)
        model.load_state_dict(state, assign=True, strict=True)
        del state  # the model holds the tensors now
        model.requires_grad_(False)
        if device.type != "cpu":
            # Stacked QKV and gate/up weights: fewer, larger matmuls on GPUs. Not on the CPU, where it
            # measured no faster and would copy weights that are otherwise used in place from the map.
            model.fuse()
        model.setup_caches(max_batch_size, max_seq_len)
        log.info("loaded %s (%d shard(s)) on %s as %s, rank %d of %d, in %.2f s", ckpt_dir, len(files),
                 device, str(dtype).replace("torch.", ""), mp.rank, mp.world_size, time.perf_counter() - start)
        return Llama(model, tokenizer, seed=seed, compile=compiled)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._stop = torch.tensor(sorted(tokenizer.stop_ids), device=self.device)
        self._compiled = None
        self._compiled_sizes: set[int] = set()
        if compile:
            # One decode step = one graph (a CUDA-graph replay on GPUs); prefill stays eager.
            mode = "reduce-overhead" if distributed.is_cuda(self.device) else None
            # one graph per padded batch size and model shape; several models in one process are fine
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._compiled = torch.compile(model.decode_step, fullgraph=True, dynamic=False, mode=mode)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def uses_compiled(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows runs compiled: always on GPUs; on the CPU only for
        a row or two (the fused matrix-vector product), since eager measured faster beyond."""
        return self._compiled is not None and (distributed.is_cuda(self.device) or rows <= GEMV_MAX_ROWS)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: Optional[int] = None) -> torch.Tensor:
        """Logits (n, vocab) for one new token per row: tokens (n, 1) at per-row positions (n,),
        cache rows 0..n-1. Compiled (GPUs; CPU for 1-2 rows): rows are padded to a power of two;
        padding rows write only to cache rows >= n at position 0, which no live row uses."""
        n = tokens.shape[0]
        if not self.uses_compiled(n):
            return self.model(tokens, positions, kv_len=kv_len)[:, -1]
        # fresh standard strides: a view (even a "contiguous" one) fails the compiled graph's guards
        tokens = tokens.clone(memory_format=torch.contiguous_format)
        positions = positions.clone(memory_format=torch.contiguous_format)
        size = min(self.model.params.max_batch_size, 1 << (n - 1).bit_length())
        if size > n:
            tokens = torch.cat([tokens, tokens.new_zeros(size - n, 1)])
            positions = torch.cat([positions, positions.new_zeros(size - n)])
        start = time.perf_counter()
        out = self._compiled(tokens, positions)
        if size not in self._compiled_sizes:  # the first call for a size compiles it
            self._compiled_sizes.add(size)
            log.info("compiled the decode step for batch %d in %.1f s (once per batch size; cached on disk)",
                     size, time.perf_counter() - start)
        # a CUDA graph's output is overwritten by its next replay
        return out[:n].clone() if distributed.is_cuda(self.device) else out[:n]

    def generate(self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False, top_k: Optional[int] = None,
                 on_step: Optional[Callable[[List[int]], None]] = None):
        """Meta's token-level generation: returns (tokens, logprobs or None), one list per prompt.

        Prompts are batched max_batch_size at a time. on_step, if given, receives the token
        chosen for each row at every decoding step (for streaming).
        """
        n = len(prompt_tokens)
        return self.generate_rows(prompt_tokens, [max_gen_len] * n, [temperature] * n, [top_p] * n,
                                  logprobs=logprobs, echo=echo, top_k=top_k, on_step=on_step)

    def generate_rows(self, prompt_tokens: List[List[int]], max_gen_lens: List[int], temperatures: List[float],
                      top_ps: List[float], *, logprobs: bool = False, echo: bool = False, top_k: Optional[int] = None,
                      on_step: Optional[Callable[[List[int]], None]] = None):
        """`generate` with a max_gen_len, temperature and top_p per prompt."""
        for t, p, g in zip(temperatures, top_ps, max_gen_lens):
            check_sampling(t, p, top_k)
            _positive_int("max_gen_len", g)
        bs = self.model.params.max_batch_size
        out_tokens, out_logprobs = [], []
        for i in range(0, len(prompt_tokens), bs):
            part = slice(i, i + bs)
            toks, probs = self._generate_batch(prompt_tokens[part], max_gen_lens[part], temperatures[part],
                                               top_ps[part], logprobs, echo, top_k, on_step)
            out_tokens += toks
            out_logprobs += probs
        return out_tokens, (out_logprobs if logprobs else None)

    def _generate_batch(self, prompt_tokens, max_gen_lens, temperatures, top_ps, logprobs, echo, top_k, on_step):
        params = self.model.params
        bsz = len(prompt_tokens)
        lengths = [len(t) for t in prompt_tokens]
        for i, n in enumerate(lengths):
            if n == 0:
                raise UserError(f"prompt {i} is empty; give at least one token")
            if n > params.max_seq_len:
                raise UserError(f"prompt {i} has {n} tokens but max_seq_len is {params.max_seq_len}; "
                                f"raise --max_seq_len or shorten the prompt")
        ends = [n + g for n, g in zip(lengths, max_gen_lens)]  # where each row stops, exclusive
        min_len = min(lengths)
        total_len = min(params.max_seq_len, max(ends))

        tokens = torch.full((bsz, total_len), PAD, dtype=torch.long, device=self.device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, :len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=self.device) if logprobs else None
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        row_end = torch.tensor(ends, device=self.device)
        input_text_mask = tokens != PAD
        uniform = len(set(temperatures)) == 1 and len(set(top_ps)) == 1
        temps = torch.tensor(temperatures, dtype=torch.float, device=self.device)
        tops = torch.tensor(top_ps, dtype=torch.float, device=self.device)
        check_every = 1 if self.device.type == "cpu" else 8  # host syncs are costly on accelerators

        prev_pos = 0
        if min_len == total_len and logprobs:
            logits = self.model(tokens, prev_pos)
            token_logprobs = -F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none", ignore_index=PAD)
        for cur_pos in range(min_len, total_len):
            if cur_pos - prev_pos == 1 and self.uses_compiled(bsz):
                positions = torch.full((bsz,), prev_pos, dtype=torch.long, device=self.device)
                logits = self.decode(tokens[:, prev_pos:cur_pos], positions)[:, None]  # (bsz, 1, vocab)
            else:
                last = None if logprobs else torch.full((bsz,), cur_pos - prev_pos - 1, device=self.device)
                logits = self.model(tokens[:, prev_pos:cur_pos], prev_pos, output_index=last)
            if uniform:
                next_token = sample(logits[:, -1], temperature=temperatures[0], top_p=top_ps[0], top_k=top_k,
                                    generator=self.generator)
            else:
                next_token = sample_rows(logits[:, -1], temps, tops, top_k=top_k, generator=self.generator)
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                token_logprobs[:, prev_pos + 1:cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1:cur_pos + 1], reduction="none", ignore_index=PAD)
            done |= ~input_text_mask[:, cur_pos] & torch.isin(next_token, self._stop)
            done |= row_end <= cur_pos + 1
            prev_pos = cur_pos
            if on_step is not None:
                on_step(next_token.tolist())
            if (cur_pos - min_len) % check_every == check_every - 1 and bool(done.all()):
                break

        all_logprobs = token_logprobs.tolist() if logprobs else None
        out_tokens, out_logprobs = [], []
        for i, toks in enumerate(tokens.tolist()):
            start = 0 if echo else lengths[i]
            toks = toks[start:ends[i]]
            probs = all_logprobs[i][start:ends[i]] if logprobs else []
            for j, t in enumerate(toks[lengths[i] - start:], lengths[i] - start):
                if t in self.tokenizer.stop_ids or t == PAD:
                    toks, probs = toks[:j], probs[:j]
                    break
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, out_logprobs

    def text_completion(self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False,
                        top_k: Optional[int] = None) -> List[CompletionPrediction]:
        """Complete each prompt; returns [{"generation", and with logprobs "tokens", "logprobs"}]."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise UserError(f"prompt {i} is a {type(p).__name__}, not text")
        prompt_tokens = [self.tokenizer.encode(x, bos=self.tokenizer.add_bos, eos=False) for x in prompts]
        gen_tokens, gen_logprobs = self.generate(prompt_tokens, max_gen_len, temperature, top_p,
                                                 logprobs=logprobs, echo=echo, top_k=top_k)
        if logprobs:
            return [{"generation": self.tokenizer.decode(t), "tokens": [self.tokenizer.decode([x]) for x in t],
                     "logprobs": lp} for t, lp in zip(gen_tokens, gen_logprobs)]
        return [{"generation": self.tokenizer.decode(t)} for t in gen_tokens]

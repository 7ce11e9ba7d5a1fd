"""The flags of `llama-cli` (completion): one list, `RunConfig`, which checks itself.

fire builds a RunConfig straight from the command line (its `--help` is this class's
docstring), `__post_init__` checks every value, so a bad flag fails before any model loads.
Adding a flag means adding one field here and one line to the docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import UserError
from .settings import KV_CACHE_DTYPES, SEED_MAX, Settings, resolve


@dataclass
class RunConfig:
    """Complete text prompts with a LLaMA model (a Meta checkpoint folder).

    Examples:
      llama-cli --ckpt_dir llama-2-7b --prompt "The capital of France is"
      llama-cli --ckpt_dir llama-2-7b --prompts_file prompts.jsonl --output jsonl --output_file out.jsonl --resume
      echo "Once upon a time" | llama-cli --ckpt_dir llama-2-7b --temperature 0
      torchrun --nproc_per_node 2 -m llama_cli --ckpt_dir llama-2-13b --prompt "Hi"

    Subcommands (each with its own --help):
      llama-cli chat --ckpt_dir llama-2-7b-chat            talk with a chat model in the terminal
      llama-cli convert --src model.gguf --out my-model    a GGUF file or HF folder into a checkpoint folder
      llama-cli quantize --ckpt_dir X --out Y --mode int4  write an int8/int4 checkpoint folder
      llama-cli perplexity --ckpt_dir X --text_file F      the model's perplexity on a text
      llama-cli reshard --ckpt_dir X --out Y --shards 2    split or merge checkpoint shards
      llama-cli compile --ckpt_dir X                       compile the decode step ahead, kept for later runs

    Args:
      ckpt_dir: folder with consolidated.NN.pth shards and params.json (any shard count, any process count).
      tokenizer_path: tokenizer file. Default is tokenizer.json or tokenizer.model in ckpt_dir, else
        tokenizer.model in its parent folder.
      prompt: text to complete; repeat --prompt for several. Always taken as text (42 stays "42").
      prompts_file: .txt (one prompt per line), .jsonl (one object per line with "prompt" and optional
        "id" and per-prompt settings, any of max_gen_len, temperature, top_p, top_k, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, stop, seed) or .json (an array of such
        objects or of texts); "-" reads standard input, and a pipe such as <(command) is read as it is.
        Without --prompt or --prompts_file, prompts are read from a piped standard input, one per line
        (JSONL when its first line is such an object; a JSON array as a .json file is).
      temperature: sampling temperature; 0 is greedy (deterministic).
      top_p: nucleus sampling, drawing only from the most likely tokens that hold this much probability.
      top_k: also limit sampling to the k most likely tokens (0 means no limit).
      min_p: also drop tokens less than min_p times as likely as the most likely one (0 means off).
      repetition_penalty: divide the logits of tokens already in the prompt or the generation by this
        (multiply when negative), as HF transformers does; 1 means off.
      presence_penalty: subtract this from the logits of tokens generated so far (OpenAI's), -2 to 2.
      frequency_penalty: subtract this times each token's count so far (OpenAI's), -2 to 2.
      stop: end the generation where this text appears (it is not part of the output); repeat for several.
      max_seq_len: longest prompt + completion, in tokens (sizes the KV cache). Past the context the model was
        trained for (where its params.json states it, as convert writes it) a warning says so.
      max_gen_len: most tokens to generate per prompt.
      max_batch_size: prompts decoded together; prompt files run in batches of this size. The KV cache holds
        min(this, the number of prompts) rows (one prompt, one row; under torchrun, for --prompt texts).
      seed: random seed. Each prompt's samples depend only on it and the prompt's place in the input, never on
        its batch (the same with any --max_batch_size or --schedule, and after --resume); a JSONL "seed" gives
        a prompt draws of its own, the same in any file or run.
      logprobs: also report each generated token's log-probability (needs --output jsonl).
      echo: include the prompt tokens in the generation (and its logprobs).
      device: cpu, cuda, cuda:N or mps. Default is this rank's GPU if there is one, else cpu.
      dtype: fp32, bf16 or fp16. Default is bf16 on GPUs that support it, fp16 on others, fp32 on cpu,
        where linear weights a checkpoint stores in bf16 or fp16 (Meta's) stay so on x86 CPUs, widened to
        fp32 exactly as our C++ kernels read them (half the memory, about twice the decoding speed, fp32's
        results); an explicit --dtype fp32 widens them at load instead.
      kv_cache_dtype: auto, fp32, bf16 or fp16: the type the KV cache holds keys and values in. auto is
        --dtype's (exact). bf16 or fp16 under fp32 halves the cache's memory and what a step reads of it, for
        faster decoding at long contexts on the CPU (keys and values rounded to it, as llama.cpp's f16 cache).
      threads: CPU threads per process, 1 to the CPUs it may use. Default is OMP_NUM_THREADS, else one per core
        and at most a container's CPU quota (torchrun sets OMP_NUM_THREADS=1 for several processes a machine),
        fewer while other work keeps some cores busy (a thread waiting on a busy core slows every step), more
        again when it stops. A number given here is kept whatever else runs.
      output: text (each prompt followed by its completion) or jsonl (one object per prompt with id,
        index, prompt, generation, tokens, finish_reason, and logprobs when asked).
      output_file: also append each result to this file as soon as it is done (flushed).
      resume: skip prompts whose results are already in --output_file (needs --output jsonl).
      stream: print the completion token by token as it is generated (one prompt).
      strict: stop at the first prompt that cannot run (too long) instead of writing an error entry.
      quiet: no logs or progress on stderr, only errors.
      debug: show the Python traceback on errors.
      schedule: continuous (the default, where a finished prompt's batch slot is refilled at once, best
        for prompt files) or static (Meta's way, where each batch runs until its longest completion ends).
      share_prefixes: in the continuous schedule, a prompt that begins with 16+ tokens of a prompt already in
        the batch copies their keys and values instead of computing them (a shared instruction or few-shot
        examples, the same prompt sampled several times); --noshare_prefixes computes every prompt whole.
      compile: compile the decoding step with torch.compile, one of on, off, auto. auto does not compile
        on x86 CPUs running fp32 in one process, where the uncompiled step runs each layer as one native
        call (our C++ kernels), faster than compiled. Otherwise auto compiles on the CPU for
        --max_batch_size 1-2 (or 1-2 prompts) for jobs of 512+ tokens when this model shape and cache size
        were compiled before (kept on disk, see llama-cli compile), or of 4096+ tokens (where our CPU kernels are not
        built the uncompiled step is slower, so from 128+ and 1024+ tokens, for quantized weights 16+ and
        128+); on GPUs auto uses CUDA graphs instead (and compiles only int8 weights at batch 1-2, a step
        kept from before for 16+ tokens, a first compile, about a minute, for 2048+).
      cuda_graphs: capture the decoding step as CUDA graphs, one of on, off, auto (auto means on CUDA GPUs).
      quantize: int8 or int4, to quantize the linear layers' weights at load, and the token embeddings to int8
        (weight-only; activations stay in --dtype). Fewer bytes per weight is faster decoding where it is
        memory-bound, on x86 CPUs through our C++ kernels, built once on first use (LLAMA_CLI_NATIVE=0 turns
        them off), uncompiled or compiled (SmolLM2-135M int4 about 3x its fp32 compiled speed); on other
        CPUs at batch 1-2 compiled; on CUDA GPUs at --max_batch_size 1-2 through our Triton kernels (7B on an
        H100 against bf16 captured, int4 groups of 32 2.2x, of 128 2.7x, int8 1.5x), past that int4 on the
        tinygemm kernel and int8 fast only compiled.
      group_size: weights per quantization group along the input dimension. int8 takes 0 (one group per
        output row, the default), 32, 64, 128 or 256; int4 takes 32 (the default, measured best), 64, 128
        or 256.
      chat_format: how dialogs (JSONL lines with "messages") become tokens, one of auto, llama2, llama3,
        template. auto takes the checkpoint's chat template (tokenizer_config.json), else Meta's Llama 3
        format for tiktoken tokenizers and Meta's Llama 2 format for SentencePiece ones.

    Exit codes are 0 when done, 2 for bad usage or input, 1 for a failure while running or when some
    prompts got error entries, 130 when interrupted (Ctrl-C), 143 when terminated (kill, a job scheduler's
    time limit). Multi-node runs use torchrun --nnodes N --node_rank R --nproc_per_node G --rdzv_backend c10d,
    --rdzv_endpoint the first node's host and port, and -m llama_cli (see README).
    """
    ckpt_dir: Optional[str] = None
    tokenizer_path: Optional[str] = None
    prompt: list = field(default_factory=list)
    prompts_file: Optional[str] = None
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list = field(default_factory=list)
    max_seq_len: int = 512
    max_gen_len: int = 64
    max_batch_size: int = 4
    seed: int = 1
    logprobs: bool = False
    echo: bool = False
    device: Optional[str] = None
    dtype: Optional[str] = None
    kv_cache_dtype: str = "auto"
    output: str = "text"
    output_file: Optional[str] = None
    resume: bool = False
    stream: bool = False
    strict: bool = False
    quiet: bool = False
    debug: bool = False
    schedule: str = "continuous"
    share_prefixes: bool = True
    compile: str = "auto"
    cuda_graphs: str = "auto"
    chat_format: str = "auto"
    quantize: Optional[str] = None
    group_size: Optional[int] = None
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        """Check every flag; raise UserError naming the first bad one."""
        from .devices import check_threads
        from .tokenizer import find_tokenizer

        if self.ckpt_dir is None:
            raise UserError("--ckpt_dir is required: the folder with consolidated.NN.pth and params.json "
                            "(llama-cli --help lists every flag)")
        self.ckpt_dir = str(self.ckpt_dir)
        if self.tokenizer_path is None:
            self.tokenizer_path = find_tokenizer(self.ckpt_dir)
        self.tokenizer_path = str(self.tokenizer_path)
        self.prompt = list(self.prompt or [])
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.settings = resolve(Settings(), {"max_gen_len": self.max_gen_len, "temperature": self.temperature,
                                             "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                                             "repetition_penalty": self.repetition_penalty,
                                             "presence_penalty": self.presence_penalty,
                                             "frequency_penalty": self.frequency_penalty, "stop": self.stop})
        _int("max_seq_len", self.max_seq_len, minimum=2)
        _int("max_batch_size", self.max_batch_size)
        _int("seed", self.seed, minimum=0, maximum=SEED_MAX)
        for name in ("logprobs", "echo", "resume", "stream", "strict", "quiet", "debug"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"--{name} is a switch: write --{name} or --no{name}, not --{name} "
                                f"{getattr(self, name)!r}")
        _choice("compile", self.compile, ("auto", "on", "off"))
        _choice("cuda_graphs", self.cuda_graphs, ("auto", "on", "off"))
        _choice("schedule", self.schedule, ("continuous", "static"))
        _choice("chat_format", self.chat_format, ("auto", "llama2", "llama3", "template"))
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        check_threads(self.threads)
        if self.quantize is not None or self.group_size is not None:
            from .quant import check_flags  # (imports torch: only when asked)

            self.quantize, self.group_size = check_flags(self.quantize, self.group_size)
        _choice("output", self.output, ("text", "jsonl"))
        if self.resume and not self.output_file:
            raise UserError("--resume needs --output_file: the file whose finished prompts should be skipped")
        if self.resume and self.output != "jsonl":
            raise UserError("--resume reads back the results, so it needs --output jsonl")
        if self.stream and self.output != "text":
            raise UserError("--stream prints text as it is generated; drop --output jsonl or --stream")
        if self.logprobs and self.output != "jsonl":
            raise UserError("--logprobs are reported in the JSONL records; add --output jsonl")


def _int(name, value, minimum=1, maximum=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise UserError(f"--{name} must be an integer <= {maximum}, got {value}")
    return value


def _choice(name, value, choices):
    if value not in choices:
        raise UserError(f"--{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")

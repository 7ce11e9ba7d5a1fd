"""The command line, read and explained: each command's flags checked and rewritten for fire (literal_args), other
tools' names for them hinted at (ALIASES, ELSEWHERE), a value given without its flag pointed to the flag, and
fire's help text tidied, the flags a command cannot run without marked (REQUIRED). No torch here: `--help` is
quick."""

from __future__ import annotations

import inspect
import os
import re

from .config import RunConfig
from .errors import UserError

_LIST_FLAGS = ("prompt", "stop")  # repeatable: every occurrence is kept, in order
_STR_FLAGS = ("ckpt_dir", "tokenizer_path", "prompts_file", "output", "output_file", "device", "dtype", "schedule",
              "compile", "cuda_graphs", "chat_format", "system", "quantize", "kv_cache_dtype")


# other tools' names (llama.cpp, transformers, OpenAI's API, Meta's scripts) for flags of ours, hinted at when given;
# the first of a name's that the command has is named. Single letters are llama.cpp's (-m model, -f file, -n
# tokens, -c context, -t threads, -s seed, -b batch, -r reverse prompt, -o output), else the flag it would be
# here: we take no one-letter flags but -q and -h, so that another tool's habit is never taken for another flag
# of ours (`-f prompts.txt` as --frequency_penalty, `-s 42` as perplexity's --stride).
ALIASES = {"max_seq_len": ("ctx",), "ctx": ("max_seq_len",), "ctx_size": ("max_seq_len", "ctx"),
           "n_ctx": ("max_seq_len", "ctx"), "context": ("max_seq_len", "ctx"), "n_predict": ("max_gen_len",),
           "max_new_tokens": ("max_gen_len",), "max_tokens": ("max_gen_len",), "temp": ("temperature",),
           "model": ("ckpt_dir", "src"),
           "checkpoint": ("ckpt_dir",), "file": ("prompts_file", "text_file"), "batch_size": ("max_batch_size",),
           "tokenizer": ("tokenizer_path",), "n_threads": ("threads",), "repeat_penalty": ("repetition_penalty",),
           "p": ("prompt",), "m": ("ckpt_dir", "src"), "f": ("prompts_file", "text_file"),
           "n": ("max_gen_len",), "c": ("max_seq_len", "ctx", "ckpt_dir"), "t": ("threads",), "s": ("seed", "stride",
           "shards"), "b": ("max_batch_size",), "r": ("stop", "repetition_penalty"), "o": ("output_file", "out"),
           "e": ("echo",), "l": ("logprobs",), "k": ("top_k", "kv_cache_dtype"), "g": ("group_size",),
           "d": ("dtype", "device"), "ngl": ("device",), "n_gpu_layers": ("device",), "gpu_layers": ("device",)}


def _is_command(use: str) -> str:
    return f"that is a command here: llama-cli {use} (see llama-cli {use.split()[0]} --help)"


# flags that mean something else in a command, and what to say there: flags of other tools (llama.cpp's -i, -cnv)
# that are commands here, and the prompt flags that chat, which reads its messages, does not take
_CHAT = _is_command("chat --ckpt_dir DIR")
_MESSAGES = ("chat takes your messages typed at its prompt or one a line on standard input: echo TEXT | llama-cli "
             "chat --ckpt_dir DIR")
ELSEWHERE = {"llama-cli": {"interactive": _CHAT, "i": _CHAT, "conversation": _CHAT, "cnv": _CHAT, "chat": _CHAT,
                           "perplexity": _is_command("perplexity --ckpt_dir DIR --text_file FILE"),
                           "convert": _is_command("convert --src FILE --out DIR")},
             "llama-cli chat": {**dict.fromkeys(("p", "prompt", "f", "prompts_file"), _MESSAGES),
                                "stream": "chat's text replies stream as they are generated; there is nothing to "
                                          "turn on",
                                "output_file": "chat writes its replies to standard output; redirect it: "
                                               "llama-cli chat ... > FILE"}}


def _positional(arg: str, command: str) -> UserError:
    """The error for a value given without a flag, naming the flag it most likely belongs to."""
    see = f"(see {command} --help)"
    what = None
    if command == "llama-cli convert" and os.path.exists(arg):
        what = "the file or folder to convert goes after --src"
    elif os.path.isfile(os.path.join(arg, "params.json")):
        what = "a checkpoint folder goes after --ckpt_dir"
    elif command == "llama-cli perplexity" and os.path.isfile(arg):
        what = "the text to score goes after --text_file"
    elif command == "llama-cli":
        what = "text to complete goes after --prompt"
    return UserError(f"unexpected argument {arg!r}; {what or command + ' takes flags only, each value after its flag'}"
                     f" {see}")


def literal_args(argv: list[str], fn=RunConfig, str_flags=_STR_FLAGS, command: str = "llama-cli") -> list[str]:
    """Check argv against fn's flags and rewrite it so fire takes text as text.

    fire types every value by its look (`--prompt 42` arrives as an int, `--prompt "a, b"`
    as a tuple), keeps only the last of a repeated flag, and hands flags it does not know
    to the function's *result* after running it. So unknown flags are refused here, every
    --prompt (and --stop) is gathered into one list, and text values are passed as Python
    string literals, which fire reads back unchanged.
    """
    params = inspect.signature(fn).parameters
    switches = {n for n, p in params.items() if isinstance(p.default, bool)}
    short = {"q": "quiet"} if "quiet" in params else {}  # the one short flag (see ALIASES)
    lists: dict[str, list] = {}
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            raise _positional(arg, command)
        flag, eq, value = arg.partition("=")
        name = flag.lstrip("-").replace("-", "_")
        name = short.get(name, name) if flag.startswith("-") and not flag.startswith("--") else name
        if name in switches or name.startswith("no") and name[2:] in switches:
            rest.append(f"--{name}" if not eq else f"--{name}={value}")  # short forms spelled out for fire
            i += 1
            continue
        if name not in params:
            import difflib

            said = ELSEWHERE.get(command, {}).get(name)
            if said:
                raise UserError(f"unknown flag {flag}; {said}")
            guess = [a for a in ALIASES.get(name, ()) if a in params]
            guess = guess or difflib.get_close_matches(name, list(params), n=1)
            hint = f"did you mean --{guess[0]}? " if guess else ""
            raise UserError(f"unknown flag {flag}; {hint}see {command} --help for the flags")
        if not eq:
            if i + 1 >= len(argv):
                raise UserError(f"{flag} needs a value")
            value = argv[i + 1]
            i += 1
            if value.startswith("--") and name not in _LIST_FLAGS and name != "system":  # not a value: a flag
                raise UserError(f"{flag} needs a value" + (f", not the flag {value}" if value != "--" else ""))
        if name in _LIST_FLAGS:
            lists.setdefault(name, []).append(value)
        elif name in str_flags:
            rest += [f"--{name}", repr(value)]
        else:
            rest += [f"--{name}", value]
        i += 1
    for name, values in lists.items():
        rest += [f"--{name}", repr(values)]
    return rest


# the flags each command cannot run without (each command's own check says so when one is missing): --help marks
# them "Required" where fire would say "Default: None"
REQUIRED = {"llama-cli": ("ckpt_dir",), "llama-cli chat": ("ckpt_dir",), "llama-cli compile": ("ckpt_dir",),
            "llama-cli convert": ("src", "out"), "llama-cli perplexity": ("ckpt_dir", "text_file"),
            "llama-cli quantize": ("ckpt_dir", "out", "mode"), "llama-cli reshard": ("ckpt_dir", "out", "shards")}


def tidy_help(text: str, name: str) -> str:
    """fire's help text for command `name` as a user should read it: no "VALUE" choices (fire lists the flags of
    RunConfig, a class, once more as values), no one-letter flags but -q, no Python quoting of names and types,
    switches shown as they are given (--echo, --noshare_prefixes), and required flags marked so."""
    text = text.replace(f"'{name}'", name)  # fire quotes a name with a space in it
    text = re.sub(r"\nVALUES\n.*", "\n", text, flags=re.S).replace(f"{name} VALUE | <flags>", f"{name} <flags>")
    # fire offers "-x" for each flag whose first letter is its own; we take -q for --quiet alone (see ALIASES)
    text = re.sub(r"(?m)^(\s+)-[a-z], (--(?!quiet\b))", r"\1\2", text)
    blocks = re.split(r"(?m)^(?=    -)", text)
    for i, block in enumerate(blocks):
        flag = re.match(r" +(?:-q, )?--(\w+)", block)
        if flag is None:
            continue
        block = re.sub(r"(?m)^ +Type: Optional\[\]\n", "", block)  # a flag without a type, whose default is None
        block = re.sub(r"Type: Optional\['(Optional\[\w+\])'\]", r"Type: \1", block)
        block = re.sub(r"(?m)^( +(?:Type|Default): )'([^'\n]*)'$", r"\1\2", block)
        if "Default: <factory>" in block:  # a list: the flag given any number of times
            block = block.replace("Type: list", "Type: str, repeatable").replace("Default: <factory>", "Default: None")
        switch = re.search(r"(?m)^ +Default: (True|False)$", block)
        if switch:  # given alone (--echo), or --noX where it is on by default; -q is --quiet in every command
            on = flag.group(1)
            head = ("-q, " if on == "quiet" else "") + f"--{on}" + (f" / --no{on}" if switch.group(1) == "True" else "")
            block = re.sub(rf"^    (?:-q, )?--{on}={on.upper()}", "    " + head, block)
        if flag.group(1) in REQUIRED.get(name, ()):
            block = re.sub(r"Type: Optional\[(\w+)\]", r"Type: \1", block).replace("Default: None", "Required")
        blocks[i] = block
    return "".join(blocks).rstrip() + "\n"

"""Dialogs to prompt tokens: Meta's Llama 2 and Llama 3 chat formats, and a checkpoint's own HF chat template.

A dialog is a list of {"role": "system" | "user" | "assistant", "content": text}: an optional
system message, then user and assistant turns alternating, ending with the user's (Meta's rule,
checked for every format). The format comes from the checkpoint unless chosen:
- "template": a `chat_template` in tokenizer_config.json (or chat_template.jinja) beside the
  tokenizer, rendered with jinja2 as transformers renders it (sandboxed, trim_blocks, lstrip_blocks,
  with add_generation_prompt), then tokenized without added special tokens;
- "llama3": Meta's Llama 3 ChatFormat (`<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>`),
  the default for tiktoken tokenizers;
- "llama2": Meta's Llama 2 format (`[INST]`/`[/INST]`, the system prompt folded into the first user
  turn in `<<SYS>>`, BOS/EOS around every exchange), the default for SentencePiece tokenizers.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Optional

from .errors import UserError
from .settings import check_text

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "llama2", "llama3", "template")

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def check_dialog(dialog, where: str = "dialog") -> list[dict]:
    """The dialog, checked: a non-empty list of {"role", "content"} with known roles, an optional system
    message first, then user/assistant alternating, ending with the user. One-line UserError otherwise."""
    if not isinstance(dialog, list) or not dialog:
        raise UserError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} objects')
    out = []
    for i, m in enumerate(dialog):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise UserError(f'{where}: message {i + 1} must be an object with a "role" and a "content" text')
        if m["role"] not in ROLES:
            raise UserError(f'{where}: message {i + 1} has role {json.dumps(m["role"])}; the roles are '
                            "system, user and assistant")
        out.append({"role": m["role"], "content": check_text(m["content"], f"{where}: message {i + 1}")})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise UserError(f"{where}: after an optional system message, messages must alternate user, assistant, "
                            f"user, ...; message {out.index(m) + 1} is {m['role']} where {want} belongs")
    if not turns or turns[-1]["role"] != "user":
        raise UserError(f"{where}: the last message must be the user's (the model writes the assistant's reply)")
    return out


class Llama2Format:
    name = "llama2"

    def encode(self, dialog: list[dict], tokenizer) -> list[int]:
        if dialog[0]["role"] == "system":
            dialog = [{"role": dialog[1]["role"],
                       "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
        ids: list[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            ids += tokenizer.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                    bos=True, eos=True)
        return ids + tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)

    @staticmethod
    def unsafe(dialog: list[dict]) -> bool:
        """Meta's check: its special tags inside a message make the reply an error text."""
        return any(tag in m["content"] for tag in SPECIAL_TAGS for m in dialog)


class Llama3Format:
    name = "llama3"

    def encode(self, dialog: list[dict], tokenizer) -> list[int]:
        special = tokenizer.special_id
        ids = [special("<|begin_of_text|>")]
        for m in dialog:
            ids += self._header(m["role"], tokenizer)
            ids += tokenizer.encode(m["content"].strip(), bos=False, eos=False) + [special("<|eot_id|>")]
        return ids + self._header("assistant", tokenizer)

    @staticmethod
    def _header(role: str, tokenizer) -> list[int]:
        return ([tokenizer.special_id("<|start_header_id|>")] + tokenizer.encode(role, bos=False, eos=False)
                + [tokenizer.special_id("<|end_header_id|>")] + tokenizer.encode("\n\n", bos=False, eos=False))


class TemplateFormat:
    name = "template"

    def __init__(self, template: str, special_tokens: dict):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(template)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"the checkpoint's chat template does not parse ({e}); pass --chat_format llama2 "
                            "or llama3, or fix chat_template in tokenizer_config.json") from None
        self.special_tokens = special_tokens

    def render(self, dialog: list[dict]) -> str:
        import jinja2

        try:
            return self.template.render(messages=dialog, add_generation_prompt=True, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"the chat template cannot render this dialog: {e}") from None

    def encode(self, dialog: list[dict], tokenizer) -> list[int]:
        return tokenizer.encode(self.render(dialog), bos=False, eos=False)


def read_template(tokenizer_path: str) -> tuple[Optional[str], dict]:
    """(chat template or None, special token strings) from the tokenizer's folder."""
    folder = os.path.dirname(os.path.abspath(tokenizer_path))
    config = {}
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        pass
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    return (template if isinstance(template, str) else None), special


def check_choice(choice: str) -> str:
    if choice not in FORMATS:
        raise UserError(f"--chat_format must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, got {choice!r}")
    return choice


def pick_format(tokenizer, tokenizer_path: str, choice: str = "auto"):
    """The chat format for this tokenizer: the checkpoint's template, else Meta's format of its kind."""
    from .tokenizer import SentencePieceTokenizer, TiktokenTokenizer

    check_choice(choice)
    template, special = read_template(tokenizer_path)
    if choice == "template" or (choice == "auto" and template is not None):
        if template is None:
            raise UserError(f"no chat_template in tokenizer_config.json beside {tokenizer_path}; pass "
                            "--chat_format llama2 or llama3")
        return TemplateFormat(template, special)
    if choice == "llama3" or (choice == "auto" and isinstance(tokenizer, TiktokenTokenizer)):
        if not hasattr(tokenizer, "special_id"):
            raise UserError("the llama3 chat format needs a tokenizer with Llama 3's special tokens")
        return Llama3Format()
    if choice == "llama2" or (choice == "auto" and isinstance(tokenizer, SentencePieceTokenizer)):
        return Llama2Format()
    raise UserError(f"{tokenizer_path} comes with no chat template; pass --chat_format llama2 or llama3")

"""A checkpoint's own Jinja chat template, rendered the way transformers' apply_chat_template does.

The environment follows transformers (utils/chat_template_utils.py): an immutable sandbox (templates
come from the Hub and are untrusted code), trim_blocks and lstrip_blocks, loop controls, a `tojson`
that does not HTML-escape, `raise_exception`, `strftime_now`, and `namespace`/`dict` that refuse
underscore names. A template sees `messages`, `add_generation_prompt`, `tools`/`documents` (None) and
the special tokens by name (`bos_token`, `eos_token`, ...). The rendered text is then tokenized whole,
special tokens recognised, no bos added: the ids of transformers' apply_chat_template(tokenize=True).
So, as there, a message that spells a control token (say "<|im_end|>") gets that token.

End of turn (documented in docs/CONTRACTS.md): the special token the template writes right after an
assistant message's content, whitespace skipped (<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>, </s>).
An assistant reply as training ids is what the model generates after the generation prompt: the
conversation rendered with the reply, minus the prompt's ids, cut after that token (the newline some
templates add after it is never generated: sampling stops at the token)."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Callable

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' names for the special tokens a template may use
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# probes of the template's shape; odd enough that no template writes them itself
_PROBE_USER = "Probe question 7f3a?"
_PROBE_REPLY = "Probe answer 7f3a."
_OPEN_REPLY = "<open-reply-7f3a>"


class ChatTemplateError(ValueError):
    """A template that cannot render (syntax error, raise_exception, a reply it does not continue);
    one line naming the checkpoint."""

    def __init__(self, source, problem: str):
        super().__init__(" ".join(f"{source}: chat template: {problem}".split()))


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes (<, >, &, '), which would change what the model sees.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _check_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not store {name!r} (underscore names)")


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace without underscore attributes: the sandbox checks reads, not these writes."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _dict(*args, **kwargs) -> dict:
    return dict(*args, **kwargs)  # a function, not the type: no class attributes to reach through


def _environment() -> ImmutableSandboxedEnvironment:
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (earlier sandboxes have known escapes); "
                          f"found {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=_dict)
    return env


class JinjaTemplate:
    """One checkpoint's template bound to its tokenizer.

    encode: rendered text -> ids with special tokens recognised; special_tokens: {"bos_token": "<s>", ...};
    control_tokens: every special token string of the vocabulary (to spot the end of turn)."""

    def __init__(self, text: str, *, encode: Callable[[str], list[int]], token_id: Callable[[str], int | None],
                 special_tokens: dict[str, str], control_tokens: list[str], source):
        self.text, self.source = text, source
        self.special_tokens = dict(special_tokens)
        self._encode = encode
        try:
            self._template = _environment().from_string(text)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(source, f"line {e.lineno}: {e.message}") from None
        self.end_of_turn = self._find_end_of_turn(control_tokens)
        self.end_of_turn_id = None if self.end_of_turn is None else token_id(self.end_of_turn)
        self._probe_prompt_text = self.render([{"role": "user", "content": _PROBE_USER}], add_generation_prompt=True)
        self._probe_prompt = encode(self._probe_prompt_text)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: expected {{'role': str, 'content': str}}, got {m!r}")
        try:
            return self._template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined calls, sandbox refusals
            raise ChatTemplateError(self.source, f"{type(e).__name__}: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(self.source, f"{type(e).__name__}: {e}") from None

    def apply(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self._encode(self.render(messages, add_generation_prompt))

    def _find_end_of_turn(self, control_tokens: list[str]) -> str | None:
        text = self.render([{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}],
                           add_generation_prompt=False)
        at = text.rfind(_PROBE_REPLY)
        if at < 0:
            return None
        after = text[at + len(_PROBE_REPLY):].lstrip()
        # longest first: "<|im_end|>" must not be taken for a shorter token it starts with
        for token in sorted(control_tokens, key=len, reverse=True):
            if token and not token.isspace() and after.startswith(token):
                return token
        return None

    def reply_ids(self, text: str, finished: bool, end_id: int | None) -> list[int]:
        """Ids of an assistant reply after the generation prompt; when finished, through end_id (the end of
        turn; appended when the template writes none, as a model must still stop)."""
        turn = [{"role": "user", "content": _PROBE_USER}]
        if finished:
            full_text = self.render(turn + [{"role": "assistant", "content": text}], add_generation_prompt=False)
        else:
            # as transformers' continue_final_message: the reply rendered, the text cut where it ends
            rendered = self.render(turn + [{"role": "assistant", "content": text + _OPEN_REPLY}], False)
            at = rendered.rfind(_OPEN_REPLY)
            if at < 0:
                raise ChatTemplateError(self.source, "it does not render an assistant message's content as given; "
                                        "name a built-in format (model.chat_template: llama2|llama3|chatml)")
            full_text = rendered[:at]
        if not full_text.startswith(self._probe_prompt_text):
            raise ChatTemplateError(self.source, "an assistant reply does not continue its generation prompt "
                                    "(add_generation_prompt), so replies cannot be trained on; name a built-in "
                                    "format (model.chat_template: llama2|llama3|chatml)")
        full, prompt = self._encode(full_text), self._probe_prompt
        if full[:len(prompt)] == prompt:
            tail = full[len(prompt):]
        else:
            # The tokenizer merges across the boundary (a GPT-2 split keeps a final "\n\n" whole, not one
            # before text): the reply tokenized on its own, as the sampler produces it after the prompt's ids.
            tail = self._encode(full_text[len(self._probe_prompt_text):])
        if not finished:
            return tail
        if end_id is not None and end_id in tail:
            return tail[:len(tail) - tail[::-1].index(end_id)]
        return tail + ([end_id] if end_id is not None else [])

"""The Ollama Modelfile a GGUF export carries: FROM the file, a TEMPLATE that gives the prompt training used,
PARAMETER stop for every end-of-turn token, and SYSTEM when the recipe had a system prompt.

Ollama's templates are Go templates, not Jinja, so the chat template is not translated: it is rendered with
marker strings in place of the system message, the user's message and the reply, and the text between the
markers becomes the template's literal parts (`{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}` between).
That gives exactly training's single-turn prompt; a conversation of several turns repeats it turn by turn
(Ollama's legacy template form), which training never saw. A prompt trained in plain text (data.chat false)
becomes `data.template` with the prompt field as `{{ .Prompt }}`.
"""

from __future__ import annotations

import json
import string

from grpo_cli.export.protocol import Trained
from grpo_cli.rollout.sampling import eos_token_ids

MODELFILE = "Modelfile"
_SYSTEM, _USER, _REPLY = "GRPOSYSTEMMARKER7F3A", "GRPOUSERMARKER7F3A", "GRPOREPLYMARKER7F3A"


def go_literal(text: str) -> str:
    """`text` as literal Go-template text inside TEMPLATE \"\"\"...\"\"\": pieces that would open an action or
    close the block are written as Go string actions."""
    if "{{" not in text and "}}" not in text and '"""' not in text and not text.endswith('"'):
        return text
    return "{{ " + json.dumps(text) + " }}"  # a JSON string is a valid Go string literal


def _turn_end(tokenizer, kwargs: dict) -> str:
    """What the chat template writes after an assistant's reply, closing its turn ("<|im_end|>\n")."""
    turn = tokenizer.apply_chat_template([{"role": "user", "content": _USER}, {"role": "assistant", "content": _REPLY}],
                                         tokenize=False, **kwargs)
    return turn.split(_REPLY, 1)[1] if _REPLY in turn else ""


def _chat_template(trained: Trained) -> str:
    """The Go template for a chat-prompted model, from its chat template rendered with markers."""
    from grpo_cli.data.examples import render_chat

    tokenizer, kwargs = trained.tokenizer, trained.template_kwargs
    with_system = render_chat(tokenizer, [{"role": "system", "content": _SYSTEM},
                                          {"role": "user", "content": _USER}], kwargs)
    without = "".join(_split(render_chat(tokenizer, [{"role": "user", "content": _USER}], kwargs)))
    if _SYSTEM in with_system:
        body = "{{ if .System }}" + "".join(_split(with_system)) + "{{ else }}" + without + "{{ end }}"
    else:  # a template that has no place for a system message
        body = without
    return body + "{{ .Response }}" + go_literal(_turn_end(tokenizer, kwargs))


def _split(rendered: str):
    """The rendered prompt's literal pieces (escaped) and its markers as Go actions, in order."""
    rest = rendered
    actions = {_SYSTEM: "{{ .System }}", _USER: "{{ .Prompt }}"}
    while rest:
        found = [(rest.find(m), m) for m in actions if m in rest]
        if not found:
            yield go_literal(rest)
            return
        at, marker = min(found)
        if at:
            yield go_literal(rest[:at])
        yield actions[marker]
        rest = rest[at + len(marker):]


def _plain_template(trained: Trained) -> tuple[str, str | None]:
    """(Go template, a note) for plain-text prompts: data.template with its prompt field as the prompt."""
    spec = trained.recipe.data
    if spec.template is None:
        return "{{ .Prompt }}{{ .Response }}", None
    fields = {name for _, name, _, _ in string.Formatter().parse(spec.template) if name}
    if fields - {spec.prompt_field}:
        return "{{ .Prompt }}{{ .Response }}", (f"data.template uses the fields {', '.join(sorted(fields))}: send the "
                                                "whole filled-in prompt as the message")
    rendered = spec.template.format(**{spec.prompt_field: _USER})
    return "".join(_split(rendered)) + "{{ .Response }}", None


def stop_tokens(trained: Trained) -> list[str]:
    """Every token that ends the model's turn: those generation stops at (the EOS and the generation config's
    eos_token_id list), and the special tokens the chat template closes an assistant turn with."""
    tokenizer = trained.tokenizer
    stops = [tokenizer.convert_ids_to_tokens(i) for i in eos_token_ids(trained.model, tokenizer)]
    if getattr(tokenizer, "chat_template", None):
        after = _turn_end(tokenizer, trained.template_kwargs)
        specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                         if t.special}
        stops += [s for s in sorted(specials, key=after.find) if s and s in after]
    return list(dict.fromkeys(s for s in stops if s))


def modelfile(gguf_name: str, trained: Trained) -> str:
    """The Modelfile for the GGUF file `gguf_name` in the same directory."""
    recipe, chat = trained.recipe, trained.chat
    template, note = (_chat_template(trained), None) if chat else _plain_template(trained)
    lines = [f"# Ollama: ollama create NAME -f {MODELFILE}. The TEMPLATE gives the prompt training used "
             "(one turn).", f"FROM ./{gguf_name}"]
    if note:
        lines.append(f"# {note}")
    lines.append(f'TEMPLATE """{template}"""')
    system = recipe.data.system_prompt if recipe is not None and chat else None
    if system:
        if '"""' in system:
            lines.append("# SYSTEM left out: the recipe's system prompt contains three double quotes in a row, which "
                         "a Modelfile cannot quote; pass it with each request")
        else:
            lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stop_tokens(trained)]
    return "\n".join(lines) + "\n"

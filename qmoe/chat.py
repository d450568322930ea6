"""A model's chat template (tokenizer.chat_template, Jinja) applied to messages: what
`qmoe run --chat` and `qmoe serve`'s /v1/chat/completions feed the model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmoe.errors import QmoeError

if TYPE_CHECKING:
    from qmoe.engine import Model


def render_chat(model: Model, messages: list[dict]) -> str:
    """The model's chat template applied to `messages`, ending with the assistant's turn."""
    template = model.tokenizer.chat_template
    if not template:
        raise QmoeError(f"{model.path}: the model has no chat template (tokenizer.chat_template); "
                        "use plain completions (run without --chat, or /v1/completions)")
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tok = model.tokenizer
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True,
            bos_token=tok.decode([tok.bos_id]) if tok.bos_id is not None else "",
            eos_token=tok.decode([tok.eos_id]) if tok.eos_id is not None else "",
        )
    except TemplateError as e:  # the template refuses these messages (raise_exception), or is broken
        raise QmoeError(f"{model.path}: the chat template failed on these messages: {e}") from None

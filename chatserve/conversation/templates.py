"""Conversation templates: one table row per family, one renderer for all of them.

A template renders `[{role, content}, ...]` to the exact prompt text a model was trained on, ending with
the generation prefix (the text before the assistant's reply). The same rendering is used for every turn,
so turn N's prompt is a strict prefix of turn N+1's and the worker's prefix cache reuses it.

Rendering model:
    [bos] system_format(system)? (user_format(u) | assistant_format(a))* generation_prefix
`system_in_first_user` folds the system prompt into the first user turn (LLaMA-2 chat).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    description: str
    user: str  # "{content}" is replaced
    assistant: str  # a finished assistant turn
    generation_prefix: str
    system: str = "{content}"
    default_system: str = ""
    stop: tuple[str, ...] = ()
    add_bos: bool = True  # prepend the tokenizer's BOS token (LLaMA's <s>)
    system_in_first_user: str | None = None  # format with {system} and {content} for the first user turn
    aliases: tuple[str, ...] = ()
    match: tuple[str, ...] = ()  # substrings of a model name that select this template

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        system, turns = _split_system(messages, self.default_system)
        out: list[str] = []
        if system and self.system_in_first_user is None:
            out.append(self.system.replace("{content}", system))
        first_user = True
        for msg in turns:
            content = msg["content"]
            if msg["role"] == "user":
                if first_user and system and self.system_in_first_user is not None:
                    out.append(
                        self.user.replace(
                            "{content}",
                            self.system_in_first_user.replace("{system}", system).replace("{content}", content),
                        )
                    )
                else:
                    out.append(self.user.replace("{content}", content))
                first_user = False
            else:
                out.append(self.assistant.replace("{content}", content))
        if add_generation_prompt:
            out.append(self.generation_prefix)
        return "".join(out)


def _split_system(messages: list[dict[str, str]], default: str) -> tuple[str, list[dict[str, str]]]:
    """Join every system message (in order) into one system prompt; the rest are the turns."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    return ("\n\n".join(systems) if systems else default), turns


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

TEMPLATES: tuple[Template, ...] = (
    Template(
        name="vicuna_v1.1",
        description="Vicuna v1.1/v1.3/v1.5 (FastChat): USER:/ASSISTANT:, </s> after replies",
        system="{content} ",
        default_system=VICUNA_SYSTEM,
        user="USER: {content} ",
        assistant="ASSISTANT: {content}</s>",
        generation_prefix="ASSISTANT:",
        stop=("</s>",),
        aliases=("vicuna",),
        match=("vicuna", "wizardlm", "longchat"),
    ),
    Template(
        name="vicuna_v0",
        description="Vicuna v0: ### Human:/### Assistant:, stop at ###",
        system="{content}\n###",
        default_system=VICUNA_V0_SYSTEM,
        user=" Human: {content}\n###",
        assistant=" Assistant: {content}\n###",
        generation_prefix=" Assistant:",
        stop=("###",),
        match=("vicuna-v0", "vicuna_v0"),
    ),
    Template(
        name="alpaca",
        description="Stanford Alpaca instruction format",
        system="{content}\n\n",
        default_system=ALPACA_SYSTEM,
        user="### Instruction:\n{content}\n\n",
        assistant="### Response:\n{content}</s>\n\n",
        generation_prefix="### Response:\n",
        stop=("</s>", "### Instruction:"),
        match=("alpaca",),
    ),
    Template(
        name="llama-2",
        description="LLaMA-2 chat: [INST] <<SYS>> ... <</SYS>> ... [/INST]",
        user="[INST] {content} [/INST]",
        assistant=" {content} </s><s>",
        generation_prefix="",
        system_in_first_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        stop=("</s>",),
        aliases=("llama2",),
        match=("llama-2", "llama2"),
    ),
    Template(
        name="llama-3",
        description="LLaMA-3 instruct headers with <|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
        generation_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        stop=("<|eot_id|>",),
        aliases=("llama3",),
        match=("llama-3", "llama3"),
    ),
    Template(
        name="chatml",
        description="ChatML (<|im_start|>role ... <|im_end|>), used by SmolLM2, Qwen and others",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
        generation_prefix="<|im_start|>assistant\n",
        stop=("<|im_end|>",),
        add_bos=False,
        match=("smollm", "qwen", "chatml"),
    ),
    Template(
        name="belle",
        description="BELLE: Human: / Assistant:, EOS after replies",
        system="{content}\n\n",
        user="Human: \n{content}\n\n",
        assistant="Assistant: \n{content}</s>",
        generation_prefix="Assistant: \n",
        stop=("</s>", "Human:"),
        match=("belle",),
    ),
    Template(
        name="zero_shot",
        description="Plain ### Human:/### Assistant: turns, no example",
        system="{content}\n",
        default_system=VICUNA_V0_SYSTEM,
        user="### Human: {content}\n",
        assistant="### Assistant: {content}\n",
        generation_prefix="### Assistant:",
        stop=("###",),
    ),
    Template(
        name="raw",
        description="Message contents joined by newlines, no roles (base models)",
        system="{content}\n",
        user="{content}\n",
        assistant="{content}\n",
        generation_prefix="",
        add_bos=True,
    ),
)
DEFAULT_TEMPLATE = "zero_shot"


@dataclass(slots=True)
class TemplateRegistry:
    templates: dict[str, Template] = field(default_factory=dict)

    @classmethod
    def builtin(cls) -> TemplateRegistry:
        reg = cls()
        for t in TEMPLATES:
            reg.templates[t.name] = t
            for alias in t.aliases:
                reg.templates.setdefault(alias, t)
        return reg

    def names(self) -> list[str]:
        return [t.name for t in TEMPLATES if t.name in self.templates]

    def get(self, name: str) -> Template:
        try:
            return self.templates[name]
        except KeyError:
            raise KeyError(f"unknown chat template {name!r}; known: {', '.join(self.names())}") from None

    def match(self, model_name: str) -> Template | None:
        """The family template whose match strings occur in the model name (longest match wins)."""
        lowered = model_name.lower()
        best: tuple[int, Template] | None = None
        for t in TEMPLATES:
            for needle in t.match:
                if needle in lowered and (best is None or len(needle) > best[0]):
                    best = (len(needle), t)
        return best[1] if best else None

"""Conversation templates: one table row per family, one renderer for all of them.

A template renders `[{role, content}, ...]` to the exact prompt text a model was trained on, ending with
the generation prefix (the text before the assistant's reply). The same rendering is used for every turn,
so turn N's prompt is a strict prefix of turn N+1's and the worker's prefix cache reuses it.

Rendering model:
    [bos] system_format(system)? (user_format(u) | assistant_format(a))* generation_prefix
`system_in_first_user` folds the system prompt into the first user turn (LLaMA-2 chat).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


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
    # a user message right after another user message is an input to it (Alpaca's "### Input:")
    user_input: str | None = None
    default_system_with_input: str = ""
    examples: tuple[tuple[str, str], ...] = ()  # a fixed exchange after the system prompt (one-shot)
    aliases: tuple[str, ...] = ()
    match: tuple[str, ...] = ()  # substrings of a model name that select this template

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        default = self.default_system
        if self.user_input is not None and _first_user_has_input(messages):
            default = self.default_system_with_input
        system, turns = _split_system(messages, default)
        out: list[str] = []
        if system and self.system_in_first_user is None:
            out.append(self.system.replace("{content}", system))
        for question, answer in self.examples:
            out += [self.user.replace("{content}", question), self.assistant.replace("{content}", answer)]
        first_user = True
        previous = ""
        for msg in turns:
            content = msg["content"]
            if msg["role"] == "user" and previous == "user" and self.user_input is not None:
                out.append(self.user_input.replace("{content}", content))
            elif msg["role"] == "user":
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
            previous = msg["role"]
        if add_generation_prompt:
            out.append(self.generation_prefix)
        return "".join(out)


def _first_user_has_input(messages: list[dict[str, str]]) -> bool:
    roles = [m["role"] for m in messages if m["role"] != "system"]
    return roles[:2] == ["user", "user"]


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
ALPACA_SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ONE_SHOT_EXAMPLE = (
    "What are the key differences between renewable and non-renewable energy sources?",
    "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, "
    "such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are "
    "finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences "
    "between renewable and non-renewable energy sources:\n"
    "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources are "
    "finite and will eventually run out.\n"
    "2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable "
    "sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n"
    "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower "
    "operational costs than non-renewable sources.\n"
    "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations "
    "than non-renewable sources.\n"
    "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations "
    "and needs, while non-renewable sources are more rigid and inflexible.\n"
    "6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable "
    "sources are not, and their depletion can lead to economic and social instability.",
)

# FastChat's zero_shot / one_shot (ADD_COLON_SINGLE, sep "\n### ")
ZERO_SHOT = Template(
    name="zero_shot",
    description="### Human: / ### Assistant: turns, no example",
    system="{content}\n",
    default_system=VICUNA_V0_SYSTEM,
    user="### Human: {content}\n",
    assistant="### Assistant: {content}\n",
    generation_prefix="### Assistant:",
    stop=("###",),
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
        # exactly Stanford Alpaca's training prompt (train.py PROMPT_DICT, target = output + EOS); a second,
        # consecutive user message is the optional "### Input:". Later turns repeat the block.
        name="alpaca",
        description="Stanford Alpaca: ### Instruction: / ### Input: / ### Response:",
        system="{content}\n\n",
        default_system=ALPACA_SYSTEM,
        default_system_with_input=ALPACA_SYSTEM_WITH_INPUT,
        user="### Instruction:\n{content}\n\n",
        user_input="### Input:\n{content}\n\n",
        assistant="### Response:{content}</s>\n\n",
        generation_prefix="### Response:",
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
        # ColossalChat's Coati (applications/Chat/coati/dataset/conversation.py, ADD_EOS_TOKEN style)
        name="colossalchat",
        description="ColossalChat (Coati): Human: ...</s>Assistant: ...</s>",
        system="{content}\n\n",
        default_system=VICUNA_V0_SYSTEM,
        user="Human: {content}</s>",
        assistant="Assistant: {content}</s>",
        generation_prefix="Assistant: ",
        stop=("</s>", "Human:"),
        aliases=("coati",),
        match=("coati", "colossalchat"),
    ),
    Template(
        # Colossal-LLaMA-2 (applications/Colossal-LLaMA-2 conversation.py, ADD_BOS_EOS_TOKEN style)
        name="colossal-llama-2",
        description="Colossal-LLaMA-2: Human: <s>...</s>Assistant: <s>...</s>",
        system="{content}\n\n",
        default_system=VICUNA_V0_SYSTEM,
        user="Human: <s>{content}</s>",
        assistant="Assistant: <s>{content}</s>",
        generation_prefix="Assistant: <s>",
        stop=("</s>",),
        match=("colossal-llama", "colossal_llama"),
    ),
    Template(
        # Mistral's [INST] format (Mistral-7B-Instruct's model card): no system role, the system prompt goes
        # before the first user message
        name="mistral",
        description="Mistral instruct: [INST] ... [/INST] answer</s>",
        user="[INST] {content} [/INST]",
        assistant="{content}</s> ",
        generation_prefix="",
        system_in_first_user="{system}\n\n{content}",
        stop=("</s>",),
        match=("mistral", "mixtral"),
    ),
    Template(
        # Phi-3's chat format (its model card): <|role|> headers, <|end|> after each turn
        name="phi-3",
        description="Phi-3: <|user|> / <|assistant|> turns ending in <|end|>",
        system="<|system|>\n{content}<|end|>\n",
        user="<|user|>\n{content}<|end|>\n",
        assistant="<|assistant|>\n{content}<|end|>\n",
        generation_prefix="<|assistant|>\n",
        stop=("<|end|>",),
        aliases=("phi3",),
        match=("phi-3", "phi3"),
    ),
    Template(
        # DeepSeek-R1 distills (Llama and Qwen): the generation prompt opens the reasoning span
        name="deepseek-r1",
        description="DeepSeek-R1 distills: <｜User｜> / <｜Assistant｜>, the reply starts inside <think>",
        user="<｜User｜>{content}",
        assistant="<｜Assistant｜>{content}<｜end▁of▁sentence｜>",
        generation_prefix="<｜Assistant｜><think>\n",
        stop=("<｜end▁of▁sentence｜>",),
        match=("deepseek-r1", "r1-distill"),
    ),
    ZERO_SHOT,
    replace(ZERO_SHOT, name="one_shot", examples=(ONE_SHOT_EXAMPLE,),
            description="zero_shot with FastChat's one example exchange before the conversation"),
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
